"""Evaluation figures a clinician can read at a glance: every curve shows where τ* actually operates.

Each function takes plain numpy arrays, writes one PNG and returns its path. Figures are built on
``matplotlib.figure.Figure`` with an Agg canvas, never through pyplot, so a long evaluation or a
server process never accumulates open figures. Degenerate inputs (no cases, one class only,
non-finite scores) still produce a PNG that says why the figure is not computable, so a report
never has a hole or a crash where a figure should be.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from strnet import metrics as M
from strnet.sufficient import EvaluationCounts

WHO_OSTEOPENIA = -1.0
WHO_OSTEOPOROSIS = -2.5
_FIGSIZE = (5.5, 4.5)
_DPI = 110


class NotComputable(ValueError):
    """Raised inside a drawing function when the data cannot support the figure; becomes a placeholder."""


def _as_arrays(y_true: Sequence | np.ndarray, y_prob: Sequence | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true, dtype=float).ravel()
    p = np.asarray(y_prob, dtype=float).ravel()
    if y.shape != p.shape:
        raise NotComputable(f"{y.size} labels but {p.size} scores")
    if y.size == 0:
        raise NotComputable("no cases")
    if not np.all(np.isfinite(p)):
        raise NotComputable("some scores are not finite")
    if not np.all(np.isin(y, (0.0, 1.0))):
        raise NotComputable("labels must be 0 (normal) or 1 (bone loss)")
    return y.astype(int), p


def _need_both_classes(y: np.ndarray) -> None:
    if np.unique(y).size < 2:
        only = "bone loss" if y[0] == 1 else "normal"
        raise NotComputable(f"only one class present ({only}, n={y.size})")


def _paired(t_true: Sequence | np.ndarray, t_pred: Sequence | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(t_true, dtype=float).ravel()
    b = np.asarray(t_pred, dtype=float).ravel()
    if a.shape != b.shape:
        raise NotComputable(f"{a.size} reference T-scores but {b.size} predictions")
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    if a.size < 2:
        raise NotComputable(f"fewer than 2 cases with both T-scores (n={a.size})")
    return a, b


def operating_point(
    y_true: Sequence | np.ndarray, y_prob: Sequence | np.ndarray, threshold: float
) -> tuple[float, float]:
    """(false-positive rate, sensitivity) when a case is flagged at prob >= threshold — the point τ* sits on.

    A rate whose denominator is empty (no negatives / no positives) is NaN rather than a misleading 0.
    """
    y = np.asarray(y_true, dtype=int).ravel()
    flag = np.asarray(y_prob, dtype=float).ravel() >= threshold
    pos, neg = y == 1, y == 0
    tpr = float(flag[pos].mean()) if pos.any() else float("nan")
    fpr = float(flag[neg].mean()) if neg.any() else float("nan")
    return fpr, tpr


def _op_label(fpr: float, tpr: float, threshold: float) -> str:
    return f"τ* = {threshold:.3f}: sensitivity {tpr:.1%}, specificity {1 - fpr:.1%}"


def _save(out: str | Path, title: str, draw: Callable[[Axes], None]) -> Path:
    """Draw into a fresh figure; any NotComputable becomes a readable placeholder figure instead."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=_FIGSIZE, dpi=_DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    try:
        draw(ax)
        ax.set_title(ax.get_title() or title, fontsize=10)
    except NotComputable as exc:
        fig.clear()
        ax = fig.add_subplot(1, 1, 1)
        ax.set_axis_off()
        ax.set_title(title, fontsize=11)
        ax.text(0.5, 0.5, f"not computable:\n{exc}", ha="center", va="center", wrap=True, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def roc_curve_plot(
    y_true: Sequence | np.ndarray, y_prob: Sequence | np.ndarray, threshold: float, out: str | Path
) -> Path:
    """ROC with the frozen operating point marked, so the chosen trade-off is visible on the curve."""

    def draw(ax: Axes) -> None:
        y, p = _as_arrays(y_true, y_prob)
        _need_both_classes(y)
        fpr, tpr, _ = roc_curve(y, p)
        auc = roc_auc_score(y, p)
        ax.plot(fpr, tpr, color="tab:blue", lw=2, label=f"STR-Net (AUROC = {auc:.3f})")
        ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance")
        ofpr, otpr = operating_point(y, p, threshold)
        ax.plot([ofpr], [otpr], "o", color="tab:red", ms=8, label=_op_label(ofpr, otpr, threshold))
        ax.set_xlabel("1 − specificity (false-positive rate)")
        ax.set_ylabel("Sensitivity (true-positive rate)")
        ax.set_xlim(-0.01, 1.01)
        ax.set_ylim(-0.01, 1.01)
        ax.set_title(f"ROC — bone-loss screening (n={y.size})")
        ax.legend(loc="lower right", fontsize=8)
        ax.grid(alpha=0.3)

    return _save(out, "ROC — bone-loss screening", draw)


def pr_curve_plot(
    y_true: Sequence | np.ndarray, y_prob: Sequence | np.ndarray, threshold: float, out: str | Path
) -> Path:
    """Precision–recall with the prevalence baseline: the honest view when bone loss is rare or common."""

    def draw(ax: Axes) -> None:
        y, p = _as_arrays(y_true, y_prob)
        _need_both_classes(y)
        precision, recall, _ = precision_recall_curve(y, p)
        ap = average_precision_score(y, p)
        prevalence = float(y.mean())
        ax.step(recall, precision, where="post", color="tab:blue", lw=2, label=f"STR-Net (AUPRC = {ap:.3f})")
        ax.axhline(prevalence, ls="--", color="grey", lw=1, label=f"prevalence = {prevalence:.3f}")
        flag = p >= threshold
        sens = float(flag[y == 1].mean())
        ppv = float(y[flag].mean()) if flag.any() else float("nan")
        spec = 1.0 - float(flag[y == 0].mean())
        if np.isfinite(ppv):
            ax.plot(
                [sens],
                [ppv],
                "o",
                color="tab:red",
                ms=8,
                label=f"τ* = {threshold:.3f}: sensitivity {sens:.1%}, specificity {spec:.1%}, PPV {ppv:.1%}",
            )
        ax.set_xlabel("Recall (sensitivity)")
        ax.set_ylabel("Precision (positive predictive value)")
        ax.set_xlim(-0.01, 1.01)
        ax.set_ylim(-0.01, 1.01)
        ax.set_title(f"Precision–recall — bone-loss screening (n={y.size})")
        ax.legend(loc="lower left", fontsize=8)
        ax.grid(alpha=0.3)

    return _save(out, "Precision–recall — bone-loss screening", draw)


def confusion_matrix_plot(
    y_true: Sequence | np.ndarray,
    y_prob: Sequence | np.ndarray,
    threshold: float,
    out: str | Path,
    labels: tuple[str, str] = ("Normal", "Bone loss"),
) -> Path:
    """Counts with row percentages: each row reads directly as specificity / sensitivity."""

    def draw(ax: Axes) -> None:
        y, p = _as_arrays(y_true, y_prob)
        pred = (p >= threshold).astype(int)
        cm = np.zeros((2, 2), dtype=int)
        np.add.at(cm, (y, pred), 1)
        rows = cm.sum(axis=1, keepdims=True)
        frac = np.divide(cm, rows, out=np.zeros_like(cm, dtype=float), where=rows > 0)
        ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
        for i in range(2):
            for j in range(2):
                pct = f"{frac[i, j]:.1%}" if rows[i, 0] else "n/a"
                colour = "white" if frac[i, j] > 0.6 else "black"
                ax.text(j, i, f"{cm[i, j]}\n({pct})", ha="center", va="center", fontsize=12, color=colour)
        ax.set_xticks([0, 1], [f"Predicted\n{labels[0]}", f"Predicted\n{labels[1]}"])
        ax.set_yticks([0, 1], [f"Reference\n{labels[0]}", f"Reference\n{labels[1]}"])
        ax.set_title(f"Confusion matrix at τ* = {threshold:.3f} (n={y.size})\nrow % = share of each reference class")

    return _save(out, "Confusion matrix", draw)


def score_histogram_plot(
    y_true: Sequence | np.ndarray, y_prob: Sequence | np.ndarray, threshold: float, out: str | Path
) -> Path:
    """Score distribution per reference class, so the overlap around τ* is visible."""

    def draw(ax: Axes) -> None:
        y, p = _as_arrays(y_true, y_prob)
        bins = np.linspace(0.0, 1.0, 21)
        for cls, name, colour in ((0, "Normal", "tab:green"), (1, "Bone loss", "tab:orange")):
            sel = p[y == cls]
            if sel.size:
                ax.hist(np.clip(sel, 0, 1), bins=bins, alpha=0.55, color=colour, label=f"{name} (n={sel.size})")
        ax.axvline(threshold, color="tab:red", ls="--", lw=2, label=f"τ* = {threshold:.3f}")
        ax.set_xlabel("Predicted probability of bone loss")
        ax.set_ylabel("Number of knees")
        ax.set_xlim(0, 1)
        ax.set_title("Score distribution by reference class")
        ax.legend(fontsize=8)

    return _save(out, "Score distribution by reference class", draw)


def reliability_plot(hists: dict[str, np.ndarray], out: str | Path, n_groups: int = 10) -> Path:
    """Reliability diagram from per-class score histograms, one line per scale (e.g. uncalibrated vs Platt):
    does a predicted 30 % mean that about 30 % of such knees have bone loss? ECE and Brier in the legend."""

    def draw(ax: Axes) -> None:
        ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
        drawn = 0
        for (label, hist), colour in zip(hists.items(), ("tab:orange", "tab:blue", "tab:green"), strict=False):
            h = np.asarray(hist)
            if h.sum() == 0:
                continue
            r = M.reliability_from_histogram(h, n_groups)
            keep = np.asarray(r["count"]) > 0
            brier = M.brier_from_histogram(h)
            ax.plot(
                np.asarray(r["predicted"])[keep],
                np.asarray(r["observed"])[keep],
                "o-",
                color=colour,
                lw=2,
                label=f"{label} (ECE {r['ece']:.3f}, Brier {brier:.3f})",
            )
            drawn += 1
        if not drawn:
            raise NotComputable("no scored cases")
        ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="Mean predicted probability of bone loss")
        ax.set_ylabel("Observed fraction with bone loss")
        ax.set_title(f"Reliability ({n_groups} bins)")
        ax.legend(loc="upper left", fontsize=8)
        ax.grid(alpha=0.3)

    return _save(out, "Reliability", draw)


