"""``strnet bench`` on a tiny setting: every figure is measured against its own ceiling and written down.

Speed itself is never asserted here (timed tests are flaky on shared CPUs); the bench's job in CI is to run."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest

from configs import load_config
from simulations import bench
from strnet.cli import main as cli_main


def tiny(tmp_path: Path):  # type: ignore[no-untyped-def]
    return load_config(
        "demo",
        [
            "model.backbone=tiny",
            "preprocess.size=32",
            "train.batch_size=4",
            "train.precision=fp32",
            f"data.cache_dir={tmp_path / 'cache'}",
        ],
    )


def test_training_figure_is_the_pipeline_over_the_bare_step(tmp_path: Path) -> None:
    row = bench.bench_training(tiny(tmp_path), steps=2, workdir=tmp_path)
    assert row["pipeline_images_per_s"] > 0 and row["bare_step_images_per_s"] > 0
    assert math.isclose(row["ratio"], row["pipeline_images_per_s"] / row["bare_step_images_per_s"])
    assert (row["backbone"], row["size"], row["steps"]) == ("tiny", 32, 2)


def test_predict_figure_counts_every_knee_through_the_model(tmp_path: Path) -> None:
    sizes = bench.Sizes(predict_files=6, gradcam_files=2)
    row = bench.bench_predict(tiny(tmp_path), sizes, tmp_path)
    assert row["knees"] == 6  # single-knee synthetic films: one knee each, judged or out of distribution
    assert math.isclose(row["ratio"], row["end_to_end_images_per_s"] / row["bare_forward_images_per_s"])
    overlays = list((tmp_path / "gradcam-out").glob("*_gradcam.png"))
    assert len(overlays) == row["gradcam_overlays"] == row["gradcam_judged"]  # one per judged knee


def test_cli_writes_json_and_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench, "bench_preprocess", lambda sizes: {"radiographs_per_s": 321.0, "input": "x"})
    assert cli_main(["bench", "--only", "preprocess", "--quick", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["preprocess"]["radiographs_per_s"] == 321.0 and result["quick"] is True
    assert "321 radiographs/s" in (tmp_path / "bench.md").read_text()
    with pytest.raises(SystemExit):
        bench.main(["--only", "nonsense", "--out", str(tmp_path)])


def test_transport_figure_pairs_fp16_and_fp32_runs_by_seed(tmp_path: Path) -> None:
    import numpy as np
    from scipy import stats

    small = ("model.backbone=tiny", "preprocess.size=32", "train.precision=fp32", "federation.rounds=1")
    small += ("tscore.rounds=0", "ood.enabled=false", "train.batch_size=8", "train.channels_last=false")
    small += ("evaluate.bootstrap=50", "evaluate.figures=false")
    small += (f"data.cache_dir={tmp_path / 'cache'}",)
    args = argparse.Namespace(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    row = bench.bench_transport(args, tmp_path, seeds=2, overrides=small, patients=20, draw_patients=15)
    assert [p["seed"] for p in row["pairs"]] == [42, 43]
    for seed in (42, 43):
        for transport in ("fp16", "fp32"):
            bundle = json.loads((tmp_path / f"seed{seed}-{transport}" / "bundle" / "metadata.json").read_text())
            assert bundle["training"]["transport"]["dtype"] == transport
    for prefix in ("", "draw_"):
        diff = [p[f"{prefix}fp16"] - p[f"{prefix}fp32"] for p in row["pairs"]]
        assert row[f"{prefix}mean_difference"] == pytest.approx(np.mean(diff))
        fp32 = [p[f"{prefix}fp32"] for p in row["pairs"]]
        assert row[f"{prefix}sd_fp32_between_seeds"] == pytest.approx(np.std(fp32, ddof=1))
        low, high = stats.ttest_1samp(diff, 0.0).confidence_interval(0.95)
        assert row[f"{prefix}ci_difference"] == pytest.approx([low, high])
    # the draw: every labelled knee of the training sites of another synthetic draw, none of them trained on
    assert row["draw_knees"] > 0 and all(0.0 <= p["draw_fp16"] <= 1.0 for p in row["pairs"])
    text = bench.table({"transport": row})
    assert "2 seed(s)" in text and f"new draw ({row['draw_knees']} knees)" in text


def test_real_preprocessing_throughput_is_measured() -> None:
    row = bench.bench_preprocess(bench.Sizes(preprocess_images=4))
    assert row["radiographs_per_s"] > 0 and row["radiographs_per_s_1_thread"] > 0
