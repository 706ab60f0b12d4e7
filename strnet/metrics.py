"""Screening, threshold, bootstrap, agreement and pooled-histogram metrics — the numbers every report quotes.

Everything here is pure numpy/scipy/scikit-learn so the federation server, the trainer and the evaluator agree
to the last digit. Two design constraints shape the module:

* The operating threshold τ* is chosen from *confusion counts per grid threshold* only. Counts are additive, so
  the server can sum per-site counts and obtain exactly the τ* it would get on the concatenated raw scores,
  without any site sharing a single score.
* Ranking metrics for pooled data come from per-site score histograms (also additive). Binning is the only
  approximation; with 1000 bins it moves AUROC/AUPRC by well under 1e-3.

Undefined quantities (one class only, zero denominators) are ``nan`` rather than exceptions or warnings, because
small validation splits and single-site evaluations hit them routinely and must not abort a run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats
from sklearn.metrics import (
    average_precision_score,
    brier_score_loss,
    confusion_matrix,
    matthews_corrcoef,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

RULE_CONSTRAINED = "sensitivity-constrained"
RULE_FALLBACK = "fallback-balanced-accuracy"

METRIC_NAMES: tuple[str, ...] = (
    "auroc",
    "auprc",
    "accuracy",
    "balanced_accuracy",
    "sensitivity",
    "specificity",
    "ppv",
    "npv",
    "f1",
    "youden_j",
    "mcc",
    "brier",
)

_NAN = float("nan")
_BOOT_CELLS = 4_000_000  # replicate x unique-score cells held at once; bounds bootstrap memory to ~100 MB


# ----------------------------------------------------------------------------------------------------------------
# input checks


def _binary_inputs(y_true: Any, y_prob: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate once so every metric sees 0/1 int labels and finite probabilities in [0, 1]."""
    y = np.asarray(y_true)
    p = np.asarray(y_prob, dtype=np.float64)
    if y.ndim != 1 or p.ndim != 1:
        raise ValueError(f"y_true and y_prob must be 1-D, got shapes {y.shape} and {p.shape}")
    if len(y) != len(p):
        raise ValueError(f"y_true has {len(y)} values but y_prob has {len(p)}")
    if len(y) == 0:
        raise ValueError("no samples: y_true and y_prob are empty")
    try:
        yf = y.astype(np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"y_true must be 0/1 labels, got dtype {y.dtype}") from exc
    bad = ~np.isin(yf, (0.0, 1.0))
    if bad.any():
        raise ValueError(f"y_true must contain only 0/1, found {np.unique(y[bad])[:5].tolist()}")
    if not np.isfinite(p).all():
        raise ValueError(f"y_prob has {int((~np.isfinite(p)).sum())} non-finite value(s)")
    if p.min() < 0.0 or p.max() > 1.0:
        raise ValueError(f"y_prob must lie in [0, 1], found range [{p.min():.6g}, {p.max():.6g}]")
    return yf.astype(np.int64), p


def _grid(grid: Sequence[float] | np.ndarray) -> np.ndarray:
    g = np.asarray(grid, dtype=np.float64)
    if g.ndim != 1 or len(g) == 0:
        raise ValueError(f"threshold grid must be a non-empty 1-D sequence, got shape {g.shape}")
    if not np.isfinite(g).all():
        raise ValueError("threshold grid contains non-finite values")
    return g


