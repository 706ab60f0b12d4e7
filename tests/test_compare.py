from __future__ import annotations

from pathlib import Path

import pytest

from server.compare import compare
from server.tracking import Tracker
from strnet.cli import main as cli_main


def log_run(uri: str, mode: str, metrics: dict[str, float], step: str = "epoch") -> str:
    tracker = Tracker(uri=uri, experiment="cmp")
    tags = {"mode": mode, "recipe.step": step, "recipe.optimizer": "AdamW"}
    run_id = tracker.start(f"{mode}-run", tags=tags, params={"train.epochs": 1})
    tracker.log_metrics({**metrics, "not_a_number": float("nan")})
    tracker.end()
    assert run_id is not None
    return run_id


def test_compare_puts_newest_runs_of_each_mode_side_by_side(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    log_run(uri, "centralized", {"test_screening_auroc": 0.5})  # older, superseded
    cen = log_run(
        uri, "centralized", {"test_screening_auroc": 0.91, "tau_star": 0.4, "site.a.test_screening_auroc": 0.9}
    )
    fed = log_run(
        uri,
        "federated",
        {"test_screening_auroc": 0.89, "tau_star": 0.42, "site.a.test_screening_auroc": 0.88},
        step="round of 1 local epoch(s)",
    )
    table, recipes, figure = compare(uri, "cmp", tmp_path / "out")
    assert list(table.columns) == [f"federated ({fed[:8]})", f"centralized ({cen[:8]})"]
    assert table.loc["test_screening_auroc"].tolist() == pytest.approx([0.89, 0.91])
    assert table.loc["site.a.test_screening_auroc"].tolist() == pytest.approx([0.88, 0.9])
    assert "not_a_number" not in table.index
    # only the recipe entries that differ between the runs are listed, and written beside the table
    assert recipes.index.tolist() == ["recipe.step"]
    assert "round of 1 local epoch(s)" in (tmp_path / "out" / "comparison.txt").read_text()
    assert figure.stat().st_size > 0 and (tmp_path / "out" / "comparison.csv").is_file()


def test_compare_cli_reports_missing_experiment(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    uri = f"sqlite:///{tmp_path / 'empty.db'}"
    assert cli_main(["compare", "--tracking-uri", uri, "--experiment", "nope", "--out", str(tmp_path)]) == 2
    assert "no runs in MLflow experiment 'nope'" in capsys.readouterr().err
