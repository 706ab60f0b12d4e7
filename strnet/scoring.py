"""The one place metrics are computed and named, for a single evaluation and for a pooled federation alike.

Every metric comes from :class:`strnet.sufficient.EvaluationCounts`: threshold metrics from the exact counts at
τ*, Brier from its exact sum, T-score agreement from exact sums. Only ranking metrics and their intervals
depend on what is at hand: with the raw predictions (a centralized run, a site's own data) they are exact
(scikit-learn) with a stratified bootstrap over cases; with pooled counts alone (the federation's server) they
come from the summed histogram, with the same stratified bootstrap drawn over its bins.

Names are ``{task}_{metric}`` (``screening_auroc``, ``t_score_mae``), intervals ``{task}_{metric}_ci_lo/_ci_hi``;
:func:`prefixed` adds ``{split}_`` and ``site.<name>.`` in front. MLflow, ``summary.json``, the evaluation table
and ``strnet compare`` all use exactly these names.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from strnet import metrics as M
from strnet.sufficient import EvaluationCounts, Predictions, histogram_ranking, screening_cases, severity_cases

TASKS = ("screening", "severity", "t_score")
CI_METRICS = tuple(k for k in M.METRIC_NAMES if k != "brier")  # Brier needs every score: no pooled interval
COUNT_METRICS = ("n", "n_pos", "n_neg", "tp", "fp", "tn", "fn")


def task_metrics(
    counts: EvaluationCounts,
    threshold: float,
    *,
    predictions: Predictions | None = None,
    n_boot: int,
    seed: int,
) -> dict[str, float]:
    """Screening metrics at ``threshold`` with 95 % intervals, severity ranking, T-score agreement — flat names.

    ``predictions`` (the raw scores behind ``counts``) makes AUROC/AUPRC and the bootstrap exact; without them
    the histogram stands in. Undefined values (one class only, too few T-scores) are NaN, never dropped, so
    every run reports the same set of names.
    """
    tp, fp, tn, fn = (int(v) for v in counts.at_threshold)
    n_pos, n_neg = tp + fn, tn + fp
    n = n_pos + n_neg
    screening: dict[str, float] = {k: float(v) for k, v in M.metrics_from_counts(tp, fp, tn, fn).items()}
    raw = predictions is not None and n > 0
    if raw:
        y, p = screening_cases(predictions)  # type: ignore[arg-type]
        screening |= M.ranking_metrics(y, p)
    else:
        screening |= histogram_ranking(counts.hist)
    screening["brier"] = float(counts.brier_sum[0]) / n if n else math.nan
    if n_boot > 0 and n > 0:
        if raw:
            cis = M.bootstrap_ci(y, p, threshold, metric_names=CI_METRICS, n_boot=n_boot, seed=seed)
        else:
            cis = M.bootstrap_ci_from_histogram(counts.hist, threshold, n_boot=n_boot, seed=seed)
    else:
        cis = {k: (math.nan, math.nan) for k in CI_METRICS}
    out = {f"screening_{k}": screening[k] for k in M.METRIC_NAMES}
    for k in CI_METRICS:
        out[f"screening_{k}_ci_lo"], out[f"screening_{k}_ci_hi"] = (float(v) for v in cis[k])
    out |= {f"screening_{k}": float(v) for k, v in zip(COUNT_METRICS, (n, n_pos, n_neg, tp, fp, tn, fn), strict=True)}
    sev_n = int(counts.severity_hist.sum())
    if predictions is not None and sev_n:
        severity = M.ranking_metrics(*severity_cases(predictions))
    else:
        severity = histogram_ranking(counts.severity_hist)
    out |= {"severity_n": float(sev_n), "severity_auroc": severity["auroc"], "severity_auprc": severity["auprc"]}
    out |= {f"t_score_{k}": float(v) for k, v in M.regression_from_sums(counts.tscore_sums).items()}
    return out


def evaluation_metrics(
    preds: Predictions, threshold: float, *, n_bins: int, n_boot: int, seed: int
) -> tuple[dict[str, float], EvaluationCounts]:
    """:func:`task_metrics` of raw predictions, with the counts they were computed from."""
    counts = EvaluationCounts.from_predictions(preds, threshold=threshold, n_bins=n_bins)
    return task_metrics(counts, threshold, predictions=preds, n_boot=n_boot, seed=seed), counts


def prefixed(metrics: Mapping[str, float], split: str, site: str | None = None) -> dict[str, float]:
    """``{split}_{name}``, or ``site.<site>.{split}_{name}`` for one site's own values."""
    head = f"site.{site}." if site else ""
    return {f"{head}{split}_{k}": v for k, v in metrics.items()}