def _div(num: np.ndarray | float, den: np.ndarray | float) -> np.ndarray:
    """Elementwise num/den with nan where den == 0 — the single place zero denominators become 'undefined'."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den != 0)
    return out


# ----------------------------------------------------------------------------------------------------------------
# confusion counts and the sensitivity-constrained threshold


def confusion_at_thresholds(y_true: Any, y_prob: Any, grid: Sequence[float] | np.ndarray) -> dict[str, np.ndarray]:
    """Exact tp/fp/tn/fn (int64 arrays, one entry per grid threshold) with the rule positive ⇔ prob >= threshold.

    These are what a site sends to the server: additive, and enough to reproduce τ* exactly.
    """
    y, p = _binary_inputs(y_true, y_prob)
    g = _grid(grid)
    pos = np.sort(p[y == 1])
    neg = np.sort(p[y == 0])
    # count of scores >= t is len - (number strictly below t) = len - searchsorted(left)
    tp = len(pos) - np.searchsorted(pos, g, side="left")
    fp = len(neg) - np.searchsorted(neg, g, side="left")
    return {
        "tp": tp.astype(np.int64),
        "fp": fp.astype(np.int64),
        "tn": (len(neg) - fp).astype(np.int64),
        "fn": (len(pos) - tp).astype(np.int64),
    }


def threshold_selection_from_counts(
    tp: Any,
    fp: Any,
    tn: Any,
    fn: Any,
    grid: Sequence[float] | np.ndarray,
    min_sensitivity: float,
) -> dict[str, Any]:
    """τ* and why it was chosen, from (possibly site-summed) confusion counts.

    Comparisons use integer arithmetic (specificity ∝ tn, balanced accuracy ∝ tp·N + tn·P) so ties are exact and
    the result cannot depend on floating-point summation order — the pooled and concatenated answers must match.
    """
    g = _grid(grid)
    arrs = [np.asarray(a) for a in (tp, fp, tn, fn)]
    for name, a in zip(("tp", "fp", "tn", "fn"), arrs, strict=True):
        if a.shape != g.shape:
            raise ValueError(f"{name} has shape {a.shape} but the grid has {len(g)} thresholds")
        if (a < 0).any() or not np.array_equal(a, np.round(a)):
            raise ValueError(f"{name} must hold non-negative integer counts")
    tp_, fp_, tn_, fn_ = ([int(v) for v in a] for a in arrs)
    pos_totals = {a + b for a, b in zip(tp_, fn_, strict=True)}
    neg_totals = {a + b for a, b in zip(fp_, tn_, strict=True)}
    if len(pos_totals) != 1 or len(neg_totals) != 1:
        raise ValueError("inconsistent counts: tp+fn and fp+tn must be the same at every threshold")
    n_pos, n_neg = pos_totals.pop(), neg_totals.pop()
    if n_pos == 0 or n_neg == 0:
        raise ValueError(
            f"cannot choose a threshold without both classes (n_pos={n_pos}, n_neg={n_neg}): "
            "sensitivity or specificity is undefined"
        )
    if not 0.0 <= min_sensitivity <= 1.0:
        raise ValueError(f"min_sensitivity must be in [0, 1], got {min_sensitivity}")

    def ba_key(i: int) -> int:
        return tp_[i] * n_neg + tn_[i] * n_pos

    indices = range(len(g))
    qualifying = [i for i in indices if tp_[i] / n_pos >= min_sensitivity]
    if qualifying:
        rule = RULE_CONSTRAINED
        best = max(qualifying, key=lambda i: (tn_[i], ba_key(i), tp_[i], -g[i]))
    else:
        rule = RULE_FALLBACK
        best = max(indices, key=lambda i: (ba_key(i), tp_[i], -g[i]))
    sens = tp_[best] / n_pos
    spec = tn_[best] / n_neg
    value = round(float(g[best]), 2)
    return {
        "value": value,
        "rule": rule,
        "min_sensitivity": float(min_sensitivity),
        "sensitivity": sens,
        "specificity": spec,
        "balanced_accuracy": (sens + spec) / 2.0,
        "n_pos": n_pos,
        "n_neg": n_neg,
    }


def select_threshold_from_counts(
    tp: Any,
    fp: Any,
    tn: Any,
    fn: Any,
    grid: Sequence[float] | np.ndarray,
    min_sensitivity: float,
) -> float:
    """τ* from confusion counts; what the server calls on counts summed over sites."""
    return threshold_selection_from_counts(tp, fp, tn, fn, grid, min_sensitivity)["value"]


def threshold_selection(
    y_true: Any,
    y_prob: Any,
    min_sensitivity: float,
    grid: Sequence[float] | np.ndarray,
) -> dict[str, Any]:
    """τ* with its rule, sensitivity/specificity at τ* and class counts (see threshold_selection_from_counts)."""
    g = _grid(grid)
    c = confusion_at_thresholds(y_true, y_prob, g)
    return threshold_selection_from_counts(c["tp"], c["fp"], c["tn"], c["fn"], g, min_sensitivity)


def select_threshold(
    y_true: Any,
    y_prob: Any,
    min_sensitivity: float,
    grid: Sequence[float] | np.ndarray,
) -> float:
    """Highest-specificity grid threshold with sensitivity >= min_sensitivity (else best balanced accuracy)."""
    return threshold_selection(y_true, y_prob, min_sensitivity, grid)["value"]


# ----------------------------------------------------------------------------------------------------------------
# point metrics


def metrics_from_counts(tp: np.ndarray, fp: np.ndarray, tn: np.ndarray, fn: np.ndarray) -> dict[str, np.ndarray]:
    """Threshold metrics from counts, vectorised over replicates; nan wherever a denominator is zero."""
    tp, fp, tn, fn = (np.asarray(a, dtype=np.float64) for a in (tp, fp, tn, fn))
    sens = _div(tp, tp + fn)
    spec = _div(tn, tn + fp)
    mcc_den = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return {
        "accuracy": _div(tp + tn, tp + fp + tn + fn),
        "balanced_accuracy": (sens + spec) / 2.0,
        "sensitivity": sens,
        "specificity": spec,
        "ppv": _div(tp, tp + fp),
        "npv": _div(tn, tn + fn),
        "f1": _div(2.0 * tp, 2.0 * tp + fp + fn),
        "youden_j": sens + spec - 1.0,
        "mcc": _div(tp * tn - fp * fn, mcc_den),
    }


def ranking_metrics(y_true: Any, y_prob: Any) -> dict[str, float]:
    """AUROC (nan without both classes) and AUPRC (average precision; nan without a positive), by scikit-learn."""
    y, p = _binary_inputs(y_true, y_prob)
    n_pos = int(y.sum())
    return {
        "auroc": float(roc_auc_score(y, p)) if 0 < n_pos < len(y) else _NAN,
        "auprc": float(average_precision_score(y, p)) if n_pos else _NAN,
    }


def classification_metrics(y_true: Any, y_prob: Any, threshold: float) -> dict[str, float | int]:
    """Screening metrics at ``threshold`` (positive ⇔ prob >= threshold) plus the confusion counts.

    Ranking metrics that need both classes (AUROC; AUPRC needs a positive) are nan otherwise; MCC is nan when any
    confusion-matrix margin is empty (scikit-learn would report 0, which reads as 'no skill' rather than 'undefined').
    """
    y, p = _binary_inputs(y_true, y_prob)
    pred = (p >= threshold).astype(np.int64)
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(y, pred, labels=[0, 1]).ravel())
    n_pos, n_neg = tp + fn, tn + fp
    out: dict[str, float | int] = {k: float(v) for k, v in metrics_from_counts(tp, fp, tn, fn).items()}
    out.update(ranking_metrics(y, p))
    if not np.isnan(out["mcc"]):
        out["mcc"] = float(matthews_corrcoef(y, pred))
    out["brier"] = float(brier_score_loss(y, p, labels=[0, 1]))
    ordered = {k: out[k] for k in METRIC_NAMES}
    ordered.update(threshold=float(threshold), n=len(y), n_pos=n_pos, n_neg=n_neg, tp=tp, fp=fp, tn=tn, fn=fn)
    return ordered


# ----------------------------------------------------------------------------------------------------------------
# ranking metrics from tied-score counts (shared by the bootstrap and the pooled histogram)


def _auc_ap_from_counts(neg: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUROC and average precision from counts per distinct score, scores ascending along the last axis.

    AUROC is Mann–Whitney with ties counted half (= trapezoid over the ROC); AP is scikit-learn's step-wise
    sum over descending thresholds of Δrecall × precision. Zero-count columns contribute nothing, so the same
    code serves a bootstrap replicate (columns = the sample's distinct scores) and a histogram (columns = bins).
    """
    neg = np.asarray(neg, dtype=np.float64)
    pos = np.asarray(pos, dtype=np.float64)
    n_neg = neg.sum(axis=-1)
    n_pos = pos.sum(axis=-1)
    neg_below = np.cumsum(neg, axis=-1) - neg
    u = (pos * (neg_below + 0.5 * neg)).sum(axis=-1)
    auroc = _div(u, n_pos * n_neg)

    tps = np.cumsum(pos[..., ::-1], axis=-1)
    fps = np.cumsum(neg[..., ::-1], axis=-1)
    precision = np.zeros_like(tps)
    np.divide(tps, tps + fps, out=precision, where=(tps + fps) > 0)
    ap = _div((pos[..., ::-1] * precision).sum(axis=-1), n_pos)  # Δrecall at a column is its positives / n_pos
    return auroc, ap


