"""The wire protocol between the ServerApp and the ClientApps: message kinds, record keys, payload types.

Flower-free, so ``client/`` and ``server/`` import the same names from here and never keep keys in step by
convention (MONAI ``fl/utils/constants.py`` style). Statistics travel as typed arrays (dtype and shape kept) in
an ``ArrayRecord`` under :attr:`Key.STATS`; every message and every reply carries :data:`PROTOCOL_VERSION`, and
a peer speaking another version is refused with an error that names it.

A run's resolved configuration travels once, in the site-info query; later messages carry its digest.

Model weights go onto the wire through :func:`to_wire` and come off it through :func:`from_wire`, on both sides,
so there is one way to pack them: at ``federation.transport`` precision (fp16 by default) in every training
round — the global weights of the train and the validation-statistics messages, and the sites' trained weights
— and exactly (fp32) in the few messages about the final model after training (FedBN's BatchNorm send,
calibration, OOD, T-score refit, frozen evaluation), so that every number in the bundle is of the bundled
weights. :func:`round_nbytes` says what one round costs per site.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

import numpy as np
import torch

from strnet.calibration import PlattStats
from strnet.errors import SiteError
from strnet.sufficient import EvaluationCounts, ValidationCounts

PROTOCOL_VERSION = 7  # 5: a train message may ask for validation counts of its weights first; the final model
# travels to a site once and is named by digest afterwards. 6: one message may carry several queries (BATCH).
# 7: FedBN's bundle asks for BatchNorm statistics re-estimated under the final model (BN_STATISTICS)


class MessageKind:
    """Flower message types (``<type>.<action>``; the ClientApp registers the action part).

    Plain ``str`` constants (not an Enum) so they go into Flower records and protobuf maps unchanged.
    """

    SITE_INFO = "query.site_info"  # who are you, how many cases; carries the run's configuration
    TRAIN = "train"  # local epochs from the global weights at the round's learning rate (validating them first)
    VAL_STATS = "query.val_stats"  # ValidationCounts of the global model (calibrated when the message says so)
    CALIBRATE = "query.calibration"  # PlattStats of the kept model's validation logits at the sent (a, b)
    BATCHNORM = "query.batchnorm"  # FedBN: the site's BatchNorm tensors of one round, sent once after training
    BN_STATISTICS = "query.bn_statistics"  # FedBN: BatchNorm input statistics of the final model on the training split
    OOD_MOMENTS = "query.ood_moments"  # FeatureMoments of the kept model's neck features on the training split
    OOD_DISTANCES = "query.ood_distances"  # histogram of validation distances under the pooled Gaussian
    TSCORE_VAL = "query.tscore_val"  # validation (n, Σ err², Σ |err|) of the sent T-score branch
    TSCORE_TRAIN = "query.tscore_train"  # local steps on the sent T-score branch; replies it and its case count
    FROZEN = "evaluate.frozen"  # EvaluationCounts of the final model at τ*
    # several of the queries above in one message, answered in one reply (the after-training conversations
    # share exchanges): part ``kind``'s records travel as ``kind/<record>`` (:func:`part_name`)
    BATCH = "query.batch"

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
    ERROR = "error"  # ConfigRecord of a batch reply's part that failed at the site: its public reason


class Field:
    """Entries of the CONFIG and INFO records."""

    VERSION = "protocol-version"
    CONFIG_JSON = "config-json"
    CONFIG_DIGEST = "config-digest"
    FEDERATION_ID = "federation-id"  # names a federation across a resume; sites key their kept state by it
    SERVER_ROUND = "server-round"
    LEARNING_RATE = "lr"
    VALIDATE = "validate"  # a train message: validation counts of the sent weights first, in the reply's stats
    PROXIMAL_MU = "proximal-mu"  # FedProx (Flower's key): weight of the proximal term in a site's loss
    THRESHOLD = "threshold"
    PLATT_A = "platt-a"  # the screening calibration p = sigmoid(a·logit + b)
    PLATT_B = "platt-b"
    TARGET_NEG = "platt-target-neg"  # Platt's smoothed targets, from the pooled class counts
    TARGET_POS = "platt-target-pos"
    STEPS = "steps"  # local optimizer steps (T-score branch refit)
    SHRINKAGE = "shrinkage"  # the pooled Gaussian's covariance shrinkage and case count (OOD)
    N_CASES = "n-cases"
    MODEL_DIGEST = "model-digest"  # which whole model a message is about (sent once, then named by digest)
    KEEP_MODEL = "keep-model"  # the site keeps the message's whole model under MODEL_DIGEST for later messages
    BASE_DIGEST = "base-digest"  # the message's arrays are the tensors that differ from this model the site keeps
    SITE = "site"
    ROLE = "role"
    PARTS = "parts"  # a BATCH message: the kinds of its queries, in the order the site answers them
    REASON = "reason"  # a failed part's public reason (client.sanitize)


WEIGHT = "num-examples"  # FedAvg's weight in a train reply's MetricRecord (Flower's own key)


def part_name(kind: str, record: str) -> str:
    """The name a record of a BATCH message's part ``kind`` travels under."""
    return f"{kind}/{record}"


