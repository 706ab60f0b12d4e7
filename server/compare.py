"""Centralized vs federated, side by side, read back from MLflow (``strnet compare``).

Both modes log the same metric names (:mod:`strnet.scoring`: pooled ``test_*``/``val_*``, ``tau_star``,
per-site ``site.<name>.test_*``, ``wall_seconds``), so the comparison is a join on names, not a translation
table. Where the two runs' recipes differ (their ``recipe.*`` tags), the differences are listed too.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from server.tracking import search_runs
from strnet.plots import comparison_plot

HEADLINE = (
    "test_screening_auroc",
    "test_screening_auroc_ci_lo",
    "test_screening_auroc_ci_hi",
    "test_screening_auprc",
    "test_screening_sensitivity",
    "test_screening_specificity",
    "test_t_score_mae",
    "val_screening_auprc",
    "tau_star",
    "best_step",
    "wall_seconds",
    "privacy_epsilon",  # DP-SGD runs: the largest site's ε over the whole run, at privacy_delta
    "privacy_delta",
)
SITE_KEYS = (
    "test_screening_auroc",
    "test_screening_auprc",
    "test_screening_sensitivity",
    "test_screening_specificity",
    "test_t_score_mae",
    "privacy_epsilon",
)


def latest_runs(uri: str | None, experiment: str, run_ids: list[str] | None = None) -> pd.DataFrame:
    """The newest finished run of each mode (or exactly the given run ids)."""
    runs = search_runs(uri, experiment)
    if runs.empty:
        raise LookupError(f"no runs in MLflow experiment {experiment!r}")
    if run_ids:
        picked = runs[runs["run_id"].isin(run_ids)]
        missing = set(run_ids) - set(picked["run_id"])
        if missing:
            raise LookupError(f"run(s) not found in {experiment!r}: {', '.join(sorted(missing))}")
        return picked
    runs = runs[runs["status"] == "FINISHED"]
    if "tags.mode" not in runs:
        raise LookupError(f"no runs with a 'mode' tag in {experiment!r}")
    picked = runs.dropna(subset=["tags.mode"]).groupby("tags.mode", sort=False).head(1)
    return picked


def comparison_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Rows: metrics (headline, then per-site); columns: one per run, labelled by mode."""
    columns = {}
    for _, run in runs.iterrows():
        label = _label(run)
        values = {}
        for key in HEADLINE:
            values[key] = run.get(f"metrics.{key}")
        site_cols = sorted(c for c in run.index if c.startswith("metrics.site."))
        for col in site_cols:
            name = col[len("metrics.") :]
            if name.rsplit(".", 1)[-1] in SITE_KEYS:
                values[name] = run[col]
        columns[label] = values
    table = pd.DataFrame(columns)
    return table.dropna(how="all")


def recipe_differences(runs: pd.DataFrame) -> pd.DataFrame:
    """The ``recipe.*`` tags whose values differ between the compared runs (empty when the recipes agree)."""
    cols = sorted(c for c in runs.columns if c.startswith("tags.recipe."))
    table = pd.DataFrame(
        {_label(run): {c[len("tags.") :]: run.get(c) for c in cols} for _, run in runs.iterrows()}, dtype=object
    )
    if table.empty:
        return table
    return table[table.astype(str).nunique(axis=1) > 1]


def _label(run: pd.Series) -> str:
    return f"{run.get('tags.mode', 'run')} ({str(run['run_id'])[:8]})"


def compare(
    uri: str | None, experiment: str, out_dir: Path, run_ids: list[str] | None = None
) -> tuple[pd.DataFrame, pd.DataFrame, Path]:
    """The metrics table, the recipe differences and the figure, also written to ``out_dir``."""
    runs = latest_runs(uri, experiment, run_ids)
    table, recipes = comparison_table(runs), recipe_differences(runs)
    out_dir.mkdir(parents=True, exist_ok=True)
    table.to_csv(out_dir / "comparison.csv")
    text = table.to_string(float_format=lambda v: f"{v:.3f}")
    if not recipes.empty:
        text += "\n\nrecipe differences:\n" + recipes.to_string()
    (out_dir / "comparison.txt").write_text(text + "\n")
    return table, recipes, comparison_plot(table, out_dir / "comparison.png")