def tscore_scatter_plot(t_true: Sequence | np.ndarray, t_pred: Sequence | np.ndarray, out: str | Path) -> Path:
    """Estimated vs reference T-score over the WHO bands, so misclassification across -1 / -2.5 is visible."""

    def draw(ax: Axes) -> None:
        a, b = _paired(t_true, t_pred)
        lo = float(min(a.min(), b.min(), WHO_OSTEOPOROSIS) - 0.5)
        hi = float(max(a.max(), b.max(), WHO_OSTEOPENIA) + 0.5)
        ax.axvspan(lo, WHO_OSTEOPOROSIS, color="tab:red", alpha=0.08, label="osteoporosis (≤ −2.5)")
        ax.axvspan(WHO_OSTEOPOROSIS, WHO_OSTEOPENIA, color="tab:orange", alpha=0.08, label="osteopenia (−2.5 to −1.0)")
        for t in (WHO_OSTEOPENIA, WHO_OSTEOPOROSIS):
            ax.axvline(t, color="grey", lw=0.8, ls=":")
            ax.axhline(t, color="grey", lw=0.8, ls=":")
        ax.plot([lo, hi], [lo, hi], ls="--", color="black", lw=1, label="identity")
        ax.scatter(a, b, s=14, alpha=0.7, color="tab:blue")
        mae = float(np.mean(np.abs(b - a)))
        r = float(np.corrcoef(a, b)[0, 1]) if np.std(a) > 0 and np.std(b) > 0 else float("nan")
        r_txt = f"{r:.3f}" if np.isfinite(r) else "n/a"
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_xlabel("Reference T-score")
        ax.set_ylabel("Estimated T-score")
        ax.set_title(f"T-score estimate vs reference (n={a.size})\nPearson r = {r_txt}, MAE = {mae:.3f}")
        ax.legend(loc="upper left", fontsize=8)
        ax.grid(alpha=0.3)

    return _save(out, "T-score estimate vs reference", draw)


