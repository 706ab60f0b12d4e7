"""Sufficient statistics, the wire protocol and the one metrics function, against scikit-learn/scipy on the
concatenated cohort: what a federation computes from summed counts must be what one machine computes."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import pytest
from flwr.app import Array, ArrayRecord
from scipy import stats
from sklearn.metrics import average_precision_score, brier_score_loss, recall_score, roc_auc_score

from configs.schema import ThresholdConfig
from server.pooled import QuorumError, pool, pooled_threshold
from strnet import metrics as M
from strnet.errors import SiteError
from strnet.protocol import decode_splits, decode_validation, encode, encode_splits
from strnet.scoring import task_metrics
from strnet.sufficient import BILATERAL_BINS, EvaluationCounts, ValidationCounts

TH = ThresholdConfig()
GRID, BINS = TH.grid(), TH.histogram_bins


def site_scores(seed: int, n: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p = np.clip(rng.beta(2, 3, n) + shift * y, 0, 1)
    return y, p


def site_predictions(seed: int, n: int) -> dict[str, np.ndarray]:
    """Raw predictions of one site, with unknown labels and T-scores (NaN) as real manifests have them."""
    rng = np.random.default_rng(seed + 1000)
    y, p = site_scores(seed, n, 0.25)
    y_screen = y.astype(float)
    y_screen[:3] = np.nan
    severity = np.where(y == 1, rng.integers(0, 2, n).astype(float), np.nan)
    t_true = rng.normal(-1.5, 1.0, n)
    t_true[rng.random(n) < 0.3] = np.nan
    return {
        "y_screen": y_screen,
        "prob_screen": p,
        "y_severity": severity,
        "prob_severity": rng.random(n),
        "t_true": t_true,
        "t_pred": np.nan_to_num(t_true) + rng.normal(0.2, 0.5, n),
    }


def wire(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Through a Flower ArrayRecord and back, as a ClientApp reply travels."""
    record = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
    return {k: v.numpy() for k, v in record.items()}


def test_pooled_tau_and_ranking_equal_the_concatenated_cohort() -> None:
    sites = {f"s{i}": site_scores(i, n, shift) for i, (n, shift) in enumerate([(120, 0.3), (60, 0.1), (90, 0.2)])}
    per_site = {
        s: decode_validation(
            s, wire(encode(ValidationCounts.from_scores(y, p, grid=GRID, n_bins=BINS))), n_bins=BINS, n_grid=len(GRID)
        )
        for s, (y, p) in sites.items()
    }
    pooled = pool(per_site, quorum=3, what="test")
    y = np.concatenate([yp[0] for yp in sites.values()])
    p = np.concatenate([yp[1] for yp in sites.values()])
    for min_sens in (0.86, 0.6, 0.99):
        tau = pooled_threshold(pooled, ThresholdConfig(min_sensitivity=min_sens), sites=list(sites), excluded=[])
        assert tau["value"] == M.select_threshold(y, p, min_sens, GRID)
        assert tau["sites"] == ["s0", "s1", "s2"] and tau["n_cases"] == len(y)
    ranking = pooled.ranking()
    assert abs(ranking["auroc"] - roc_auc_score(y, p)) < 1e-3
    assert abs(ranking["auprc"] - average_precision_score(y, p)) < 1e-3
    with pytest.raises(QuorumError, match="quorum is 4"):
        pool(per_site, quorum=4, what="test")


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda s: s.update(hist=s["hist"][:, :10]), "shape"),
        (lambda s: s.update(tp=-s["tp"]), "negative"),
        (lambda s: s.pop("fn"), r"missing \['fn'\]"),
        (lambda s: s.update(tp=s["tp"] + 1), "inconsistent"),
        (lambda s: s.update(tp=s["tp"].astype(np.float64)), "integer counts"),
        (lambda s: s.update(extra=np.zeros(3)), "unexpected"),
    ],
)
def test_malformed_statistics_name_the_site(corrupt: Callable, message: str) -> None:
    arrays = encode(ValidationCounts.from_scores(*site_scores(3, 50, 0.3), grid=GRID, n_bins=BINS))
    corrupt(arrays)
    with pytest.raises(SiteError, match=f"site 's1'.*{message}"):
        decode_validation("s1", wire(arrays), n_bins=BINS, n_grid=len(GRID))