# ----------------------------------------------------------------------------------------------------------------
# bootstrap


def _resample_indices(y: np.ndarray, n_boot: int, rng: np.random.Generator, stratified: bool) -> np.ndarray:
    """(n_boot, n) resample indices; stratified keeps the positive and negative counts of the original sample."""
    if not stratified:
        return rng.integers(0, len(y), size=(n_boot, len(y)))
    pos = np.flatnonzero(y == 1)
    neg = np.flatnonzero(y == 0)
    parts = [idx[rng.integers(0, len(idx), size=(n_boot, len(idx)))] for idx in (pos, neg) if len(idx)]
    return np.concatenate(parts, axis=1)


def _replicate_metrics(y: np.ndarray, p: np.ndarray, threshold: float, idx: np.ndarray) -> dict[str, np.ndarray]:
    """All METRIC_NAMES for each row of ``idx`` at once, via per-replicate counts over the distinct scores."""
    n_rep = idx.shape[0]
    uniq, inv = np.unique(p, return_inverse=True)
    k = len(uniq)
    ys = y[idx]
    flat = (np.arange(n_rep)[:, None] * k + inv[idx]).ravel()
    pos = np.bincount(flat, weights=ys.ravel().astype(np.float64), minlength=n_rep * k).reshape(n_rep, k)
    tot = np.bincount(flat, minlength=n_rep * k).reshape(n_rep, k).astype(np.float64)
    neg = tot - pos
    flagged = uniq >= threshold
    tp = pos[:, flagged].sum(axis=1)
    fp = neg[:, flagged].sum(axis=1)
    n_pos = pos.sum(axis=1)
    n_neg = neg.sum(axis=1)
    out = metrics_from_counts(tp, fp, n_neg - fp, n_pos - tp)
    out["auroc"], out["auprc"] = _auc_ap_from_counts(neg, pos)
    out["brier"] = ((p - y) ** 2)[idx].mean(axis=1)
    return out


