"""What a site releases, in one place, and how ``privacy.statistics`` protects it.

:data:`REGISTRY` lists every record a site returns, message by message (:class:`strnet.protocol.MessageKind`):
what it is, its kind (case counts, per-class histogram, threshold counts, sums, weights, scalars) and how many
cases it is computed over. The node refuses to send a statistic the registry does not list (while protection is
on), ``tests/test_message_audit.py`` checks every array of a whole in-process run against it, and the list in
``docs/deploy.md`` is generated from it (``python -m strnet.released``).

Protection, off by default (the pooled τ* is then exactly the concatenated cohort's):

* **k-threshold** (``min_cases``): a statistic computed over 0 < n < k cases is withheld at the site. Its arrays
  stay there; the reply's ``withheld`` record names the statistic and the k in force (never n). The server pools
  without it and names the site and the statistic in the run's problems. A statistic over no case is sent (its
  zeros say nothing the site-info counts do not).
* **noise** (``noise_multiplier`` σ > 0): Gaussian N(0, σ²) on every bin of every per-class score histogram, at
  the site, rounded to integers but not clipped: counts may be negative, so the sum over sites stays unbiased.
  Clipping each site's histogram at 0 instead puts ~0.4σ phantom cases into every empty bin — thousands over
  1000 bins — which pulled τ* towards low thresholds and AUROC towards 0.5 in ``simulations/statistics_noise.py``.
  Counts that could be read off a noised histogram (tp/fp/tn/fn on the τ grid and at τ*, the WHO-cut counts) are
  not sent: the server derives them from the (pooled) noised histograms by cumulative sums at bin edges (every grid
  threshold is a bin edge), which is exact on a noise-free histogram (:func:`counts_at`, tested), and brings them
  into range only where they are read (:func:`strnet.sufficient.usable_quad`, :func:`usable`). Sums, moments and
  the other histograms are sent exactly, under k only.
* **ε**: one case (a knee) moves one count of a per-class histogram, so each noised histogram is the Gaussian
  mechanism with L2 sensitivity 1 (√2 for the per-radiograph histogram, where a knee moves its film's mean from
  one bin to another). The subgroup histograms of one variable (sex, age band, BMI band: one per level, each
  withheld under k on its own) are over disjoint knees, so a knee moves one count among all of them: together
  they are one release of sensitivity 1 per split. The server composes every noised histogram it receives from a
  site over the whole run — each round's validation counts, the calibrated ones, both splits of the frozen
  evaluation — with Opacus's RDP accountant (:class:`StatisticsLedger`) and reports the largest ε over sites.
  Conservative: releases over disjoint splits are composed as if they were the same cases. A patient with both
  knees counts twice.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from strnet import metrics as M
from strnet.data.manifest import WHO_NORMAL_MIN
from strnet.protocol import WEIGHT, Key, MessageKind
from strnet.subgroups import SUBGROUP_LEVELS
from strnet.sufficient import SUBGROUP_ARRAYS, EvaluationCounts, usable_quad

WITHHELD = "withheld"  # MetricRecord of a reply: statistic id -> the k it fell short of

# kinds of released arrays
COUNTS = "case counts"
SCALARS = "scalars"
WEIGHTS = "weights"
HISTOGRAM = "per-class histogram"
DISTANCES = "histogram"
THRESHOLD_COUNTS = "threshold counts"
SUMS = "sums"
MOMENTS = "per-channel means and variances"

ANY = "*"  # every array of the record not named by another statistic (model tensors, training scalars)


@dataclass(frozen=True)
class StatisticsPrivacy:
    """``privacy.statistics``: off by default (the existing exact pooled τ*).

    ``min_cases`` (k): a statistic computed over fewer cases is withheld. ``noise_multiplier``: σ of the Gaussian
    noise added to every per-class score histogram (count units; one case moves one count, sensitivity 1), 0 = none;
    ε is composed over every noised release of the run at ``delta``.
    """

    enabled: bool = False
    min_cases: int = 10
    noise_multiplier: float = 0.0
    delta: float = 1e-5

    @property
    def noised(self) -> bool:
        return self.enabled and self.noise_multiplier > 0

    def problems(self) -> list[str]:
        """Settings that cannot work, each naming its key (the config check raises them as one ConfigError)."""
        out = []
        if isinstance(self.min_cases, bool) or not isinstance(self.min_cases, int) or self.min_cases < 1:
            out.append(f"privacy.statistics.min_cases={self.min_cases!r} must be an integer >= 1")
        if not math.isfinite(self.noise_multiplier) or self.noise_multiplier < 0:
            out.append(f"privacy.statistics.noise_multiplier={self.noise_multiplier!r} must be >= 0 (0 = no noise)")
        if not 0 < self.delta < 1:
            out.append(f"privacy.statistics.delta={self.delta!r} must be in (0, 1)")
        return out


def _total(name: str) -> Callable[[Mapping[str, np.ndarray]], int]:
    def count(arrays: Mapping[str, np.ndarray]) -> int:
        return int(np.asarray(arrays[name]).sum())

    return count


def _first(name: str) -> Callable[[Mapping[str, np.ndarray]], int]:
    def count(arrays: Mapping[str, np.ndarray]) -> int:
        return round(float(np.asarray(arrays[name]).reshape(-1)[0]))

    return count


@dataclass(frozen=True)
class Statistic:
    """One statistic a site returns: the arrays it consists of, and how many cases it is computed over.

    ``arrays``: name -> kind (``*``: every other array of the record). ``n_cases`` reads the case count from the
    statistic's own exact arrays at the site; None means the k-threshold does not apply (``protection`` says why).
    ``noised``: the per-class histograms that get noise, with their L2 sensitivity per case. ``derived``: counts
    the site does not send under noise, with the histogram the server reads them from.
    """

    message: str
    key: str
    label: str
    what: str
    arrays: Mapping[str, str]
    cases: str
    n_cases: Callable[[Mapping[str, np.ndarray]], int] | None = None
    record: str = Key.STATS
    per_split: bool = False  # evaluate.frozen: one per split, arrays named ``<split>.<name>``
    noised: Mapping[str, float] = field(default_factory=dict)
    derived: Mapping[str, str] = field(default_factory=dict)
    protection: str = "withheld under k"
    # statistics sharing a non-empty name are over disjoint cases (the levels of one subgroup variable): a knee
    # moves one count of one of them, so together they are one Gaussian release of sensitivity 1 (the ledger)
    disjoint: str = ""

    def ident(self, split: str = "") -> str:
        return f"{split}.{self.key}" if self.per_split else self.key

    def describe(self, split: str = "") -> str:
        return self.label.format(split=split)


def _subgroup_statistics() -> tuple[Statistic, ...]:
    """One statistic per level of :data:`strnet.subgroups.SUBGROUP_LEVELS`, each with its own case count, so a
    level over fewer than k knees is withheld on its own and the others still go."""
    return tuple(
        Statistic(
            MessageKind.FROZEN,
            name,
            f"{{split}}-split subgroup {variable} {level}",
            f"score histogram per class of the knees whose {variable} is {level} (fixed levels; source: the "
            "server reads each site's split as one source)",
            {name: HISTOGRAM},
            f"the split's labelled knees whose {variable} is {level}",
            _total(name),
            per_split=True,
            noised={name: 1.0},
            protection="withheld under k (per level); histogram noised (one release per variable: its levels "
            "are disjoint)",
            disjoint=variable,
        )
        for (variable, level), name in zip(SUBGROUP_LEVELS, SUBGROUP_ARRAYS, strict=True)
    )


_WEIGHTS_NOTE = "not withheld (that would drop the site from FedAvg); privacy.dp (DP-SGD) bounds what they reveal"
_SPLIT_CASES = (
    "the split's labelled knees (test: the evaluation cohort; val: a training site's validation split; train: its "
    "training split, sent only without privacy.statistics)"
)

# a round's validation counts: asked by a validation query, or in the next round's train message
_VALIDATION = Statistic(
    MessageKind.VAL_STATS,
    "validation",
    "validation statistics",
    "score histogram per class (fixed bins) and tp/fp/tn/fn at every τ-grid threshold",
    {
        "hist": HISTOGRAM,
        "tp": THRESHOLD_COUNTS,
        "fp": THRESHOLD_COUNTS,
        "tn": THRESHOLD_COUNTS,
        "fn": THRESHOLD_COUNTS,
    },
    "the labelled validation knees",
    _total("hist"),
    noised={"hist": 1.0},
    derived={"tp": "hist", "fp": "hist", "tn": "hist", "fn": "hist"},
    protection="withheld under k; histogram noised, τ-grid counts derived by the server",
)

REGISTRY: tuple[Statistic, ...] = (
    Statistic(
        MessageKind.SITE_INFO,
        "site_info",
        "site-info counts",
        "rows, labelled rows, train/val/test rows and unreadable images of the site's manifest; whether the site "
        "trains in bf16 autocast and whether its CPU has native bf16 (0 or 1: `train.precision: auto` resolves "
        "there, and the run's recipe records it)",
        {n: COUNTS for n in ("n_rows", "n_labelled", "n_train", "n_val", "n_test", "n_skipped_images")}
        | {n: SCALARS for n in ("bf16_autocast", "native_bf16")},
        "the whole manifest",
        record=Key.METRICS,
        protection="sent exactly: the server maps nodes to sites and plans the quorum with them (sizes, not "
        "outcomes); the two flags describe the site's hardware, not its cases",
    ),
    Statistic(
        MessageKind.TRAIN,
        "train_weights",
        "training weights",
        "the model weights after local training: at `federation.transport: fp16` (the default) each weight "
        "matrix (two or more dimensions) as its update on the weights received, in fp16 (one whose update is "
        "beyond fp16's range: its value, at its own precision), vectors (BatchNorm scales, shifts and "
        "statistics, biases) as their values at fp32; at fp32 the weights themselves (FedBN: without the "
        "BatchNorm layers)",
        {ANY: WEIGHTS},
        "the training split",
        record=Key.ARRAYS,
        protection=_WEIGHTS_NOTE,
    ),
    Statistic(
        MessageKind.TRAIN,
        "train_metrics",
        "training metrics",
        "mean training losses and throughput of the last local epoch (DP-SGD: its ε), and the FedAvg weight",
        {WEIGHT: COUNTS, ANY: SCALARS},
        "the training split",
        record=Key.METRICS,
        protection=_WEIGHTS_NOTE,
    ),
    _VALIDATION,
    dataclasses.replace(
        _VALIDATION,
        message=MessageKind.TRAIN,
        label="validation statistics of the round's weights",
        what=_VALIDATION.what + ", of the weights the train message carries, before training from them",
    ),
    Statistic(
        MessageKind.CALIBRATE,
        "calibration",
        "calibration statistics",
        "log-loss, its gradient (2) and Hessian (2×2) at the sent Platt parameters, and the case count",
        {"gradient": SUMS, "hessian": SUMS, "loss": SUMS, "n": COUNTS},
        "the labelled validation knees",
        _first("n"),
    ),
    Statistic(
        MessageKind.BATCHNORM,
        "batchnorm",
        "BatchNorm tensors",
        "FedBN, once after training: the site's BatchNorm tensors of the kept round and its training-case count",
        {ANY: WEIGHTS, WEIGHT: COUNTS},
        "the training split",
        protection=_WEIGHTS_NOTE,
    ),
    Statistic(
        MessageKind.BN_STATISTICS,
        "bn_statistics",
        "BatchNorm statistics",
        "FedBN, once after training: each BatchNorm layer's input mean and variance over the training images under "
        "the final model, and the image count",
        {"n": COUNTS, ANY: MOMENTS},
        "the training images",
        _first("n"),
    ),
    Statistic(
        MessageKind.OOD_MOMENTS,
        "ood_moments",
        "out-of-distribution moments",
        "count, sum and sum of outer products of the training knees' 128-d neck features",
        {"n": COUNTS, "sum": SUMS, "sum_outer": SUMS},
        "the training knees",
        _first("n"),
    ),
    Statistic(
        MessageKind.OOD_DISTANCES,
        "ood_distances",
        "out-of-distribution distances",
        "histogram of validation distances under the pooled Gaussian (one class: not noised)",
        {"hist": DISTANCES},
        "the validation knees",
        _total("hist"),
    ),
    Statistic(
        MessageKind.TSCORE_VAL,
        "tscore_val",
        "T-score validation sums",
        "(n, Σ err², Σ |err|) of the sent T-score branch",
        {"sums": SUMS},
        "the validation knees with a reference T-score",
        _first("sums"),
    ),
    Statistic(
        MessageKind.TSCORE_TRAIN,
        "tscore_val",
        "T-score validation sums",
        "(n, Σ err², Σ |err|) of the sent T-score branch, before the site's steps on it",
        {"sums": SUMS},
        "the validation knees with a reference T-score",
        _first("sums"),
    ),
    Statistic(
        MessageKind.TSCORE_TRAIN,
        "tscore_train",
        "T-score branch",
        "the T-score branch (~14 k weights) after a few full-batch steps, and its case count",
        {ANY: WEIGHTS, WEIGHT: COUNTS},
        "the training knees with a reference T-score",
        _first(WEIGHT),
        protection="withheld under k (a branch fitted on a few cases is a statistic of them; no DP-SGD covers it)",
    ),
    Statistic(
        MessageKind.FROZEN,
        "screening",
        "{split}-split evaluation",
        "calibrated and raw score histograms per class, tp/fp/tn/fn at τ*, Brier sums (calibrated and raw)",
        {
            "hist": HISTOGRAM,
            "raw_hist": HISTOGRAM,
            "at_threshold": THRESHOLD_COUNTS,
            "brier_sum": SUMS,
            "brier_sum_raw": SUMS,
        },
        _SPLIT_CASES,
        _total("hist"),
        per_split=True,
        noised={"hist": 1.0, "raw_hist": 1.0},
        derived={"at_threshold": "hist"},
        protection="withheld under k; histograms noised, counts at τ* derived by the server; Brier sums exact",
    ),
    Statistic(
        MessageKind.FROZEN,
        "radiograph",
        "{split}-split per-radiograph evaluation",
        "score histogram per class of radiographs (mean of their knees) and tp/fp/tn/fn at τ*",
        {"film_hist": HISTOGRAM, "film_at_threshold": THRESHOLD_COUNTS},
        "the split's labelled radiographs",
        _total("film_hist"),
        per_split=True,
        noised={"film_hist": math.sqrt(2.0)},
        derived={"film_at_threshold": "film_hist"},
        protection="withheld under k; histogram noised (sensitivity √2), counts at τ* derived by the server",
    ),
    Statistic(
        MessageKind.FROZEN,
        "severity",
        "{split}-split severity",
        "severity-score histogram per class (osteopenia / osteoporosis) among bone-loss knees",
        {"severity_hist": HISTOGRAM},
        "the split's bone-loss knees with a severity label",
        _total("severity_hist"),
        per_split=True,
        noised={"severity_hist": 1.0},
        protection="withheld under k; histogram noised",
    ),
    Statistic(
        MessageKind.FROZEN,
        "t_score",
        "{split}-split T-score agreement",
        "sums of estimate and reference T-scores, their squares, products and errors (metrics.TSCORE_SUM_KEYS)",
        {"tscore_sums": SUMS},
        "the split's knees with a reference T-score",
        _first("tscore_sums"),
        per_split=True,
    ),
    Statistic(
        MessageKind.FROZEN,
        "t_score_who",
        "{split}-split T-score screening",
        "histogram per screening class of the T-score estimate, and tp/fp/tn/fn of the WHO read (estimate < -1)",
        {"tscore_hist": HISTOGRAM, "tscore_who": THRESHOLD_COUNTS},
        "the split's labelled knees with a reference T-score",
        _total("tscore_hist"),
        per_split=True,
        noised={"tscore_hist": 1.0},
        derived={"tscore_who": "tscore_hist"},
        protection="withheld under k; histogram noised, WHO counts derived by the server",
    ),
    Statistic(
        MessageKind.FROZEN,
        "bilateral",
        "{split}-split left-right agreement",
        "bilateral films: pairs, flag disagreements at τ*, Σ|P(R) − P(L)|, joint (R, L) probability histogram",
        {"bilateral_sums": SUMS, "bilateral_hist": DISTANCES},
        "the split's films with one right and one left knee",
        _first("bilateral_sums"),
        per_split=True,
    ),
    Statistic(
        MessageKind.FROZEN,
        "mirror",
        "{split}-split mirror stability",
        "knees, flag changes at τ* and Σ|P − P(mirrored)|",
        {"mirror_sums": SUMS},
        "the split's knees",
        _first("mirror_sums"),
        per_split=True,
    ),
    *_subgroup_statistics(),
)


def statistics_of(message: str, record: str | None = Key.STATS) -> tuple[Statistic, ...]:
    return tuple(s for s in REGISTRY if s.message == message and (record is None or s.record == record))


def find(message: str, statistic_id: str) -> tuple[Statistic, str]:
    """(statistic, split) for a ``withheld`` id of a reply to ``message``."""
    split, _, key = statistic_id.rpartition(".")
    for s in statistics_of(message, None):
        if s.key == key and bool(split) == s.per_split:
            return s, split
    raise KeyError(f"{message}: no statistic {statistic_id!r} in strnet.released.REGISTRY")


class UnregisteredStatistic(ValueError):
    """An array a reply would carry that the registry does not list: the site refuses to send it."""


def group(
    message: str, arrays: Mapping[str, Any], record: str = Key.STATS
) -> list[tuple[Statistic, str, dict[str, Any]]]:
    """The reply's arrays by statistic: (statistic, split, {name: array}) in registry order."""
    stats = statistics_of(message, record)
    named = {n: s for s in stats for n in s.arrays if n != ANY}
    wildcard = next((s for s in stats if ANY in s.arrays), None)
    out: dict[tuple[str, str], tuple[Statistic, str, dict[str, Any]]] = {}
    for full, value in arrays.items():
        split, name = "", full
        if stats and stats[0].per_split:
            split, _, name = full.partition(".")
        s = named.get(name, wildcard)
        if s is None:
            raise UnregisteredStatistic(f"{message}: array {full!r} is not in strnet.released.REGISTRY")
        out.setdefault((s.key, split), (s, split, {}))[2][name] = value
    order = {s.key: i for i, s in enumerate(stats)}
    return [out[k] for k in sorted(out, key=lambda k: (k[1], order[k[0]]))]