def bland_altman_plot(t_true: Sequence | np.ndarray, t_pred: Sequence | np.ndarray, out: str | Path) -> Path:
    """Agreement, not correlation: systematic bias and the range within which 95% of differences fall."""

    def draw(ax: Axes) -> None:
        a, b = _paired(t_true, t_pred)
        mean = (a + b) / 2
        diff = b - a
        bias = float(diff.mean())
        sd = float(diff.std(ddof=1))
        lo, hi = bias - 1.96 * sd, bias + 1.96 * sd
        ax.scatter(mean, diff, s=14, alpha=0.7, color="tab:blue")
        ax.axhline(0, color="grey", lw=0.8)
        ax.axhline(bias, color="tab:red", lw=1.5, label=f"bias = {bias:.3f}")
        ax.axhline(hi, color="tab:red", ls="--", lw=1, label=f"+1.96 SD = {hi:.3f}")
        ax.axhline(lo, color="tab:red", ls="--", lw=1, label=f"−1.96 SD = {lo:.3f}")
        ax.set_xlabel("Mean of estimated and reference T-score")
        ax.set_ylabel("Estimated − reference T-score")
        ax.set_title(f"Bland–Altman agreement (n={a.size})")
        ax.legend(loc="best", fontsize=8)
        ax.grid(alpha=0.3)

    return _save(out, "Bland–Altman agreement", draw)


