"""The wire protocol between the ServerApp and the ClientApps: message kinds, record keys, payload types.

Flower-free, so ``client/`` and ``server/`` import the same names from here and never keep keys in step by
convention (MONAI ``fl/utils/constants.py`` style). Statistics travel as typed arrays (dtype and shape kept) in
an ``ArrayRecord`` under :attr:`Key.STATS`; every message and every reply carries :data:`PROTOCOL_VERSION`, and
a peer speaking another version is refused with an error that names it.

A run's resolved configuration travels once, in the site-info query; later messages carry its digest.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

import numpy as np

from strnet.calibration import PlattStats
from strnet.errors import SiteError
from strnet.sufficient import EvaluationCounts, ValidationCounts

PROTOCOL_VERSION = 3


class MessageKind:
    """Flower message types (``<type>.<action>``; the ClientApp registers the action part).

    Plain ``str`` constants (not an Enum) so they go into Flower records and protobuf maps unchanged.
    """

    SITE_INFO = "query.site_info"  # who are you, how many cases; carries the run's configuration
    TRAIN = "train"  # local epochs from the global weights at the round's learning rate
    VAL_STATS = "query.val_stats"  # ValidationCounts of the global model (calibrated when the message says so)
    CALIBRATE = "query.calibration"  # PlattStats of the kept model's validation logits at the sent (a, b)
    BATCHNORM = "query.batchnorm"  # FedBN: the site's BatchNorm tensors of one round, sent once after training
    OOD_MOMENTS = "query.ood_moments"  # FeatureMoments of the kept model's neck features on the training split
    OOD_DISTANCES = "query.ood_distances"  # histogram of validation distances under the pooled Gaussian
    TSCORE_VAL = "query.tscore_val"  # validation (n, Σ err², Σ |err|) of the sent T-score branch
    TSCORE_TRAIN = "query.tscore_train"  # local steps on the sent T-score branch; replies it and its case count
    FROZEN = "evaluate.frozen"  # EvaluationCounts of the final model at τ*

    @staticmethod
    def action(kind: str) -> str:
        return kind.partition(".")[2]


class Key:
    """Records inside a message's RecordDict."""

    ARRAYS = "arrays"  # ArrayRecord: model weights
    STATS = "stats"  # ArrayRecord: ValidationCounts / EvaluationCounts fields
    CONFIG = "config"  # ConfigRecord: the instruction's settings (Field below)
    METRICS = "metrics"  # MetricRecord: scalars (losses, counts, the FedAvg weight)
    INFO = "info"  # ConfigRecord on every reply: site, role, protocol version


class Field:
    """Entries of the CONFIG and INFO records."""

    VERSION = "protocol-version"
    CONFIG_JSON = "config-json"
    CONFIG_DIGEST = "config-digest"
    FEDERATION_ID = "federation-id"  # names a federation across a resume; sites key their kept state by it
    SERVER_ROUND = "server-round"
    LEARNING_RATE = "lr"
    PROXIMAL_MU = "proximal-mu"  # FedProx (Flower's key): weight of the proximal term in a site's loss
    THRESHOLD = "threshold"
    PLATT_A = "platt-a"  # the screening calibration p = sigmoid(a·logit + b)
    PLATT_B = "platt-b"
    TARGET_NEG = "platt-target-neg"  # Platt's smoothed targets, from the pooled class counts
    TARGET_POS = "platt-target-pos"
    STEPS = "steps"  # local optimizer steps (T-score branch refit)
    SHRINKAGE = "shrinkage"  # the pooled Gaussian's covariance shrinkage and case count (OOD)
    N_CASES = "n-cases"
    MODEL_DIGEST = "model-digest"  # which weights a calibration step refers to (sent once, then by digest)
    SITE = "site"
    ROLE = "role"


WEIGHT = "num-examples"  # FedAvg's weight in a train reply's MetricRecord (Flower's own key)


