"""Pooled statistics: sum what the sites send and choose τ* — never from raw scores.

Sites send the additive counts of :mod:`strnet.sufficient`. Summing them gives exactly the counts of the
concatenated cohort, so the pooled τ* equals the τ* a centralized run would choose on the union of the
validation splits, and every pooled metric (:func:`strnet.scoring.task_metrics`) is that of the union up to
the histogram's bin width for AUROC/AUPRC. A pooled AUROC is *not* an average of site AUROCs; both are
reported, side by side.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

from configs.schema import ThresholdConfig
from strnet.errors import StrnetError
from strnet.sufficient import EvaluationCounts, ValidationCounts

S = TypeVar("S", ValidationCounts, EvaluationCounts)


class QuorumError(StrnetError):
    """Fewer usable site replies than ``federation.quorum``: the step fails instead of silently shrinking."""


def pool(per_site: Mapping[str, S], *, quorum: int, what: str, problems: Sequence[str] = ()) -> S:
    """The sum over the sites that replied usably; fewer than ``quorum`` of them is a :class:`QuorumError`."""
    if len(per_site) < max(quorum, 1):
        detail = "; ".join(problems) if problems else "no usable replies"
        raise QuorumError(f"{what}: {len(per_site)} usable site(s) {sorted(per_site)}, quorum is {quorum} ({detail})")
    stats = list(per_site.values())
    total = stats[0]
    for s in stats[1:]:
        total = total + s
    return total


def pooled_threshold(
    counts: ValidationCounts,
    th: ThresholdConfig,
    *,
    sites: Sequence[str],
    excluded: Sequence[str],
    noised: bool = False,
) -> dict[str, Any]:
    """τ* from the summed counts, with its provenance (which sites, how many cases) for the bundle."""
    try:
        sel = counts.threshold(th.grid(), th.min_sensitivity)
    except ValueError as exc:
        hint = (
            " (privacy.statistics noise drove a class's pooled total to <= 0: use fewer histogram bins, less "
            "noise or more validation cases)"
            if noised
            else ""
        )
        raise StrnetError(
            f"τ* cannot be chosen on the pooled validation counts of {sorted(sites)}: {exc}{hint}"
        ) from exc
    sel.update(
        chosen_on="validation split, pooled counts over training sites (federated)",
        sites=sorted(sites),
        n_cases=counts.n_cases,
        grid=[th.grid_start, th.grid_stop, th.grid_step],
        excluded=list(excluded),
    )
    return sel


def weighted_average(
    states: list[dict[str, np.ndarray]],
    weights: list[float],
    reference: Mapping[str, tuple[tuple[int, ...], np.dtype]] | None = None,
) -> dict[str, np.ndarray]:
    """Σ wᵢ·xᵢ / Σ wᵢ in float64, cast back to each tensor's dtype (integers rounded, never left as floats)."""
    if not states or len(states) != len(weights):
        raise ValueError("need one weight per state and at least one state")
    total = float(sum(weights))
    out: dict[str, np.ndarray] = {}
    for key in states[0]:
        acc = np.zeros(states[0][key].shape, np.float64)
        for state, w in zip(states, weights, strict=True):
            acc += state[key].astype(np.float64) * (w / total)
        dtype = reference[key][1] if reference and key in reference else states[0][key].dtype
        out[key] = np.asarray(np.rint(acc) if np.issubdtype(dtype, np.integer) else acc).astype(dtype)
    return out