def test_pooled_evaluation_metrics_match_scikit_learn_and_scipy() -> None:
    tau = 0.45
    preds = [site_predictions(20 + i, 40 + 10 * i) for i in range(3)]
    counts = [EvaluationCounts.from_predictions(p, threshold=tau, n_bins=BINS) for p in preds]
    decoded = [
        decode_splits(f"s{i}", wire(encode_splits({"test": c})), n_bins=BINS)["test"] for i, c in enumerate(counts)
    ]
    pooled = pool({f"s{i}": c for i, c in enumerate(decoded)}, quorum=3, what="test")
    m = task_metrics(pooled, tau, n_boot=400, seed=1)

    cat = {k: np.concatenate([p[k] for p in preds]) for k in preds[0]}
    known = ~np.isnan(cat["y_screen"])
    y, p = cat["y_screen"][known].astype(int), cat["prob_screen"][known]
    assert m["screening_n"] == len(y)
    assert m["screening_sensitivity"] == pytest.approx(recall_score(y, p >= tau))
    assert m["screening_specificity"] == pytest.approx(recall_score(1 - y, p < tau))
    assert m["screening_brier"] == pytest.approx(brier_score_loss(y, p))
    assert abs(m["screening_auroc"] - roc_auc_score(y, p)) < 1e-3
    assert m["screening_auroc_ci_lo"] < m["screening_auroc"] < m["screening_auroc_ci_hi"]
    sev = ~np.isnan(cat["y_severity"])
    assert abs(m["severity_auroc"] - roc_auc_score(cat["y_severity"][sev], cat["prob_severity"][sev])) < 1e-3
    t = ~np.isnan(cat["t_true"])
    tt, tp = cat["t_true"][t], cat["t_pred"][t]
    assert m["t_score_n"] == t.sum()
    assert m["t_score_mae"] == pytest.approx(np.mean(np.abs(tp - tt)))
    assert m["t_score_rmse"] == pytest.approx(np.sqrt(np.mean((tp - tt) ** 2)))
    assert m["t_score_pearson_r"] == pytest.approx(stats.pearsonr(tt, tp).statistic)
    reference = M.regression_metrics(tt, tp)
    for key in ("bland_altman_bias", "bland_altman_loa_low", "bland_altman_loa_high"):
        assert m[f"t_score_{key}"] == pytest.approx(reference[key])
    assert (m["t_score_pearson_r_ci_lo"], m["t_score_pearson_r_ci_hi"]) == pytest.approx(reference["pearson_ci"])

    # the T-score estimate read through the WHO cut, on knees with a label and a reference T-score
    w = known & t
    yw, tw = cat["y_screen"][w].astype(int), cat["t_pred"][w]
    assert m["t_score_who_n"] == w.sum()
    assert m["t_score_who_sensitivity"] == pytest.approx(recall_score(yw, tw < -1.0))
    assert m["t_score_who_specificity"] == pytest.approx(recall_score(1 - yw, tw >= -1.0))
    assert abs(m["t_score_who_auroc"] - roc_auc_score(yw, -tw)) < 1e-2  # 0.1-unit bins: ties within a bin

    # the same function on the raw predictions: the same names, exact ranking, the same counts
    raw = task_metrics(sum(counts[1:], counts[0]), tau, predictions=cat, n_boot=400, seed=1)
    assert set(raw) == set(m)
    assert raw["screening_auroc"] == pytest.approx(roc_auc_score(y, p))
    assert raw["screening_tp"] == m["screening_tp"] and raw["t_score_mae"] == pytest.approx(m["t_score_mae"])
    assert raw["t_score_who_auroc"] == pytest.approx(roc_auc_score(yw, -tw))


