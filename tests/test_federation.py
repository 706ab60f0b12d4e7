"""The federation in-process (no Ray): pooled statistics, the strategy's aggregation, and a whole federated run
driven through a Grid stand-in that delivers Messages to the real ClientApp."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from mlflow.tracking import MlflowClient
from scipy import stats
from sklearn.metrics import average_precision_score, recall_score, roc_auc_score

from client.app import app as client_app
from client.site import to_metric_record
from configs.schema import load_config
from server.app import config_from_run_config, run_federation
from server.pooled import (
    QuorumError,
    SiteError,
    check_validation_statistics,
    pool_test_metrics,
    pool_validation_statistics,
    pooled_threshold,
)
from server.strategy import SiteFedAvg, weighted_average
from server.tracking import Tracker
from simulations.scenario import build_synthetic_scenario
from strnet import metrics as M
from strnet.bundle import load_bundle
from strnet.data.cache import PreprocessCache
from strnet.data.manifest import read_manifest
from strnet.evaluation import predict_frame
from strnet.site import confusion, decode_statistics, histogram, tscore_sums

GRID = M.THRESHOLD_GRID
BINS = 1000


@pytest.fixture(autouse=True)
def task_identity():
    """Messages are stamped with the process's run/node/task ids, which a SuperLink/SuperNode sets; do the same."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def site_scores(seed: int, n: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p = np.clip(rng.beta(2, 3, n) + shift * y, 0, 1)
    return y, p


def val_stats(y: np.ndarray, p: np.ndarray) -> dict:
    return {"hist": histogram(y, p, BINS), **confusion(y, p, GRID), "site_auroc": roc_auc_score(y, p)}


# ------------------------------------------------------------------------------------------------ pooled


def test_pooled_tau_and_ranking_equal_the_concatenated_cohort() -> None:
    sites = {f"s{i}": site_scores(i, n, shift) for i, (n, shift) in enumerate([(120, 0.3), (60, 0.1), (90, 0.2)])}
    # round-trip through the wire format the ClientApp uses
    per_site = {s: decode_statistics(to_metric_record(val_stats(*yp))) for s, yp in sites.items()}
    pooled = pool_validation_statistics(per_site, n_bins=BINS, n_grid=len(GRID), quorum=3)
    y = np.concatenate([yp[0] for yp in sites.values()])
    p = np.concatenate([yp[1] for yp in sites.values()])
    for min_sens in (0.86, 0.6, 0.99):
        tau = pooled_threshold(pooled, GRID, min_sens)
        assert tau["value"] == M.select_threshold(y, p, min_sensitivity=min_sens, grid=GRID)
        assert tau["sites"] == ["s0", "s1", "s2"] and tau["n_cases"] == len(y)
    ranking = pooled.ranking()
    assert abs(ranking["auroc"] - roc_auc_score(y, p)) < 1e-3
    assert abs(ranking["auprc"] - average_precision_score(y, p)) < 1e-3
    # the pooled value is not the mean of the site AUROCs (which is what must never be reported as pooled)
    assert pooled.per_site["s1"]["site_auroc"] == pytest.approx(roc_auc_score(*sites["s1"]))


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda s: s.update(hist=s["hist"][:, :10]), "shape"),
        (lambda s: s.update(tp=-s["tp"]), "negative"),
        (lambda s: s.pop("fn"), "missing key.s. fn"),
        (lambda s: s.update(tp=s["tp"] + 1), "inconsistent"),
    ],
)
def test_malformed_statistics_name_the_site_and_the_rest_still_pool(corrupt: Callable, message: str) -> None:
    sites = {f"s{i}": site_scores(10 + i, 50, 0.3) for i in range(3)}
    per_site = {s: val_stats(*yp) for s, yp in sites.items()}
    corrupt(per_site["s1"])
    with pytest.raises(SiteError, match=f"site 's1'.*{message}"):
        check_validation_statistics("s1", per_site["s1"], n_bins=BINS, n_grid=len(GRID))
    pooled = pool_validation_statistics(per_site, n_bins=BINS, n_grid=len(GRID), quorum=2)
    assert pooled.sites == ["s0", "s2"]
    assert len(pooled.problems) == 1 and "s1" in pooled.problems[0]
    np.testing.assert_array_equal(pooled.hist, per_site["s0"]["hist"] + per_site["s2"]["hist"])
    with pytest.raises(QuorumError, match="s1"):
        pool_validation_statistics(per_site, n_bins=BINS, n_grid=len(GRID), quorum=3)


