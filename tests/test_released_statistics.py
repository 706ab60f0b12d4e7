"""``privacy.statistics``: the registry of everything a site returns, the k-threshold, noised per-class histograms
with τ-grid counts derived on the server, and the ε of the run composed by Opacus's RDP accountant."""

from __future__ import annotations

import json
import math
import re
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
from opacus.accountants import RDPAccountant

from client.audit import AUDIT_ENV, read_log, unregistered
from configs.schema import ThresholdConfig, load_config
from server.federation import run_federated
from server.pooled import QuorumError, pool, pooled_threshold
from simulations.inprocess import InProcessGrid
from strnet import metrics as M
from strnet.calibration import PlattStats
from strnet.errors import ConfigError, SiteError, StrnetError
from strnet.protocol import WEIGHT, MessageKind, decode_splits, decode_validation, encode, encode_splits
from strnet.released import (
    REGISTRY,
    StatisticsLedger,
    StatisticsPrivacy,
    UnregisteredStatistic,
    counts_at,
    markdown,
    protect,
    restore_evaluation,
    restore_validation,
    statistics_of,
    usable,
    withheld_problem,
)
from strnet.sufficient import EvaluationCounts, ValidationCounts
from tests.test_message_audit import config as audit_config
from tests.test_pooled import site_predictions, site_scores

pytestmark = pytest.mark.usefixtures("flower_task_identity")
ON = StatisticsPrivacy(enabled=True)


def _validation(y: np.ndarray, p: np.ndarray, th: ThresholdConfig) -> ValidationCounts:
    return ValidationCounts.from_scores(y, p, grid=th.grid(), n_bins=th.histogram_bins)


# ------------------------------------------------------------------------------------------------ the registry


def test_the_registry_lists_every_field_a_site_computes_exactly_once() -> None:
    for message, names in (
        (MessageKind.VAL_STATS, [f.name for f in fields(ValidationCounts)]),
        (MessageKind.FROZEN, list(EvaluationCounts.empty(10).arrays())),  # subgroup_hist: one array per level
        (MessageKind.CALIBRATE, [f.name for f in fields(PlattStats)]),
    ):
        listed = [n for s in statistics_of(message) for n in s.arrays]
        assert sorted(listed) == sorted(names), message
    # a batch message releases nothing of its own: each part is registered (and protected) under its own kind
    assert {s.message for s in REGISTRY} == {
        v for k, v in vars(MessageKind).items() if k.isupper() and isinstance(v, str) and v != MessageKind.BATCH
    }
    for s in REGISTRY:  # what gets noise is a per-class histogram of the statistic; derived counts name one
        assert set(s.noised) <= set(s.arrays) and set(s.derived.values()) <= set(s.noised), s.key


def test_the_deploy_guide_lists_what_leaves_a_site_from_the_registry() -> None:
    text = (Path(__file__).parents[1] / "docs" / "deploy.md").read_text()
    found = re.search(r"<!-- released:begin -->\n(.*?)\n<!-- released:end -->", text, re.S)
    assert found is not None, "docs/deploy.md lost its generated table"
    assert found.group(1) == markdown(), "regenerate with: python -m strnet.released"


# ------------------------------------------------------------------------------------------------ exact derivation


@pytest.mark.parametrize("bins", [100, 1000])
def test_grid_counts_read_off_the_histogram_equal_the_counts_on_the_raw_scores(bins: int) -> None:
    th = ThresholdConfig(histogram_bins=bins)
    grid = th.grid()
    rng = np.random.default_rng(bins)
    y = rng.integers(0, 2, 3000)
    p = rng.random(3000)
    # the boundary convention p >= τ: scores exactly on every threshold and one ulp either side of it
    p[: len(grid)] = grid
    p[len(grid) : 2 * len(grid)] = np.nextafter(grid, 0)
    p[2 * len(grid) : 3 * len(grid)] = np.nextafter(grid, 1)
    p[-2:] = (0.0, 1.0)
    derived = counts_at(M.score_histogram(y, p, bins), grid)
    exact = M.confusion_at_thresholds(y, p, grid)
    for k in ("tp", "fp", "tn", "fn"):
        np.testing.assert_array_equal(derived[k], exact[k])


