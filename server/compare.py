"""Centralized vs federated, side by side, read back from MLflow (``strnet compare``).

Both modes log the same metric names (:mod:`strnet.scoring`: pooled ``test_*``/``val_*``, ``tau_star``,
per-site ``site.<name>.test_*``, ``wall_seconds``), so the comparison is a join on names, not a translation
table. Where the two runs' recipes differ (their ``recipe.*`` tags), the differences are listed too.
"""

from __future__ import annotations

import math
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
    "val_screening_auroc",
    "val_monitored_screening_auroc",  # what the schedule kept its step by: far above the line above, a problem
    "tau_star",
    "best_step",
    "wall_seconds",
    "privacy_epsilon",  # DP-SGD runs: the largest site's ε over the whole run, at privacy_delta
    "privacy_delta",
)
SITE_KEYS = (
    "train_screening_auroc",
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
    """The ``recipe.*`` tags whose values differ between the compared runs (empty when the recipes agree), and
    the ``env.*`` tags that differ: runs on different kinds of CPU or at another precision are different
    draws of one recipe (docs/real-data.md, "Why two runs differ")."""
    cols = sorted(c for c in runs.columns if c.startswith(("tags.recipe.", "tags.env.")))
    table = pd.DataFrame(
        {_label(run): {c[len("tags.") :]: run.get(c) for c in cols} for _, run in runs.iterrows()}, dtype=object
    )
    if table.empty:
        return table
    return table[table.astype(str).nunique(axis=1) > 1]


POOLED = "pooled test (training sites)"
FOREST_METRICS = ("auroc", "sensitivity", "specificity")
INTERVALS = {
    "centralized": "a bootstrap over whole radiographs",
    "federated": "a stratified bootstrap of the pooled (or the site's) histogram counts",
}


def _site_names(run: pd.Series) -> list[str]:
    head, tail = "metrics.site.", ".test_screening_auroc"
    names = [c[len(head) : -len(tail)] for c in run.index if c.startswith(head) and c.endswith(tail)]
    return sorted(n for n in names if any(_finite(run.get(f"{head}{n}.test_screening_{m}")) for m in FOREST_METRICS))


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(float(value))


def forest_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per run, cohort and metric (AUROC, sensitivity and specificity at τ*) with its 95 % interval, as
    each run logged them: ``test_screening_*`` pooled and ``site.<name>.test_screening_*`` per site, each with its
    ``_ci_lo``/``_ci_hi`` (centralized: the radiograph bootstrap; federated: the histogram bootstrap)."""
    rows = []
    for _, run in runs.iterrows():
        listed = [v for v in (run.get("tags.train_sites"), run.get("tags.sites")) if isinstance(v, str) and v]
        train = set(listed[0].split(",")) if listed else None  # runs logged before these tags: no role shown
        cohorts = [(POOLED, "")] + [
            (name if train is None or name in train else f"{name} (external)", f"site.{name}.")
            for name in _site_names(run)
        ]
        for cohort, head in cohorts:
            for metric in FOREST_METRICS:
                key = f"metrics.{head}test_screening_{metric}"
                value, lo, hi = (run.get(key + tail, math.nan) for tail in ("", "_ci_lo", "_ci_hi"))
                rows.append({"run": _legend(run), "mode": run.get("tags.mode"), "cohort": cohort, "metric": metric}
                            | {"value": value, "lo": lo, "hi": hi})  # fmt: skip
    frame = pd.DataFrame(rows, columns=["run", "mode", "cohort", "metric", "value", "lo", "hi"])
    order = [POOLED, *sorted(set(frame["cohort"]) - {POOLED}, key=lambda c: (c.endswith("(external)"), c))]
    frame["cohort"] = pd.Categorical(frame["cohort"], categories=order, ordered=True)
    out = frame.sort_values(["cohort", "run"], kind="stable").reset_index(drop=True)
    out["cohort"] = out["cohort"].astype(str)
    for c in ("value", "lo", "hi"):
        out[c] = pd.to_numeric(out[c], errors="coerce")
    return out


def forest_caption(runs: pd.DataFrame) -> str:
    """τ* in words (never plotted as a score) and where each run's intervals come from."""
    taus = ", ".join(
        f"{r.get('tags.mode', 'run')} τ* = {float(r['metrics.tau_star']):.2f}"
        for _, r in runs.iterrows()
        if _finite(r.get("metrics.tau_star"))
    )
    modes = [str(r.get("tags.mode")) for _, r in runs.iterrows()]
    how = "; ".join(f"{m}: {INTERVALS[m]}" for m in dict.fromkeys(modes) if m in INTERVALS)
    return (
        f"Frozen test evaluation. Sensitivity and specificity are read at each run's own threshold ({taus}),\n"
        f"chosen on validation and frozen. Pooled = the training sites' test splits; an external site: its whole "
        f"cohort. Dotted line: AUROC 0.5 (chance). 95 % intervals: {how}."
    )


def _legend(run: pd.Series) -> str:
    name = run.get("tags.mlflow.runName")
    return f"{name if isinstance(name, str) and name else run.get('tags.mode', 'run')} ({str(run['run_id'])[:8]})"


def _label(run: pd.Series) -> str:
    return f"{run.get('tags.mode', 'run')} ({str(run['run_id'])[:8]})"


def compare(
    uri: str | None, experiment: str, out_dir: Path, run_ids: list[str] | None = None
) -> tuple[pd.DataFrame, pd.DataFrame, Path]:
    """The metrics table, the recipe differences and the forest figure (its numbers in ``forest.csv``), also
    written to ``out_dir``."""
    runs = latest_runs(uri, experiment, run_ids)
    table, recipes = comparison_table(runs), recipe_differences(runs)
    out_dir.mkdir(parents=True, exist_ok=True)
    table.to_csv(out_dir / "comparison.csv")
    text = table.to_string(float_format=lambda v: f"{v:.3f}")
    if not recipes.empty:
        text += "\n\nrecipe differences:\n" + recipes.to_string()
    (out_dir / "comparison.txt").write_text(text + "\n")
    forest = forest_table(runs)
    forest.to_csv(out_dir / "forest.csv", index=False)
    return table, recipes, comparison_plot(forest, forest_caption(runs), out_dir / "comparison.png")
