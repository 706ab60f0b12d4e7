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

import numpy as np
from scipy import stats

from strnet import metrics as M
from strnet.sufficient import (
    EvaluationCounts,
    Predictions,
    bilateral_pairs,
    film_scores,
    histogram_ranking,
    knee_films,
    screening_cases,
    severity_cases,
    tscore_screening_cases,
)

TASKS = ("screening", "radiograph", "severity", "t_score", "bilateral", "mirror")
CI_METRICS = tuple(k for k in M.METRIC_NAMES if k != "brier")  # Brier needs every score: no pooled interval
COUNT_METRICS = ("n", "n_pos", "n_neg", "tp", "fp", "tn", "fn", "n_pairs")


def _screening(
    hist: np.ndarray,
    at_threshold: np.ndarray,
    threshold: float,
    scores: tuple[np.ndarray, np.ndarray] | None,
    *,
    n_boot: int,
    seed: int,
    groups: np.ndarray | None = None,
) -> dict[str, float]:
    """Threshold metrics from the exact counts, ranking metrics exact from ``scores`` (else from the histogram),
    95 % intervals from a stratified bootstrap over cases (or over the histogram's bins)."""
    tp, fp, tn, fn = (int(v) for v in at_threshold)
    n_pos, n_neg = tp + fn, tn + fp
    n = n_pos + n_neg
    out: dict[str, float] = {k: float(v) for k, v in M.metrics_from_counts(tp, fp, tn, fn).items()}
    raw = scores is not None and n > 0
    out |= M.ranking_metrics(*scores) if raw else histogram_ranking(hist)  # type: ignore[misc]
    if n_boot > 0 and n > 0:
        if raw:
            cis = M.bootstrap_ci(
                *scores,  # type: ignore[misc]
                threshold,
                metric_names=CI_METRICS,
                n_boot=n_boot,
                seed=seed,
                groups=groups,
            )
        else:
            cis = M.bootstrap_ci_from_histogram(hist, threshold, n_boot=n_boot, seed=seed)
    else:
        cis = {k: (math.nan, math.nan) for k in CI_METRICS}
    for k in CI_METRICS:
        out[f"{k}_ci_lo"], out[f"{k}_ci_hi"] = (float(v) for v in cis[k])
    return out | {k: float(v) for k, v in zip(COUNT_METRICS, (n, n_pos, n_neg, tp, fp, tn, fn), strict=False)}