# ---------------------------------------------------------------------------------------------------- the site


@dataclass
class Release:
    """What a reply carries after protection: its arrays and the ids of the statistics withheld (-> k)."""

    arrays: dict[str, np.ndarray]
    withheld: dict[str, int]


def noised_histogram(hist: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """``hist`` + N(0, σ²) per bin, rounded to integers (post-processing) and *not* clipped: a count may be
    negative, so the pooled sum stays unbiased; the server clips once, after pooling (:func:`usable`)."""
    h = np.asarray(hist)
    return np.rint(h + rng.normal(0.0, sigma, h.shape)).astype(np.int64)


def protect(
    message: str,
    arrays: Mapping[str, np.ndarray],
    policy: StatisticsPrivacy,
    rng: np.random.Generator | None = None,
) -> Release:
    """A reply's statistics as the site sends them under ``policy`` (unchanged when protection is off).

    ``rng``: the noise's generator; by default seeded from the operating system, so nobody can replay it.
    """
    if not policy.enabled:
        return Release(dict(arrays), {})
    rng = rng if rng is not None else np.random.default_rng()
    out: dict[str, np.ndarray] = {}
    withheld: dict[str, int] = {}
    for stat, split, own in group(message, arrays):
        n = stat.n_cases(own) if stat.n_cases is not None else None
        if n is not None and 0 < n < policy.min_cases:
            withheld[stat.ident(split)] = policy.min_cases
            continue
        if policy.noised:
            own = {k: v for k, v in own.items() if k not in stat.derived}
            for name in stat.noised:
                if name in own:
                    own[name] = noised_histogram(own[name], policy.noise_multiplier, rng)
        out |= {(f"{split}.{k}" if stat.per_split else k): v for k, v in own.items()}
    return Release(out, withheld)


# ---------------------------------------------------------------------------------------------------- the server


def counts_at(hist: np.ndarray, thresholds: Iterable[float]) -> dict[str, np.ndarray]:
    """tp/fp/tn/fn with the rule positive ⇔ score >= t, read off a per-class histogram at bin edges.

    Bin b holds edges[b] <= p < edges[b+1] (:func:`strnet.metrics.score_histogram`), so the cases at or above edge
    k are bins k.. — for a threshold that *is* an edge (every τ-grid value and τ*; ``_check`` guarantees it) this
    equals :func:`strnet.metrics.confusion_at_thresholds` on the raw scores exactly.
    """
    h = np.asarray(hist, np.int64)
    n_bins = h.shape[1]
    edges = M.histogram_edges(n_bins)
    t = np.asarray(list(thresholds), np.float64)
    k = np.rint(t * n_bins).astype(np.int64)
    if ((k < 0) | (k > n_bins)).any() or not np.allclose(edges[np.clip(k, 0, n_bins)], t, rtol=0, atol=1e-9):
        raise ValueError(f"thresholds {t.tolist()} do not all fall on edges of {n_bins} histogram bins")
    above = np.concatenate([h[:, ::-1].cumsum(axis=1)[:, ::-1], np.zeros((2, 1), np.int64)], axis=1)[:, k]
    tp, fp = above[1], above[0]
    return {"tp": tp, "fp": fp, "tn": h[0].sum() - fp, "fn": h[1].sum() - tp}


def _quad(hist: np.ndarray, threshold: float) -> np.ndarray:
    c = counts_at(hist, [threshold])
    return np.array([c["tp"][0], c["fp"][0], c["tn"][0], c["fn"][0]], np.int64)


def _who_cut() -> float:
    """The WHO cut (estimate < -1.0) as an edge of the T-score screening histogram (exact up to ties at -1.0)."""
    lo, hi = M.TSCORE_RANGE
    k = round((hi - WHO_NORMAL_MIN) / (hi - lo) * M.TSCORE_BINS)
    return float(M.histogram_edges(M.TSCORE_BINS)[k])


def restore_validation(arrays: Mapping[str, np.ndarray], grid: np.ndarray) -> dict[str, np.ndarray]:
    """A validation reply's arrays with the τ-grid counts derived from its histogram when it did not send them."""
    out = dict(arrays)
    if "hist" in out and not any(k in out for k in ("tp", "fp", "tn", "fn")):
        out |= counts_at(out["hist"], grid)
    return out


def restore_evaluation(
    arrays: Mapping[str, np.ndarray], withheld: Iterable[str], *, threshold: float, empty: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """A frozen-evaluation reply's ``<split>.<field>`` arrays, complete: withheld statistics as zeros (``empty``:
    :meth:`EvaluationCounts.empty`'s arrays; they add nothing to a pool) and, when the site did not send them,
    the counts at τ* and at the WHO cut read off the (noised) histograms."""
    out = dict(arrays)
    splits = {k.partition(".")[0] for k in out} | {w.partition(".")[0] for w in withheld}
    for ident in withheld:
        stat, split = find(MessageKind.FROZEN, ident)
        out |= {f"{split}.{name}": np.asarray(empty[name]).copy() for name in stat.arrays}
    for split in splits:
        for name, source, at in (
            ("at_threshold", "hist", threshold),
            ("film_at_threshold", "film_hist", threshold),
            ("tscore_who", "tscore_hist", _who_cut()),
        ):
            if f"{split}.{name}" not in out and f"{split}.{source}" in out:
                out[f"{split}.{name}"] = _quad(out[f"{split}.{source}"], at)
    return out


def usable(counts: EvaluationCounts) -> EvaluationCounts:
    """Pooled (or one site's) evaluation counts as the metrics read them: noised per-class histograms clipped at 0
    and the confusion counts read off them brought into range (:func:`strnet.sufficient.usable_quad`).

    Post-processing of the sum (the noise stays unbiased through pooling, clipping happens once); the identity on
    exact counts."""
    names = ("hist", "raw_hist", "severity_hist", "film_hist", "subgroup_hist")
    hists = {n: np.clip(getattr(counts, n), 0, None) for n in names}
    quads = {
        n: np.array([int(v) for v in usable_quad(*getattr(counts, n))], np.int64)
        for n in ("at_threshold", "film_at_threshold", "tscore_who")
    }
    return dataclasses.replace(counts, tscore_hist=np.clip(counts.tscore_hist, 0, None), **hists, **quads)


def withheld_problem(message: str, statistic_id: str, k: int) -> str:
    """Why a statistic is missing from a reply, for the run's problems (the statistic and k, never a count)."""
    try:
        stat, split = find(message, statistic_id)
        what = stat.describe(split)
    except KeyError:
        what = statistic_id
    return f"{what} withheld (fewer than k={k} cases)"


def composed_epsilon(releases: Iterable[tuple[float, int]], delta: float) -> float:
    """ε of ``count`` Gaussian releases at each noise multiplier (σ / L2 sensitivity), composed by Opacus's RDP
    accountant (sample rate 1: every release reads every case)."""
    from opacus.accountants import RDPAccountant

    history = [(float(m), 1.0, int(n)) for m, n in releases if n > 0]
    if not history:
        return 0.0
    accountant = RDPAccountant()
    accountant.history = history
    return float(accountant.get_epsilon(delta))


@dataclass
class StatisticsLedger:
    """The server's count of every noised histogram each site released in the run, and its ε.

    Counted on receipt of a reply (before it is checked), so a reply the server then refuses still counts."""

    policy: StatisticsPrivacy
    releases: dict[str, dict[float, int]] = field(default_factory=dict)  # site -> noise multiplier -> releases

    def record(self, site: str, message: str, arrays: Mapping[str, Any]) -> None:
        if not self.policy.noised:
            return
        stats = statistics_of(message)
        noised = {n: (sens, s.disjoint) for s in stats for n, sens in s.noised.items()}
        seen: set[tuple[str, str]] = set()  # (split, disjoint group) already counted in this reply
        for full in arrays:
            split, name = full.partition(".")[::2] if stats and stats[0].per_split else ("", full)
            if name in noised:
                sensitivity, group_name = noised[name]
                if group_name:
                    if (split, group_name) in seen:
                        continue
                    seen.add((split, group_name))
                multiplier = self.policy.noise_multiplier / sensitivity
                counts = self.releases.setdefault(site, {})
                counts[multiplier] = counts.get(multiplier, 0) + 1

    def epsilon(self, site: str) -> float:
        return composed_epsilon(self.releases.get(site, {}).items(), self.policy.delta)

    def report(self) -> dict[str, Any]:
        """The run's ``statistics_privacy`` entry (summary.json and the bundle, beside τ*)."""
        p = self.policy
        out: dict[str, Any] = {"enabled": p.enabled, "min_cases": p.min_cases, "noise_multiplier": p.noise_multiplier}
        if p.noised:
            sites = {
                s: {"releases": sum(self.releases[s].values()), "epsilon": self.epsilon(s)}
                for s in sorted(self.releases)
            }
            out |= {
                "delta": p.delta,
                "epsilon": max((v["epsilon"] for v in sites.values()), default=0.0),
                "sites": sites,
                "accounting": "Gaussian mechanism per noised per-class histogram, RDP composition (Opacus) over "
                "every release of the run; the largest ε over sites",
            }
        return out

    def state_dict(self) -> dict[str, list[list[float]]]:
        return {s: [[m, n] for m, n in c.items()] for s, c in self.releases.items()}

    def load_state_dict(self, state: Mapping[str, list[list[float]]]) -> None:
        self.releases = {s: {float(m): int(n) for m, n in pairs} for s, pairs in state.items()}


# ---------------------------------------------------------------------------------------------------- the list


def markdown() -> str:
    """The table of ``docs/deploy.md``'s "What leaves the site" (a test keeps the two equal)."""
    rows = [
        "| message | statistic | arrays (kind) | computed over | under `privacy.statistics` |",
        "|---|---|---|---|---|",
    ]
    for s in REGISTRY:
        kinds: dict[str, list[str]] = {}
        for name, kind in s.arrays.items():
            other = "all others" if len(s.arrays) > 1 else "all"
            kinds.setdefault(kind, []).append(other if name == ANY else f"`{name}`")
        arrays = "; ".join(f"{', '.join(names)} ({kind})" for kind, names in kinds.items())
        cells = (f"`{s.message}`", f"{s.describe('test/val/train')}: {s.what}", arrays, s.cases, s.protection)
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown())
