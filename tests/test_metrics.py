"""strnet.metrics against scikit-learn/scipy oracles on random and adversarial inputs."""

from __future__ import annotations

import time
import warnings
from fractions import Fraction

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    brier_score_loss,
    confusion_matrix,
    f1_score,
    matthews_corrcoef,
    precision_score,
    recall_score,
    roc_auc_score,
)

from configs.schema import ThresholdConfig
from strnet import metrics as M

GRID = ThresholdConfig().grid()
SENS = ThresholdConfig().min_sensitivity
BINS = ThresholdConfig().histogram_bins


def _random_case(seed: int, n: int = 120, decimals: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    y[:2] = (0, 1)  # both classes always present
    p = np.clip(rng.normal(0.35 + 0.3 * y, 0.18), 0.0, 1.0)
    if decimals is not None:  # heavy ties, many scores exactly on grid thresholds
        p = np.round(p, decimals)
    return y, p


def _reference_rows(y: np.ndarray, p: np.ndarray, grid: np.ndarray) -> list[tuple[float, Fraction, Fraction, Fraction]]:
    """(threshold, sensitivity, specificity, balanced accuracy) from sklearn confusion matrices, as exact fractions."""
    rows = []
    for t in grid:
        tn, fp, fn, tp = confusion_matrix(y, (p >= t).astype(int), labels=[0, 1]).ravel()
        sens, spec = Fraction(int(tp), int(tp + fn)), Fraction(int(tn), int(tn + fp))
        rows.append((float(t), sens, spec, (sens + spec) / 2))
    return rows


def _reference_threshold(rows: list[tuple[float, Fraction, Fraction, Fraction]], min_sens: float) -> tuple[float, str]:
    """Independent oracle: the spec's ordering written as a sort over exact fractions."""
    ok = [r for r in rows if r[1] >= Fraction(min_sens).limit_denominator(10**6)]
    if ok:
        best = sorted(ok, key=lambda r: (-r[2], -r[3], -r[1], r[0]))[0]
        return round(best[0], 2), M.RULE_CONSTRAINED
    best = sorted(rows, key=lambda r: (-r[3], -r[1], r[0]))[0]
    return round(best[0], 2), M.RULE_FALLBACK


# ---------------------------------------------------------------------------------------------- threshold


def test_grid_is_the_papers_61_thresholds() -> None:
    assert len(GRID) == 61 and SENS == 0.86
    assert GRID[0] == 0.20 and GRID[-1] == 0.80
    assert np.allclose(np.diff(GRID), 0.01)
    assert GRID.tolist() == [round(0.20 + 0.01 * k, 2) for k in range(61)]  # exact decimals, no float drift


@pytest.mark.parametrize("decimals", [None, 2])
def test_confusion_counts_match_sklearn_with_ge_rule(decimals: int | None) -> None:
    y, p = _random_case(1, decimals=decimals)
    c = M.confusion_at_thresholds(y, p, GRID)
    assert set(c) == {"tp", "fp", "tn", "fn"}
    for i, t in enumerate(GRID):
        tn, fp, fn, tp = confusion_matrix(y, (p >= t).astype(int), labels=[0, 1]).ravel()
        assert (c["tp"][i], c["fp"][i], c["tn"][i], c["fn"][i]) == (tp, fp, tn, fn)


def test_score_equal_to_threshold_counts_as_positive() -> None:
    y = np.array([1, 0])
    p = np.array([0.3, 0.1])
    c = M.confusion_at_thresholds(y, p, [0.3, 0.31])
    assert c["tp"].tolist() == [1, 0]
    assert M.classification_metrics(y, p, 0.3)["sensitivity"] == 1.0
    assert M.classification_metrics(y, p, 0.30000001)["sensitivity"] == 0.0


@pytest.mark.parametrize("seed", range(6))
def test_select_threshold_matches_reference_oracle(seed: int) -> None:
    y, p = _random_case(seed, decimals=2 if seed % 2 else None)
    rows = _reference_rows(y, p, GRID)
    for min_sens in (0.86, 0.5, 0.99):
        sel = M.threshold_selection(y, p, min_sensitivity=min_sens, grid=GRID)
        assert (sel["value"], sel["rule"]) == _reference_threshold(rows, min_sens)
        assert sel["value"] == M.select_threshold(y, p, min_sens, GRID)
        assert isinstance(sel["value"], float) and "threshold" not in sel
        at = M.classification_metrics(y, p, sel["value"])
        assert sel["sensitivity"] == pytest.approx(at["sensitivity"])
        assert sel["specificity"] == pytest.approx(at["specificity"])
        assert (sel["n_pos"], sel["n_neg"]) == (int(y.sum()), int((1 - y).sum()))


def test_specificity_tie_broken_by_balanced_accuracy() -> None:
    # negatives all >= 0.9 so specificity is 0 everywhere on this grid; sensitivity decides via balanced accuracy
    y = np.array([1, 1, 1, 1, 0, 0])
    p = np.array([0.25, 0.45, 0.45, 0.45, 0.9, 0.95])
    grid = [0.2, 0.3, 0.4]
    sel = M.threshold_selection(y, p, min_sensitivity=0.5, grid=grid)
    assert sel["rule"] == M.RULE_CONSTRAINED
    assert sel["specificity"] == 0.0
    assert sel["value"] == 0.2  # sens 1.0 beats 0.75 at 0.3/0.4 on balanced accuracy
    assert _reference_threshold(_reference_rows(y, p, np.array(grid)), 0.5)[0] == 0.2


def test_full_tie_goes_to_lower_threshold() -> None:
    y = np.array([1, 1, 0, 0])
    p = np.array([0.7, 0.8, 0.1, 0.2])
    # every grid threshold in (0.2, 0.7] gives sens 1, spec 1
    assert M.select_threshold(y, p, SENS, grid=[0.5, 0.3, 0.6, 0.25]) == 0.25
    assert M.select_threshold(y, p, SENS, GRID) == 0.21


def test_fallback_to_balanced_accuracy_when_sensitivity_unreachable() -> None:
    y = np.array([1, 1, 1, 0, 0])
    p = np.array([0.1, 0.1, 0.5, 0.3, 0.6])
    sel = M.threshold_selection(y, p, SENS, GRID)
    # best sensitivity on the grid is 1/3 < 0.86; balanced accuracy peaks at 0.5 for every t > 0.6 -> lowest, 0.61
    assert sel["rule"] == M.RULE_FALLBACK
    assert sel["value"] == 0.61
    assert sel["balanced_accuracy"] == pytest.approx(0.5)


def test_pooled_site_counts_give_exactly_the_concatenated_threshold() -> None:
    for seed in range(10):
        y, p = _random_case(100 + seed, n=150, decimals=2 if seed % 2 else None)
        sites = np.array_split(np.random.default_rng(seed).permutation(len(y)), 3)
        summed = {k: np.zeros(len(GRID), np.int64) for k in ("tp", "fp", "tn", "fn")}
        for idx in sites:
            for k, v in M.confusion_at_thresholds(y[idx], p[idx], GRID).items():
                summed[k] += v
        for min_sens in (0.86, 0.95):
            pooled = M.select_threshold_from_counts(**summed, grid=GRID, min_sensitivity=min_sens)
            assert pooled == M.select_threshold(y, p, min_sensitivity=min_sens, grid=GRID)


def test_counts_checks() -> None:
    c = M.confusion_at_thresholds([0, 1, 1], [0.1, 0.5, 0.9], GRID)
    tp = c["tp"].copy()
    tp[5] += 1
    bad = dict(c, tp=tp)
    with pytest.raises(ValueError, match="inconsistent"):
        M.select_threshold_from_counts(**bad, grid=GRID, min_sensitivity=SENS)
    with pytest.raises(ValueError, match="both classes"):
        M.select_threshold([1, 1, 1], [0.2, 0.5, 0.9], SENS, GRID)
    with pytest.raises(ValueError, match="shape"):
        M.select_threshold_from_counts(c["tp"][:3], c["fp"][:3], c["tn"][:3], c["fn"][:3], GRID, SENS)


# ---------------------------------------------------------------------------------------------- point metrics


@pytest.mark.parametrize("seed", range(6))
def test_classification_metrics_match_sklearn(seed: int) -> None:
    y, p = _random_case(seed, n=90, decimals=2 if seed % 2 else None)
    t = 0.5
    pred = (p >= t).astype(int)
    m = M.classification_metrics(y, p, t)
    sens = recall_score(y, pred)
    spec = recall_score(y, pred, pos_label=0)
    expected = {
        "auroc": roc_auc_score(y, p),
        "auprc": average_precision_score(y, p),
        "accuracy": accuracy_score(y, pred),
        "balanced_accuracy": balanced_accuracy_score(y, pred),
        "sensitivity": sens,
        "specificity": spec,
        "ppv": precision_score(y, pred),
        "npv": precision_score(y, pred, pos_label=0),
        "f1": f1_score(y, pred),
        "youden_j": sens + spec - 1,
        "mcc": matthews_corrcoef(y, pred),
        "brier": brier_score_loss(y, p),
    }
    for k, v in expected.items():
        assert m[k] == pytest.approx(v, abs=1e-12), k
        assert isinstance(m[k], float)
    assert list(m)[: len(M.METRIC_NAMES)] == list(M.METRIC_NAMES)


def test_one_class_and_degenerate_inputs_give_nan_without_warnings() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        neg_only = M.classification_metrics([0, 0, 0], [0.1, 0.6, 0.3], 0.5)
        pos_only = M.classification_metrics([1, 1], [0.7, 0.2], 0.5)
        no_flags = M.classification_metrics([0, 1, 0], [0.1, 0.2, 0.3], 0.9)
        equal = M.classification_metrics([0, 1, 0, 1], [0.4] * 4, 0.4)
    for k in ("auroc", "auprc", "sensitivity", "balanced_accuracy", "youden_j", "mcc"):
        assert np.isnan(neg_only[k]), k
    assert neg_only["f1"] == 0.0  # one false positive, no positives: 2tp/(2tp+fp+fn) = 0/1 is defined
    assert neg_only["specificity"] == pytest.approx(2 / 3)
    assert neg_only["brier"] == pytest.approx(brier_score_loss([0, 0, 0], [0.1, 0.6, 0.3]))
    assert np.isnan(pos_only["auroc"]) and pos_only["auprc"] == 1.0 and np.isnan(pos_only["specificity"])
    assert np.isnan(no_flags["ppv"]) and np.isnan(no_flags["mcc"]) and no_flags["npv"] == pytest.approx(2 / 3)
    assert equal["auroc"] == 0.5 and equal["sensitivity"] == 1.0 and equal["specificity"] == 0.0
    assert M.threshold_selection([0, 1, 0, 1], [0.4] * 4, SENS, GRID)["value"] == 0.2  # all tie: sens 1 up to 0.40


@pytest.mark.parametrize(
    ("y", "p", "match"),
    [
        ([0, 2], [0.1, 0.2], "0/1"),
        ([0, 1], [0.1, np.nan], "non-finite"),
        ([0, 1], [0.1, 1.2], r"\[0, 1\]"),
        ([0, 1, 1], [0.1, 0.2], "has 3 values"),
        ([], [], "no samples"),
    ],
)
def test_bad_inputs_raise_clear_errors(y: list, p: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        M.classification_metrics(y, p, 0.5)


# ---------------------------------------------------------------------------------------------- bootstrap


def test_replicate_metrics_equal_pointwise_metrics_on_each_resample() -> None:
    y, p = _random_case(7, n=60, decimals=2)
    rng = np.random.default_rng(0)
    for stratified in (True, False):
        idx = M._resample_indices(y, 5, rng, stratified)
        reps = M._replicate_metrics(y, p, 0.45, idx)
        for b in range(len(idx)):
            if stratified:
                assert y[idx[b]].sum() == y.sum()
            ref = M.classification_metrics(y[idx[b]], p[idx[b]], 0.45)
            for k in M.METRIC_NAMES:
                assert reps[k][b] == pytest.approx(ref[k], abs=1e-12, nan_ok=True), (k, b)


def test_bootstrap_is_seeded_and_covers_point_estimate() -> None:
    y, p = _random_case(3, n=300)
    start = time.perf_counter()
    ci = M.bootstrap_ci(y, p, 0.5, n_boot=2000, seed=42)
    seconds = time.perf_counter() - start
    assert seconds < 10.0, f"2000 replicates x 300 samples took {seconds:.2f}s"
    assert ci == M.bootstrap_ci(y, p, 0.5, n_boot=2000, seed=42)
    assert ci != M.bootstrap_ci(y, p, 0.5, n_boot=2000, seed=43)
    point = M.classification_metrics(y, p, 0.5)
    assert set(ci) == set(M.METRIC_NAMES)
    for k, (lo, hi) in ci.items():
        assert lo <= point[k] <= hi, k
        assert lo < hi, k
    sub = M.bootstrap_ci(y, p, 0.5, metric_names=["auroc"], n_boot=50, seed=1, stratified=False)
    assert list(sub) == ["auroc"]
    with pytest.raises(ValueError, match="unknown metric"):
        M.bootstrap_ci(y, p, 0.5, metric_names=["nope"])


def test_bootstrap_interval_width_matches_its_percentiles() -> None:
    # narrower alpha must give a wider interval; n_boot=1 collapses to the single replicate
    y, p = _random_case(5, n=80)
    wide = M.bootstrap_ci(y, p, 0.5, ["auroc"], n_boot=400, alpha=0.01)["auroc"]
    narrow = M.bootstrap_ci(y, p, 0.5, ["auroc"], n_boot=400, alpha=0.2)["auroc"]
    assert wide[0] < narrow[0] and narrow[1] < wide[1]
    one = M.bootstrap_ci(y, p, 0.5, ["auroc"], n_boot=1, seed=9)["auroc"]
    idx = M._resample_indices(y, 1, np.random.default_rng(9), True)[0]
    assert one[0] == one[1] == pytest.approx(roc_auc_score(y[idx], p[idx]), abs=1e-12)


# ---------------------------------------------------------------------------------------------- regression


@pytest.mark.parametrize("seed", range(4))
def test_regression_metrics_match_scipy_and_numpy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    t = rng.normal(-1.5, 1.2, 40)
    e = 0.7 * t + rng.normal(0, 0.8, 40) + 0.2
    t[3], e[7] = np.nan, np.nan
    r = M.regression_metrics(t, e)
    keep = ~(np.isnan(t) | np.isnan(e))
    tk, ek = t[keep], e[keep]
    ref = stats.pearsonr(tk, ek)
    ci = ref.confidence_interval(confidence_level=0.95)
    diff = ek - tk
    assert r["n"] == 38
    assert r["pearson_r"] == pytest.approx(ref.statistic, abs=1e-12)
    assert r["pearson_p"] == pytest.approx(ref.pvalue, rel=1e-9)
    assert r["pearson_ci"] == pytest.approx((ci.low, ci.high), abs=1e-10)
    assert r["mae"] == pytest.approx(np.mean(np.abs(diff)))
    assert r["rmse"] == pytest.approx(np.sqrt(np.mean(diff**2)))
    assert r["bland_altman_bias"] == pytest.approx(diff.mean())
    sd = diff.std(ddof=1)
    assert r["bland_altman_loa_low"] == pytest.approx(diff.mean() - 1.96 * sd)
    assert r["bland_altman_loa_high"] == pytest.approx(diff.mean() + 1.96 * sd)
    r90 = M.regression_metrics(t, e, alpha=0.10)
    ci90 = ref.confidence_interval(confidence_level=0.90)
    assert r90["pearson_ci"] == pytest.approx((ci90.low, ci90.high), abs=1e-10)


def test_regression_small_and_degenerate_samples() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        three = M.regression_metrics([1.0, 2.0, 3.5], [1.1, 2.5, 3.0])
        const = M.regression_metrics([1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 2.0, 2.0])
        empty = M.regression_metrics([np.nan], [1.0])
    assert three["n"] == 3 and np.isfinite(three["pearson_r"]) and all(np.isnan(three["pearson_ci"]))
    assert np.isnan(const["pearson_r"]) and const["mae"] == pytest.approx(1.0)
    assert empty["n"] == 0 and np.isnan(empty["mae"])
    with pytest.raises(ValueError, match="equal length"):
        M.regression_metrics([1.0, 2.0], [1.0])


# ---------------------------------------------------------------------------------------------- histograms


def test_score_histogram_bins_and_edges() -> None:
    y = np.array([0, 1, 1, 0, 1])
    p = np.array([0.0, 1.0, 0.5, 0.999, 0.25])
    h = M.score_histogram(y, p, n_bins=4)
    assert h.dtype == np.int64 and h.shape == (2, 4)
    # edges 0, .25, .5, .75, 1: an edge value goes to the bin above, 1.0 to the last bin
    assert h.tolist() == [[1, 0, 0, 1], [0, 1, 1, 1]]
    yr, pr = _random_case(2, n=200)
    h = M.score_histogram(yr, pr, n_bins=50)
    for cls in (0, 1):
        assert h[cls].tolist() == np.histogram(pr[yr == cls], bins=M.histogram_edges(50))[0].tolist()


def test_histograms_are_additive_across_sites() -> None:
    y, p = _random_case(4, n=150)
    parts = np.array_split(np.arange(150), 3)
    summed = sum(M.score_histogram(y[i], p[i], BINS) for i in parts)
    assert np.array_equal(summed, M.score_histogram(y, p, BINS))


def test_histogram_metrics_exact_on_bin_centres() -> None:
    edges = M.histogram_edges(1000)
    centres = (edges[:-1] + edges[1:]) / 2
    for seed in range(5):
        rng = np.random.default_rng(seed)
        y = rng.integers(0, 2, 300)
        y[:2] = (0, 1)
        p = centres[np.clip((rng.beta(2 + 2 * y, 3) * 1000).astype(int), 0, 999)]
        m = M.metrics_from_histogram(M.score_histogram(y, p, BINS))
        assert m["auroc"] == roc_auc_score(y, p)
        assert m["auprc"] == average_precision_score(y, p)


def test_histogram_metrics_close_to_sklearn_on_raw_scores() -> None:
    # measured over 200 seeds: AUROC error <= 2.2e-4 at n=500; AUPRC error <= 7e-4 at n=5000 (larger at small n,
    # where a few tied positives at the top move precision a lot)
    for seed in range(4):
        rng = np.random.default_rng(seed)
        for n, key, tol in ((500, "auroc", 1e-3), (5000, "auroc", 1e-3), (5000, "auprc", 1e-3)):
            y = rng.integers(0, 2, n)
            p = np.where(y == 1, rng.beta(3, 2, n), rng.beta(2, 3, n))
            m = M.metrics_from_histogram(M.score_histogram(y, p, BINS))
            ref = roc_auc_score(y, p) if key == "auroc" else average_precision_score(y, p)
            assert abs(m[key] - ref) < tol, (seed, n, key)


def test_histogram_metrics_degenerate_and_bad() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        only_neg = M.metrics_from_histogram(M.score_histogram([0, 0], [0.2, 0.3], BINS))
        only_pos = M.metrics_from_histogram(M.score_histogram([1, 1], [0.2, 0.3], BINS))
    assert np.isnan(only_neg["auroc"]) and np.isnan(only_neg["auprc"])
    assert np.isnan(only_pos["auroc"]) and only_pos["auprc"] == 1.0
    with pytest.raises(ValueError, match="shape"):
        M.metrics_from_histogram(np.zeros((3, 10)))
    with pytest.raises(ValueError, match="non-negative integer"):
        M.metrics_from_histogram(np.array([[1, -1], [0, 2]]))


def test_radiograph_bootstrap_keeps_the_two_knees_of_a_film_together() -> None:
    """Two identical knees per film carry one film's information: resampling films gives the interval of the
    films alone; resampling knees as if independent gives a too narrow one."""
    rng = np.random.default_rng(8)
    y = (rng.random(120) < 0.6).astype(int)
    p = np.clip(0.3 + 0.3 * y + rng.normal(0, 0.2, 120), 0, 1)
    films = M.bootstrap_ci(y, p, 0.5, metric_names=["auroc"], n_boot=1500, seed=1)["auroc"]
    knees_y, knees_p, film_id = np.repeat(y, 2), np.repeat(p, 2), np.repeat(np.arange(120), 2)
    grouped = M.bootstrap_ci(knees_y, knees_p, 0.5, metric_names=["auroc"], n_boot=1500, seed=1, groups=film_id)
    naive = M.bootstrap_ci(knees_y, knees_p, 0.5, metric_names=["auroc"], n_boot=1500, seed=1)["auroc"]
    width = films[1] - films[0]
    assert grouped["auroc"] == pytest.approx(films, abs=0.02)
    assert naive[1] - naive[0] < 0.85 * width


def test_paired_radiograph_bootstrap_of_an_auroc_difference() -> None:
    from simulations.paired_difference import paired_auroc_difference

    rng = np.random.default_rng(3)
    y = np.repeat((rng.random(60) < 0.6).astype(int), 2)
    film = np.repeat(np.arange(60), 2)
    p_a = np.clip(0.3 + 0.3 * y + rng.normal(0, 0.2, 120), 0, 1)
    same = paired_auroc_difference(y, p_a, p_a, film, n_boot=200)
    assert same["difference"] == 0 and same["ci_lo"] == same["ci_hi"] == 0  # paired: identical models never differ
    worse = paired_auroc_difference(y, p_a, p_a + rng.normal(0, 0.3, 120), film, n_boot=400)
    assert worse["difference"] == pytest.approx(worse["auroc_b"] - roc_auc_score(y, p_a))
    assert worse["ci_lo"] <= worse["difference"] <= worse["ci_hi"] and worse["ci_hi"] < 0.05


def test_pooled_auroc_splits_into_within_and_across_source_pairs() -> None:
    """Against scikit-learn: the within-source part is the per-source AUROCs weighted by their pair counts, and
    the two parts weighted by theirs give the pooled AUROC; a score that is only the source orders every
    across-source pair of a source that is all bone loss against one that is all normal."""
    from simulations.seed_ensemble import source_pairs

    rng = np.random.default_rng(5)
    source = np.array(["a"] * 50 + ["b"] * 30)
    y = np.r_[(rng.random(50) < 0.4), (rng.random(30) < 0.85)].astype(int)
    score = np.round(y + (source == "b") + rng.normal(0, 0.8, 80), 1)  # rounded: some ties
    parts = source_pairs(y, score, source)
    per_source = [
        (roc_auc_score(y[source == s], score[source == s]), (y[source == s] == 1).sum() * (y[source == s] == 0).sum())
        for s in "ab"
    ]
    assert parts["pairs_within"] == sum(n for _, n in per_source)
    assert parts["within_source"] == pytest.approx(sum(a * n for a, n in per_source) / parts["pairs_within"])
    total = parts["pairs_within"] + parts["pairs_across"]
    assert total == (y == 1).sum() * (y == 0).sum()
    pooled = (parts["within_source"] * parts["pairs_within"] + parts["across_sources"] * parts["pairs_across"]) / total
    assert pooled == pytest.approx(roc_auc_score(y, score))

    only_source = source_pairs(
        np.r_[np.zeros(5), np.ones(5)].astype(int), np.r_[np.zeros(5), np.ones(5)], np.array(list("aaaaabbbbb"))
    )
    assert only_source["across_sources"] == 1.0 and np.isnan(only_source["within_source"])