def bootstrap_ci(
    y_true: Any,
    y_prob: Any,
    threshold: float,
    metric_names: Sequence[str] | None = None,
    n_boot: int = 2000,
    seed: int = 42,
    alpha: float = 0.05,
    stratified: bool = True,
    groups: Any = None,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals for classification metrics at a fixed threshold.

    Stratified by default: class counts are held fixed so every replicate has the study's prevalence and
    sensitivity/specificity stay defined. Replicates where a metric is undefined are ignored for that metric;
    an interval is (nan, nan) only when no replicate defines it. ``groups`` (e.g. the radiograph of each knee)
    resamples whole groups instead of cases — the two knees of a film are not independent — stratified by the
    group's label (bone loss if any of its cases has it).
    """
    y, p = _binary_inputs(y_true, y_prob)
    names = tuple(METRIC_NAMES if metric_names is None else metric_names)
    unknown = sorted(set(names) - set(METRIC_NAMES))
    if unknown:
        raise ValueError(f"unknown metric name(s) {unknown}; choose from {list(METRIC_NAMES)}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    rng = np.random.default_rng(seed)
    if groups is not None:
        return _group_bootstrap(y, p, threshold, np.asarray(groups), names, n_boot, rng, alpha, stratified)
    chunk = max(1, _BOOT_CELLS // max(len(y), 1))
    collected: dict[str, list[np.ndarray]] = {k: [] for k in names}
    for start in range(0, n_boot, chunk):
        idx = _resample_indices(y, min(chunk, n_boot - start), rng, stratified)
        reps = _replicate_metrics(y, p, threshold, idx)
        for k in names:
            collected[k].append(reps[k])
    return {k: _percentile_interval(np.concatenate(collected[k]), alpha) for k in names}


def _group_bootstrap(
    y: np.ndarray,
    p: np.ndarray,
    threshold: float,
    groups: np.ndarray,
    names: Sequence[str],
    n_boot: int,
    rng: np.random.Generator,
    alpha: float,
    stratified: bool,
) -> dict[str, tuple[float, float]]:
    if groups.shape != y.shape:
        raise ValueError(f"groups has shape {groups.shape}, the labels {y.shape}")
    ids, member = np.unique(groups, return_inverse=True)
    order = np.argsort(member, kind="stable")
    starts = np.searchsorted(member[order], np.arange(len(ids)))
    members = np.split(order, starts[1:])
    label = np.array([y[m].max() for m in members])
    strata = [np.flatnonzero(label == c) for c in (1, 0)] if stratified else [np.arange(len(ids))]
    collected: dict[str, list[float]] = {k: [] for k in names}
    for _ in range(n_boot):
        chosen = np.concatenate([s[rng.integers(0, len(s), len(s))] for s in strata if len(s)])
        idx = np.concatenate([members[g] for g in chosen])[None, :]
        reps = _replicate_metrics(y, p, threshold, idx)
        for k in names:
            collected[k].append(float(reps[k][0]))
    return {k: _percentile_interval(np.asarray(collected[k]), alpha) for k in names}


# ----------------------------------------------------------------------------------------------------------------
# regression agreement (T-score estimate vs DXA)


def regression_metrics(y_true: Any, y_pred: Any, alpha: float = 0.05) -> dict[str, Any]:
    """Agreement of an estimate with the reference: error, Pearson r with Fisher-z CI, Bland–Altman limits.

    Bland–Altman differences are ``y_pred - y_true`` (positive bias = overestimate); limits are bias ± 1.96 SD
    (ddof=1). Pairs with a NaN on either side are dropped, since DXA T-scores are often missing.
    """
    t = np.asarray(y_true, dtype=np.float64)
    e = np.asarray(y_pred, dtype=np.float64)
    if t.ndim != 1 or e.ndim != 1 or len(t) != len(e):
        raise ValueError(f"y_true and y_pred must be 1-D of equal length, got shapes {t.shape} and {e.shape}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    keep = ~(np.isnan(t) | np.isnan(e))
    if np.isinf(t[keep]).any() or np.isinf(e[keep]).any():
        raise ValueError("y_true/y_pred contain infinite values")
    t, e = t[keep], e[keep]
    n = len(t)
    out: dict[str, Any] = {
        "n": n,
        "mae": _NAN,
        "rmse": _NAN,
        "pearson_r": _NAN,
        "pearson_ci": (_NAN, _NAN),
        "pearson_p": _NAN,
        "bland_altman_bias": _NAN,
        "bland_altman_sd": _NAN,
        "bland_altman_loa_low": _NAN,
        "bland_altman_loa_high": _NAN,
    }
    if n == 0:
        return out
    diff = e - t
    out["mae"] = float(np.mean(np.abs(diff)))
    out["rmse"] = float(np.sqrt(np.mean(diff**2)))
    out["bland_altman_bias"] = bias = float(np.mean(diff))
    if n >= 2:
        sd = float(np.std(diff, ddof=1))
        out["bland_altman_sd"] = sd
        out["bland_altman_loa_low"] = bias - 1.96 * sd
        out["bland_altman_loa_high"] = bias + 1.96 * sd
    if n >= 2 and np.ptp(t) > 0 and np.ptp(e) > 0:
        res = stats.pearsonr(t, e)
        r = float(res.statistic)
        out["pearson_r"] = r
        out["pearson_p"] = float(res.pvalue)
        if n >= 4:
            z = np.arctanh(np.clip(r, -1.0, 1.0))
            half = stats.norm.ppf(1.0 - alpha / 2.0) / np.sqrt(n - 3)
            with np.errstate(invalid="ignore"):
                out["pearson_ci"] = (float(np.tanh(z - half)), float(np.tanh(z + half)))
    return out


# ----------------------------------------------------------------------------------------------------------------
# pooled (histogram) ranking metrics for the federation


def histogram_edges(n_bins: int) -> np.ndarray:
    """Fixed bin edges on [0, 1]; every site must use the same ones for the histograms to be summable.

    Edge k is k / n_bins correctly rounded — the very double a decimal threshold such as 0.29 is — so a count read
    off the histogram at a grid threshold equals the count ``p >= threshold`` exactly (``linspace`` is an ulp off
    at some edges).
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    return np.arange(n_bins + 1, dtype=np.float64) / n_bins


def score_histogram(y_true: Any, y_prob: Any, n_bins: int) -> np.ndarray:
    """(2, n_bins) int64 counts — row 0 negatives, row 1 positives — on fixed [0, 1] bins, [lo, hi) except the
    last bin which also holds prob == 1.0. Additive across sites and free of individual scores."""
    y, p = _binary_inputs(y_true, y_prob)
    edges = histogram_edges(n_bins)
    b = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, n_bins - 1)
    counts = [np.bincount(b[y == label], minlength=n_bins) for label in (0, 1)]
    return np.stack(counts).astype(np.int64)


