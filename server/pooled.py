"""Pooled statistics: sum what the sites send, choose τ*, and score the pooled cohort — never from raw scores.

Sites send additive counts (score histograms per class, tp/fp/tn/fn on the τ grid, T-score sums). Summing
them gives exactly the counts of the concatenated cohort, so the pooled τ* equals the τ* a centralized run
would choose on the union of the validation splits, and pooled AUROC/AUPRC are those of the union up to the
histogram's bin width. A pooled AUROC is *not* an average of site AUROCs; both are reported, side by side.

Every check names the site, and one bad site is dropped (with its reason) while the others still count,
as long as the quorum holds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.metrics import precision_recall_curve, roc_curve

from strnet import metrics as M
from strnet.errors import StrnetError

VAL_KEYS = ("hist", "tp", "fp", "tn", "fn")
TEST_KEYS = ("hist", "tp", "fp", "tn", "fn", "severity_hist")
TSCORE_SUM_KEYS = ("t_n", "t_sum_x", "t_sum_y", "t_sum_xx", "t_sum_yy", "t_sum_xy", "t_sum_abs_err", "t_sum_sq_err")


class SiteError(StrnetError):
    """A site's reply that cannot be used, with the site's name and the reason."""

    def __init__(self, site: str, problem: str) -> None:
        self.site = site
        self.problem = problem
        super().__init__(f"site {site!r}: {problem}")


class QuorumError(StrnetError):
    """Fewer usable site replies than ``federation.quorum``: the step fails instead of silently shrinking."""


def _counts(site: str, name: str, value: Any, shape: tuple[int, ...]) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise SiteError(site, f"{name} is not numeric ({exc})") from exc
    if arr.shape != shape:
        raise SiteError(site, f"{name} has shape {arr.shape}, expected {shape}")
    if not np.isfinite(arr).all():
        raise SiteError(site, f"{name} holds NaN or infinite values")
    if (arr < 0).any():
        raise SiteError(site, f"{name} holds negative counts")
    if not np.array_equal(arr, np.round(arr)):
        raise SiteError(site, f"{name} holds non-integer counts")
    return arr.astype(np.int64)


def _missing(site: str, stats: Mapping[str, Any], keys: Sequence[str], what: str) -> None:
    missing = [k for k in keys if k not in stats]
    if missing:
        raise SiteError(site, f"{what}: missing key(s) {', '.join(missing)}")


def check_validation_statistics(
    site: str, stats: Mapping[str, Any], *, n_bins: int, n_grid: int
) -> dict[str, np.ndarray]:
    """Shapes, non-negative integer counts, and internal consistency (tp+fn = positives in the histogram)."""
    _missing(site, stats, VAL_KEYS, "validation statistics")
    hist = _counts(site, "hist", stats["hist"], (2, n_bins))
    out = {"hist": hist}
    for k in ("tp", "fp", "tn", "fn"):
        out[k] = _counts(site, k, stats[k], (n_grid,))
    n_neg, n_pos = int(hist[0].sum()), int(hist[1].sum())
    if not (np.all(out["tp"] + out["fn"] == n_pos) and np.all(out["fp"] + out["tn"] == n_neg)):
        raise SiteError(
            site,
            f"inconsistent validation statistics: tp+fn and fp+tn must equal the histogram's class totals "
            f"({n_pos} positives, {n_neg} negatives) at every threshold",
        )
    return out


@dataclass
class PooledStatistics:
    hist: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    tn: np.ndarray
    fn: np.ndarray
    sites: list[str]
    problems: list[str] = field(default_factory=list)
    per_site: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def n_cases(self) -> int:
        return int(self.hist.sum())

    def ranking(self) -> dict[str, float | int]:
        return M.metrics_from_histogram(self.hist)


def pool_validation_statistics(
    per_site: Mapping[str, Mapping[str, Any]],
    *,
    n_bins: int,
    n_grid: int,
    quorum: int = 1,
    problems: Sequence[str] = (),
) -> PooledStatistics:
    """Sum the usable sites' statistics; drop (and report) the malformed ones; enforce the quorum."""
    problems = list(problems)
    good: dict[str, dict[str, np.ndarray]] = {}
    per: dict[str, dict[str, float]] = {}
    for site, stats in per_site.items():
        try:
            good[site] = check_validation_statistics(site, stats, n_bins=n_bins, n_grid=n_grid)
        except SiteError as exc:
            problems.append(str(exc))
            continue
        per[site] = {
            "n_val": float(good[site]["hist"].sum()),
            **{k: _scalar(stats.get(k)) for k in ("site_auroc", "site_auprc")},
        }
    if len(good) < quorum:
        detail = "; ".join(problems) if problems else "no replies"
        raise QuorumError(
            f"pooled validation statistics: {len(good)} usable site(s) {sorted(good)}, quorum is {quorum} ({detail})"
        )
    pooled = {
        k: sum((g[k] for g in good.values()), start=np.zeros_like(next(iter(good.values()))[k])) for k in VAL_KEYS
    }
    return PooledStatistics(**pooled, sites=sorted(good), problems=problems, per_site=per)


