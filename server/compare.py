"""Centralized vs federated, side by side, read back from MLflow (``strnet compare``).

Both modes log the same metric names (pooled ``test_*``, ``tau_star``, per-site ``site.<name>.*``,
``wall_seconds``), so the comparison is a join on names, not a translation table.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from server.tracking import search_runs

HEADLINE = (
    "test_screening_auroc",
    "test_screening_auprc",
    "tau_star",
    "test_screening_sensitivity",
    "test_screening_specificity",
    "wall_seconds",
)
SITE_KEYS = ("screening_auroc", "screening_auprc", "screening_sensitivity", "screening_specificity", "t_score_mae")


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
        label = f"{run.get('tags.mode', 'run')} ({str(run['run_id'])[:8]})"
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


def comparison_figure(table: pd.DataFrame, out: Path) -> Path:
    """Grouped bars of AUROC/AUPRC (pooled and per site) and τ*, one colour per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in table.index if r.endswith(("screening_auroc", "screening_auprc")) or r == "tau_star"]
    data = table.loc[rows].astype(float)
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows) + 2), 4))
    width = 0.8 / max(1, data.shape[1])
    for i, col in enumerate(data.columns):
        xs = [j + i * width for j in range(len(rows))]
        ax.bar(xs, data[col].fillna(0).to_numpy(), width=width, label=col)
    ax.set_xticks([j + width * (data.shape[1] - 1) / 2 for j in range(len(rows))])
    ax.set_xticklabels(
        [r.replace("test_screening_", "pooled ").replace("site.", "") for r in rows], rotation=30, ha="right"
    )
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("value")
    ax.set_title("Centralized vs federated STR-Net (frozen τ*)")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.45), ncol=max(1, data.shape[1]))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def compare(
    uri: str | None, experiment: str, out_dir: Path, run_ids: list[str] | None = None
) -> tuple[pd.DataFrame, Path]:
    table = comparison_table(latest_runs(uri, experiment, run_ids))
    out_dir.mkdir(parents=True, exist_ok=True)
    table.to_csv(out_dir / "comparison.csv")
    (out_dir / "comparison.txt").write_text(table.to_string(float_format=lambda v: f"{v:.3f}"))
    return table, comparison_figure(table, out_dir / "comparison.png")