def test_noise_free_derived_counts_give_exactly_the_concatenated_pooled_tau() -> None:
    th = ThresholdConfig()
    sites = {f"s{i}": site_scores(i, n, shift) for i, (n, shift) in enumerate([(120, 0.3), (60, 0.1), (90, 0.2)])}
    per_site = {}
    for s, (y, p) in sites.items():
        hist_only = {"hist": encode(_validation(y, p, th))["hist"]}  # what a noised site sends, without noise
        arrays = restore_validation(hist_only, th.grid())
        per_site[s] = decode_validation(s, arrays, n_bins=th.histogram_bins, n_grid=len(th.grid()))
    pooled = pool(per_site, quorum=3, what="test")
    y = np.concatenate([v[0] for v in sites.values()])
    p = np.concatenate([v[1] for v in sites.values()])
    for min_sens in (0.86, 0.6, 0.99):
        tau = pooled_threshold(pooled, ThresholdConfig(min_sensitivity=min_sens), sites=list(sites), excluded=[])
        assert tau["value"] == M.select_threshold(y, p, min_sens, th.grid())


def test_protection_without_noise_sends_the_exact_counts() -> None:
    th = ThresholdConfig()
    counts = _validation(*site_scores(3, 200, 0.2), th)
    release = protect(MessageKind.VAL_STATS, encode(counts), ON)
    assert release.withheld == {}
    assert all(np.array_equal(v, encode(counts)[k]) for k, v in release.arrays.items())
    assert set(release.arrays) == set(encode(counts))


# ------------------------------------------------------------------------------------------------ k-threshold


def test_statistics_over_fewer_than_k_cases_are_withheld_and_pooled_as_nothing() -> None:
    th = ThresholdConfig()
    small = _validation(*site_scores(1, 9, 0.2), th)
    assert protect(MessageKind.VAL_STATS, encode(small), ON).withheld == {"validation": 10}
    assert protect(MessageKind.VAL_STATS, encode(small), ON).arrays == {}
    assert protect(MessageKind.VAL_STATS, encode(small), StatisticsPrivacy(enabled=True, min_cases=9)).withheld == {}
    empty = encode(ValidationCounts.from_scores(np.zeros(0), np.zeros(0), grid=th.grid(), n_bins=1000))
    assert protect(MessageKind.VAL_STATS, empty, ON).withheld == {}  # no case: nothing to protect

    preds = site_predictions(4, 60)
    known = np.flatnonzero(~np.isnan(preds["y_severity"]))
    preds["y_severity"][known[5:]] = np.nan  # 5 knees with a severity label
    counts = {"test": EvaluationCounts.from_predictions(preds, threshold=0.5, n_bins=1000)}
    release = protect(MessageKind.FROZEN, encode_splits(counts), ON)
    assert release.withheld == {"test.severity": 10}
    assert "test.severity_hist" not in release.arrays and "test.hist" in release.arrays
    restored = restore_evaluation(
        release.arrays, release.withheld, threshold=0.5, empty=EvaluationCounts.empty(1000).arrays()
    )
    decoded = decode_splits("hospital", restored, n_bins=1000)["test"]
    assert decoded.severity_hist.sum() == 0 and decoded.hist.sum() == counts["test"].hist.sum()
    text = withheld_problem(MessageKind.FROZEN, "test.screening", 10)
    assert text == "test-split evaluation withheld (fewer than k=10 cases)"


def test_a_tscore_round_withholds_its_validation_sums_and_its_branch_separately() -> None:
    """One refit exchange carries two statistics over different cases: each meets k on its own count."""
    branch = {"t_fusion.0.weight": np.ones((4, 3), np.float32), WEIGHT: np.array([40])}
    few_val = branch | {"sums": np.array([6.0, 3.2, 4.1])}
    release = protect(MessageKind.TSCORE_TRAIN, few_val, ON)
    assert release.withheld == {"tscore_val": 10} and set(release.arrays) == set(branch)
    few_train = {
        "t_fusion.0.weight": np.ones((4, 3), np.float32),
        WEIGHT: np.array([7]),
        "sums": np.array([30.0, 1, 2]),
    }
    release = protect(MessageKind.TSCORE_TRAIN, few_train, ON)
    assert release.withheld == {"tscore_train": 10} and set(release.arrays) == {"sums"}


def test_an_unregistered_statistic_is_refused_when_protection_is_on() -> None:
    arrays = encode(_validation(*site_scores(1, 50, 0.2), ThresholdConfig())) | {"scores": np.zeros(50)}
    with pytest.raises(UnregisteredStatistic, match="scores"):
        protect(MessageKind.VAL_STATS, arrays, ON)
    assert "scores" in protect(MessageKind.VAL_STATS, arrays, StatisticsPrivacy()).arrays  # off: unchanged


# ------------------------------------------------------------------------------------------------ noise and ε