def test_who_read_of_the_tscore_estimate_puts_minus_one_in_normal() -> None:
    """WHO: normal >= -1.0, so an estimate of exactly -1.0 is a 'normal' answer, whatever the bins do."""
    nan = np.nan
    preds = {
        "y_screen": np.array([1.0, 0.0, 1.0, 0.0, 1.0]),
        "prob_screen": np.full(5, 0.5),
        "y_severity": np.full(5, nan),
        "prob_severity": np.full(5, 0.5),
        "t_true": np.array([-2.0, 0.0, -1.5, 0.5, nan]),  # the last knee has no reference: not in the cohort
        "t_pred": np.array([-1.0, -1.0, -3.0, 1.0, -4.0]),
    }
    counts = EvaluationCounts.from_predictions(preds, threshold=0.5, n_bins=BINS)
    assert counts.tscore_who.tolist() == [1, 0, 2, 1]  # tp, fp, tn, fn
    m = task_metrics(counts, 0.5, n_boot=10, seed=0)
    assert (m["t_score_who_n"], m["t_score_who_sensitivity"], m["t_score_who_specificity"]) == (4.0, 0.5, 1.0)


def test_histogram_bootstrap_agrees_with_the_case_bootstrap() -> None:
    """Resampling cases within class and resampling a class's count over its bins are the same distribution:
    on scores that sit on bin centres both give the same intervals up to Monte Carlo error."""
    y, p = site_scores(5, 300, 0.2)
    centres = (np.floor(p * BINS).clip(0, BINS - 1) + 0.5) / BINS
    hist = M.score_histogram(y, centres, BINS)
    by_cases = M.bootstrap_ci(y, centres, 0.5, n_boot=3000, seed=0)
    by_bins = M.bootstrap_ci_from_histogram(hist, 0.5, n_boot=3000, seed=1)
    for k in ("auroc", "auprc", "sensitivity", "specificity", "ppv", "mcc"):
        assert by_bins[k] == pytest.approx(by_cases[k], abs=0.02), k
    with pytest.raises(ValueError, match="n_boot"):
        M.bootstrap_ci_from_histogram(hist, 0.5, n_boot=0, seed=1)


def test_malformed_frozen_statistics_name_the_site() -> None:
    counts = EvaluationCounts.from_predictions(site_predictions(1, 30), threshold=0.5, n_bins=BINS)
    arrays = encode_splits({"test": counts, "val": counts, "train": counts})
    assert set(decode_splits("s1", wire(arrays), n_bins=BINS)) == {"test", "val", "train"}
    with pytest.raises(SiteError, match=r"site 's1'.*splits"):
        decode_splits("s1", {k.replace("test.", "holdout."): v for k, v in arrays.items()}, n_bins=BINS)
    bad = dict(arrays, **{"test.tscore_sums": np.full(8, np.nan)})
    with pytest.raises(SiteError, match=r"site 's1'.*tscore_sums"):
        decode_splits("s1", bad, n_bins=BINS)
    bad = dict(arrays, **{"val.at_threshold": arrays["val.at_threshold"] + 1})
    with pytest.raises(SiteError, match=r"site 's1'.*do not match"):
        decode_splits("s1", bad, n_bins=BINS)


