"""The within-source probe: covariates and frozen image features under grouped cross-validation."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from simulations.source_probe import grouped_cv_auroc, main, probe


def knee_manifest(tmp_path: Path, n: int = 24) -> pd.DataFrame:
    """Bilateral-looking films whose age separates the classes and whose pixels do not."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        img = (rng.random((64, 96)) * 60).astype(np.uint8)
        img[8:56, 10:40] += 150
        img[8:56, 56:86] += 150
        path = tmp_path / f"film{i}.png"
        cv2.imwrite(str(path), img)
        label = "normal" if i % 3 == 0 else "osteopenia"
        age = 30.0 + i % 5 if label == "normal" else 60.0 + i % 7
        for side in ("R", "L"):
            rows.append(
                {
                    "path": str(path),
                    "source": "mendeley",
                    "split": "train",
                    "label_cls": label,
                    "age": age,
                    "sex": "F",
                    "bmi": 25.0,
                    "side": side,
                }
            )
    return pd.DataFrame(rows)


def test_covariates_that_separate_the_classes_score_near_one_and_images_run(tmp_path: Path) -> None:
    frame = knee_manifest(tmp_path)
    rows = probe(frame, ["knee32", "joint32", "film32"], backbone="tiny", weights="none", repeats=1)
    by_input = {r["input"]: r for r in rows}
    assert by_input["covariates: age"]["auroc"] == pytest.approx(1.0)
    assert by_input["covariates: age"]["normal"] == 16  # 8 normal films, two knees each
    assert {"frozen tiny: knee32", "frozen tiny: joint32", "frozen tiny: film32"} <= set(by_input)
    assert all(0.0 <= r["auroc"] <= 1.0 for r in rows)


def test_grouped_cv_keeps_the_knees_of_a_film_together() -> None:
    # Two knees of a film share a feature no other film has: a split that separated them would score ~1.
    y = np.repeat(np.arange(20) % 2, 2)
    x = np.repeat(np.random.default_rng(1).normal(size=(20, 1)), 2, axis=0)
    groups = np.repeat(np.arange(20), 2)
    mean, _ = grouped_cv_auroc(x, y, groups, repeats=3)
    assert mean < 0.8


def test_the_probe_refuses_the_test_split(tmp_path: Path) -> None:
    manifest = tmp_path / "split.csv"
    knee_manifest(tmp_path).to_csv(manifest, index=False)
    with pytest.raises(SystemExit):
        main(["--manifest", str(manifest), "--source", "mendeley", "--splits", "train", "test"])
