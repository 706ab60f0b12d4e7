"""The federated subgroup table, from the per-level score histograms the sites release — never a prediction.

Each site's frozen evaluation carries, per split, a per-class screening histogram for every fixed level of
:data:`strnet.subgroups.LEVELS` (sex, age band, BMI band). Summed over the training sites they are the pooled
test split's histograms per level, and from them come the same rows :func:`strnet.subgroups.subgroup_metrics`
computes from per-knee predictions: AUROC from the histogram (:func:`strnet.sufficient.histogram_ranking`,
equal to the per-knee AUROC up to ties within a bin), sensitivity and specificity at τ* read off the histogram
at the τ* bin edge (:func:`strnet.released.counts_at`, exact), 95 % intervals from the stratified histogram
bootstrap the pooled metrics use, small subgroups marked by the same rule. ``source`` has one row per training
site (the site's whole split is its source: source strings are each site's own vocabulary).

A level a site withheld under ``privacy.statistics.min_cases`` is pooled without that site, and the row's
``withheld`` names the sites; a level withheld everywhere it has knees has no numbers (None), never zeros.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import Any

import numpy as np

from strnet import metrics as M
from strnet.released import counts_at
from strnet.subgroups import METRICS, SUBGROUP_LEVELS, small_reason
from strnet.sufficient import SUBGROUP_ARRAYS, EvaluationCounts, histogram_ranking, usable_quad

FEDERATED_NOTE = (
    "from the per-level score histograms the training sites release (never a prediction), summed: AUROC from the "
    "histogram (equal to the per-knee AUROC up to ties within a bin), sensitivity and specificity at τ* exact, "
    "95% intervals from a stratified bootstrap of the histogram counts; source: one row per training site (its "
    "whole test split); a level a site withheld under privacy.statistics.min_cases is pooled without it and says so"
)


def federated_subgroups(
    per_site: Mapping[str, EvaluationCounts],
    withheld: Mapping[str, Collection[str]],
    threshold: float,
    *,
    split: str = "test",
    min_cases: int,
    n_boot: int,
    seed: int,
) -> list[dict[str, Any]]:
    """The subgroup rows of the pooled ``split`` of ``per_site`` (the training sites' decoded counts, withheld
    statistics as zeros), in the keys and level order of :func:`strnet.subgroups.subgroup_metrics`.

    ``withheld``: site -> the statistic ids it withheld (``<split>.<key>``, :func:`server.frozen.frozen_evaluation`);
    ``min_cases``: the k they fell short of, for the row's words."""
    rows: list[dict[str, Any]] = []
    if not per_site:
        return rows
    for i, (variable, level) in enumerate(SUBGROUP_LEVELS):
        ident = f"{split}.{SUBGROUP_ARRAYS[i]}"
        held = sorted(site for site in per_site if ident in withheld.get(site, ()))
        hist = np.sum([np.asarray(c.subgroup_hist[i], np.int64) for c in per_site.values()], axis=0)
        rows += _row(variable, level, hist, held, threshold, min_cases=min_cases, n_boot=n_boot, seed=seed)
    for site in sorted(per_site):
        held = [site] if f"{split}.screening" in withheld.get(site, ()) else []
        hist = per_site[site].hist
        rows += _row("source", site, hist, held, threshold, min_cases=min_cases, n_boot=n_boot, seed=seed)
    return rows


def _row(
    variable: str,
    level: str,
    hist: np.ndarray,
    held: list[str],
    threshold: float,
    *,
    min_cases: int,
    n_boot: int,
    seed: int,
) -> list[dict[str, Any]]:
    """[] for a level no site has a knee in; else its one row (numbers None when every site holding it withheld it).

    Counts come from the unclipped (possibly noised) sum, brought into range as every pooled count is
    (:func:`strnet.sufficient.usable_quad`); AUROC and the bootstrap read the histogram clipped at 0 (the identity
    on exact counts)."""
    raw = np.asarray(hist, np.int64)
    at = counts_at(raw, [threshold])
    tp, fp, tn, fn = (int(v[0]) for v in usable_quad(at["tp"], at["fp"], at["tn"], at["fn"]))
    n_pos, n_neg = tp + fn, fp + tn
    n = n_pos + n_neg
    where = ", ".join(held)
    if n == 0:
        if not held:
            return []
        empty = {k: math.nan for m in METRICS for k in (m, f"{m}_ci_lo", f"{m}_ci_hi")}
        return [
            {"variable": variable, "level": level, "n": None, "n_pos": None, "n_neg": None}
            | empty
            | {"small": "", "withheld": f"withheld by {where} (fewer than k={min_cases} knees)"}
        ]
    clipped = np.clip(raw, 0, None)
    rates = M.metrics_from_counts(np.array(tp), np.array(fp), np.array(tn), np.array(fn))
    values = {"auroc": histogram_ranking(clipped)["auroc"], "sensitivity": rates["sensitivity"]}
    values["specificity"] = rates["specificity"]
    if n_boot > 0 and clipped.sum() > 0:
        cis = M.bootstrap_ci_from_histogram(clipped, threshold, n_boot=n_boot, seed=seed)
    else:
        cis = {k: (math.nan, math.nan) for k in METRICS}
    row: dict[str, Any] = {"variable": variable, "level": level, "n": n, "n_pos": n_pos, "n_neg": n_neg}
    for k in METRICS:
        row |= {k: float(values[k]), f"{k}_ci_lo": float(cis[k][0]), f"{k}_ci_hi": float(cis[k][1])}
    row["small"] = small_reason(n, n_pos, n_neg)
    row["withheld"] = f"without {where}: withheld there (fewer than k={min_cases} knees)" if held else ""
    return [row]