def film_predictions(seed: int, n_films: int) -> dict[str, np.ndarray]:
    """A site's knees: bilateral films (two rows, R and L, correlated scores) and single-knee films."""
    rng = np.random.default_rng(seed)
    rows: dict[str, list] = {k: [] for k in ("film", "side", "y_screen", "prob_screen", "prob_screen_mirror")}
    for film in range(n_films):
        y = float(rng.random() < 0.6)
        base = np.clip(0.35 + 0.3 * y + rng.normal(0, 0.15), 0.01, 0.99)
        sides = (1, 2) if rng.random() < 0.6 else (0,)
        for side in sides:
            p = float(np.clip(base + rng.normal(0, 0.12), 0, 1))
            rows["film"].append(film)
            rows["side"].append(side)
            rows["y_screen"].append(y if rng.random() > 0.05 else np.nan)
            rows["prob_screen"].append(p)
            rows["prob_screen_mirror"].append(float(np.clip(p + rng.normal(0, 0.05), 0, 1)))
    out = {k: np.asarray(v, np.int64 if k in ("film", "side") else np.float64) for k, v in rows.items()}
    n = len(out["film"])
    nan = np.full(n, np.nan)
    return out | {"y_severity": nan, "prob_severity": nan, "t_true": nan, "t_pred": nan}


def test_per_radiograph_and_left_right_metrics_pool_to_the_concatenated_films() -> None:
    tau = 0.5
    preds = [film_predictions(40 + i, 30 + 15 * i) for i in range(3)]
    counts = [EvaluationCounts.from_predictions(p, threshold=tau, n_bins=BINS) for p in preds]
    decoded = [
        decode_splits(f"s{i}", wire(encode_splits({"test": c})), n_bins=BINS)["test"] for i, c in enumerate(counts)
    ]
    m = task_metrics(pool({f"s{i}": c for i, c in enumerate(decoded)}, quorum=3, what="test"), tau, n_boot=0, seed=1)

    # the oracle: one frame of all sites' knees, films numbered apart per site
    frames = []
    for i, p in enumerate(preds):
        f = pd.DataFrame({k: p[k] for k in ("film", "side", "y_screen", "prob_screen", "prob_screen_mirror")})
        frames.append(f.assign(film=f["film"] + 10_000 * i))
    knees = pd.concat(frames, ignore_index=True)
    films = knees.dropna(subset=["y_screen"]).groupby("film").agg(y=("y_screen", "max"), p=("prob_screen", "mean"))
    assert m["radiograph_n"] == len(films)
    assert abs(m["radiograph_auroc"] - roc_auc_score(films["y"], films["p"])) < 1e-3
    assert m["radiograph_sensitivity"] == pytest.approx(recall_score(films["y"], films["p"] >= tau))
    pairs = knees[knees["side"] > 0].pivot(index="film", columns="side", values="prob_screen").dropna()
    right, left = pairs[1].to_numpy(), pairs[2].to_numpy()
    assert m["bilateral_n_pairs"] == len(pairs)
    assert m["bilateral_flag_disagreement"] == pytest.approx(np.mean((right >= tau) != (left >= tau)))
    assert m["bilateral_mean_abs_dp"] == pytest.approx(np.mean(np.abs(right - left)))
    # pooled Spearman is scipy's on the binned values (ties within a bin), and close to the exact one
    b = BILATERAL_BINS
    binned = stats.spearmanr(np.minimum((right * b).astype(int), b - 1), np.minimum((left * b).astype(int), b - 1))
    assert m["bilateral_spearman"] == pytest.approx(binned.statistic)
    assert abs(m["bilateral_spearman"] - stats.spearmanr(right, left).statistic) < 0.02
    mirror = knees["prob_screen"] - knees["prob_screen_mirror"]
    assert m["mirror_mean_abs_dp"] == pytest.approx(mirror.abs().mean())
    assert m["mirror_flag_change"] == pytest.approx(
        np.mean((knees["prob_screen"] >= tau) != (knees["prob_screen_mirror"] >= tau))
    )

    # with the raw predictions of one site, Spearman is exact
    one = task_metrics(counts[0], tau, predictions=preds[0], n_boot=0, seed=1)
    f0 = pd.DataFrame({k: preds[0][k] for k in ("film", "side", "prob_screen")})
    p0 = f0[f0["side"] > 0].pivot(index="film", columns="side", values="prob_screen").dropna()
    assert one["bilateral_spearman"] == pytest.approx(stats.spearmanr(p0[1], p0[2]).statistic)
