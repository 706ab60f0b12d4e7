"""The film-format probe: formats read from headers, mean scores per format, AUROC without each format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from simulations.format_probe import auroc_without_each_format, film_format, format_table


def films(tmp_path: Path) -> pd.DataFrame:
    """Square grey films and portrait RGB films, two knees each; one model scores every portrait film low."""
    rows = []
    for i in range(8):
        portrait = i % 2 == 1
        size, mode = ((40, 52), "RGB") if portrait else ((48, 48), "L")
        path = tmp_path / f"film{i}.png"
        Image.new(mode, size).save(path)
        label = "normal" if i in (0, 1, 2) else "osteopenia"
        for side in ("R", "L"):
            rows.append({"path": str(path), "site": "stage2", "split": "train", "label_cls": label, "side": side})
    return pd.DataFrame(rows)


def test_formats_come_from_the_header_and_scores_are_grouped_by_format_label_and_cohort(tmp_path: Path) -> None:
    frame = films(tmp_path)
    frame["format"] = frame["path"].map(film_format)
    assert sorted(frame["format"].unique()) == ["40x52 RGB", "48x48 L"]
    rng = np.random.default_rng(0)
    score = np.where(frame["format"] == "40x52 RGB", 0.1, 0.5 + 0.4 * (frame["label_cls"] != "normal"))
    score = score + rng.normal(0, 0.01, len(frame))
    table = format_table(frame, {"m": score})
    portrait_bone_loss = table[(table["format"] == "40x52 RGB") & table["bone_loss"]]
    assert portrait_bone_loss[["knees", "films"]].values.tolist() == [[6, 3]]  # films 3, 5, 7
    assert portrait_bone_loss["m"].item() == pytest.approx(0.1, abs=0.02)
    assert table["knees"].sum() == len(frame)


def test_auroc_without_each_format_is_scikit_learns_on_the_rest(tmp_path: Path) -> None:
    frame = films(tmp_path)
    frame["format"] = frame["path"].map(film_format)
    score = np.where(frame["format"] == "40x52 RGB", 0.1, 0.5 + 0.4 * (frame["label_cls"] != "normal"))
    score = score + np.random.default_rng(1).normal(0, 0.05, len(frame))
    y = (frame["label_cls"] != "normal").astype(int)
    rows = auroc_without_each_format(frame, {"m": score}).set_index("without")
    assert rows.loc["-", "m"] == pytest.approx(roc_auc_score(y, score))
    square = (frame["format"] == "48x48 L").to_numpy()
    assert rows.loc["40x52 RGB", "m"] == pytest.approx(roc_auc_score(y[square], score[square]))
    assert rows.loc["40x52 RGB", "m"] > rows.loc["-", "m"]  # the low-scored format is what pulled it down
    assert rows.loc["40x52 RGB", "normal"] == 4  # films 0 and 2
