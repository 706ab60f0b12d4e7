from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from server.compare import compare
from server.tracking import Tracker
from strnet.cli import main as cli_main


def log_run(uri: str, mode: str, metrics: dict[str, float], step: str = "epoch", native_bf16: str = "False") -> str:
    tracker = Tracker(uri=uri, experiment="cmp")
    tags = {"mode": mode, "recipe.step": step, "recipe.optimizer": "AdamW", "env.torch": "2.14.1"}
    tags["env.native_bf16"] = native_bf16
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
        native_bf16="True",
    )
    table, recipes, figure = compare(uri, "cmp", tmp_path / "out")
    assert list(table.columns) == [f"federated ({fed[:8]})", f"centralized ({cen[:8]})"]
    assert table.loc["test_screening_auroc"].tolist() == pytest.approx([0.89, 0.91])
    assert table.loc["site.a.test_screening_auroc"].tolist() == pytest.approx([0.88, 0.9])
    assert "not_a_number" not in table.index
    # only the recipe and host entries that differ between the runs are listed, and written beside the table
    assert recipes.index.tolist() == ["env.native_bf16", "recipe.step"]
    assert "round of 1 local epoch(s)" in (tmp_path / "out" / "comparison.txt").read_text()
    assert figure.stat().st_size > 0 and (tmp_path / "out" / "comparison.csv").is_file()


def test_compare_cli_reports_missing_experiment(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    uri = f"sqlite:///{tmp_path / 'empty.db'}"
    assert cli_main(["compare", "--tracking-uri", uri, "--experiment", "nope", "--out", str(tmp_path)]) == 2
    assert "no runs in MLflow experiment 'nope'" in capsys.readouterr().err


def log_forest_run(
    uri: str, mode: str, name: str, tau: float, values: dict[str, tuple[float, ...]], **tags: str
) -> str:
    """A run as Run.finish logs it: pooled and per-site AUROC/sensitivity/specificity with their intervals."""
    tracker = Tracker(uri=uri, experiment="forest")
    run_id = tracker.start(name, tags={"mode": mode, **tags}, params={})
    metrics: dict[str, float] = {"tau_star": tau}
    for cohort, triple in values.items():
        head = "" if cohort == "pooled" else f"site.{cohort}."
        for key, v in zip(("auroc", "sensitivity", "specificity"), triple, strict=True):
            metrics |= {f"{head}test_screening_{key}": v, f"{head}test_screening_{key}_ci_lo": v - 0.1}
            metrics[f"{head}test_screening_{key}_ci_hi"] = min(1.0, v + 0.05)
    tracker.log_metrics(metrics)
    tracker.end()
    assert run_id is not None
    return run_id


def test_comparison_figure_is_a_forest_plot_with_intervals_and_tau_in_the_caption(tmp_path: Path) -> None:
    from matplotlib.container import ErrorbarContainer

    from server.compare import forest_caption, forest_table, latest_runs
    from strnet.plots import forest_figure

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    nan = float("nan")
    log_forest_run(uri, "centralized", "demo · centralized", 0.42, {
        "pooled": (0.85, 0.86, 0.8), "stage1": (0.9, 0.88, 0.7), "a-much-longer-hospital-name": (0.7, 0.9, 0.5),
    }, sites="stage1")  # fmt: skip
    log_forest_run(uri, "federated", "demo · federated · fedavg", 0.38, {
        "pooled": (0.82, 0.9, 0.7), "stage1": (0.88, 0.9, nan), "a-much-longer-hospital-name": (0.6, 0.95, 0.4),
    }, train_sites="stage1")  # fmt: skip
    compare(uri, "forest", tmp_path / "out")
    forest = pd.read_csv(tmp_path / "out" / "forest.csv")
    assert forest["cohort"].drop_duplicates().tolist() == [
        "pooled test (training sites)",
        "stage1",
        "a-much-longer-hospital-name (external)",
    ]
    shown = forest.dropna(subset=["value"])
    assert len(shown) == 2 * 3 * 3 - 1  # the federated stage1 specificity is undefined
    assert ((shown["lo"] <= shown["value"]) & (shown["value"] <= shown["hi"])).all()

    runs = latest_runs(uri, "forest")
    caption = forest_caption(runs)
    assert "federated τ* = 0.38" in caption and "centralized τ* = 0.42" in caption
    fig = forest_figure(forest_table(runs), caption)
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    fig.draw(renderer)
    panels = [ax for ax in fig.axes if ax.axison]
    assert len(panels) == 3
    for ax in panels:  # every drawn point has its interval; τ* is nowhere a plotted value or a tick
        bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
        assert bars and all(c.has_xerr for c in bars)
        ticks = [t.get_text() for t in ax.get_xticklabels() + ax.get_yticklabels()]
        assert not any("τ" in t or "tau" in t for t in ticks)
    assert sum(len([c for c in ax.containers if isinstance(c, ErrorbarContainer)]) for ax in panels) == len(shown)
    # no two labels overlap, and neither the legend nor the caption covers a panel
    texts = [t for ax in panels for t in (*ax.get_yticklabels(), *ax.get_xticklabels())]
    texts += [t for ax in fig.axes for t in (ax.title, *ax.texts)]
    legend = next(ax.get_legend() for ax in fig.axes if ax.get_legend() is not None)
    texts += list(legend.get_texts())
    boxes = [t.get_window_extent(renderer) for t in texts if t.get_visible() and t.get_text()]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            assert not a.overlaps(b), (a, b)
    caption_box = next(t for ax in fig.axes for t in ax.texts if "τ*" in t.get_text()).get_window_extent(renderer)
    for ax in panels:
        for box in (legend.get_window_extent(renderer), caption_box):
            assert not box.overlaps(ax.get_window_extent(renderer))
