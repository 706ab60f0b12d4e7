"""Sufficient statistics: the additive counts from which τ* and every reported metric are computed.

A centralized run computes them from its own predictions; a federated site computes the same objects from its
predictions and sends only these; the server adds them up. Because every metric comes from these objects
(ranking metrics from the histogram, threshold metrics from exact counts, T-score agreement from sums), the
two modes cannot drift apart, and what leaves a site is fixed in size: it depends on the τ grid and the number
of histogram bins, never on the number of images.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import pandas as pd

from strnet import metrics as M
from strnet.data.manifest import WHO_NORMAL_MIN
from strnet.subgroups import LEVELS, SUBGROUP_LEVELS, level_codes, level_slug

Predictions = dict[str, np.ndarray]  # engine.predict_loader's output: y_screen, prob_screen, ..., NaN = unknown


def screening_cases(preds: Predictions) -> tuple[np.ndarray, np.ndarray]:
    """(labels, probabilities) of the cases with a known screening label."""
    known = ~np.isnan(preds["y_screen"])
    return preds["y_screen"][known].astype(np.int64), preds["prob_screen"][known]


def severity_cases(preds: Predictions) -> tuple[np.ndarray, np.ndarray]:
    known = ~np.isnan(preds["y_severity"])
    return preds["y_severity"][known].astype(np.int64), preds["prob_severity"][known]


def score_histogram(y: np.ndarray, p: np.ndarray, n_bins: int) -> np.ndarray:
    """The per-class histogram; all zeros for no cases (a site may have no validation or test split)."""
    return M.score_histogram(y, p, n_bins) if len(y) else np.zeros((2, n_bins), np.int64)


def histogram_ranking(hist: np.ndarray) -> dict[str, float]:
    """AUROC and AUPRC of a cohort known by its histogram: the monitored score in both modes."""
    m = M.metrics_from_histogram(hist)
    return {"auroc": float(m["auroc"]), "auprc": float(m["auprc"])}


def _check_counts(name: str, arr: np.ndarray, shape: tuple[int, ...], *, signed: bool = False) -> None:
    """Shape and integer dtype; non-negative unless ``signed`` (a noised histogram: ``privacy.statistics``)."""
    if arr.shape != shape:
        raise ValueError(f"{name} has shape {arr.shape}, expected {shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integer counts, got dtype {arr.dtype}")
    if not signed and (arr < 0).any():
        raise ValueError(f"{name} holds negative counts")


def usable_quad(tp: Any, fp: Any, tn: Any, fn: Any) -> tuple[np.ndarray, ...]:
    """Confusion counts brought into range: tp in [0, positives], fp in [0, negatives], totals kept (clipped at 0).

    The identity on exact counts; on counts derived from noised histograms (which may stray below 0 or above
    their class total) it is the post-processing every rate needs."""
    tp, fp, tn, fn = (np.asarray(v, np.int64) for v in (tp, fp, tn, fn))
    n_pos, n_neg = np.maximum(tp + fn, 0), np.maximum(fp + tn, 0)
    tp, fp = np.clip(tp, 0, n_pos), np.clip(fp, 0, n_neg)
    return tp, fp, n_neg - fp, n_pos - tp


class Additive:
    """Element-wise sum of two statistics of the same shape (what pooling over sites is)."""

    def __add__(self, other: Any) -> Any:
        if type(other) is not type(self):
            return NotImplemented
        return type(self)(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})  # type: ignore[arg-type]

    def arrays(self) -> dict[str, np.ndarray]:
        return {f.name: np.asarray(getattr(self, f.name)) for f in fields(self)}  # type: ignore[arg-type]


@dataclass
class ValidationCounts(Additive):
    """Per-class score histogram and tp/fp/tn/fn at every grid threshold: τ* and the monitored AUPRC."""

    hist: np.ndarray  # (2, n_bins) int64: row 0 negatives, row 1 positives
    tp: np.ndarray  # (n_grid,) int64
    fp: np.ndarray
    tn: np.ndarray
    fn: np.ndarray

    @classmethod
    def from_scores(cls, y: np.ndarray, p: np.ndarray, *, grid: np.ndarray, n_bins: int) -> ValidationCounts:
        if len(y):
            c = M.confusion_at_thresholds(y, p, grid)
        else:
            c = {k: np.zeros(len(grid), np.int64) for k in ("tp", "fp", "tn", "fn")}
        return cls(hist=score_histogram(y, p, n_bins), **c)

    @classmethod
    def from_predictions(cls, preds: Predictions, *, grid: np.ndarray, n_bins: int) -> ValidationCounts:
        return cls.from_scores(*screening_cases(preds), grid=grid, n_bins=n_bins)

    def check(self, *, n_bins: int, n_grid: int, noised: bool = False) -> None:
        """Shapes, non-negative integer counts, and tp+fn / fp+tn equal to the histogram's class totals.

        ``noised`` (``privacy.statistics``): the histogram carries unclipped noise and the counts are read off it, so
        they may be negative; they still add up."""
        _check_counts("hist", self.hist, (2, n_bins), signed=noised)
        for k in ("tp", "fp", "tn", "fn"):
            _check_counts(k, getattr(self, k), (n_grid,), signed=noised)
        n_neg, n_pos = int(self.hist[0].sum()), int(self.hist[1].sum())
        if not (np.all(self.tp + self.fn == n_pos) and np.all(self.fp + self.tn == n_neg)):
            raise ValueError(
                "inconsistent validation statistics: tp+fn and fp+tn must equal the histogram's class totals "
                f"({n_pos} positives, {n_neg} negatives) at every threshold"
            )

    @property
    def n_cases(self) -> int:
        return int(self.hist.sum())

    def ranking(self) -> dict[str, float]:
        """AUROC/AUPRC of the histogram (a noised one clipped at 0 first: the identity on exact counts)."""
        return histogram_ranking(np.clip(self.hist, 0, None))

    def threshold(self, grid: np.ndarray, min_sensitivity: float) -> dict[str, Any]:
        """The paper's τ* rule on these counts (exactly what it gives on the concatenated scores); counts read off
        a noised histogram are brought into range first (:func:`usable_quad`, the identity on exact counts)."""
        return M.threshold_selection_from_counts(
            *usable_quad(self.tp, self.fp, self.tn, self.fn), grid, min_sensitivity
        )


BILATERAL_BINS = 100  # the joint (right, left) probability histogram behind the pooled left-right Spearman
SIDE_CODES = {"": 0, "R": 1, "L": 2}


def with_films(preds: Predictions, frame: pd.DataFrame) -> Predictions:
    """Attach each case's radiograph (``film``: rows of one image file share it) and side (0 none, 1 R, 2 L).

    A bilateral film is two manifest rows, one per knee; the radiograph-level result and the left-right
    agreement are computed from these two arrays, at the site, so no path leaves it.
    """
    order = np.asarray(preds["index"], np.int64)
    film, _ = pd.factorize(frame["path"].astype(str).str.lower())
    side = frame["side"].fillna("").astype(str).map(SIDE_CODES).fillna(0).to_numpy(np.int64)
    return dict(preds) | {"film": np.asarray(film, np.int64)[order], "side": side[order]}


def with_subgroups(preds: Predictions, frame: pd.DataFrame) -> Predictions:
    """Attach each case's subgroup levels (``subgroup``: (cases, 3) indices into :data:`strnet.subgroups.LEVELS`)
    so a site can histogram its scores per level; the levels, like the scores, never leave it."""
    order = np.asarray(preds["index"], np.int64)
    return dict(preds) | {"subgroup": level_codes(frame.reset_index(drop=True))[order]}


def knee_films(preds: Predictions) -> np.ndarray | None:
    """The radiograph of each labelled knee (the bootstrap's resampling unit), or None when films are unknown."""
    if "film" not in preds:
        return None
    return np.asarray(preds["film"], np.int64)[~np.isnan(preds["y_screen"])]


def film_scores(preds: Predictions) -> tuple[np.ndarray, np.ndarray]:
    """(labels, probabilities) per radiograph: the mean of its knees' probabilities; bone loss if any knee has it.

    Bone loss is systemic, so a film is one screening decision; cases without ``film`` are their own film.
    """
    known = ~np.isnan(preds["y_screen"])
    film = np.asarray(preds.get("film", np.arange(len(known))), np.int64)[known]
    y, p = preds["y_screen"][known], preds["prob_screen"][known]
    if not len(y):
        return np.zeros(0, np.int64), np.zeros(0)
    frame = pd.DataFrame({"film": film, "y": y, "p": p}).groupby("film", sort=True)
    return frame["y"].max().to_numpy(np.int64), frame["p"].mean().to_numpy(np.float64)


def bilateral_pairs(preds: Predictions) -> tuple[np.ndarray, np.ndarray]:
    """(right, left) probabilities of every film with exactly one right and one left knee, labelled or not."""
    if "film" not in preds or not len(preds["film"]):
        return np.zeros(0), np.zeros(0)
    frame = pd.DataFrame({"film": preds["film"], "side": preds["side"], "p": preds["prob_screen"]})
    frame = frame[frame["side"] > 0]
    wide = frame.pivot_table(index="film", columns="side", values="p", aggfunc=["mean", "count"])
    if ("count", 1) not in wide.columns or ("count", 2) not in wide.columns:
        return np.zeros(0), np.zeros(0)
    pairs = wide[(wide[("count", 1)] == 1) & (wide[("count", 2)] == 1)]
    return pairs[("mean", 1)].to_numpy(np.float64), pairs[("mean", 2)].to_numpy(np.float64)


def tscore_screening_cases(preds: Predictions) -> tuple[np.ndarray, np.ndarray]:
    """(labels, T-score estimates) of the knees with a screening label *and* a reference T-score.

    Restricted to the T-score cohort (the knees whose site records T-scores and the covariates the branch
    reads), so this reads the same knees as the T-score agreement, not knees whose covariates were imputed.
    """
    known = ~np.isnan(preds["y_screen"]) & ~np.isnan(preds["t_true"]) & ~np.isnan(preds["t_pred"])
    return preds["y_screen"][known].astype(np.int64), preds["t_pred"][known]


def _confusion(y: np.ndarray, p: np.ndarray, threshold: float) -> np.ndarray:
    flag = p >= threshold
    return np.array(
        [
            int((flag & (y == 1)).sum()),
            int((flag & (y == 0)).sum()),
            int((~flag & (y == 0)).sum()),
            int((~flag & (y == 1)).sum()),
        ],
        np.int64,
    )


SUBGROUP_ARRAYS: tuple[str, ...] = tuple(f"subgroup_{level_slug(v, level)}" for v, level in SUBGROUP_LEVELS)


def subgroup_histograms(preds: Predictions, n_bins: int) -> np.ndarray:
    """Per-class screening histogram of every :data:`strnet.subgroups.SUBGROUP_LEVELS` level (labelled cases);
    without ``subgroup`` codes (:func:`with_subgroups`) every case's levels are unknown."""
    y, p = screening_cases(preds)
    known = ~np.isnan(preds["y_screen"])
    if "subgroup" in preds:
        codes = np.asarray(preds["subgroup"], np.int64)[known]
    else:
        codes = np.tile(np.array([len(v) - 1 for v in LEVELS.values()], np.int64), (len(y), 1))
    out = []
    for j, vocabulary in enumerate(LEVELS.values()):
        for i in range(len(vocabulary)):
            keep = codes[:, j] == i
            out.append(score_histogram(y[keep], p[keep], n_bins))
    return np.stack(out).astype(np.int64)


@dataclass
class EvaluationCounts(Additive):
    """A frozen evaluation at τ*: everything the reported metrics need, per knee and per radiograph."""

    hist: np.ndarray  # (2, n_bins) int64 screening scores per class (calibrated: what the product outputs)
    at_threshold: np.ndarray  # (4,) int64: tp, fp, tn, fn at τ*
    brier_sum: np.ndarray  # (1,) float64: Σ (p − y)²
    raw_hist: np.ndarray  # (2, n_bins) int64 the same knees' uncalibrated scores (calibration before/after)
    brier_sum_raw: np.ndarray  # (1,) float64
    severity_hist: np.ndarray  # (2, n_bins) int64: osteopenia / osteoporosis among bone-loss cases
    tscore_sums: np.ndarray  # (8,) float64: metrics.TSCORE_SUM_KEYS
    film_hist: np.ndarray  # (2, n_bins) int64 per radiograph (mean of its knees)
    film_at_threshold: np.ndarray  # (4,) int64
    bilateral_sums: np.ndarray  # (3,) float64: pairs, flag disagreements at τ*, Σ |P_right − P_left|
    bilateral_hist: np.ndarray  # (BILATERAL_BINS, BILATERAL_BINS) int64 joint (right, left) probabilities
    mirror_sums: np.ndarray  # (3,) float64: knees, flag changes at τ*, Σ |P − P_mirror|  (all zero: not measured)
    tscore_hist: np.ndarray  # (2, M.TSCORE_BINS) int64 the T-score estimate per screening class (T-score cohort)
    tscore_who: np.ndarray  # (4,) int64: tp, fp, tn, fn of the WHO read (estimate < -1.0 = bone loss)
    # (len(SUBGROUP_LEVELS), 2, n_bins) int64: the screening histogram of each sex / age-band / BMI-band level. On
    # the wire one array per level (SUBGROUP_ARRAYS), so privacy.statistics withholds a level under k on its own.
    subgroup_hist: np.ndarray

    @classmethod
    def from_predictions(cls, preds: Predictions, *, threshold: float, n_bins: int) -> EvaluationCounts:
        y, p = screening_cases(preds)
        known = ~np.isnan(preds["y_screen"])
        p_raw = preds.get("prob_screen_raw", preds["prob_screen"])[known]
        fy, fp = film_scores(preds)
        right, left = bilateral_pairs(preds)
        b = BILATERAL_BINS
        joint = np.histogram2d(right, left, bins=b, range=[[0, 1], [0, 1]])[0] if len(right) else np.zeros((b, b))
        mirror = np.zeros(3)
        if "prob_screen_mirror" in preds:
            pm, pa = preds["prob_screen_mirror"], preds["prob_screen"]
            flips = ((pa >= threshold) != (pm >= threshold)).sum()
            mirror = np.array([len(pa), flips, np.abs(pa - pm).sum()], np.float64)
        ty, t_pred = tscore_screening_cases(preds)
        who = _confusion(ty, (t_pred < WHO_NORMAL_MIN).astype(np.float64), 0.5)
        return cls(
            subgroup_hist=subgroup_histograms(preds, n_bins),
            hist=score_histogram(y, p, n_bins),
            at_threshold=_confusion(y, p, threshold),
            brier_sum=np.array([float(((p - y) ** 2).sum())], np.float64),
            raw_hist=score_histogram(y, p_raw, n_bins),
            brier_sum_raw=np.array([float(((p_raw - y) ** 2).sum())], np.float64),
            severity_hist=score_histogram(*severity_cases(preds), n_bins),
            tscore_sums=M.tscore_sums(preds["t_true"], preds["t_pred"]),
            film_hist=score_histogram(fy, fp, n_bins),
            film_at_threshold=_confusion(fy, fp, threshold),
            bilateral_sums=np.array(
                [len(right), ((right >= threshold) != (left >= threshold)).sum(), np.abs(right - left).sum()],
                np.float64,
            ),
            bilateral_hist=joint.astype(np.int64),
            mirror_sums=mirror,
            tscore_hist=score_histogram(ty, M.tscore_screening_score(t_pred), M.TSCORE_BINS),
            tscore_who=who,
        )

    @classmethod
    def empty(cls, n_bins: int) -> EvaluationCounts:
        z = np.zeros((2, n_bins), np.int64)
        b = BILATERAL_BINS
        return cls(
            subgroup_hist=np.zeros((len(SUBGROUP_LEVELS), 2, n_bins), np.int64),
            hist=z,
            at_threshold=np.zeros(4, np.int64),
            brier_sum=np.zeros(1),
            raw_hist=z.copy(),
            brier_sum_raw=np.zeros(1),
            severity_hist=z.copy(),
            tscore_sums=np.zeros(len(M.TSCORE_SUM_KEYS)),
            film_hist=z.copy(),
            film_at_threshold=np.zeros(4, np.int64),
            bilateral_sums=np.zeros(3),
            bilateral_hist=np.zeros((b, b), np.int64),
            mirror_sums=np.zeros(3),
            tscore_hist=np.zeros((2, M.TSCORE_BINS), np.int64),
            tscore_who=np.zeros(4, np.int64),
        )

    def arrays(self) -> dict[str, np.ndarray]:
        """Field name -> array as they travel: ``subgroup_hist`` as one (2, n_bins) array per level."""
        out = {k: v for k, v in super().arrays().items() if k != "subgroup_hist"}
        return out | {name: np.asarray(self.subgroup_hist[i]) for i, name in enumerate(SUBGROUP_ARRAYS)}

    @classmethod
    def wire_names(cls) -> tuple[str, ...]:
        """Every array name of :meth:`arrays` (what a frozen-evaluation reply carries per split)."""
        return tuple(f.name for f in fields(cls) if f.name != "subgroup_hist") + SUBGROUP_ARRAYS

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> EvaluationCounts:
        """The inverse of :meth:`arrays` (exactly :meth:`wire_names`, checked by the caller)."""
        own = {k: v for k, v in arrays.items() if k not in SUBGROUP_ARRAYS}
        return cls(**own, subgroup_hist=np.stack([np.asarray(arrays[n]) for n in SUBGROUP_ARRAYS]))

    def check(self, *, n_bins: int, noised: bool = False) -> None:
        """Shapes, dtypes, and counts that agree with their histograms; ``noised`` (``privacy.statistics``): the
        per-class histograms carry independent unclipped noise (counts may be negative, and the calibrated and raw
        totals differ) and the confusion counts are read off them."""
        for name in ("hist", "raw_hist", "severity_hist", "film_hist"):
            _check_counts(name, getattr(self, name), (2, n_bins), signed=noised)
        _check_counts("bilateral_hist", self.bilateral_hist, (BILATERAL_BINS, BILATERAL_BINS))
        _check_counts("tscore_hist", self.tscore_hist, (2, M.TSCORE_BINS), signed=noised)
        _check_counts("subgroup_hist", self.subgroup_hist, (len(SUBGROUP_LEVELS), 2, n_bins), signed=noised)
        if not noised:  # a variable's levels split the knees (a level withheld under k counts as zeros)
            for variable in LEVELS:
                rows = [i for i, (v, _) in enumerate(SUBGROUP_LEVELS) if v == variable]
                if (self.subgroup_hist[rows].sum(axis=(0, 2)) > self.hist.sum(axis=1)).any():
                    raise ValueError(f"subgroup histograms of {variable} count more knees than hist")
        for name, hist in (
            ("at_threshold", self.hist),
            ("film_at_threshold", self.film_hist),
            ("tscore_who", self.tscore_hist),
        ):
            counts = getattr(self, name)
            _check_counts(name, counts, (4,), signed=noised)
            tp, fp, tn, fn = (int(v) for v in counts)
            if tp + fn != int(hist[1].sum()) or fp + tn != int(hist[0].sum()):
                raise ValueError(f"{name}: confusion counts at τ* do not match the histogram's class totals")
        if not noised and int(self.raw_hist.sum()) != int(self.hist.sum()):
            raise ValueError("raw_hist and hist count different knees")
        floats = {
            "brier_sum": (1,),
            "brier_sum_raw": (1,),
            "tscore_sums": (len(M.TSCORE_SUM_KEYS),),
            "bilateral_sums": (3,),
            "mirror_sums": (3,),
        }
        for name, shape in floats.items():
            arr = getattr(self, name)
            if arr.shape != shape or not np.issubdtype(arr.dtype, np.floating) or not np.isfinite(arr).all():
                raise ValueError(f"{name} must be {shape} finite floats, got {arr.dtype} {arr.shape}")
        if int(self.bilateral_hist.sum()) != round(float(self.bilateral_sums[0])):
            raise ValueError("bilateral_hist and bilateral_sums count different films")