class ProtocolError(SiteError):
    """A peer that speaks another protocol version or sends a message this version does not know."""


def config_digest(config_json: str) -> str:
    return hashlib.sha256(config_json.encode()).hexdigest()[:16]


def check_version(value: Any, site: str) -> None:
    if value != PROTOCOL_VERSION:
        raise ProtocolError(
            site,
            f"speaks protocol version {value!r}, this side speaks {PROTOCOL_VERSION}: "
            "install the same strnet version on the server and every site",
        )


def encode(stats: ValidationCounts | EvaluationCounts | PlattStats) -> dict[str, np.ndarray]:
    """Field name -> array, dtype and shape as computed (int64 counts, float64 sums)."""
    return stats.arrays()


def encode_splits(counts: Mapping[str, EvaluationCounts]) -> dict[str, np.ndarray]:
    """A frozen evaluation's counts per split (``test``, ``val``) as ``<split>.<field>`` arrays."""
    return {f"{split}.{k}": v for split, c in counts.items() for k, v in encode(c).items()}


def decode_splits(
    site: str, arrays: Mapping[str, np.ndarray], *, n_bins: int, noised: bool = False
) -> dict[str, EvaluationCounts]:
    """The inverse of :func:`encode_splits`, each split checked by :func:`decode_evaluation`."""
    by_split: dict[str, dict[str, np.ndarray]] = {}
    for key, value in arrays.items():
        split, _, name = key.partition(".")
        by_split.setdefault(split, {})[name] = value
    if "test" not in by_split or set(by_split) - {"test", "val"}:
        raise SiteError(site, f"malformed evaluation statistics: splits {sorted(by_split)}, expected test [and val]")
    return {split: decode_evaluation(site, values, n_bins=n_bins, noised=noised) for split, values in by_split.items()}


def _arrays(site: str, arrays: Mapping[str, np.ndarray], names: tuple[str, ...]) -> dict[str, np.ndarray]:
    missing = [n for n in names if n not in arrays]
    extra = sorted(set(arrays) - set(names))
    if missing or extra:
        raise SiteError(site, f"malformed statistics: missing {missing}, unexpected {extra}")
    return {n: np.asarray(arrays[n]) for n in names}


def decode_validation(
    site: str, arrays: Mapping[str, np.ndarray], *, n_bins: int, n_grid: int, noised: bool = False
) -> ValidationCounts:
    """Validation counts from a reply, checked (shape, dtype, consistency) with errors naming the site;
    ``noised``: a histogram under ``privacy.statistics`` noise, the counts derived from it."""
    stats = ValidationCounts(**_arrays(site, arrays, ("hist", "tp", "fp", "tn", "fn")))
    try:
        stats.check(n_bins=n_bins, n_grid=n_grid, noised=noised)
    except ValueError as exc:
        raise SiteError(site, f"validation statistics: {exc}") from exc
    return stats


def decode_evaluation(
    site: str, arrays: Mapping[str, np.ndarray], *, n_bins: int, noised: bool = False
) -> EvaluationCounts:
    """Evaluation counts from a reply, checked; ``noised``: histograms under ``privacy.statistics`` noise."""
    names = tuple(f.name for f in fields(EvaluationCounts))
    stats = EvaluationCounts(**_arrays(site, arrays, names))
    try:
        stats.check(n_bins=n_bins, noised=noised)
    except ValueError as exc:
        raise SiteError(site, f"evaluation statistics: {exc}") from exc
    return stats


def decode_platt(site: str, arrays: Mapping[str, np.ndarray]) -> PlattStats:
    stats = PlattStats(**_arrays(site, arrays, tuple(f.name for f in fields(PlattStats))))
    try:
        stats.check()
    except ValueError as exc:
        raise SiteError(site, f"calibration statistics: {exc}") from exc
    return stats


def model_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """A short fingerprint of a set of weights (names, shapes and bytes)."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]