def _scalar(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def pooled_threshold(pooled: PooledStatistics, grid: Sequence[float] | np.ndarray, min_sensitivity: float) -> dict:
    """τ* from the summed counts, with its provenance (which sites, how many cases) for the bundle."""
    sel = M.threshold_selection_from_counts(pooled.tp, pooled.fp, pooled.tn, pooled.fn, grid, min_sensitivity)
    g = np.asarray(grid, dtype=np.float64)
    step = float(np.round(g[1] - g[0], 6)) if len(g) > 1 else 0.0
    sel.update(
        chosen_on="validation split, pooled counts over training sites (federated)",
        sites=pooled.sites,
        n_cases=pooled.n_cases,
        grid=[float(g[0]), float(g[-1]), step],
        excluded=pooled.problems,
    )
    return sel


def count_metrics(tp: float, fp: float, tn: float, fn: float) -> dict[str, float]:
    """Threshold metrics from one summed confusion matrix (strnet.metrics' own formulas; nan, never a silent 0)."""
    return {k: float(v) for k, v in M.metrics_from_counts(tp, fp, tn, fn).items()}


def pool_test_metrics(per_site: Mapping[str, Mapping[str, Any]], *, n_bins: int) -> tuple[dict[str, Any], list[str]]:
    """Pooled frozen-test metrics (screening at τ*, severity, T-score) from the sites' additive counts.

    Returns the nested metrics (``flat_metrics(.., prefix="test_")`` gives the centralized run's names) and the
    per-site problems of replies that were left out.
    """
    problems: list[str] = []
    hist = np.zeros((2, n_bins), np.int64)
    sev = np.zeros((2, n_bins), np.int64)
    cm = np.zeros(4, np.int64)
    sums = np.zeros(len(TSCORE_SUM_KEYS), np.float64)
    used: list[str] = []
    for site, stats in per_site.items():
        try:
            _missing(site, stats, (*TEST_KEYS, *TSCORE_SUM_KEYS), "test statistics")
            h = _counts(site, "hist", stats["hist"], (2, n_bins))
            s = _counts(site, "severity_hist", stats["severity_hist"], (2, n_bins))
            c = np.array([_counts(site, k, stats[k], ()) for k in ("tp", "fp", "tn", "fn")], np.int64)
            t = np.array([_scalar(stats[k]) for k in TSCORE_SUM_KEYS], np.float64)
            if not np.isfinite(t).all():
                raise SiteError(site, "T-score sums hold NaN or infinite values")
            if c[0] + c[3] != h[1].sum() or c[1] + c[2] != h[0].sum():
                raise SiteError(site, "confusion counts at τ* do not match the histogram's class totals")
        except SiteError as exc:
            problems.append(str(exc))
            continue
        hist += h
        sev += s
        cm += c
        sums += t
        used.append(site)
    tp, fp, tn, fn = (int(v) for v in cm)
    screening: dict[str, Any] = {**M.metrics_from_histogram(hist), **count_metrics(tp, fp, tn, fn)}
    screening.update(n=tp + fp + tn + fn, tp=tp, fp=fp, tn=tn, fn=fn)
    result: dict[str, Any] = {"sites": used, "screening": screening, "hist": hist}
    sev_m = M.metrics_from_histogram(sev)
    result["severity"] = {"auroc": sev_m["auroc"], "auprc": sev_m["auprc"], "n": int(sev.sum())}
    result["t_score"] = tscore_from_sums(dict(zip(TSCORE_SUM_KEYS, sums, strict=True)))
    return result, problems


def tscore_from_sums(s: Mapping[str, float]) -> dict[str, float]:
    """MAE, RMSE, Bland–Altman bias and Pearson r of the pooled cohort from per-site sufficient statistics."""
    n = s["t_n"]
    out = {"n": float(n), "mae": math.nan, "rmse": math.nan, "bland_altman_bias": math.nan, "pearson_r": math.nan}
    if n <= 0:
        return out
    out["mae"] = s["t_sum_abs_err"] / n
    out["rmse"] = math.sqrt(s["t_sum_sq_err"] / n)
    out["bland_altman_bias"] = (s["t_sum_y"] - s["t_sum_x"]) / n
    vx = n * s["t_sum_xx"] - s["t_sum_x"] ** 2
    vy = n * s["t_sum_yy"] - s["t_sum_y"] ** 2
    if n >= 2 and vx > 0 and vy > 0:
        out["pearson_r"] = (n * s["t_sum_xy"] - s["t_sum_x"] * s["t_sum_y"]) / math.sqrt(vx * vy)
    return out


def curves_from_histogram(hist: np.ndarray) -> dict[str, np.ndarray]:
    """ROC and PR curve points of the pooled cohort (bin centres as tied scores, weighted by the counts)."""
    h = np.asarray(hist, dtype=np.float64)
    edges = M.histogram_edges(h.shape[1])
    centres = (edges[:-1] + edges[1:]) / 2.0
    keep_neg, keep_pos = h[0] > 0, h[1] > 0
    scores = np.concatenate([centres[keep_neg], centres[keep_pos]])
    labels = np.concatenate([np.zeros(keep_neg.sum()), np.ones(keep_pos.sum())])
    weights = np.concatenate([h[0][keep_neg], h[1][keep_pos]])
    fpr, tpr, _ = roc_curve(labels, scores, sample_weight=weights)
    precision, recall, _ = precision_recall_curve(labels, scores, sample_weight=weights)
    return {"fpr": fpr, "tpr": tpr, "precision": precision, "recall": recall}