def task_metrics(
    counts: EvaluationCounts,
    threshold: float,
    *,
    predictions: Predictions | None = None,
    n_boot: int,
    seed: int,
) -> dict[str, float]:
    """Per-knee and per-radiograph screening at ``threshold`` with 95 % intervals (with raw predictions, the
    knee-level bootstrap resamples whole radiographs), calibration, severity ranking,
    T-score agreement, left-right agreement and mirror stability — flat names.

    ``predictions`` (the raw scores behind ``counts``) makes AUROC/AUPRC, Spearman and the bootstrap exact;
    without them the histograms stand in. Undefined values (one class only, too few T-scores, no bilateral
    films) are NaN, never dropped, so every run reports the same set of names.
    """
    raw = predictions is not None
    # per knee (bootstrap over whole radiographs) and per radiograph (a film = the mean of its knees)
    knee, film = (
        _screening(hist, at, threshold, cases, n_boot=n_boot, seed=seed, groups=groups)
        for hist, at, cases, groups in (
            (
                counts.hist,
                counts.at_threshold,
                screening_cases(predictions) if raw else None,
                knee_films(predictions) if raw else None,
            ),  # type: ignore[arg-type]
            (counts.film_hist, counts.film_at_threshold, film_scores(predictions) if raw else None, None),  # type: ignore[arg-type]
        )
    )
    n = knee["n"]
    knee["brier"] = float(counts.brier_sum[0]) / n if n else math.nan
    knee["brier_raw"] = float(counts.brier_sum_raw[0]) / n if n else math.nan
    knee["ece"] = float(M.reliability_from_histogram(counts.hist)["ece"])
    knee["ece_raw"] = float(M.reliability_from_histogram(counts.raw_hist)["ece"])
    out = {f"screening_{k}": v for k, v in knee.items()}
    out |= {f"radiograph_{k}": v for k, v in film.items() if k in RADIOGRAPH_METRICS}
    sev_n = int(counts.severity_hist.sum())
    if predictions is not None and sev_n:
        severity = M.ranking_metrics(*severity_cases(predictions))
    else:
        severity = histogram_ranking(counts.severity_hist)
    out |= {"severity_n": float(sev_n), "severity_auroc": severity["auroc"], "severity_auprc": severity["auprc"]}
    out |= {f"t_score_{k}": float(v) for k, v in M.regression_from_sums(counts.tscore_sums).items()}
    # The T-score estimate read through the WHO cut (-1.0) as a screening answer, on the T-score cohort: the
    # paper's second route to a bone-loss call, and the one that carries the covariates (age, sex, BMI).
    if predictions is not None:
        ty, t_pred = tscore_screening_cases(predictions)
        who_rank = M.ranking_metrics(ty, M.tscore_screening_score(t_pred)) if len(ty) else {"auroc": math.nan}
    else:
        who_rank = histogram_ranking(counts.tscore_hist)
    tp, fp, tn, fn = (float(v) for v in counts.tscore_who)
    out |= {
        "t_score_who_n": tp + fp + tn + fn,
        "t_score_who_auroc": float(who_rank["auroc"]),
        "t_score_who_sensitivity": tp / (tp + fn) if tp + fn else math.nan,
        "t_score_who_specificity": tn / (tn + fp) if tn + fp else math.nan,
    }
    pairs, disagree, abs_dp = (float(v) for v in counts.bilateral_sums)
    if predictions is not None:
        right, left = bilateral_pairs(predictions)
        rho = float(stats.spearmanr(right, left).statistic) if len(right) >= 3 else math.nan
    else:
        rho = M.spearman_from_joint_histogram(counts.bilateral_hist)
    out |= {
        "bilateral_n_pairs": pairs,
        "bilateral_flag_disagreement": disagree / pairs if pairs else math.nan,
        "bilateral_mean_abs_dp": abs_dp / pairs if pairs else math.nan,
        "bilateral_spearman": rho,
    }
    knees, flips, mirror_dp = (float(v) for v in counts.mirror_sums)
    out |= {
        "mirror_n": knees,
        "mirror_flag_change": flips / knees if knees else math.nan,
        "mirror_mean_abs_dp": mirror_dp / knees if knees else math.nan,
    }
    return out


RADIOGRAPH_METRICS = (
    "auroc",
    "auroc_ci_lo",
    "auroc_ci_hi",
    "auprc",
    "sensitivity",
    "sensitivity_ci_lo",
    "sensitivity_ci_hi",
    "specificity",
    "specificity_ci_lo",
    "specificity_ci_hi",
    "n",
    "n_pos",
    "n_neg",
)


def evaluation_metrics(
    preds: Predictions, threshold: float, *, n_bins: int, n_boot: int, seed: int
) -> tuple[dict[str, float], EvaluationCounts]:
    """:func:`task_metrics` of raw predictions, with the counts they were computed from."""
    counts = EvaluationCounts.from_predictions(preds, threshold=threshold, n_bins=n_bins)
    return task_metrics(counts, threshold, predictions=preds, n_boot=n_boot, seed=seed), counts


FIT_METRICS = ("screening_n", "screening_auroc", "screening_auprc")


def fit_of(metrics: Mapping[str, float]) -> dict[str, float]:
    """The kept model on a site's own training split, un-augmented: how far it fits what it was taught.

    A model that cannot rank its own training knees of one site has learnt a rule the other sites' data
    contradicts (the federated runs once fitted Mendeley's training split at AUROC 0.63 against the centralized
    0.99, invisible in every other number); test metrics alone cannot tell that from a hard test split.
    """
    return {k: float(metrics[k]) for k in FIT_METRICS}


def prefixed(metrics: Mapping[str, float], split: str, site: str | None = None) -> dict[str, float]:
    """``{split}_{name}``, or ``site.<site>.{split}_{name}`` for one site's own values."""
    head = f"site.{site}." if site else ""
    return {f"{head}{split}_{k}": v for k, v in metrics.items()}