def metrics_from_histogram(hist: Any) -> dict[str, float | int]:
    """AUROC and AUPRC from (summed) score histograms, each bin treated as one tied score.

    Computed by scikit-learn on bin centres weighted by the counts, which is exactly the tied-score trapezoid ROC
    and step-wise average precision; nan when a class is absent (AUPRC only needs positives).
    """
    h = np.asarray(hist)
    if h.ndim != 2 or h.shape[0] != 2 or h.shape[1] < 1:
        raise ValueError(f"histogram must have shape (2, n_bins), got {h.shape}")
    if not np.isfinite(h).all() or (h < 0).any() or not np.array_equal(h, np.round(h)):
        raise ValueError("histogram must hold non-negative integer counts")
    n_bins = h.shape[1]
    edges = histogram_edges(n_bins)
    centres = (edges[:-1] + edges[1:]) / 2.0
    neg, pos = h[0].astype(np.float64), h[1].astype(np.float64)
    n_neg, n_pos = int(neg.sum()), int(pos.sum())
    out: dict[str, float | int] = {"auroc": _NAN, "auprc": _NAN, "n_pos": n_pos, "n_neg": n_neg}
    if n_pos == 0:
        return out
    keep_neg, keep_pos = neg > 0, pos > 0
    scores = np.concatenate([centres[keep_neg], centres[keep_pos]])
    labels = np.concatenate([np.zeros(keep_neg.sum(), np.int64), np.ones(keep_pos.sum(), np.int64)])
    weights = np.concatenate([neg[keep_neg], pos[keep_pos]])
    out["auprc"] = float(average_precision_score(labels, scores, sample_weight=weights))
    if n_neg:
        out["auroc"] = float(roc_auc_score(labels, scores, sample_weight=weights))
    return out


