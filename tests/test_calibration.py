"""Platt calibration: the Newton fit against scipy's optimum, pooled statistics against the concatenated cohort,
the reliability/ECE numbers against a direct computation, and the report's first line when τ* falls back."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from scipy.optimize import minimize
from scipy.special import expit, log_expit
from sklearn.metrics import brier_score_loss

from configs.schema import ThresholdConfig
from server.pooled import pool
from strnet import metrics as M
from strnet.calibration import Platt, PlattStats, fit_platt, fit_platt_to_logits, platt_targets
from strnet.protocol import decode_platt, encode
from strnet.run import headline
from strnet.sufficient import ValidationCounts


def site_logits(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Over-confident, shifted logits, as class-weighted BCE on few images produces them."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.65).astype(np.int64)
    z = 4.0 * (rng.normal(0.0, 1.0, n) + 1.2 * y) + 2.0
    return z, y


def wire(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    record = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
    return {k: v.numpy() for k, v in record.items()}


def platt_loss(theta: np.ndarray, z: np.ndarray, y: np.ndarray) -> float:
    t_neg, t_pos = platt_targets(int(y.sum()), int(len(y) - y.sum()))
    t = np.where(y > 0, t_pos, t_neg)
    s = theta[0] * z + theta[1]
    return float(-(t * log_expit(s) + (1 - t) * log_expit(-s)).sum())


def test_newton_fit_reaches_scipys_optimum_of_platts_objective() -> None:
    z, y = site_logits(1, 300)
    fitted = fit_platt_to_logits(z, y)
    assert fitted["status"] == "fitted" and fitted["iterations"] < 20
    ref = minimize(platt_loss, x0=np.array([1.0, 0.0]), args=(z, y), method="BFGS", options={"gtol": 1e-10})
    assert (fitted["a"], fitted["b"]) == pytest.approx(tuple(ref.x), abs=1e-5)
    # the statistics are the loss's gradient and Hessian (central differences)
    targets = platt_targets(int(y.sum()), int(len(y) - y.sum()))
    at = Platt(0.3, -0.2)
    stats = PlattStats.from_logits(z, y, at, targets)
    assert stats.loss[0] == pytest.approx(platt_loss(np.array([0.3, -0.2]), z, y))
    h = 1e-6
    for i in range(2):
        e = np.eye(2)[i] * h
        grad = (platt_loss(np.array([0.3, -0.2]) + e, z, y) - platt_loss(np.array([0.3, -0.2]) - e, z, y)) / (2 * h)
        assert stats.gradient[i] == pytest.approx(grad, rel=1e-5)
        plus = PlattStats.from_logits(z, y, Platt(0.3 + e[0], -0.2 + e[1]), targets).gradient
        minus = PlattStats.from_logits(z, y, Platt(0.3 - e[0], -0.2 - e[1]), targets).gradient
        assert stats.hessian[:, i] == pytest.approx((plus - minus) / (2 * h), rel=1e-4)


def test_pooled_calibration_equals_the_fit_on_the_concatenated_validation_logits() -> None:
    sites = {f"s{i}": site_logits(10 + i, n) for i, n in enumerate((40, 90, 25))}
    z = np.concatenate([v[0] for v in sites.values()])
    y = np.concatenate([v[1] for v in sites.values()])
    n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
    targets = platt_targets(n_pos, n_neg)

    def pooled_at(params: Platt) -> PlattStats:  # what the server does: every site's reply, over the wire, summed
        replies = {s: wire(encode(PlattStats.from_logits(lz, ly, params, targets))) for s, (lz, ly) in sites.items()}
        return pool({s: decode_platt(s, r) for s, r in replies.items()}, quorum=3, what="calibration")

    federated = fit_platt(pooled_at, n_pos=n_pos, n_neg=n_neg)
    central = fit_platt_to_logits(z, y)
    assert federated["status"] == central["status"] == "fitted"
    assert abs(federated["a"] - central["a"]) < 1e-6 and abs(federated["b"] - central["b"]) < 1e-6


def test_calibration_puts_the_paper_grid_to_work() -> None:
    """Over-confident, shifted scores: the rule falls back before calibration and finds τ* after it."""
    th = ThresholdConfig()
    z, y = site_logits(3, 400)
    z = z - 9.0  # most bone-loss knees below 0.20: no grid threshold reaches sensitivity 0.86
    raw = ValidationCounts.from_scores(y, expit(z), grid=th.grid(), n_bins=th.histogram_bins)
    assert raw.threshold(th.grid(), 0.86)["rule"] == M.RULE_FALLBACK
    platt = Platt.from_dict(fit_platt_to_logits(z, y))
    p = platt.probabilities(z)
    cal = ValidationCounts.from_scores(y, p, grid=th.grid(), n_bins=th.histogram_bins)
    chosen = cal.threshold(th.grid(), 0.86)
    assert chosen["rule"] == M.RULE_CONSTRAINED and chosen["sensitivity"] >= 0.86
    assert brier_score_loss(y, p) < brier_score_loss(y, expit(z))
    assert M.reliability_from_histogram(cal.hist)["ece"] < M.reliability_from_histogram(raw.hist)["ece"]


def test_degenerate_validation_keeps_the_identity() -> None:
    z, y = site_logits(4, 50)
    one_class = fit_platt_to_logits(z, np.ones_like(y))
    assert (one_class["a"], one_class["b"]) == (1.0, 0.0) and one_class["status"].startswith("identity")
    inverted = fit_platt_to_logits(-z, y)  # a model that ranks backwards: calibration must not flip it silently
    assert (inverted["a"], inverted["b"]) == (1.0, 0.0) and "invert" in inverted["status"]


def test_reliability_and_ece_from_the_histogram_match_a_direct_computation() -> None:
    rng = np.random.default_rng(5)
    p = rng.random(500)
    y = (rng.random(500) < p**1.5).astype(int)
    r = M.reliability_from_histogram(M.score_histogram(y, p, 1000), n_groups=10)
    group = np.minimum((p * 10).astype(int), 9)
    direct = sum(
        (group == g).sum() / len(p) * abs(y[group == g].mean() - p[group == g].mean())
        for g in range(10)
        if (group == g).any()
    )
    assert r["ece"] == pytest.approx(direct, abs=1e-3)  # bin centres stand in for the scores: ≤ half a fine bin
    assert M.brier_from_histogram(M.score_histogram(y, p, 1000)) == pytest.approx(brier_score_loss(y, p), abs=1e-3)


def test_the_first_line_says_when_the_rule_fell_back() -> None:
    cal = {"status": "fitted", "a": 0.4, "b": -0.3}
    ok = {"value": 0.55, "rule": M.RULE_CONSTRAINED, "min_sensitivity": 0.86, "sensitivity": 0.9, "specificity": 0.7}
    assert headline(ok, cal).startswith("τ* = 0.55 meets validation sensitivity >= 0.86")
    fell = ok | {"rule": M.RULE_FALLBACK, "sensitivity": 0.6}
    assert headline(fell, cal).startswith("WARNING: no grid threshold reached validation sensitivity >= 0.86")
