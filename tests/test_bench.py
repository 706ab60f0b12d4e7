"""``strnet bench`` on a tiny setting: every figure is measured against its own ceiling and written down.

Speed itself is never asserted here (timed tests are flaky on shared CPUs); the bench's job in CI is to run."""

from __future__ import annotations

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


def test_real_preprocessing_throughput_is_measured() -> None:
    row = bench.bench_preprocess(bench.Sizes(preprocess_images=4))
    assert row["radiographs_per_s"] > 0 and row["radiographs_per_s_1_thread"] > 0
