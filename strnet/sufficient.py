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

from strnet import metrics as M

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


def _check_counts(name: str, arr: np.ndarray, shape: tuple[int, ...]) -> None:
    if arr.shape != shape:
        raise ValueError(f"{name} has shape {arr.shape}, expected {shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integer counts, got dtype {arr.dtype}")
    if (arr < 0).any():
        raise ValueError(f"{name} holds negative counts")


class _Additive:
    """Element-wise sum of two statistics of the same shape (what pooling over sites is)."""

    def __add__(self, other: Any) -> Any:
        if type(other) is not type(self):
            return NotImplemented
        return type(self)(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})  # type: ignore[arg-type]

    def arrays(self) -> dict[str, np.ndarray]:
        return {f.name: np.asarray(getattr(self, f.name)) for f in fields(self)}  # type: ignore[arg-type]


@dataclass
class ValidationCounts(_Additive):
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

    def check(self, *, n_bins: int, n_grid: int) -> None:
        """Shapes, non-negative integer counts, and tp+fn / fp+tn equal to the histogram's class totals."""
        _check_counts("hist", self.hist, (2, n_bins))
        for k in ("tp", "fp", "tn", "fn"):
            _check_counts(k, getattr(self, k), (n_grid,))
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
        return histogram_ranking(self.hist)

    def threshold(self, grid: np.ndarray, min_sensitivity: float) -> dict[str, Any]:
        """The paper's τ* rule on these counts (exactly what it gives on the concatenated scores)."""
        return M.threshold_selection_from_counts(self.tp, self.fp, self.tn, self.fn, grid, min_sensitivity)


@dataclass
class EvaluationCounts(_Additive):
    """A frozen evaluation at τ*: everything the reported screening, severity and T-score metrics need."""

    hist: np.ndarray  # (2, n_bins) int64 screening scores per class
    at_threshold: np.ndarray  # (4,) int64: tp, fp, tn, fn at τ*
    brier_sum: np.ndarray  # (1,) float64: Σ (p − y)²
    severity_hist: np.ndarray  # (2, n_bins) int64: osteopenia / osteoporosis among bone-loss cases
    tscore_sums: np.ndarray  # (8,) float64: metrics.TSCORE_SUM_KEYS

    @classmethod
    def from_predictions(cls, preds: Predictions, *, threshold: float, n_bins: int) -> EvaluationCounts:
        y, p = screening_cases(preds)
        at = ValidationCounts.from_scores(y, p, grid=np.array([threshold]), n_bins=n_bins)
        return cls(
            hist=at.hist,
            at_threshold=np.array([int(at.tp[0]), int(at.fp[0]), int(at.tn[0]), int(at.fn[0])], np.int64),
            brier_sum=np.array([float(((p - y) ** 2).sum())], np.float64),
            severity_hist=score_histogram(*severity_cases(preds), n_bins),
            tscore_sums=M.tscore_sums(preds["t_true"], preds["t_pred"]),
        )

    @classmethod
    def empty(cls, n_bins: int) -> EvaluationCounts:
        z = np.zeros((2, n_bins), np.int64)
        return cls(z, np.zeros(4, np.int64), np.zeros(1), z.copy(), np.zeros(len(M.TSCORE_SUM_KEYS)))

    def check(self, *, n_bins: int) -> None:
        _check_counts("hist", self.hist, (2, n_bins))
        _check_counts("severity_hist", self.severity_hist, (2, n_bins))
        _check_counts("at_threshold", self.at_threshold, (4,))
        tp, fp, tn, fn = (int(v) for v in self.at_threshold)
        if tp + fn != int(self.hist[1].sum()) or fp + tn != int(self.hist[0].sum()):
            raise ValueError("confusion counts at τ* do not match the histogram's class totals")
        for name, shape in (("brier_sum", (1,)), ("tscore_sums", (len(M.TSCORE_SUM_KEYS),))):
            arr = getattr(self, name)
            if arr.shape != shape or not np.issubdtype(arr.dtype, np.floating) or not np.isfinite(arr).all():
                raise ValueError(f"{name} must be {shape} finite floats, got {arr.dtype} {arr.shape}")