def test_noised_histograms_have_the_configured_scale_and_derived_counts_stay_home() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200_000)
    counts = _validation(y, rng.random(200_000), ThresholdConfig())  # ~100 cases per bin: clipping never bites
    policy = StatisticsPrivacy(enabled=True, noise_multiplier=3.0)
    release = protect(MessageKind.VAL_STATS, encode(counts), policy, np.random.default_rng(1))
    assert set(release.arrays) == {"hist"} and release.arrays["hist"].dtype == np.int64
    residual = (release.arrays["hist"] - counts.hist).ravel().astype(float)
    # rounding adds variance 1/12; 2000 bins: the sample sd is within ~3 % of sqrt(9 + 1/12) at this seed
    assert residual.std() == pytest.approx(math.sqrt(9 + 1 / 12), rel=0.05)
    assert abs(residual.mean()) < 4 * 3 / math.sqrt(residual.size)
    grid = ThresholdConfig().grid()
    restored = decode_validation("s", restore_validation(release.arrays, grid), n_bins=1000, n_grid=61, noised=True)
    assert np.all(restored.tp + restored.fn == restored.hist[1].sum())

    # few cases: the noised counts are not clipped at the site (the pooled sum stays unbiased), the server clips
    sparse = _validation(*site_scores(2, 40, 0.2), ThresholdConfig())
    sent = restore_validation(
        protect(MessageKind.VAL_STATS, encode(sparse), policy, np.random.default_rng(3)).arrays, grid
    )
    assert (sent["hist"] < 0).any()
    with pytest.raises(SiteError, match="negative"):
        decode_validation("s", sent, n_bins=1000, n_grid=61)
    noisy = decode_validation("s", sent, n_bins=1000, n_grid=61, noised=True)
    assert 0 <= noisy.ranking()["auroc"] <= 1
    tau = noisy.threshold(grid, 0.86)
    assert tau["n_pos"] == max(int(noisy.hist[1].sum()), 0) and 0 <= tau["sensitivity"] <= 1
    swamped = ValidationCounts(hist=np.array([[-5] * 1000, [1] * 1000]), **counts_at(np.zeros((2, 1000)), grid))
    with pytest.raises(StrnetError, match="noise drove a class"):
        pooled_threshold(swamped, ThresholdConfig(), sites=["a"], excluded=[], noised=True)


def test_frozen_evaluation_under_noise_decodes_with_counts_from_the_noised_histograms() -> None:
    preds = site_predictions(5, 400)
    counts = {"test": EvaluationCounts.from_predictions(preds, threshold=0.4, n_bins=100)}
    policy = StatisticsPrivacy(enabled=True, noise_multiplier=2.0)
    release = protect(MessageKind.FROZEN, encode_splits(counts), policy, np.random.default_rng(2))
    assert not {"test.at_threshold", "test.film_at_threshold", "test.tscore_who"} & set(release.arrays)
    assert np.array_equal(release.arrays["test.brier_sum"], counts["test"].brier_sum)  # sums stay exact
    restored = restore_evaluation(release.arrays, {}, threshold=0.4, empty=EvaluationCounts.empty(100).arrays())
    decoded = decode_splits("s", restored, n_bins=100, noised=True)["test"]
    assert decoded.at_threshold.sum() == decoded.hist.sum()
    used = usable(decoded)
    assert (used.hist >= 0).all() and (used.at_threshold >= 0).all() and (used.tscore_who >= 0).all()
    exact = counts["test"]
    assert all(np.array_equal(v, exact.arrays()[k]) for k, v in usable(exact).arrays().items())