def bootstrap_ci_from_histogram(
    hist: Any, threshold: float, *, n_boot: int, seed: int, alpha: float = 0.05
) -> dict[str, tuple[float, float]]:
    """Percentile intervals for a pooled cohort known only by its per-class score histogram.

    The stratified bootstrap of :func:`bootstrap_ci` redraws each class's cases with replacement; for cases known
    only by their bin, that is a multinomial draw of the class's count over its own bins. A bin is flagged when its
    lower edge is at or above ``threshold`` (grid thresholds fall on bin edges). Brier needs the scores and has no
    interval here.
    """
    h = np.asarray(hist)
    if h.ndim != 2 or h.shape[0] != 2 or (h < 0).any():
        raise ValueError(f"histogram must be non-negative counts of shape (2, n_bins), got {h.shape}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    names = tuple(k for k in METRIC_NAMES if k != "brier")
    n_neg, n_pos = int(h[0].sum()), int(h[1].sum())
    if n_neg + n_pos == 0:
        return {k: (_NAN, _NAN) for k in names}
    flagged = histogram_edges(h.shape[1])[:-1] >= threshold - 1e-9
    rng = np.random.default_rng(seed)
    chunk = max(1, _BOOT_CELLS // h.shape[1])
    collected: dict[str, list[np.ndarray]] = {k: [] for k in names}
    for start in range(0, n_boot, chunk):
        size = min(chunk, n_boot - start)
        neg, pos = (
            rng.multinomial(n, row / n, size=size).astype(np.float64) if n else np.zeros((size, h.shape[1]))
            for n, row in ((n_neg, h[0].astype(np.float64)), (n_pos, h[1].astype(np.float64)))
        )
        tp, fp = pos[:, flagged].sum(axis=1), neg[:, flagged].sum(axis=1)
        reps = metrics_from_counts(tp, fp, n_neg - fp, n_pos - tp)
        reps["auroc"], reps["auprc"] = _auc_ap_from_counts(neg, pos)
        for k in names:
            collected[k].append(reps[k])
    return {k: _percentile_interval(np.concatenate(collected[k]), alpha) for k in names}


def _percentile_interval(values: np.ndarray, alpha: float) -> tuple[float, float]:
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return (_NAN, _NAN)
    lo, hi = np.quantile(values, [alpha / 2.0, 1.0 - alpha / 2.0])
    return (float(lo), float(hi))


# ----------------------------------------------------------------------------------------------------------------
# T-score agreement from additive sums (what a site can share instead of its cases)

TSCORE_SUM_KEYS = ("n", "sum_x", "sum_y", "sum_xx", "sum_yy", "sum_xy", "sum_abs_err", "sum_sq_err")
# The T-score estimate read as a screening score (WHO: bone loss below -1.0) is histogrammed on this range in
# 0.1-unit bins, so the WHO cut falls on a bin edge and a site shares counts, not estimates.
TSCORE_RANGE = (-6.0, 3.0)
TSCORE_BINS = 90


def tscore_screening_score(t_pred: Any) -> np.ndarray:
    """The T-score estimate as a score in [0, 1] that rises with bone loss (lower T-score), clipped to the range."""
    lo, hi = TSCORE_RANGE
    return np.clip((hi - np.asarray(t_pred, dtype=np.float64)) / (hi - lo), 0.0, 1.0)


def tscore_sums(t_true: Any, t_pred: Any) -> np.ndarray:
    """The sufficient statistics of :data:`TSCORE_SUM_KEYS` over the pairs where both values are known."""
    x = np.asarray(t_true, dtype=np.float64)
    y = np.asarray(t_pred, dtype=np.float64)
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]
    d = y - x
    return np.array(
        [len(x), x.sum(), y.sum(), (x * x).sum(), (y * y).sum(), (x * y).sum(), np.abs(d).sum(), (d * d).sum()],
        dtype=np.float64,
    )


def regression_from_sums(sums: Any, alpha: float = 0.05) -> dict[str, float]:
    """MAE, RMSE, Pearson r with its Fisher-z interval and Bland–Altman bias and limits, from :func:`tscore_sums`.

    Summed over sites these give exactly the agreement of the concatenated cohort (up to float rounding), so one
    formula serves a single evaluation and a federation. Differences are estimate − reference; limits are
    bias ± 1.96 SD (ddof=1).
    """
    n, sx, sy, sxx, syy, sxy, sabs, ssq = (float(v) for v in np.asarray(sums, dtype=np.float64))
    out = dict.fromkeys(
        ("mae", "rmse", "pearson_r", "pearson_r_ci_lo", "pearson_r_ci_hi", "bland_altman_bias"), _NAN
    ) | {"n": n, "bland_altman_loa_low": _NAN, "bland_altman_loa_high": _NAN}
    if n <= 0:
        return out
    out["mae"] = sabs / n
    out["rmse"] = float(np.sqrt(ssq / n))
    out["bland_altman_bias"] = bias = (sy - sx) / n
    if n >= 2:
        sd = float(np.sqrt(max(ssq - n * bias * bias, 0.0) / (n - 1)))
        out["bland_altman_loa_low"], out["bland_altman_loa_high"] = bias - 1.96 * sd, bias + 1.96 * sd
    vx, vy = n * sxx - sx * sx, n * syy - sy * sy
    scale = max(abs(n * sxx), abs(n * syy), 1.0)
    if n >= 2 and vx > 1e-12 * scale and vy > 1e-12 * scale:
        r = float(np.clip((n * sxy - sx * sy) / np.sqrt(vx * vy), -1.0, 1.0))
        out["pearson_r"] = r
        if n >= 4:
            z = np.arctanh(np.clip(r, -1 + 1e-15, 1 - 1e-15))
            half = stats.norm.ppf(1.0 - alpha / 2.0) / np.sqrt(n - 3)
            out["pearson_r_ci_lo"], out["pearson_r_ci_hi"] = float(np.tanh(z - half)), float(np.tanh(z + half))
    return out


def curves_from_histogram(hist: Any) -> dict[str, np.ndarray]:
    """ROC and PR curve points of a cohort known by its histogram (bin centres as tied scores, weighted)."""
    h = np.asarray(hist, dtype=np.float64)
    edges = histogram_edges(h.shape[1])
    centres = (edges[:-1] + edges[1:]) / 2.0
    keep_neg, keep_pos = h[0] > 0, h[1] > 0
    scores = np.concatenate([centres[keep_neg], centres[keep_pos]])
    labels = np.concatenate([np.zeros(keep_neg.sum()), np.ones(keep_pos.sum())])
    weights = np.concatenate([h[0][keep_neg], h[1][keep_pos]])
    fpr, tpr, _ = roc_curve(labels, scores, sample_weight=weights)
    precision, recall, _ = precision_recall_curve(labels, scores, sample_weight=weights)
    return {"fpr": fpr, "tpr": tpr, "precision": precision, "recall": recall}


def reliability_from_histogram(hist: Any, n_groups: int = 10) -> dict[str, np.ndarray | float]:
    """Reliability diagram and expected calibration error of a cohort known by its histogram.

    The fine histogram bins are grouped into ``n_groups`` equal-width probability bins; within a group the mean
    predicted probability is taken at the fine bins' centres (off by at most half a fine bin, 0.0005 with 1000
    bins), the observed rate is exact. ECE = Σ (group size / n) · |observed − predicted|, as in Guo et al. 2017.
    """
    h = np.asarray(hist, dtype=np.float64)
    n_bins = h.shape[1]
    if n_bins % n_groups:
        raise ValueError(f"{n_bins} histogram bins do not divide into {n_groups} reliability groups")
    edges = histogram_edges(n_bins)
    centres = (edges[:-1] + edges[1:]) / 2.0
    total = h.sum(axis=0)
    count = total.reshape(n_groups, -1).sum(axis=1)
    predicted = _div((total * centres).reshape(n_groups, -1).sum(axis=1), count)
    observed = _div(h[1].reshape(n_groups, -1).sum(axis=1), count)
    n = count.sum()
    ece = float(np.nansum(count * np.abs(observed - predicted)) / n) if n else _NAN
    return {"count": count, "predicted": predicted, "observed": observed, "ece": ece}


def brier_from_histogram(hist: Any) -> float:
    """Brier score at the bins' centres (for scores that were only binned, e.g. the uncalibrated ones)."""
    h = np.asarray(hist, dtype=np.float64)
    edges = histogram_edges(h.shape[1])
    centres = (edges[:-1] + edges[1:]) / 2.0
    n = h.sum()
    return float(((h[0] * centres**2).sum() + (h[1] * (1 - centres) ** 2).sum()) / n) if n else _NAN


def spearman_from_joint_histogram(joint: Any) -> float:
    """Spearman's rho of pairs known only by their 2-D histogram: midranks of the bins, weighted by the counts.

    Pairs that share a bin tie, so this is Spearman's rho with ties on the binned values (scipy's ``spearmanr``
    on the bin indices gives the same number); NaN for fewer than 3 pairs or a constant margin.
    """
    h = np.asarray(joint, dtype=np.float64)
    n = h.sum()
    if n < 3:
        return _NAN

    def midranks(counts: np.ndarray) -> np.ndarray:
        return np.cumsum(counts) - (counts - 1) / 2.0

    rx, ry = midranks(h.sum(axis=1)), midranks(h.sum(axis=0))
    mx, my = (h.sum(axis=1) * rx).sum() / n, (h.sum(axis=0) * ry).sum() / n
    dx, dy = rx - mx, ry - my
    cov = (h * np.outer(dx, dy)).sum()
    var_x, var_y = (h.sum(axis=1) * dx**2).sum(), (h.sum(axis=0) * dy**2).sum()
    return float(cov / np.sqrt(var_x * var_y)) if var_x > 0 and var_y > 0 else _NAN


__all__ = [
    "METRIC_NAMES",
    "RULE_CONSTRAINED",
    "RULE_FALLBACK",
    "TSCORE_SUM_KEYS",
    "bootstrap_ci",
    "bootstrap_ci_from_histogram",
    "brier_from_histogram",
    "classification_metrics",
    "confusion_at_thresholds",
    "curves_from_histogram",
    "histogram_edges",
    "metrics_from_histogram",
    "ranking_metrics",
    "regression_from_sums",
    "regression_metrics",
    "reliability_from_histogram",
    "score_histogram",
    "select_threshold",
    "select_threshold_from_counts",
    "spearman_from_joint_histogram",
    "threshold_selection",
    "threshold_selection_from_counts",
    "tscore_sums",
]