def split_part(name: str) -> tuple[str, str] | None:
    """(kind, record) of a BATCH part's record name; None for a record of the message itself."""
    kind, sep, record = name.partition("/")
    return (kind, record) if sep else None


def part_records(records: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """The records of a BATCH message's (or reply's) part ``kind``, under their own names."""
    return {p[1]: record for name, record in records.items() if (p := split_part(name)) and p[0] == kind}


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
    if "test" not in by_split or set(by_split) - {"test", "val", "train"}:
        raise SiteError(
            site, f"malformed evaluation statistics: splits {sorted(by_split)}, expected test [and val, train]"
        )
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
    stats = EvaluationCounts.from_arrays(_arrays(site, arrays, EvaluationCounts.wire_names()))
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


# ---------------------------------------------------------------------------------------------------- weights

# ``federation.transport`` -> the dtype floating model tensors travel in (configs/schema.py lists the same names)
WIRE_DTYPES: dict[str, np.dtype] = {"fp16": np.dtype(np.float16), "fp32": np.dtype(np.float32)}


def _numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _numpy_dtype(dtype: Any) -> np.dtype:
    if isinstance(dtype, torch.dtype):
        return torch.empty((), dtype=dtype).numpy().dtype
    return np.dtype(dtype)


def wire_dtype(transport: str) -> np.dtype:
    try:
        return WIRE_DTYPES[transport]
    except KeyError:
        raise ValueError(f"federation.transport={transport!r} is not one of {sorted(WIRE_DTYPES)}") from None


def _narrowed(array: np.ndarray, wire: np.dtype) -> bool:
    """Whether ``array`` travels at the wire's precision: a floating weight matrix wider than it (:func:`to_wire`)."""
    return np.issubdtype(array.dtype, np.floating) and array.dtype.itemsize > wire.itemsize and array.ndim >= 2


def to_wire(state: Mapping[str, Any], transport: str) -> dict[str, np.ndarray]:
    """Model tensors (torch or numpy) as the contiguous numpy arrays that go into a message's ``ArrayRecord``.

    Floating tensors of two or more dimensions (convolution and linear weights: all but ~0.1 % of the bytes)
    wider than the transport dtype are narrowed to it (fp16 halves the bytes; round to nearest: relative error
    <= 2**-11, absolute <= 2**-25 below 2**-14). Vectors and scalars — BatchNorm scales, shifts and running
    statistics, biases — travel at their own precision: a BatchNorm scale sits near 1, where fp16's steps are
    2**-10, a whole round's update at lr 1e-4, and every site trained from scales moved by up to half that: over
    8 paired seeds of the demo, fp16 runs spread 3x as much as fp32 runs (AUROC SD 0.031 against 0.009 on an
    independent draw); with vectors at fp32, 0.006, and fp16 − fp32 = +0.009 (95 % CI +0.003 to +0.015;
    ``strnet bench --only transport``). Integer tensors (BatchNorm's
    ``num_batches_tracked``) travel exactly. A floating tensor with a *finite* value beyond the transport dtype's
    range (|x| > 65504 for fp16 — a BatchNorm ``running_var`` of unnormalised activations can be) travels at its
    own precision instead: refusing would end a run over a legitimate statistic, and casting would turn it into
    ±inf, which the server rejects as a diverged site. It costs only that tensor's bytes, and :func:`from_wire`
    needs nothing special for it. NaN and ±inf stay what they are (the server names the site that sent them).

    Casting is post-processing, so a DP-SGD site's ε is unchanged; the precision a hospital releases is the
    transport's (the message audit logs each array's dtype).
    """
    wire = wire_dtype(transport)
    limit = np.finfo(wire).max
    out: dict[str, np.ndarray] = {}
    for key, value in state.items():
        array = np.asarray(_numpy(value), order="C")  # (np.ascontiguousarray would make a 0-d counter 1-d)
        if _narrowed(array, wire):
            beyond = (np.abs(array) > limit) & np.isfinite(array)
            if not beyond.any():
                array = array.astype(wire)
        out[key] = array
    return out


def from_wire(arrays: Mapping[str, Any], dtypes: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
    """Arrays off the wire, floating ones cast back to the dtype the receiver keeps each tensor in (``dtypes``:
    name -> numpy or torch dtype, e.g. its model's or its global record's; fp16 comes back as fp32 for a name it
    does not list), so
    that training, averaging and a server optimizer's state run at full precision. Integer arrays are left
    exact, and never cast between integer and floating (a malformed reply stays visibly malformed)."""
    out: dict[str, np.ndarray] = {}
    for key, value in arrays.items():
        array = _numpy(value)
        if np.issubdtype(array.dtype, np.floating):
            target = _numpy_dtype(dtypes[key]) if dtypes is not None and key in dtypes else None
            if target is None or not np.issubdtype(target, np.floating):
                target = np.dtype(np.float32) if array.dtype.itemsize < 4 else array.dtype
            if array.dtype != target:
                array = array.astype(target)
        out[key] = array
    return out


def update_to_wire(trained: Mapping[str, Any], received: Mapping[str, Any], transport: str) -> dict[str, np.ndarray]:
    """A site's trained weights for its train reply: a floating tensor the transport narrows travels as the
    *update* (trained − received), narrowed; everything else as :func:`to_wire` sends it (fp32 transport:
    the weights, exactly; integer counters; a tensor whose update is beyond fp16's range: its value, at its own
    precision).

    Why updates: fp16 keeps 11 bits of a number. Sent as values, a weight of magnitude m moves in steps of
    ~m·2**-10, and a round's update (a few dozen AdamW steps at lr 1e-4) can be of that size, so it was rounded
    away or doubled; over 10 paired seeds of the demo, fp16 weights lost 0.027 pooled test AUROC to fp32
    (95 % CI 0.005–0.048; BatchNorm scales, near 1, were then still narrowed). An update keeps 11 bits of
    itself, and the server adds it to its fp32 weights (:func:`update_from_wire`), which also takes back the
    rounding of the fp16 weights the site trained from."""
    wire = wire_dtype(transport)
    out: dict[str, np.ndarray] = {}
    for key, value in trained.items():
        array = np.asarray(_numpy(value), order="C")
        if _narrowed(array, wire) and key in received:
            update = array - np.asarray(_numpy(received[key]), dtype=array.dtype)
            sent = to_wire({key: update}, transport)[key]
            out[key] = sent if sent.dtype == wire else array
        else:
            out[key] = to_wire({key: array}, transport)[key]
    return out


def update_from_wire(
    arrays: Mapping[str, Any], base: Mapping[str, np.ndarray], dtypes: Mapping[str, Any]
) -> dict[str, np.ndarray]:
    """A train reply's weights in the receiver's dtypes: a floating array narrower than its ``dtypes`` entry is an
    update on ``base`` (the weights the server sent, at full precision; :func:`update_to_wire`), any other array
    a value (:func:`from_wire`)."""
    out: dict[str, np.ndarray] = {}
    for key, value in arrays.items():
        array = _numpy(value)
        target = _numpy_dtype(dtypes[key]) if key in dtypes else None
        is_update = (
            target is not None
            and key in base
            and np.issubdtype(array.dtype, np.floating)
            and np.issubdtype(target, np.floating)
            and array.dtype.itemsize < target.itemsize
        )
        if is_update:
            out[key] = np.asarray(base[key], dtype=target) + array.astype(target)
        else:
            out[key] = from_wire({key: array}, dtypes)[key]
    return out


def wire_nbytes(arrays: Mapping[str, Any]) -> int:
    """Payload bytes of a set of arrays: Σ nbytes (an ``ArrayRecord``: ``{k: v.numpy() for k, v in rec.items()}``;
    Flower's ``ArrayRecord.count_bytes()`` adds each array's few-dozen-byte serialisation header)."""
    return int(sum(_numpy(v).nbytes for v in arrays.values()))


def round_nbytes(
    state: Mapping[str, Any], transport: str, *, local_keys: frozenset[str] = frozenset()
) -> dict[str, int]:
    """Weight bytes one training site sends and receives in one federated round at ``transport``, computed from
    the global model's state dict exactly as :func:`to_wire` packs it (for ``strnet bench``).

    ``to_site``: the global weights once, in the train message (which also asks for their validation counts);
    ``from_site``: the trained weights in the train reply. A run adds one validation-only message after its last
    round. ``local_keys`` (FedBN's BatchNorm tensors) never travel in a round after the first; round 1's train
    message carries them once more. Statistics arrays (histograms, counts) are a few kilobytes and not counted.
    """
    shared = to_wire({k: v for k, v in state.items() if k not in local_keys}, transport)
    weights = wire_nbytes(shared)
    return {"to_site": weights, "from_site": weights, "total": 2 * weights}
