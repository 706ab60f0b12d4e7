"""Pooled Platt calibration and the calibrated τ*: the kept model's validation scores never leave the sites.

The server runs :func:`strnet.calibration.fit_platt` — the very function centralized training runs on its own
logits — with a ``stats_at`` that asks every training site for the log-loss, gradient and Hessian of its
validation logits at the current (a, b) and sums them. The first request carries the weights; a site keeps its
logits in node state and later requests name the weights by digest. The same sites must answer every step
(a sum over a changing set of sites is not one objective); if one drops out, the fit stops with the identity
and the run says so.
"""

from __future__ import annotations

from typing import Any

from flwr.app import ArrayRecord

from server.pooled import QuorumError, pool
from server.replies import TrainingSites
from strnet.calibration import Platt, PlattStats, fit_platt, platt_targets
from strnet.errors import SiteError
from strnet.protocol import (
    Field,
    MessageKind,
    decode_platt,
    decode_validation,
)
from strnet.released import restore_validation
from strnet.sufficient import ValidationCounts


def pooled_calibration(sites: TrainingSites, arrays: ArrayRecord, counts: ValidationCounts) -> dict[str, Any]:
    """The bundle's ``calibration`` entry, fitted on the pooled validation statistics of the kept model.

    ``counts`` are the kept round's pooled validation counts: their class totals give Platt's targets.
    """
    n_neg, n_pos = (max(int(v), 0) for v in counts.hist.sum(axis=1))  # (noised totals can stray below 0)
    targets = platt_targets(n_pos, n_neg)
    digest = sites.shipping.digest(arrays)
    answered: list[str] = []

    def stats_at(params: Platt) -> PlattStats:
        first = not answered
        config = {
            Field.MODEL_DIGEST: digest,
            Field.PLATT_A: params.a,
            Field.PLATT_B: params.b,
            Field.TARGET_NEG: targets[0],
            Field.TARGET_POS: targets[1],
        }
        replies = sites.ask(MessageKind.CALIBRATE, config, model=arrays if first else None)
        per_site: dict[str, PlattStats] = {}
        for site, values in replies.items():
            try:
                per_site[site] = decode_platt(site, values)
            except SiteError as exc:
                sites.problem(f"calibration: {exc}")
        if first:
            answered.extend(sorted(per_site))
        elif sorted(per_site) != answered:
            raise QuorumError(f"calibration: sites {sorted(per_site)} answered, the fit started with {answered}")
        return pool(per_site, quorum=sites.cfg.federation.quorum, what="pooled calibration statistics")

    try:
        fitted = fit_platt(stats_at, n_pos=n_pos, n_neg=n_neg)
    except QuorumError as exc:
        sites.problem(str(exc))
        fitted = {"method": "platt", "n_pos": n_pos, "n_neg": n_neg} | Platt().to_dict()
        fitted["status"] = f"identity: {exc}"
    return fitted | {"fitted_on": "validation split, pooled Newton statistics over training sites", "sites": answered}


def calibrated_validation_counts(
    sites: TrainingSites, arrays: ArrayRecord, platt: Platt
) -> tuple[ValidationCounts, list[str]]:
    """The kept model's pooled validation counts on the calibrated scale (what τ* is chosen on)."""
    th = sites.cfg.threshold
    config = {Field.PLATT_A: platt.a, Field.PLATT_B: platt.b}
    per_site: dict[str, ValidationCounts] = {}
    noised = sites.cfg.privacy.statistics.noised
    for site, values in sites.ask(MessageKind.VAL_STATS, config, model=arrays).items():
        if noised:  # τ-grid counts from the noised histogram
            values = restore_validation(values, th.grid())
        try:
            per_site[site] = decode_validation(
                site, values, n_bins=th.histogram_bins, n_grid=len(th.grid()), noised=noised
            )
        except SiteError as exc:
            sites.problem(f"calibrated validation statistics: {exc}")
    pooled = pool(per_site, quorum=sites.cfg.federation.quorum, what="pooled calibrated validation statistics")
    return pooled, sorted(per_site)
