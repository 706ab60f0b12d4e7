from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score
from test_knee_copies import export, film

from simulations.leak_probe import auroc_without_seen, seen_in_training
from strnet.data.manifest import normalize


def test_a_test_knee_whose_mirror_image_is_in_training_counts_as_seen(tmp_path: Path) -> None:
    paths = {}
    for name, img in {"a": film(1), "a_mirror": export(film(1), mirror=True), "b": film(2), "c": film(3)}.items():
        paths[name] = str(tmp_path / f"{name}.png")
        assert cv2.imwrite(paths[name], img)
    rows = [
        {"path": paths["a"], "site": "s1", "split": "train", "label_cls": "osteopenia"},
        {"path": paths["a_mirror"], "site": "s2", "split": "test", "label_cls": "osteopenia"},
        {"path": paths["b"], "site": "s2", "split": "test", "label_cls": "normal"},
        {"path": paths["c"], "site": "s1", "split": "val", "label_cls": "normal"},
    ]
    seen = seen_in_training(normalize(pd.DataFrame(rows)))
    assert seen.tolist() == [False, True, False, False]  # the training row itself is not "seen": it is trained on


def test_auroc_without_seen_knees_matches_sklearn_on_the_kept_rows() -> None:
    rng = np.random.default_rng(0)
    n = 40
    frame = pd.DataFrame(
        {
            "site": np.repeat(["s1", "s2"], n // 2),
            "label_cls": rng.choice(["normal", "osteopenia"], n),
            "seen_in_training": rng.random(n) < 0.3,
        }
    )
    score = rng.random(n)
    table = auroc_without_seen(frame, {"m": score}).set_index(["cohort", "subset"])
    y = (frame["label_cls"] != "normal").to_numpy(int)
    for site in ("s1", "s2"):
        mine = (frame["site"] == site).to_numpy()
        unseen = mine & ~frame["seen_in_training"].to_numpy()
        assert table.loc[(site, "all"), "m"] == pytest.approx(roc_auc_score(y[mine], score[mine]))
        assert table.loc[(site, "unseen"), "m"] == pytest.approx(roc_auc_score(y[unseen], score[unseen]))
        assert table.loc[(site, "unseen"), "knees"] == unseen.sum()