# ----------------------------------------------------------------------------------------------------------------
# a finished run (either mode) and the comparison of runs


def histogram_cases(hist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels and bin-centre scores of a cohort known only by its (pooled) histogram, one entry per case.

    Grid thresholds fall on bin edges, so flagging these centres at τ* gives exactly the cohort's counts.
    """
    h = np.asarray(hist, dtype=np.int64)
    edges = np.linspace(0.0, 1.0, h.shape[1] + 1)
    centres = (edges[:-1] + edges[1:]) / 2.0
    y = np.concatenate([np.zeros(int(h[0].sum()), np.int64), np.ones(int(h[1].sum()), np.int64)])
    return y, np.concatenate([np.repeat(centres, h[0]), np.repeat(centres, h[1])])


def learning_curve_plot(history: Sequence[dict[str, float]], out: str | Path) -> Path:
    """Validation AUROC/AUPRC (pooled, and per site when federated) and the learning rate per epoch or round."""

    def draw(ax: Axes) -> None:
        if not history:
            raise NotComputable("no epochs or rounds")
        steps = [r["step"] for r in history]
        for key, label in (("val_screening_auroc", "AUROC"), ("val_screening_auprc", "AUPRC")):
            ax.plot(steps, [r.get(key, np.nan) for r in history], marker="o", label=f"validation {label}")
        sites = sorted({k.split(".")[1] for r in history for k in r if k.startswith("site.")})
        for site in sites:
            key = f"site.{site}.val_screening_auroc"
            ax.plot(steps, [r.get(key, np.nan) for r in history], ls="--", label=f"{site} AUROC")
        ax.set(xlabel="epoch / round", ylabel="validation score", ylim=(0, 1.02), title="Learning curve")
        ax.legend(fontsize=7, loc="lower right")
        lr = ax.twinx()
        lr.plot(steps, [r.get("lr", np.nan) for r in history], color="grey", lw=1, drawstyle="steps-post")
        lr.set_yscale("log")
        lr.set_ylabel("learning rate", color="grey")

    return _save(out, "Learning curve", draw)


def site_metrics_plot(table: pd.DataFrame, threshold: float, out: str | Path) -> Path:
    """AUROC, sensitivity and specificity at τ* per site and pooled (the evaluation table)."""

    def draw(ax: Axes) -> None:
        keys = ("screening_auroc", "screening_sensitivity", "screening_specificity")
        x = np.arange(len(table))
        for j, key in enumerate(keys):
            values = table[key].astype(float).to_numpy()
            ax.bar(x + (j - 1) * 0.27, np.nan_to_num(values), width=0.27, label=key.split("_", 1)[1])
        ax.set_xticks(x, [str(s).split(" (")[0][:18] for s in table["site"]], fontsize=7)
        ax.set(ylim=(0, 1.05), title=f"Frozen evaluation per site at τ* = {threshold:.2f}")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3)

    return _save(out, "Frozen evaluation per site", draw)


def run_figures(
    out: Path,
    history: Sequence[dict[str, float]],
    table: pd.DataFrame,
    counts: dict[str, EvaluationCounts | None],
    threshold: float,
) -> dict[str, Path]:
    """The figures every finished run writes, from statistics both modes have (never from raw scores):
    ``counts`` are the pooled ``val`` and ``test`` evaluations."""
    figs = {
        "learning_curve": learning_curve_plot(history, out / "learning_curve.png"),
        "sites": site_metrics_plot(table, threshold, out / "sites.png"),
    }
    for split, c in counts.items():
        if c is not None and c.hist.sum():
            y, p = histogram_cases(c.hist)
            figs[f"{split}_roc"] = roc_curve_plot(y, p, threshold, out / f"{split}_roc.png")
            figs[f"{split}_pr"] = pr_curve_plot(y, p, threshold, out / f"{split}_pr.png")
            figs[f"{split}_reliability"] = reliability_plot(
                {"uncalibrated": c.raw_hist, "calibrated": c.hist}, out / f"{split}_reliability.png"
            )
    return figs


FOREST_PANELS = (
    ("auroc", "AUROC (95 % CI)"),
    ("sensitivity", "Sensitivity at τ* (95 % CI)"),
    ("specificity", "Specificity at τ* (95 % CI)"),
)
_RUN_STYLES = (("tab:blue", "o"), ("tab:orange", "s"), ("tab:green", "D"), ("tab:purple", "^"))


def forest_figure(forest: pd.DataFrame, caption: str, title: str = "Centralized vs federated STR-Net") -> Figure:
    """A horizontal forest plot, one row per cohort (pooled, then each site), one marker and 95 % interval per
    run, one panel per metric (AUROC; sensitivity and specificity at each run's frozen τ*).

    ``forest`` has columns ``run, cohort, metric, value, lo, hi``. Site names sit on the shared y axis, the legend
    and the caption (which states τ*, never drawn as a score) below the panels, so no label meets another. A
    point without an interval is not drawn as if it were certain: the row says "no interval" or "undefined"."""
    runs = list(dict.fromkeys(forest["run"]))
    cohorts = list(dict.fromkeys(forest["cohort"]))
    if not runs or not cohorts:
        raise NotComputable("no runs to compare")
    k, r = len(cohorts), len(runs)
    lines = [w for part in caption.split("\n") for w in textwrap.wrap(part, 150)]
    # three rows of a constrained layout: the legend (outside the data, under the title), the panels, the caption
    # (τ* in words); each has its own space, so no label can meet another or a point
    fig = Figure(figsize=(11.0, 1.3 + 0.42 * k * r + 0.16 * len(lines)), dpi=_DPI, layout="constrained")
    fig.get_layout_engine().set(wspace=0.08)  # type: ignore[union-attr]  # panel 1's "1.0" clear of panel 2's "0.0"
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(3, len(FOREST_PANELS), height_ratios=[0.45, 0.42 * k * r, 0.16 * len(lines) + 0.1])
    top, bottom = fig.add_subplot(grid[0, :]), fig.add_subplot(grid[2, :])
    axes = [fig.add_subplot(grid[1, 0])]
    axes += [fig.add_subplot(grid[1, i], sharey=axes[0]) for i in range(1, len(FOREST_PANELS))]
    offsets = (np.arange(r) - (r - 1) / 2) * (0.7 / max(r, 1))
    for ax, (metric, label) in zip(axes, FOREST_PANELS, strict=True):
        part = forest[forest["metric"] == metric]
        for i, run in enumerate(runs):
            colour, marker = _RUN_STYLES[i % len(_RUN_STYLES)]
            for j, cohort in enumerate(cohorts):
                row = part[(part["run"] == run) & (part["cohort"] == cohort)]
                y = j + offsets[i]
                v, lo, hi = (float(row[c].iloc[0]) if len(row) else np.nan for c in ("value", "lo", "hi"))
                if np.isfinite(v) and np.isfinite(lo) and np.isfinite(hi):
                    ax.errorbar(
                        v, y, xerr=[[max(v - lo, 0.0)], [max(hi - v, 0.0)]], fmt=marker, color=colour, ms=6,
                        capsize=3, lw=1.5, label=run if j == 0 else None,
                    )  # fmt: skip
                else:
                    why = "undefined (one class)" if not np.isfinite(v) else "no interval"
                    ax.text(0.02, y, why, va="center", fontsize=7, color=colour, style="italic")
        if metric == "auroc":
            ax.axvline(0.5, color="grey", ls=":", lw=1)
        ax.set_xlim(-0.03, 1.03)  # a point or interval end at 0 or 1 stays visible
        ax.set_xticks(np.linspace(0.0, 1.0, 6))
        ax.set_title(label, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
        ax.set_yticks(range(k), cohorts, fontsize=9)
        ax.set_ylim(k - 0.5, -0.5)
        ax.tick_params(axis="x", labelsize=8)
    handles, labels = [], []
    for ax in axes:  # a run whose AUROC is undefined everywhere still has a legend entry from another panel
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if not handles:
        raise NotComputable("no metric with an interval in the compared runs")
    for ax in axes[1:]:
        ax.tick_params(axis="y", labelleft=False)
    top.set_axis_off()
    top.set_title(title, fontsize=11)
    top.legend(handles, labels, loc="center", ncol=min(r, 3), fontsize=8, frameon=False)
    bottom.set_axis_off()
    bottom.text(0.5, 1.0, "\n".join(lines), ha="center", va="top", fontsize=8, transform=bottom.transAxes)
    return fig


def comparison_plot(forest: pd.DataFrame, caption: str, out: str | Path) -> Path:
    """:func:`forest_figure` as a PNG, or a placeholder that says why it is not computable."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig = forest_figure(forest, caption)
    except NotComputable as exc:
        reason = exc
    else:
        fig.savefig(path, format="png")
        return path
    return _save(path, "Centralized vs federated STR-Net", lambda ax: _raise(reason))


def _raise(exc: Exception) -> None:
    raise exc