def test_pooled_test_metrics_match_scikit_learn_and_scipy() -> None:
    tau = 0.45
    per_site, ys, ps, tt, tp_ = {}, [], [], [], []
    rng = np.random.default_rng(3)
    for i in range(3):
        y, p = site_scores(20 + i, 40 + 10 * i, 0.25)
        t_true = rng.normal(-1.5, 1.0, len(y))
        t_pred = t_true + rng.normal(0.2, 0.5, len(y))
        c = confusion(y, p, [tau])
        per_site[f"s{i}"] = {
            "hist": histogram(y, p, BINS),
            **{k: int(v[0]) for k, v in c.items()},
            "severity_hist": histogram(y[::-1], p, BINS),
            **tscore_sums(t_true, t_pred),
        }
        ys.append(y), ps.append(p), tt.append(t_true), tp_.append(t_pred)
    per_site["bad"] = {"hist": [[1]]}
    result, problems = pool_test_metrics(per_site, n_bins=BINS)
    y, p, t, e = (np.concatenate(a) for a in (ys, ps, tt, tp_))
    sc = result["screening"]
    assert sc["sensitivity"] == pytest.approx(recall_score(y, p >= tau))
    assert sc["specificity"] == pytest.approx(recall_score(1 - y, p < tau))
    assert abs(sc["auroc"] - roc_auc_score(y, p)) < 1e-3
    assert result["t_score"]["mae"] == pytest.approx(np.mean(np.abs(e - t)))
    assert result["t_score"]["rmse"] == pytest.approx(np.sqrt(np.mean((e - t) ** 2)))
    assert result["t_score"]["pearson_r"] == pytest.approx(stats.pearsonr(t, e).statistic)
    assert result["sites"] == ["s0", "s1", "s2"]
    assert len(problems) == 1 and "'bad'" in problems[0]


# ------------------------------------------------------------------------------------------------ strategy


def _instruction(node: int, message_type: str = "train") -> Message:
    return Message(RecordDict({"config": ConfigRecord()}), dst_node_id=node, message_type=message_type)


def _train_reply(node: int, state: dict[str, np.ndarray], n: int) -> Message:
    record = RecordDict(
        {"arrays": ArrayRecord({k: Array(v) for k, v in state.items()}), "metrics": MetricRecord({"num-examples": n})}
    )
    return Message(record, reply_to=_instruction(node))


def _state(value: float, tracked: int) -> dict[str, np.ndarray]:
    return {
        "w": np.full((2, 3), value, np.float32),
        "bn.num_batches_tracked": np.array(tracked, np.int64),
    }


def _strategy(quorum: int) -> SiteFedAvg:
    return SiteFedAvg(
        train_nodes={11: "alpha", 22: "beta", 33: "gamma"}, quorum=quorum, n_bins=BINS, grid=GRID, min_sensitivity=0.86
    )