def test_the_runs_epsilon_is_a_fresh_accountants_over_every_release() -> None:
    policy = StatisticsPrivacy(enabled=True, noise_multiplier=5.0, delta=1e-5)
    ledger = StatisticsLedger(policy)
    for _ in range(7):
        ledger.record("a", MessageKind.VAL_STATS, {"hist": None})
    fresh = RDPAccountant()
    fresh.history = [(5.0, 1.0, 7)]
    assert ledger.epsilon("a") == pytest.approx(fresh.get_epsilon(1e-5), rel=1e-12)
    # a frozen evaluation, per split: four histograms of sensitivity 1, the per-radiograph one of sensitivity √2, and
    # one release per subgroup variable (sex, age band, BMI band: its levels are disjoint knees, 13 arrays in all)
    names = encode_splits({"test": EvaluationCounts.empty(100), "val": EvaluationCounts.empty(100)})
    assert sum(".subgroup_" in n for n in names) == 2 * 13
    ledger.record("a", MessageKind.FROZEN, names)
    fresh = RDPAccountant()
    fresh.history = [(5.0, 1.0, 7 + 2 * (4 + 3)), (5.0 / math.sqrt(2), 1.0, 2)]
    assert ledger.epsilon("a") == pytest.approx(fresh.get_epsilon(1e-5), rel=1e-12)
    report = ledger.report()
    assert report["epsilon"] == ledger.epsilon("a") and report["sites"]["a"]["releases"] == 23
    restored = StatisticsLedger(policy)
    restored.load_state_dict(json.loads(json.dumps(ledger.state_dict())))  # a checkpoint round trip
    assert restored.epsilon("a") == ledger.epsilon("a")
    assert StatisticsLedger(StatisticsPrivacy(enabled=True)).report().get("epsilon") is None  # no noise, no ε


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("privacy.statistics.min_cases=-1", "privacy.statistics.min_cases"),
        ("privacy.statistics.min_cases=0", "privacy.statistics.min_cases"),
        ("privacy.statistics.noise_multiplier=-0.5", "privacy.statistics.noise_multiplier"),
        ("privacy.statistics.delta=0", "privacy.statistics.delta"),
        ("privacy.statistics.delta=1.5", "privacy.statistics.delta"),
    ],
)
def test_settings_that_cannot_work_are_refused_naming_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config("demo", [override])


# ------------------------------------------------------------------------------------------------ a whole run


def _config(root: Path, *extra: str):  # type: ignore[no-untyped-def]
    """The message-audit test's whole run, with the statistics protected."""
    return audit_config(root, 20, "privacy.statistics.enabled=true", *extra)


def test_a_protected_run_names_what_was_withheld_and_reports_epsilon(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # σ = 0.01 rounds away (|noise| < 0.5 but with probability ~1e-500): the noised path — counts derived on the
    # server, ε composed — runs deterministically, and must give the unprotected run's τ* exactly
    cfg = _config(tmp_path, "privacy.statistics.noise_multiplier=0.01", "privacy.statistics.min_cases=4")
    monkeypatch.setenv(AUDIT_ENV, str(tmp_path / "sent.jsonl"))
    result = run_federated(InProcessGrid(3), cfg)  # type: ignore[arg-type]
    sent = read_log(tmp_path / "sent.jsonl")  # what left the sites: no count the server derives, the withheld named
    assert unregistered(sent) == []
    names = {(e["message_type"], k) for e in sent for r in e["arrays"].values() for k in r}
    assert ("query.val_stats", "hist") in names and ("query.val_stats", "tp") not in names
    assert not {k for kind, k in names if kind == "evaluate.frozen" and k.endswith(("at_threshold", "tscore_who"))}
    assert any("withheld" in e["metrics"] for e in sent)
    monkeypatch.delenv(AUDIT_ENV)
    plain = _config(tmp_path / "plain", "privacy.statistics.enabled=false")
    assert result.threshold["value"] == run_federated(InProcessGrid(3), plain).threshold["value"]  # type: ignore[arg-type]
    privacy = result.threshold["statistics_privacy"]
    assert privacy["epsilon"] > 0 and set(privacy["sites"]) == {"stage1", "hospital", "stage2"}
    summary = json.loads((Path(cfg.output_dir) / "summary.json").read_text())
    assert summary["threshold"]["statistics_privacy"]["epsilon"] == privacy["epsilon"]
    withheld = [p for p in result.problems if "withheld (fewer than k=4 cases)" in p]
    assert withheld, result.problems
    assert all(re.search(r"site '(stage1|hospital|stage2)': ", p) for p in withheld)
    assert summary["problems"] == result.problems
    # a subgroup level a training site withheld from its test split (its source row: the whole split) is named in
    # the subgroup table, and only those
    held = {
        (m[1], m[2] or f"source {m[1]}")
        for p in result.problems
        if (m := re.search(r"site '(stage1|hospital)': test-split (?:subgroup (.+)|evaluation) withheld \(fewer", p))
    }
    named = {
        (site, f"{r['variable']} {r['level']}")
        for r in summary["subgroups"]["rows"]
        if r["withheld"]
        for site in re.findall(r"stage1|hospital", r["withheld"])
    }
    assert held and named == held

    # every validation statistic withheld: the quorum fails, and says why
    strict = _config(tmp_path / "strict", "privacy.statistics.min_cases=100000")
    with pytest.raises(QuorumError, match=r"validation statistics withheld \(fewer than k=100000 cases\)"):
        run_federated(InProcessGrid(3), strict)  # type: ignore[arg-type]
