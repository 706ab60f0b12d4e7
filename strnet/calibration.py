"""Platt scaling of the screening logit, fitted from additive statistics so both modes fit the same thing.

Why: the paper's τ* grid (0.20–0.80) is only meaningful on calibrated probabilities. Class-weighted BCE on a few
hundred images pushes the raw probabilities towards the extremes and shifts them by the class weight, so on real
data no grid threshold reached the required sensitivity and the rule fell back. A two-parameter map
``p = sigmoid(a·z + b)`` of the raw logit ``z`` keeps the ranking (AUROC unchanged, a > 0) and puts the
probabilities where the grid can find an operating point.

How: Newton's method on the log-loss with Platt's (1999) smoothed targets ``(N₊+1)/(N₊+2)`` and ``1/(N₋+2)``,
which keep the fit finite when validation scores separate the classes. Every Newton step needs only the
gradient (2 numbers), the Hessian (2×2) and the loss of the current (a, b) summed over cases — additive, so a
federation sums them over sites (:class:`PlattStats`), and the fit on pooled statistics equals the fit on the
concatenated validation logits (tested to 1e-6). Centralized training calls :func:`fit_platt` with its own
logits; the federation's server calls it with a function that asks the sites.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.special import expit, log_expit

from strnet.sufficient import Additive, Predictions


@dataclass(frozen=True)
class Platt:
    """``P(bone loss) = sigmoid(a · logit + b)``; the identity (1, 0) is "uncalibrated"."""

    a: float = 1.0
    b: float = 0.0

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        return expit(self.a * np.asarray(logits, np.float64) + self.b)

    @property
    def is_identity(self) -> bool:
        return self.a == 1.0 and self.b == 0.0

    def to_dict(self) -> dict[str, float]:
        return {"a": self.a, "b": self.b}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Platt:
        """A bundle's ``calibration`` entry; bundles from before calibration existed are uncalibrated."""
        if not data:
            return cls()
        return cls(float(data["a"]), float(data["b"]))


@dataclass
class PlattStats(Additive):
    """Σ over cases of the log-loss, its gradient and Hessian in (a, b), and the case count — one Newton step."""

    gradient: np.ndarray  # (2,) float64
    hessian: np.ndarray  # (2, 2) float64
    loss: np.ndarray  # (1,) float64
    n: np.ndarray  # (1,) int64

    @classmethod
    def from_logits(cls, logits: np.ndarray, y: np.ndarray, params: Platt, targets: tuple[float, float]) -> PlattStats:
        """Statistics of one cohort's labelled logits at ``params``; ``targets`` = (negative, positive) targets."""
        z = np.asarray(logits, np.float64)
        t = np.where(np.asarray(y) > 0, targets[1], targets[0])
        s = params.a * z + params.b
        p = expit(s)
        r = p - t
        w = p * (1.0 - p)
        loss = -(t * log_expit(s) + (1.0 - t) * log_expit(-s)).sum()
        return cls(
            gradient=np.array([(r * z).sum(), r.sum()]),
            hessian=np.array([[(w * z * z).sum(), (w * z).sum()], [(w * z).sum(), w.sum()]]),
            loss=np.array([loss]),
            n=np.array([len(z)], np.int64),
        )

    def check(self) -> None:
        shapes = {"gradient": (2,), "hessian": (2, 2), "loss": (1,), "n": (1,)}
        for name, shape in shapes.items():
            arr = getattr(self, name)
            if arr.shape != shape or not np.isfinite(arr).all():
                raise ValueError(f"Platt statistics: {name} must be finite with shape {shape}, got {arr.shape}")
        if self.n[0] < 0 or self.loss[0] < 0:
            raise ValueError("Platt statistics: negative count or loss")


def platt_targets(n_pos: int, n_neg: int) -> tuple[float, float]:
    """Platt's smoothed (negative, positive) targets: they depend on the pooled class counts only."""
    return 1.0 / (n_neg + 2.0), (n_pos + 1.0) / (n_pos + 2.0)


def fit_platt(
    stats_at: Callable[[Platt], PlattStats],
    *,
    n_pos: int,
    n_neg: int,
    max_iter: int = 50,
    tol: float = 1e-10,
) -> dict[str, Any]:
    """Newton's method with step halving; ``stats_at(params)`` returns the statistics summed over all cases.

    Returns the bundle's ``calibration`` entry: ``a``, ``b``, the method, iterations, final mean log-loss and
    ``status`` — ``fitted``, or why the identity is kept (one class only, a non-positive slope that would
    invert the ranking, no convergence).
    """
    base = {"method": "platt", "n_pos": int(n_pos), "n_neg": int(n_neg)}
    if n_pos == 0 or n_neg == 0:
        return base | Platt().to_dict() | {"status": "identity: validation holds one class only", "iterations": 0}
    params = Platt()
    stats = stats_at(params)
    calls, iterations, converged = 1, 0, False
    for iterations in range(1, max_iter + 1):  # noqa: B007 (reported)
        try:
            step = np.linalg.solve(stats.hessian, stats.gradient)
        except np.linalg.LinAlgError:
            break
        scale = 1.0
        while True:
            candidate = Platt(params.a - scale * float(step[0]), params.b - scale * float(step[1]))
            new = stats_at(candidate)
            calls += 1
            if new.loss[0] <= stats.loss[0] * (1 + 1e-12) or scale < 1e-6:
                break
            scale /= 2
        moved = float(np.abs(scale * step).max())
        params, stats = candidate, new
        if moved < tol or float(np.abs(stats.gradient).max()) < tol * max(1.0, float(stats.n[0])):
            converged = True
            break
    n = max(int(stats.n[0]), 1)
    out = base | {"iterations": iterations, "evaluations": calls, "mean_log_loss": float(stats.loss[0]) / n}
    if not converged:
        return out | Platt().to_dict() | {"status": "identity: Newton's method did not converge"}
    if not params.a > 0 or not math.isfinite(params.b):
        return out | Platt().to_dict() | {"status": f"identity: fitted slope a={params.a:.3g} would invert the ranking"}
    return out | params.to_dict() | {"status": "fitted"}


def fit_platt_to_logits(logits: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """:func:`fit_platt` on one cohort's logits (centralized training; the oracle of the pooled fit)."""
    y = np.asarray(y).astype(np.int64)
    n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
    targets = platt_targets(n_pos, n_neg)
    return fit_platt(lambda p: PlattStats.from_logits(logits, y, p, targets), n_pos=n_pos, n_neg=n_neg)


def calibrated(preds: Predictions, platt: Platt) -> Predictions:
    """Predictions with ``prob_screen`` on the calibrated scale and the uncalibrated one kept as ``prob_screen_raw``."""
    out = dict(preds)
    out["prob_screen_raw"] = expit(np.asarray(preds["logit_screen"], np.float64))
    out["prob_screen"] = platt.probabilities(preds["logit_screen"])
    if "logit_screen_mirror" in preds:
        out["prob_screen_mirror"] = platt.probabilities(preds["logit_screen_mirror"])
    return out


def labelled_logits(preds: Predictions) -> tuple[np.ndarray, np.ndarray]:
    """(logits, labels) of the cases with a known screening label."""
    known = ~np.isnan(preds["y_screen"])
    return np.asarray(preds["logit_screen"], np.float64)[known], preds["y_screen"][known].astype(np.int64)