def test_fedavg_is_weighted_by_examples_and_keeps_integer_buffers() -> None:
    strategy = _strategy(quorum=2)
    reference = ArrayRecord({k: Array(v) for k, v in _state(0.0, 0).items()})
    messages = list(strategy.configure_train(1, reference, ConfigRecord(), grid=None))  # type: ignore[arg-type]
    assert sorted(m.metadata.dst_node_id for m in messages) == [11, 22, 33]
    assert {m.metadata.message_type for m in messages} == {"train"}
    replies = [
        _train_reply(11, _state(1.0, 10), n=10),
        _train_reply(22, _state(5.0, 21), n=30),
        Message(Error(code=0, reason="CUDA out of memory"), reply_to=_instruction(33)),
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None
    out = {k: v.numpy() for k, v in arrays.items()}
    expected = weighted_average([_state(1.0, 10), _state(5.0, 21)], [10, 30])
    np.testing.assert_allclose(out["w"], np.average([1.0, 5.0], weights=[10, 30]))
    np.testing.assert_array_equal(out["w"], expected["w"])
    assert out["bn.num_batches_tracked"].dtype == np.int64
    assert int(out["bn.num_batches_tracked"]) == round(np.average([10, 21], weights=[10, 30]))
    assert len(strategy.problems) == 1 and "gamma" in strategy.problems[0] and "out of memory" in strategy.problems[0]


def test_malformed_train_reply_is_named_and_quorum_enforced() -> None:
    strategy = _strategy(quorum=3)
    reference = ArrayRecord({k: Array(v) for k, v in _state(0.0, 0).items()})
    list(strategy.configure_train(2, reference, ConfigRecord(), grid=None))  # type: ignore[arg-type]
    bad = _state(2.0, 3)
    bad["w"] = np.zeros((3, 3), np.float32)
    replies = [_train_reply(11, _state(1.0, 1), 5), _train_reply(22, bad, 5), _train_reply(33, _state(3.0, 1), 0)]
    with pytest.raises(QuorumError, match="quorum is 3") as info:
        strategy.aggregate_train(2, replies)
    assert "beta" in str(info.value) and "shape" in str(info.value)
    assert "gamma" in str(info.value) and "num-examples" in str(info.value)


def test_round_validation_statistics_are_pooled_not_averaged() -> None:
    strategy = _strategy(quorum=2)
    ys = {11: site_scores(1, 80, 0.3), 22: site_scores(2, 40, 0.2)}
    replies = [
        Message(RecordDict({"metrics": to_metric_record(val_stats(*yp))}), reply_to=_instruction(n, "query.val_stats"))
        for n, yp in ys.items()
    ]
    replies.append(Message(RecordDict({"metrics": MetricRecord({"x": 1})}), reply_to=_instruction(33, "query")))
    record = strategy.aggregate_evaluate(1, replies)
    assert record is not None
    y = np.concatenate([v[0] for v in ys.values()])
    p = np.concatenate([v[1] for v in ys.values()])
    assert abs(record["val_screen_auroc"] - roc_auc_score(y, p)) < 1e-3
    assert record["val_tau_star"] == M.select_threshold(y, p, grid=GRID)
    assert any("gamma" in text and "missing" in text for text in strategy.problems)


# ------------------------------------------------------------------------------------------------ whole run


class LocalGrid:
    """Delivers Messages to the ClientApp in this process; node i plays partition i, with persistent state."""

    def __init__(self, n_nodes: int, fail: Callable[[Message, int], bool] | None = None) -> None:
        self.contexts = {
            100 + i: Context(
                run_id=1, node_id=100 + i, node_config={"partition-id": i}, state=RecordDict(), run_config={}
            )
            for i in range(n_nodes)
        }
        self.fail = fail
        self.sent: list[tuple[int, str]] = []

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            self.sent.append((node, msg.metadata.message_type))
            if self.fail is not None and self.fail(msg, node):
                replies.append(Message(Error(code=1, reason="injected failure"), reply_to=msg))
                continue
            try:
                replies.append(client_app(msg, self.contexts[node]))
            except Exception as exc:  # what a SuperNode does: an error reply, not a crash
                replies.append(Message(Error(code=2, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg))
        return replies


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory):
    return build_synthetic_scenario(tmp_path_factory.mktemp("fed"), seed=42, n_patients=20, image_size=64)


def _overrides(scenario, out: Path) -> list[str]:
    m = scenario.site_manifests
    sites = [
        {"name": "stage1", "role": "train", "manifest": str(m["stage1"])},
        {"name": "hospital", "role": "train", "manifest": str(m["hospital"])},
        {"name": "stage2", "role": "external", "manifest": str(m["stage2"])},
    ]
    return [
        "model.backbone=tiny",
        "preprocess.size=32",
        "train.batch_size=8",
        "train.precision=fp32",
        "train.channels_last=false",
        "federation.rounds=2",
        "federation.local_epochs=1",
        "federation.quorum=2",
        f"federation.sites={json.dumps(sites)}",
        f"output_dir={json.dumps(str(out / 'run'))}",
        f"data.cache_dir={json.dumps(str(out / 'cache'))}",
        f"tracking.uri={json.dumps('sqlite:///' + str(out / 'mlflow.db'))}",
    ]


def test_federated_run_in_process(scenario, tmp_path: Path) -> None:
    overrides = _overrides(scenario, tmp_path)
    cfg = config_from_run_config({"config": "demo", "overrides": " ".join(f"'{o}'" for o in overrides)})
    assert cfg == load_config("demo", overrides)
    grid = LocalGrid(3)
    tracker = Tracker(uri=cfg.tracking.uri, experiment="fed-test")
    result = run_federation(grid, cfg, tracker=tracker)  # type: ignore[arg-type]

    # external sites never train; every training site trains in every round
    trains = [node for node, kind in grid.sent if kind == "train"]
    assert sorted(trains) == [100, 100, 101, 101]
    assert sum(kind == "evaluate.frozen" for _, kind in grid.sent) == 3
    # each training site keeps its own AdamW state across rounds, in its node's context
    assert int(grid.contexts[100].state["optimizer"]["round"]) == 2
    assert "optimizer" not in grid.contexts[102].state

    # τ* from pooled counts == τ* on the concatenated raw validation scores of the final model
    bundle = load_bundle(result.bundle_dir)
    assert bundle.threshold == result.threshold["value"]
    assert bundle.metadata["threshold"]["sites"] == ["hospital", "stage1"]
    assert bundle.metadata["training"]["mode"] == "federated"
    cache = PreprocessCache(Path(cfg.data.cache_dir))
    frames = [read_manifest(scenario.site_manifests[s]) for s in ("stage1", "hospital")]
    val = pd.concat([f[f["split"] == "val"] for f in frames], ignore_index=True)
    pred = predict_frame(bundle, val, cache=cache, precision="fp32")
    y = (pred["label_cls"] != "normal").to_numpy(int)
    p = pred["prob_bone_loss"].to_numpy()
    assert bundle.threshold == M.select_threshold(y, p, min_sensitivity=0.86, grid=GRID)
    assert bundle.metadata["threshold"]["n_cases"] == len(val)

    # frozen evaluation: the external site evaluates its whole cohort, training sites their test split
    assert result.site_metrics["stage2"]["n_eval"] == len(read_manifest(scenario.site_manifests["stage2"]))
    test = pd.concat([f[f["split"] == "test"] for f in frames], ignore_index=True)
    assert result.test_metrics["screening"]["n"] == (test["label_cls"] != "").sum()
    assert list(result.table["site"])[-1].startswith("pooled")

    # MLflow: one federated run with the centralized run's metric names
    mlflow.set_tracking_uri(cfg.tracking.uri)
    run = MlflowClient().get_run(result.run_id)
    assert run.data.tags["mode"] == "federated" and run.data.tags["strategy"] == "fedavg"
    assert run.data.metrics["tau_star"] == bundle.threshold
    assert "test_screening_sensitivity" in run.data.metrics
    assert "site.stage2.screening_specificity" in run.data.metrics
    history = MlflowClient().get_metric_history(result.run_id, "val_screen_auprc")
    assert sorted(m.step for m in history) == [1, 2]
    best = max(history, key=lambda m: (m.value, -m.step))  # the kept model: best pooled val AUPRC, earliest on ties
    assert bundle.metadata["training"]["best_round"] == best.step
    assert (Path(cfg.output_dir) / "figures" / "rounds.png").is_file()


def test_federated_run_survives_one_failed_site_and_names_it(scenario, tmp_path: Path) -> None:
    overrides = [*_overrides(scenario, tmp_path), "federation.quorum=1", "federation.rounds=1"]
    cfg = load_config("demo", [*overrides, "tracking.enabled=false"])
    grid = LocalGrid(3, fail=lambda msg, node: node == 101 and msg.metadata.message_type == "query.val_stats")
    result = run_federation(grid, cfg)  # type: ignore[arg-type]
    assert result.threshold["sites"] == ["stage1"]
    assert any("hospital" in text and "injected failure" in text for text in result.problems)

    cfg_strict = load_config("demo", [*overrides, "federation.quorum=2", "tracking.enabled=false"])
    with pytest.raises(QuorumError, match="hospital"):
        run_federation(
            LocalGrid(3, fail=lambda msg, node: node == 101 and msg.metadata.message_type == "train"), cfg_strict
        )  # type: ignore[arg-type]
