"""The federation in-process (no Ray): the strategy's aggregation and recipe, the wire protocol, and whole
federated runs driven through a Grid stand-in that delivers Messages to the real ClientApp."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from mlflow.tracking import MlflowClient
from sklearn.metrics import roc_auc_score

import client.app
import client.kept
import server.federation
from configs.schema import FederationConfig, ThresholdConfig, load_config
from server.app import config_from_run_config
from server.federation import run_federated
from server.frozen import frozen_evaluation
from server.pooled import QuorumError, weighted_average
from server.strategy import SiteFedAvg, build_strategy
from server.subgroups import federated_subgroups
from server.tracking import Tracker
from simulations.inprocess import InProcessGrid
from simulations.scenario import build_synthetic_scenario
from strnet import batchnorm
from strnet import metrics as M
from strnet.bundle import load_bundle
from strnet.calibration import fit_platt_to_logits
from strnet.data.cache import PreprocessCache
from strnet.data.dataset import KneeDataset
from strnet.data.manifest import read_manifest
from strnet.engine import RecipeSchedule, TrainParams
from strnet.errors import ConfigError, DataError
from strnet.evaluation import predict_frame, strict_json
from strnet.model import STRNet
from strnet.protocol import PROTOCOL_VERSION, Field, Key, MessageKind, encode
from strnet.subgroups import subgroup_metrics
from strnet.sufficient import ValidationCounts
from strnet.tscore import branch_keys
from tests.test_subgroups import auroc_tolerance, level_mask

pytestmark = pytest.mark.usefixtures("flower_task_identity")
TH = ThresholdConfig()
GRID, BINS = TH.grid(), TH.histogram_bins


def site_scores(seed: int, n: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    return y, np.clip(rng.beta(2, 3, n) + shift * y, 0, 1)


# ------------------------------------------------------------------------------------------------ strategy


def _instruction(node: int, message_type: str = MessageKind.TRAIN) -> Message:
    return Message(RecordDict({Key.CONFIG: ConfigRecord()}), dst_node_id=node, message_type=message_type)


def _info(site: str, version: int = PROTOCOL_VERSION) -> ConfigRecord:
    return ConfigRecord({Field.SITE: site, Field.ROLE: "train", Field.VERSION: version})


def _train_reply(node: int, state: dict[str, np.ndarray], n: int) -> Message:
    record = RecordDict(
        {
            Key.INFO: _info(str(node)),
            Key.ARRAYS: ArrayRecord({k: Array(v) for k, v in state.items()}),
            Key.METRICS: MetricRecord({"num-examples": n, "train_loss_total": float(n)}),
        }
    )
    return Message(record, reply_to=_instruction(node))


def _val_reply(node: int, counts: ValidationCounts, version: int = PROTOCOL_VERSION) -> Message:
    arrays = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in encode(counts).items()})
    record = RecordDict({Key.INFO: _info(str(node), version), Key.STATS: arrays})
    return Message(record, reply_to=_instruction(node, MessageKind.VAL_STATS))


def _state(value: float, tracked: int) -> dict[str, np.ndarray]:
    return {"w": np.full((2, 3), value, np.float32), "bn.num_batches_tracked": np.array(tracked, np.int64)}


def _strategy(quorum: int, **train: float) -> SiteFedAvg:
    return SiteFedAvg(
        train_nodes={11: "alpha", 22: "beta", 33: "gamma"},
        quorum=quorum,
        threshold=TH,
        schedule=RecipeSchedule(TrainParams(**train)),  # type: ignore[arg-type]
        monitor="auprc",
        config_digest="d1",
    )


def test_fedavg_is_weighted_by_examples_and_keeps_integer_buffers() -> None:
    strategy = _strategy(quorum=2, lr=0.01)
    reference = ArrayRecord({k: Array(v) for k, v in _state(0.0, 0).items()})
    messages = list(strategy.configure_train(1, reference, ConfigRecord(), grid=None))  # type: ignore[arg-type]
    assert sorted(m.metadata.dst_node_id for m in messages) == [11, 22, 33]
    assert {m.metadata.message_type for m in messages} == {"train"}
    sent = messages[0].content[Key.CONFIG]
    assert sent[Field.LEARNING_RATE] == 0.01 and sent[Field.VERSION] == PROTOCOL_VERSION
    assert Field.CONFIG_JSON not in sent and sent[Field.CONFIG_DIGEST] == "d1"  # the config travelled once, before
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
    assert metrics["train_loss_total"] == pytest.approx(np.average([10, 30], weights=[10, 30]))
    assert len(strategy.problems) == 1 and "gamma" in strategy.problems[0] and "out of memory" in strategy.problems[0]


def test_equal_site_weights_average_the_sites_alike_whatever_their_size() -> None:
    """``federation.site_weights=equal`` (every configured strategy): the plain mean of the sites' weights; the
    training numbers in the learning curve stay case-weighted (they describe the cases trained on)."""
    fed = FederationConfig(strategy="fedavgm", server_lr=1.0, server_momentum=0.0, site_weights="equal")
    site = {
        "train_nodes": {11: "alpha", 22: "beta"},
        "quorum": 2,
        "threshold": TH,
        "schedule": RecipeSchedule(TrainParams(lr=0.01)),
        "monitor": "auprc",
        "config_digest": "d1",
    }
    for strategy in (build_strategy(replace(fed, strategy="fedavg"), **site), build_strategy(fed, **site)):
        reference = ArrayRecord({k: Array(v) for k, v in _state(0.0, 0).items()})
        list(strategy.configure_train(1, reference, ConfigRecord(), grid=None))  # type: ignore[arg-type]
        replies = [_train_reply(11, _state(1.0, 10), n=10), _train_reply(22, _state(5.0, 21), n=30)]
        arrays, metrics = strategy.aggregate_train(1, replies)
        assert arrays is not None and metrics is not None
        np.testing.assert_allclose(arrays["w"].numpy(), 3.0)  # not the case-weighted 4.0
        assert metrics["train_loss_total"] == pytest.approx(np.average([10, 30], weights=[10, 30]))


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


def test_a_site_that_sends_nothing_is_named_and_the_quorum_decides() -> None:
    """A killed node's messages time out silently in Flower: the round goes on without it while the quorum
    holds, names it, and fails naming it below the quorum."""
    reference = ArrayRecord({k: Array(v) for k, v in _state(0.0, 0).items()})
    replies = [_train_reply(11, _state(1.0, 1), 5), _train_reply(33, _state(3.0, 1), 5)]  # beta lost
    holds = _strategy(quorum=2)
    list(holds.configure_train(4, reference, ConfigRecord(), grid=None))  # type: ignore[arg-type]
    arrays, _ = holds.aggregate_train(4, replies)
    assert arrays is not None and holds.problems == [
        "round 4 train: site 'beta': no reply (node lost or round timed out)"
    ]
    below = _strategy(quorum=3)
    list(below.configure_train(4, reference, ConfigRecord(), grid=None))  # type: ignore[arg-type]
    with pytest.raises(QuorumError, match=r"2 of 3 .*quorum is 3.*'beta': no reply"):
        below.aggregate_train(4, replies)


def test_round_validation_counts_are_pooled_and_drive_the_recipe() -> None:
    strategy = _strategy(quorum=2, lr=0.01, plateau_patience=0, plateau_factor=0.5)
    reference = ArrayRecord({k: Array(v) for k, v in _state(0.0, 0).items()})
    ys = {11: site_scores(1, 80, 0.3), 22: site_scores(2, 40, 0.2)}
    counts = {n: ValidationCounts.from_scores(y, p, grid=GRID, n_bins=BINS) for n, (y, p) in ys.items()}
    replies = [_val_reply(n, c) for n, c in counts.items()]
    replies.append(_val_reply(33, counts[11], version=PROTOCOL_VERSION + 1))  # a site running another release
    list(strategy.configure_evaluate(1, reference, ConfigRecord(), grid=None))  # type: ignore[arg-type]
    record = strategy.aggregate_evaluate(1, replies)
    assert record is not None
    y = np.concatenate([v[0] for v in ys.values()])
    p = np.concatenate([v[1] for v in ys.values()])
    assert abs(record["val_screening_auroc"] - roc_auc_score(y, p)) < 1e-3
    assert record["site.beta.val_screening_auroc"] == pytest.approx(counts[22].ranking()["auroc"])
    assert any("gamma" in t and "protocol version" in t for t in strategy.problems)
    assert strategy.best_round == 1 and strategy.best_arrays is reference
    # a second round with the same score is no improvement: the plateau (patience 0) halves the next lr
    list(strategy.configure_evaluate(2, reference, ConfigRecord(), grid=None))  # type: ignore[arg-type]
    strategy.aggregate_evaluate(2, replies[:2])
    assert strategy.best_round == 1 and strategy.schedule.lr == pytest.approx(0.005)
    sent = list(strategy.configure_train(3, reference, ConfigRecord(), grid=None))  # type: ignore[arg-type]
    assert sent[0].content[Key.CONFIG][Field.LEARNING_RATE] == pytest.approx(0.005)


# ------------------------------------------------------------------------------------------------ whole run


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory):
    return build_synthetic_scenario(tmp_path_factory.mktemp("fed"), seed=42, n_patients=20, image_size=64)


def _overrides(scenario, out: Path) -> list[str]:
    sites = scenario.federation_sites()
    return [
        "model.backbone=tiny",
        "preprocess.size=32",
        "train.batch_size=8",
        "train.precision=fp32",
        "train.channels_last=false",
        "evaluate.bootstrap=50",
        "evaluate.figures=false",
        "federation.rounds=2",
        "federation.local_epochs=1",
        "federation.quorum=2",
        f"federation.sites={json.dumps(sites)}",
        f"output_dir={json.dumps(str(out / 'run'))}",
        f"data.cache_dir={json.dumps(str(out / 'cache'))}",
        f"tracking.uri={json.dumps('sqlite:///' + str(out / 'mlflow.db'))}",
    ]


def _same_subgroups(federated: list[dict], central: list[dict], labelled: pd.DataFrame) -> None:
    """Federated rows (as summary.json writes them: undefined = null) against the per-knee ones, level by level."""
    assert [(r["variable"], r["level"]) for r in federated] == [(r["variable"], r["level"]) for r in central]
    y_all = (labelled["label_cls"] != "normal").to_numpy(int)
    for f, c in zip(federated, central, strict=True):
        assert set(f) == set(c) and f["withheld"] == ""
        assert (f["n"], f["n_pos"], f["n_neg"], f["small"]) == (c["n"], c["n_pos"], c["n_neg"], c["small"]), f
        for m in ("sensitivity", "specificity"):
            assert (f[m] is None and math.isnan(c[m])) or f[m] == pytest.approx(c[m], abs=1e-12), (f, m)
        mask = level_mask(labelled, f["variable"], f["level"])
        y, p = y_all[mask], labelled["prob_bone_loss"].to_numpy()[mask]
        if f["auroc"] is None:
            assert math.isnan(c["auroc"])
        else:
            assert abs(f["auroc"] - c["auroc"]) <= auroc_tolerance(y, p, BINS), f


def test_federated_run_in_process(scenario, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    overrides = [*_overrides(scenario, tmp_path), "evaluate.figures=true"]
    cfg = config_from_run_config({"config": "demo", "overrides": " ".join(f"'{o}'" for o in overrides)})
    assert cfg == load_config("demo", overrides)
    sent_to_the_server: list = []  # what the frozen evaluation decoded from the sites' replies

    def keep(*args, **kwargs):  # type: ignore[no-untyped-def]
        sent_to_the_server.append(frozen_evaluation(*args, **kwargs))
        return sent_to_the_server[-1]

    monkeypatch.setattr(server.federation, "frozen_evaluation", keep)
    on_disk_after_training: dict[str, list[str]] = {}  # each site's AdamW files when the final model arrives
    drop = client.kept.KeptState.drop_optimizer_states

    def look(store: client.kept.KeptState) -> None:
        files = sorted(p.name for p in store.folder.glob("optimizer-round-*.pt"))
        on_disk_after_training.setdefault(store.folder.name, files)  # at the first model kept after training
        drop(store)

    monkeypatch.setattr(client.kept.KeptState, "drop_optimizer_states", look)
    grid = InProcessGrid(3)
    result = run_federated(grid, cfg, tracker=Tracker(uri=cfg.tracking.uri, experiment="fed-test"))  # type: ignore[arg-type]

    # external sites never train; every training site trains in every round
    kinds = grid.kinds()
    assert sorted(node for node, kind in kinds if kind == "train") == [100, 100, 101, 101]
    assert sum(kind == "evaluate.frozen" for _, kind in kinds) == 3
    # the configuration travels once per node (site-info); later messages carry only its digest
    carrying = [
        kind
        for _, msg in grid.sent
        for kind in [msg.metadata.message_type]
        if Field.CONFIG_JSON in msg.content[Key.CONFIG]
    ]
    assert carrying == ["query.site_info"] * 3
    # each training site keeps its own AdamW state across rounds, at the site (its disk and its ClientApp process),
    # never in the node context that Flower carries with every message; the large files go when the run no
    # longer needs them (the optimizer states once training is over, the final model after the frozen evaluation)
    federation_id = json.loads((result.bundle_dir / "metadata.json").read_text())["training"]["federation_id"]
    state_dirs = Path(cfg.data.cache_dir) / "federation-state" / federation_id
    trained = sorted(s for s, r in result.sites.items() if r.role == "train")
    assert {s: on_disk_after_training[s] for s in trained} == {
        s: ["optimizer-round-1.pt", "optimizer-round-2.pt"] for s in trained
    }
    for site in result.sites:
        left = sorted(p.name for p in (state_dirs / site).glob("*.pt")) if (state_dirs / site).is_dir() else []
        assert not [n for n in left if n.startswith(("optimizer-", "model-"))], (site, left)
    assert all("strnet.optimizer" not in ctx.state for ctx in grid.contexts.values())

    # τ* from pooled counts == τ* on the concatenated raw validation scores of the kept model
    bundle = load_bundle(result.bundle_dir)
    assert bundle.threshold == result.threshold["value"]
    assert bundle.metadata["threshold"]["sites"] == ["hospital", "stage1"]
    assert bundle.metadata["training"]["mode"] == "federated"
    assert bundle.metadata["training"]["recipe"]["step"].startswith("round of 1 local epoch")
    cache = PreprocessCache(Path(cfg.data.cache_dir))
    frames = [read_manifest(scenario.site_manifests[s]) for s in ("stage1", "hospital")]
    val = pd.concat([f[f["split"] == "val"] for f in frames], ignore_index=True)
    pred = predict_frame(bundle, val, cache=cache, precision="fp32")
    y = (pred["label_cls"] != "normal").to_numpy(int)
    p = pred["prob_bone_loss"].to_numpy()
    assert bundle.threshold == M.select_threshold(y, p, 0.86, GRID)
    # each training site's fit on its own training split, from its histograms == sklearn on the bundle's scores
    # (to the 1/1000 score bins the histograms hold); an external site has no training split to report
    for site in ("stage1", "hospital"):
        train = frames[("stage1", "hospital").index(site)]
        fitted = predict_frame(bundle, train[train["split"] == "train"], cache=cache, precision="fp32")
        y_fit = (fitted["label_cls"] != "normal").to_numpy(int)
        assert result.sites[site].fit["screening_n"] == len(fitted)
        expected = roc_auc_score(y_fit, fitted["prob_bone_loss"].to_numpy())
        assert result.sites[site].fit["screening_auroc"] == pytest.approx(expected, abs=0.01)
    assert all(not r.fit for r in result.sites.values() if r.role == "external")
    # the calibration fitted by Newton steps on pooled statistics == the fit on the concatenated logits
    raw = pred["prob_bone_loss_uncalibrated"].to_numpy()
    central = fit_platt_to_logits(np.log(raw) - np.log1p(-raw), y)
    fitted = bundle.metadata["calibration"]
    assert fitted["sites"] == ["hospital", "stage1"] and fitted["status"] == central["status"]
    # (float32 logits rebuilt from probabilities here: equal to rounding, the 1e-6 test is test_calibration)
    assert (fitted["a"], fitted["b"]) == pytest.approx((central["a"], central["b"]), rel=1e-4)
    # the OOD model from pooled moments and a pooled histogram == the centralized fit on the same knees
    from strnet.data.dataset import KneeDataset
    from strnet.ood import OODModel, fit_ood

    knees = {k: pd.concat([f[f["split"] == k] for f in frames], ignore_index=True) for k in ("train", "val")}
    data = [KneeDataset(knees[k], cfg.preprocess, cache, augment=None) for k in ("train", "val")]
    central_ood = fit_ood(bundle.model, *data, quantile=cfg.ood.quantile, margin=cfg.ood.margin)
    pooled_ood = OODModel.from_dict(bundle.metadata["ood"])
    assert pooled_ood.gaussian.n == len(knees["train"]) and pooled_ood.n_calibration == len(knees["val"])
    np.testing.assert_allclose(pooled_ood.gaussian.mean, central_ood.gaussian.mean, rtol=1e-4, atol=1e-6)
    assert pooled_ood.limit == pytest.approx(central_ood.limit, rel=1e-2)  # one 0.46 % histogram bin
    # the T-score branch refit: pooled validation error, the full model travels once, then the branch only
    refit = bundle.metadata["training"]["tscore_refit"]
    assert refit["status"] == "refitted" and refit["val_mse"] <= refit["val_mse_before"]
    parts = grid.parts()  # every query sent, each part of a batch message under its own kind
    tscore_msgs = [(i, content) for _, kind, content, i in parts if kind.startswith("query.tscore")]
    sizes = [len(content[Key.ARRAYS]) for _, content in tscore_msgs]
    assert sizes[0] == len(bundle.model.state_dict()) and max(sizes[3:]) < sizes[0] / 2
    # one exchange per refit round (validation of the sent branch rides with its training), one to validate the last
    # (stopped by tscore.patience: the last round's training exchange carried its validation, nothing follows)
    kinds_sent = [kind for _, kind, _, _ in parts if kind.startswith("query.tscore")]
    run = refit["rounds_run"]
    assert len(refit["val_mse_history"]) == run + 1 and run - refit["kept_round"] <= cfg.tscore.patience
    if run == cfg.tscore.rounds:
        assert kinds_sent == ["query.tscore_train"] * 2 * run + ["query.tscore_val"] * 2
    else:
        assert run - refit["kept_round"] == cfg.tscore.patience
        assert kinds_sent == ["query.tscore_train"] * 2 * (run + 1)
    sent_kinds = {kind for _, kind in grid.kinds()}
    assert {"query.ood_moments", "query.ood_distances"} <= sent_kinds
    calibrating = [content for _, kind, content, _ in parts if kind == "query.calibration"]
    # the whole model travels once per node after training, in the first message's first part
    assert len(calibrating) >= 4 and all(Key.ARRAYS not in content for content in calibrating)
    # calibration, its calibrated validation and the OOD queries ride in the T-score refit's exchanges (server.together)
    with_tscore = {i for i, _ in tscore_msgs}
    riders = [i for _, kind, _, i in parts if kind in ("query.calibration", "query.ood_moments", "query.ood_distances")]
    assert riders and set(riders) <= with_tscore
    assert sum(kind == "query.val_stats" and i in with_tscore for _, kind, _, i in parts) == 2
    assert bundle.metadata["threshold"]["n_cases"] == len(val)
    assert result.metrics["val_screening_n"] == len(val)
    assert result.metrics["val_screening_sensitivity"] == pytest.approx(np.mean(p[y == 1] >= bundle.threshold))

    # frozen evaluation: the external site evaluates its whole cohort, training sites their test split
    assert result.sites["stage2"].metrics["screening_n"] == len(read_manifest(scenario.site_manifests["stage2"]))
    test = pd.concat([f[f["split"] == "test"] for f in frames], ignore_index=True)
    assert result.metrics["test_screening_n"] == (test["label_cls"] != "").sum()
    lo, hi = result.metrics["test_screening_auroc_ci_lo"], result.metrics["test_screening_auroc_ci_hi"]
    assert lo <= result.metrics["test_screening_auroc"] <= hi  # pooled intervals from the histogram bootstrap
    assert list(result.table["site"])[-1].startswith("pooled")

    # subgroups from the per-level histograms the sites released == the per-knee table of the same frozen model on
    # the concatenated knees (source = the site): counts and sensitivity/specificity at τ* exactly, AUROC within
    # half the share of bone-loss/normal pairs sharing one of the 1000 bins. The run's own table (test split, in
    # summary.json), and the same code on the val-split histograms the sites sent in that run (more knees)
    summary = json.loads((Path(cfg.output_dir) / "summary.json").read_text())
    federated = summary["subgroups"]["rows"]
    per_site, withheld = sent_to_the_server[0]
    val_rows = federated_subgroups(
        {s: c["val"] for s, c in per_site.items() if s != "stage2"}, withheld, bundle.threshold,
        split="val", min_cases=10, n_boot=0, seed=0,
    )  # fmt: skip
    for split, rows in (("test", federated), ("val", strict_json(val_rows))):
        named = zip(("stage1", "hospital"), frames, strict=True)
        knees = pd.concat([f[f["split"] == split].assign(source=s) for s, f in named], ignore_index=True)
        labelled = predict_frame(bundle, knees, cache=cache, precision="fp32").query("label_cls != ''")
        _same_subgroups(rows, subgroup_metrics(labelled, bundle.threshold, n_boot=0, seed=0), labelled)
    assert {r["variable"] for r in federated} == {"sex", "age band", "BMI band", "source"}
    report = (Path(cfg.output_dir) / "test_report" / "report.md").read_text(encoding="utf-8")
    assert "Screening by subgroup" in report and "source: stage1" in report

    # MLflow: one federated run with the shared metric names
    mlflow.set_tracking_uri(cfg.tracking.uri)
    run = MlflowClient().get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["mode"] == "federated" and run.data.tags["strategy"] == "fedavg"
    assert run.data.metrics["tau_star"] == bundle.threshold
    assert "test_screening_sensitivity" in run.data.metrics
    assert "site.stage2.test_screening_specificity" in run.data.metrics
    logged = mlflow.artifacts.load_dict(f"runs:/{result.run_id}/subgroups.json")
    assert logged["rows"] == federated and "histograms" in logged["note"]
    assert "test_report" in {a.path for a in MlflowClient().list_artifacts(result.run_id)}
    history = MlflowClient().get_metric_history(result.run_id, "history/val_screening_auprc")
    assert sorted(m.step for m in history) == [1, 2]
    best = max(history, key=lambda m: (m.value, -m.step))  # the kept model: best pooled val AUPRC, earliest on ties
    assert bundle.metadata["training"]["best_step"] == best.step
    assert (Path(cfg.output_dir) / "figures" / "learning_curve.png").is_file()
    logged_figures = {a.path for a in MlflowClient().list_artifacts(result.run_id, "figures")}
    assert {"figures/learning_curve.png", "figures/test_roc.png"} <= logged_figures


def test_federated_run_survives_one_failed_site_and_names_it(scenario, tmp_path: Path) -> None:
    overrides = [*_overrides(scenario, tmp_path), "federation.quorum=1", "federation.rounds=1"]
    cfg = load_config("demo", [*overrides, "tracking.enabled=false"])

    def validation(msg: Message) -> bool:  # a validation query, alone or a part of a batch message
        kind = msg.metadata.message_type
        return kind == "query.val_stats" or (
            kind == "query.batch" and "query.val_stats" in msg.content["config"]["parts"]
        )

    grid = InProcessGrid(3, fail=lambda msg, node: node == 101 and validation(msg))
    result = run_federated(grid, cfg)  # type: ignore[arg-type]
    assert result.threshold["sites"] == ["stage1"]
    assert any("hospital" in text and "injected failure" in text for text in result.problems)


def test_a_part_failing_at_a_site_leaves_the_other_parts_of_its_message(
    scenario, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After training, one message carries several queries (server.together); the OOD query failing at the hospital
    is reported for that query alone, and the T-score refit and calibration riding with it keep the hospital."""
    overrides = [*_overrides(scenario, tmp_path), "federation.rounds=1", "tracking.enabled=false"]
    answer = client.app._ANSWERS[MessageKind.OOD_MOMENTS]

    def failing(message, context):  # type: ignore[no-untyped-def]
        runner, records = answer(message, context)
        if runner.site == "hospital":
            raise DataError("/data/patient-0042.png", "unreadable")  # its text must not leave the site
        return runner, records

    monkeypatch.setitem(client.app._ANSWERS, MessageKind.OOD_MOMENTS, failing)
    grid = InProcessGrid(3)
    result = run_federated(grid, load_config("demo", overrides))  # type: ignore[arg-type]
    ood_problems = [p for p in result.problems if p.startswith(MessageKind.OOD_MOMENTS)]
    assert len(ood_problems) == 1 and "hospital" in ood_problems[0] and "data problem" in ood_problems[0]
    assert not any("patient-0042" in p for p in result.problems)
    assert any("no out-of-distribution model" in p for p in result.problems)  # quorum 2
    metadata = json.loads((result.bundle_dir / "metadata.json").read_text())
    assert metadata["calibration"]["sites"] == ["hospital", "stage1"] and metadata.get("ood") is None
    assert metadata["training"]["tscore_refit"]["status"] == "refitted"
    ood_parts = [i for _, kind, _, i in grid.parts() if kind == MessageKind.OOD_MOMENTS]
    assert ood_parts and all(grid.sent[i][1].metadata.message_type == MessageKind.BATCH for i in ood_parts)

    cfg_strict = load_config("demo", [*overrides, "federation.quorum=2", "tracking.enabled=false"])
    with pytest.raises(QuorumError, match="hospital"):
        run_federated(
            InProcessGrid(3, fail=lambda msg, node: node == 101 and msg.metadata.message_type == "train"), cfg_strict
        )  # type: ignore[arg-type]


def test_a_site_on_another_protocol_version_is_named(scenario, tmp_path: Path) -> None:
    """A node whose ClientApp speaks another protocol version is left out with a message that names it."""

    def old_release(reply: Message, node: int) -> Message:
        if node == 102 and not reply.has_error():
            reply.content[Key.INFO][Field.VERSION] = PROTOCOL_VERSION - 1
        return reply

    overrides = [*_overrides(scenario, tmp_path), "federation.rounds=1", "tracking.enabled=false"]
    result = run_federated(InProcessGrid(3, tamper=old_release), load_config("demo", overrides))  # type: ignore[arg-type]
    assert "stage2" not in result.sites
    assert any("protocol version" in t and str(PROTOCOL_VERSION - 1) in t for t in result.problems)


def test_local_steps_bound_a_sites_round_and_the_server_counts_patience_in_rounds(
    scenario, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``federation.local_steps``: a site's round is that many AdamW steps whatever its size (an epoch of its
    training split otherwise), and the server's schedule uses the federation's patience, not ``train``'s."""
    from strnet.site import SiteRunner

    base = [*_overrides(scenario, tmp_path), "tracking.enabled=false", "train.early_stop_patience=30"]
    manifest = scenario.site_manifests["stage1"]
    for steps in (0, 1):
        cfg = load_config("demo", [*base, f"federation.local_steps={steps}"])
        site = SiteRunner(cfg, "stage1", manifest, device=torch.device("cpu"))
        *_, optimizer_state, _ = site.train(site.state_dict(), lr=1e-3, server_round=3, optimizer_state=None)
        taken = {int(p["step"]) for p in optimizer_state["state"].values()}
        assert taken == {steps or math.ceil(len(site.splits["train"]) / cfg.train.batch_size)}

    class Scheduled(Exception):
        pass

    def schedule(params: TrainParams) -> None:
        raise Scheduled(params)

    monkeypatch.setattr(server.federation, "RecipeSchedule", schedule)
    cfg = load_config(
        "demo", [*base, "federation.local_steps=2", "federation.plateau_patience=3", "federation.early_stop_patience=5"]
    )
    with pytest.raises(Scheduled) as made:
        run_federated(InProcessGrid(3), cfg)  # type: ignore[arg-type]
    params = made.value.args[0]
    assert (params.plateau_patience, params.early_stop_patience, params.max_steps_per_epoch) == (3, 5, 2)
    assert cfg.train.early_stop_patience == 30  # centralized training keeps its own


def test_optimizer_state_can_restart_every_round(scenario, tmp_path: Path) -> None:
    overrides = [*_overrides(scenario, tmp_path), "federation.keep_optimizer_state=false", "tracking.enabled=false"]
    grid = InProcessGrid(3)
    result = run_federated(grid, load_config("demo", overrides))  # type: ignore[arg-type]
    assert all("strnet.optimizer" not in ctx.state for ctx in grid.contexts.values())
    assert result.history[-1]["step"] == 2
    assert json.loads((result.bundle_dir / "metadata.json").read_text())["training"]["recipe"]["optimizer_state"] == (
        "reset every round"
    )


def test_a_federation_trains_one_network_whatever_model_members_says(scenario, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """``model.members`` is the centralized ensemble: a federation with the same preset serves one network, and its
    bundle and recipe say so (a bundle that claimed three members would not load its one network's weights).
    The sites train the training-only image T-score head (``loss.t_score_image``) too; the bundle leaves it out."""
    overrides = [*_overrides(scenario, tmp_path), "model.members=3", "federation.rounds=1", "tracking.enabled=false"]
    result = run_federated(InProcessGrid(3), load_config("demo", [*overrides, "loss.t_score_image=0.3"]))  # type: ignore[arg-type]
    meta = json.loads((result.bundle_dir / "metadata.json").read_text())
    assert meta["model"]["members"] == 1
    assert meta["training"]["recipe"]["members"] == "1 network (model.members=3 applies to centralized runs)"
    model = load_bundle(result.bundle_dir).model
    assert isinstance(model, STRNet) and model.image_tscore_head is None
    logged = {k: v for row in result.history for k, v in row.items() if k.endswith("train_loss_t_score_image")}
    # the hospital's knees carry T-scores and train the head; stage1's carry none (its term is an exact 0)
    assert logged["site.hospital.train_loss_t_score_image"] > 0 and logged["train_loss_t_score_image"] > 0, logged
    assert logged["site.stage1.train_loss_t_score_image"] == 0, logged


def test_federated_tscore_refit_fits_with_and_without_the_image_and_keeps_the_lower_pooled_error(
    scenario, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    overrides = [
        *_overrides(scenario, tmp_path),
        "federation.rounds=1",
        "tracking.enabled=false",
        "tscore.image=auto",
        "tscore.rounds=3",
        "tscore.patience=0",
    ]
    grid = InProcessGrid(3)
    result = run_federated(grid, load_config("demo", overrides))  # type: ignore[arg-type]
    refit = json.loads((result.bundle_dir / "metadata.json").read_text())["training"]["tscore_refit"]
    assert refit["status"] == "refitted" and refit["image_path_chosen_by"] == "validation MSE"
    on, off = refit["val_mse_image_on"], refit["val_mse_image_off"]
    assert refit["val_mse"] == min(on, off) and refit["image_path"] == ("on" if on <= off else "off")
    adapter = load_bundle(result.bundle_dir).model.t_image  # type: ignore[union-attr]
    assert any(torch.count_nonzero(p) for p in adapter.parameters()) == (refit["image_path"] == "on")
    report = (result.bundle_dir.parent / "test_report" / "report.md").read_text()
    assert ("reads age, sex and BMI only" in report) == (refit["image_path"] == "off")
    # two refits, each one exchange per round plus one to validate its last branch
    kinds = [kind for _, kind, _, _ in grid.parts() if kind.startswith("query.tscore")]
    assert kinds.count("query.tscore_train") == 2 * 2 * 3 and kinds.count("query.tscore_val") == 2 * 2


def test_a_federated_refit_with_the_image_path_off_is_the_sites_own_refit_and_never_reads_the_image(
    scenario, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """``tscore.image=off`` alone: the first refit message once carried the kept model with its own image adapter,
    so every site trained from the adapter it had and the refit read the image while the bundle said it did not.
    With one training site holding T-scores, FedAvg of the branch is that site's own refit, so the centralized
    refit on its cases, from the same kept model, is the oracle."""
    from strnet.tscore import refit_centralized

    overrides = [
        *_overrides(scenario, tmp_path),
        "federation.rounds=1",
        "tracking.enabled=false",
        "tscore.image=off",
        "tscore.rounds=3",
        "tscore.patience=0",
    ]
    cfg = load_config("demo", overrides)
    result = run_federated(InProcessGrid(3), cfg)  # type: ignore[arg-type]
    bundle = load_bundle(result.bundle_dir)
    refit = bundle.metadata["training"]["tscore_refit"]
    assert refit["status"] == "refitted" and refit["image_path"] == "off"
    assert all(torch.count_nonzero(p) == 0 for p in bundle.model.t_image.parameters())  # type: ignore[union-attr]

    with_t = [
        df[pd.to_numeric(df["t_score"], errors="coerce").notna()]
        for df in (read_manifest(site.manifest) for site in cfg.federation.sites if site.role == "train")
    ]
    (site_rows,) = [rows for rows in with_t if len(rows)]  # the one training site with T-scores
    checkpoint = torch.load(Path(cfg.output_dir) / "federation-checkpoint.pt", weights_only=True)
    kept = checkpoint["strategy"]["best_arrays"]["__arrayrecord__"]
    oracle = load_bundle(result.bundle_dir).model
    oracle.load_state_dict(kept)
    central = refit_centralized(
        oracle,
        site_rows[site_rows["split"] == "train"],
        site_rows[site_rows["split"] == "val"],
        bundle.preprocess,
        PreprocessCache(tmp_path / "cache"),
        torch.device("cpu"),
        lr=cfg.tscore.lr,
        weight_decay=cfg.tscore.weight_decay,
        **cfg.tscore.schedule(),
    )
    np.testing.assert_allclose(refit["val_mse_history"], central["val_mse_history"], rtol=1e-5)
    served, expected = bundle.model.state_dict(), oracle.state_dict()
    for key in [k for k in served if k.split(".", 1)[0] in ("t_image", "t_tabular", "t_fusion")]:
        torch.testing.assert_close(served[key], expected[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("transport", ["fp16", "fp32"])
def test_weights_travel_at_the_configured_precision(scenario, tmp_path: Path, transport: str) -> None:
    """``federation.transport``: every round's weight matrices go both ways at that precision (integer counters
    exact); the messages about the final model after training, the server's record and the bundle stay fp32."""
    replies: list[Message] = []

    def record(reply: Message, node: int) -> Message:
        replies.append(reply)
        return reply

    overrides = [*_overrides(scenario, tmp_path), "federation.rounds=1", "tracking.enabled=false"]
    grid = InProcessGrid(3, tamper=record)
    result = run_federated(grid, load_config("demo", [*overrides, f"federation.transport={transport}"]))  # type: ignore[arg-type]
    assert not result.problems

    def floating(message: Message) -> set[str]:
        """The dtypes of a message's weight matrices (vectors travel at fp32 either way; strnet.protocol.to_wire)."""
        weights = message.content.array_records.get(Key.ARRAYS, {})
        return {str(v.dtype) for v in weights.values() if len(v.shape) >= 2}

    wire = {"fp16": "float16", "fp32": "float32"}[transport]
    sent = {
        kind: [msg for _, msg in grid.sent if msg.metadata.message_type == kind]
        for kind in ("train", "query.val_stats", "evaluate.frozen")
    }
    in_round = [m for m in sent["train"] + sent["query.val_stats"] if m.metadata.group_id == "1"]
    assert [floating(m) for m in in_round] == [{wire}] * 4  # train and the round's validation statistics
    # after training, every message that carries weights (the T-score refit's and calibration's first, the
    # external site's frozen evaluation: the rest name the final model by digest) carries the bundle's, at fp32
    final = [m for _, m in grid.sent if m not in in_round and m.metadata.message_type != "train"]
    carrying = [floating(m) for m in final if Key.ARRAYS in m.content]
    assert len(carrying) >= 5 and all(f == {"float32"} for f in carrying)
    # the training sites keep the kept model from the first message after training: their frozen evaluation
    # carries the refitted T-score branch only (base-digest); the external site gets the whole model
    frozen = [set(m.content[Key.ARRAYS].keys()) for m in sent["evaluate.frozen"]]
    assert [floating(m) for m in sent["evaluate.frozen"]] == [{"float32"}] * 3
    branch = set(branch_keys(load_bundle(result.bundle_dir).model))
    assert frozen[0] == frozen[1] == branch and len(frozen[2]) > len(branch)
    train_replies = [r for r in replies if r.metadata.message_type == "train"]
    assert len(train_replies) == 2 and all(floating(r) == {wire} for r in train_replies)
    counters = [v for r in train_replies for k, v in r.content[Key.ARRAYS].items() if k.endswith("num_batches_tracked")]
    assert counters and {str(v.dtype) for v in counters} == {"int64"} and all(int(v.numpy()) > 0 for v in counters)
    bundle = load_bundle(result.bundle_dir)
    weights = torch.load(result.bundle_dir / "model.pt", weights_only=True)
    assert {v.dtype for k, v in weights.items() if not k.endswith("num_batches_tracked")} == {torch.float32}
    info = bundle.metadata["training"]["transport"]
    assert info["dtype"] == transport and info["from_site"] == sum(
        v.numpy().nbytes for v in sent["train"][0].content[Key.ARRAYS].values()
    )
    assert bundle.metadata["training"]["config"]["federation"]["transport"] == transport


# ------------------------------------------------------------------------------------------------ strategies


def _site_kwargs() -> dict:
    return {
        "train_nodes": {11: "alpha", 22: "beta", 33: "gamma"},
        "quorum": 2,
        "threshold": TH,
        "schedule": RecipeSchedule(TrainParams()),
        "monitor": "auprc",
        "config_digest": "d1",
    }


def _round(strategy: SiteFedAvg, current: float, replies: list[Message]) -> dict[str, np.ndarray]:
    arrays = ArrayRecord({k: Array(v) for k, v in _state(current, 4).items()})
    messages = list(strategy.configure_train(1, arrays, ConfigRecord(), None))  # type: ignore[arg-type]
    assert [m.metadata.dst_node_id for m in messages] == [11, 22, 33]
    new, _ = strategy.aggregate_train(1, replies)
    assert new is not None
    return {k: v.numpy() for k, v in new.items()}


def test_fedavgm_and_fedadam_are_flowers_update_on_the_quorum_tolerant_average() -> None:
    broken = _train_reply(33, {"w": np.zeros((9,), np.float32)}, 5)  # wrong shape: dropped by name, round goes on
    replies = [_train_reply(11, _state(1.0, 10), 10), _train_reply(22, _state(3.0, 20), 30), broken]
    averaged = (1.0 * 10 + 3.0 * 30) / 40  # 2.5, FedAvg over the two usable replies

    m = build_strategy(FederationConfig(strategy="fedavgm", server_lr=0.5, server_momentum=0.9), **_site_kwargs())
    out = _round(m, 1.0, list(replies))
    pseudo_gradient = 1.0 - averaged  # first round: momentum buffer = the pseudo-gradient
    np.testing.assert_allclose(out["w"], 1.0 - 0.5 * pseudo_gradient, rtol=1e-6)
    assert any("gamma" in p and "malformed weights" in p for p in m.problems)

    a = build_strategy(FederationConfig(strategy="fedadam", server_lr=0.01), **_site_kwargs())
    out = _round(a, 1.0, [_train_reply(11, _state(1.0, 10), 10), _train_reply(22, _state(3.0, 20), 30)])
    delta = averaged - 1.0
    m_t, v_t = 0.1 * delta, 0.01 * delta**2  # beta_1 = 0.9, beta_2 = 0.99, from zero
    eta = 0.01 * np.sqrt(1 - 0.99**2) / (1 - 0.9**2)  # Flower's bias correction at round 1
    np.testing.assert_allclose(out["w"], 1.0 + eta * m_t / (np.sqrt(v_t) + 1e-9), rtol=1e-5)


def test_fedprox_sends_mu_and_the_proximal_term_is_the_squared_distance() -> None:
    p = build_strategy(FederationConfig(strategy="fedprox", proximal_mu=0.3), **_site_kwargs())
    arrays = ArrayRecord({k: Array(v) for k, v in _state(1.0, 4).items()})
    messages = list(p.configure_train(1, arrays, ConfigRecord(), None))  # type: ignore[arg-type]
    assert {float(m.content[Key.CONFIG][Field.PROXIMAL_MU]) for m in messages} == {0.3}
    assert all(Field.LEARNING_RATE in m.content[Key.CONFIG] for m in messages)

    import torch

    from strnet.engine import Proximal

    model = torch.nn.Linear(3, 2)
    anchor = Proximal.of(model, 0.3)
    with torch.no_grad():
        model.weight.add_(0.5)  # 6 weights moved by 0.5, bias (2) by -0.25
        model.bias.sub_(0.25)
    term = anchor.term(model)
    assert float(term.detach()) == pytest.approx(6 * 0.25 + 2 * 0.0625)
    term.backward()  # the gradient of (mu/2)·term is mu·(w − w_global)
    np.testing.assert_allclose(model.weight.grad.numpy(), 2 * 0.5 * np.ones((2, 3)), rtol=1e-6)


def test_fedprox_federation_runs_in_process_and_sites_log_the_term(scenario, tmp_path: Path) -> None:
    overrides = [*_overrides(scenario, tmp_path), "federation.strategy=fedprox", "federation.proximal_mu=0.5"]
    result = run_federated(InProcessGrid(3), load_config("demo", [*overrides, "tracking.enabled=false"]))  # type: ignore[arg-type]
    assert result.history[-1]["step"] == 2
    assert result.history[-1]["site.stage1.train_loss_proximal"] > 0  # round 2 moved away from the global weights


def _kept_batchnorm_average(scenario, grid: InProcessGrid, result) -> tuple[dict[str, torch.Tensor], dict[int, int]]:
    """FedBN's kept-round BatchNorm tensors as the two training sites (nodes 100, 101) hold them, averaged by their
    training cases (float64), and those case counts."""
    kept = int(result.metrics["best_step"])
    site_bn = {
        node: grid.contexts[node].state[f"strnet.batchnorm.round-{kept}"].to_torch_state_dict() for node in (100, 101)
    }
    n = {
        node: len(read_manifest(scenario.site_manifests[s]).query("split == 'train'"))
        for node, s in ((100, "stage1"), (101, "hospital"))
    }
    averaged = {k: sum(site_bn[node][k].double() * n[node] for node in n) / sum(n.values()) for k in site_bn[100]}
    return averaged, n


def _training_statistics(scenario, model: torch.nn.Module, cfg) -> list[tuple[dict[str, np.ndarray], int]]:
    """Each training site's BatchNorm statistics under ``model`` on its training images (stage1, hospital)."""
    return [
        batchnorm.reestimate(
            model,
            KneeDataset(read_manifest(scenario.site_manifests[s]).query("split == 'train'"), cfg.preprocess, None),
            batch_size=cfg.train.batch_size,
        )
        for s in ("stage1", "hospital")
    ]


def test_fedbn_keeps_batchnorm_tensors_out_of_every_site_message_but_one(scenario, tmp_path: Path) -> None:
    """FedBN: no train or validation reply carries a BatchNorm tensor; after training each site sends its own
    once (the kept round), and the bundle's BatchNorm layers are their average weighted by training cases."""
    from strnet.model import batchnorm_keys, build_strnet

    bn = batchnorm_keys(build_strnet(backbone="tiny"))
    assert bn and all(k.startswith("backbone.") for k in bn)
    replies: list[tuple[int, Message]] = []

    def record(reply: Message, node: int) -> Message:
        replies.append((node, reply))
        return reply

    overrides = [*_overrides(scenario, tmp_path), "federation.strategy=fedbn", "tracking.enabled=false"]
    grid = InProcessGrid(3, tamper=record)
    result = run_federated(grid, load_config("demo", overrides))  # type: ignore[arg-type]
    assert not result.problems
    carrying: dict[str, list[int]] = {}
    for node, reply in replies:
        keys = {k for rec in reply.content.array_records.values() for k in rec}
        if keys & bn:
            carrying.setdefault(reply.metadata.message_type, []).append(node)
    # the two training sites, once each: their kept round's tensors, then statistics under the final weights
    assert carrying == {"query.batchnorm": [100, 101], "query.bn_statistics": [100, 101]}
    sent_train = [msg for _, msg in grid.sent if msg.metadata.message_type == "train"]
    assert bn <= set(sent_train[0].content[Key.ARRAYS])  # round 1 starts everyone from the same BatchNorm
    assert not bn & set(sent_train[-1].content[Key.ARRAYS])  # later rounds exchange the rest only
    averaged, n = _kept_batchnorm_average(scenario, grid, result)
    bundle = load_bundle(result.bundle_dir)
    state = bundle.model.state_dict()
    for key in (k for k in sorted(bn) if k.endswith(("weight", "bias"))):  # learned: the sites' weighted average
        np.testing.assert_allclose(state[key].double().numpy(), averaged[key].numpy(), rtol=1e-5)
    # statistics: re-estimated under the final weights on each site's training images, pooled by their moments
    cfg = load_config("demo", overrides)
    per_site = _training_statistics(scenario, bundle.model, cfg)
    assert [m for _, m in per_site] == [n[100], n[101]]
    for key, value in batchnorm.pool(per_site).items():
        np.testing.assert_allclose(state[key].numpy(), value, rtol=1e-4, atol=1e-6, err_msg=key)


def test_fedbn_statistics_a_site_garbles_are_named_and_the_average_is_kept(scenario, tmp_path: Path) -> None:
    """A negative variance in one site's re-estimated statistics: the site and the array are named, and below the
    quorum the bundle keeps the kept round's averaged statistics rather than fail or pool one site's."""

    def garble(reply: Message, node: int) -> Message:
        if node == 101 and reply.metadata.message_type == MessageKind.BN_STATISTICS and not reply.has_error():
            stats = reply.content[Key.STATS]
            key = next(k for k in sorted(stats) if k.endswith("running_var"))
            stats[key] = Array(-np.abs(stats[key].numpy()) - 1.0)
        return reply

    overrides = [*_overrides(scenario, tmp_path), "federation.strategy=fedbn", "tracking.enabled=false"]
    grid = InProcessGrid(3, tamper=garble)
    result = run_federated(grid, load_config("demo", overrides))  # type: ignore[arg-type]
    named = [p for p in result.problems if p.startswith("bn statistics")]
    assert any("site hospital: malformed" in p and "running_var" in p for p in named), named
    assert any("keeps the BatchNorm statistics it had" in p for p in named), named
    averaged, _ = _kept_batchnorm_average(scenario, grid, result)
    state = load_bundle(result.bundle_dir).model.state_dict()
    key = next(k for k in sorted(averaged) if k.endswith("running_var"))
    np.testing.assert_allclose(state[key].double().numpy(), averaged[key].numpy(), rtol=1e-5)


def test_pooled_batchnorm_statistics_are_re_estimated_before_every_exchange_and_sites_train_under_them(
    scenario, tmp_path: Path
) -> None:
    """``federation.batchnorm: pooled``: every exchange that validates or trains a global model is preceded by the
    sites' statistics under exactly those weights, pooled by their moments; a site's training normalises with
    them and leaves them as they were (its BatchNorm scales still learn); the bundle's statistics are the pooled
    ones of its own weights."""
    from strnet.model import batchnorm_keys
    from strnet.site import SiteRunner

    overrides = [*_overrides(scenario, tmp_path), "federation.batchnorm=pooled", "tracking.enabled=false"]
    cfg = load_config("demo", overrides)
    site = SiteRunner(cfg, "stage1", scenario.site_manifests["stage1"], device=torch.device("cpu"))
    before = {k: v.clone() for k, v in site.state_dict().items()}
    after, *_ = site.train(before, lr=1e-2, server_round=1, optimizer_state=None)
    stats = [k for k in batchnorm_keys(site.model) if k.endswith(("running_mean", "running_var"))]
    scales = [k for k in batchnorm_keys(site.model) if k.endswith("weight")]
    assert stats and all(torch.equal(after[k], before[k]) for k in stats)
    assert all(not torch.equal(after[k], before[k]) for k in scales)
    batch = SiteRunner(load_config("demo", overrides[:-2]), "stage1", scenario.site_manifests["stage1"])
    moved, *_ = batch.train(before, lr=1e-2, server_round=1, optimizer_state=None)
    assert not any(torch.equal(moved[k], before[k]) for k in stats)  # the batch form updates them

    grid = InProcessGrid(3)
    result = run_federated(grid, cfg)  # type: ignore[arg-type]
    assert not result.problems
    kinds = [msg.metadata.message_type for node, msg in grid.sent if node == 100]
    rounds = [i for i, k in enumerate(kinds) if k in (MessageKind.TRAIN, MessageKind.VAL_STATS)]
    assert len(rounds) == 3  # two rounds, then the last round's validation
    assert all(kinds[i - 1] == MessageKind.BN_STATISTICS for i in rounds)
    bundle = load_bundle(result.bundle_dir)
    state = bundle.model.state_dict()
    per_site = _training_statistics(scenario, bundle.model, cfg)
    for key, value in batchnorm.pool(per_site).items():
        np.testing.assert_allclose(state[key].numpy(), value, rtol=1e-4, atol=1e-6, err_msg=key)
    recipe = json.loads((result.bundle_dir / "metadata.json").read_text())["training"]["recipe"]
    assert recipe["batchnorm"] == "the sites' pooled statistics, re-estimated before every round"


def test_server_optimizers_leave_batchnorm_statistics_to_the_plain_average() -> None:
    def state(value: float) -> dict[str, np.ndarray]:
        return _state(value, 10) | {"bn.running_var": np.full(3, value, np.float32)}

    for cfg in (
        FederationConfig(strategy="fedadam", server_lr=0.5),
        FederationConfig(strategy="fedavgm", server_lr=0.5),
    ):
        strategy = build_strategy(cfg, **_site_kwargs())
        arrays = ArrayRecord({k: Array(v) for k, v in state(1.0).items()})
        list(strategy.configure_train(1, arrays, ConfigRecord(), None))  # type: ignore[arg-type]
        new, _ = strategy.aggregate_train(1, [_train_reply(11, state(0.2), 10), _train_reply(22, state(0.4), 30)])
        out = {k: v.numpy() for k, v in new.items()}  # type: ignore[union-attr]
        np.testing.assert_allclose(out["bn.running_var"], 0.35, rtol=1e-6)  # the weighted average, not a step
        assert not np.allclose(out["w"], 0.35)  # the parameters did take the server optimizer's step


class ServerStopped(Exception):
    """Stands in for a SuperLink or ServerApp that dies: raised when round ``stop_at``'s training is sent."""


class StoppingGrid(InProcessGrid):
    def __init__(self, n_nodes: int, stop_at: int) -> None:
        super().__init__(n_nodes)
        self.stop_at = stop_at

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        messages = list(messages)
        if any(
            m.metadata.message_type == MessageKind.TRAIN
            and int(m.content[Key.CONFIG][Field.SERVER_ROUND]) == self.stop_at
            for m in messages
        ):
            # the sites train round stop_at (their state moves on), then the server dies before recording it
            super().send_and_receive(messages, timeout=timeout)
            raise ServerStopped(f"server stopped during round {self.stop_at}")
        return super().send_and_receive(messages, timeout=timeout)


@pytest.mark.parametrize("strategy", ["fedavgm", "fedbn"])
def test_a_stopped_federation_resumes_to_the_same_final_weights(scenario, tmp_path: Path, strategy: str) -> None:
    """Server momentum (FedAvgM) or site BatchNorm (FedBN), AdamW moments kept at the sites, the recipe's
    schedule and the pooled history all survive a stop; the resumed run is a new Flower run (fresh node state)."""
    extra = [f"federation.strategy={strategy}", "federation.rounds=3", "tracking.enabled=false", "tscore.rounds=2"]
    full = load_config("demo", [*_overrides(scenario, tmp_path / "full"), *extra])
    run_federated(InProcessGrid(3), full)  # type: ignore[arg-type]

    cfg = load_config("demo", [*_overrides(scenario, tmp_path / "stopped"), *extra])
    with pytest.raises(ServerStopped):
        run_federated(StoppingGrid(3, stop_at=3), cfg)  # type: ignore[arg-type]
    checkpoint = torch.load(Path(cfg.output_dir) / "federation-checkpoint.pt", weights_only=True)
    assert checkpoint["server_round"] == 2 and not checkpoint["finished"]
    resumed = run_federated(InProcessGrid(3), cfg, resume=True)  # type: ignore[arg-type]

    # the last round's global weights (whatever round is kept) and the bundles are identical
    last = [torch.load(Path(c.output_dir) / "federation-checkpoint.pt", weights_only=True) for c in (full, cfg)]
    assert last[0]["server_round"] == last[1]["server_round"] == 3 and last[1]["finished"]
    ga, gb = (c["arrays"]["__arrayrecord__"] for c in last)
    assert set(ga) == set(gb) and all(torch.equal(ga[k], gb[k]) for k in ga)
    a = load_bundle(Path(full.output_dir) / "bundle")
    b = load_bundle(Path(cfg.output_dir) / "bundle")
    wa, wb = a.model.state_dict(), b.model.state_dict()
    assert set(wa) == set(wb)
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key
    assert a.threshold == b.threshold
    assert [r["step"] for r in resumed.history] == [1.0, 2.0, 3.0]
    assert (
        json.loads((Path(cfg.output_dir) / "bundle" / "metadata.json").read_text())["training"]["resumed_from_round"]
        == 2
    )


class TrainThenValidate(SiteFedAvg):
    """The oracle: the plain round loop, two exchanges a round (train; then validate the average, whose pooled
    score sets the next round's learning rate and may stop the run)."""

    def start(self, grid, initial_arrays, num_rounds=3, timeout=3600, *args, on_round_end=None, **kwargs):  # type: ignore[no-untyped-def, override]
        arrays = initial_arrays
        for server_round in range(1, num_rounds + 1):
            sent = self.configure_train(server_round, arrays, ConfigRecord(), grid)
            arrays, _ = self.aggregate_train(server_round, grid.send_and_receive(sent, timeout=timeout))
            sent = self.configure_evaluate(server_round, arrays, ConfigRecord(), grid)
            self.aggregate_evaluate(server_round, grid.send_and_receive(sent, timeout=timeout))
            self.rounds_run = server_round
            if self.schedule.should_stop:
                break


class CountingGrid(InProcessGrid):
    def __init__(self, n_nodes: int) -> None:
        super().__init__(n_nodes)
        self.train_messages = 0

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        messages = list(messages)
        self.train_messages += sum(m.metadata.message_type == MessageKind.TRAIN for m in messages)
        return super().send_and_receive(messages, timeout=timeout)


@pytest.mark.parametrize("strategy", ["fedavg", "fedbn"])
def test_one_exchange_rounds_equal_train_then_validate(
    scenario, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, strategy: str
) -> None:
    """Validation riding in the next round's train message, with the learning rate speculated and a round sent
    again where its validation changed it, and the round trained meanwhile discarded at the early stop: the
    history, the kept round and the bundled weights are exactly the plain loop's. The plateau (patience 0) and
    the early stop (patience 2) both fire within the rounds, so both paths are taken."""
    extra = [
        f"federation.strategy={strategy}",
        "federation.rounds=6",
        "train.plateau_patience=0",
        "train.early_stop_patience=2",
        "train.min_epochs=0",
        "train.lr=0.01",
        "tracking.enabled=false",
        "tscore.rounds=0",
        "ood.enabled=false",
    ]
    fused_cfg = load_config("demo", [*_overrides(scenario, tmp_path / "fused"), *extra])
    grid = CountingGrid(3)
    fused = run_federated(grid, fused_cfg)  # type: ignore[arg-type]

    built = server.federation.build_strategy

    def plain(*args, **kwargs):  # type: ignore[no-untyped-def]
        strategy = built(*args, **kwargs)
        strategy.__class__ = TrainThenValidate
        return strategy

    monkeypatch.setattr(server.federation, "build_strategy", plain)
    plain_cfg = load_config("demo", [*_overrides(scenario, tmp_path / "plain"), *extra])
    reference = run_federated(InProcessGrid(3), plain_cfg)  # type: ignore[arg-type]

    training = json.loads((Path(fused_cfg.output_dir) / "bundle" / "metadata.json").read_text())["training"]
    rounds = training["rounds_run"]
    assert training["redone_rounds"], "no learning-rate change: the redo path was not taken"
    assert rounds < 6 and training["stopped_early"], "no early stop: the discarded round was not taken"
    # two training sites: one train message each per round, per round sent again, and the discarded round
    assert grid.train_messages == 2 * (rounds + len(training["redone_rounds"]) + 1)
    assert [r["lr"] for r in fused.history] == [r["lr"] for r in reference.history]
    assert len({r["lr"] for r in fused.history}) > 1
    for got, want in zip(fused.history, reference.history, strict=True):
        assert got.keys() == want.keys()
        for key in (k for k in want if not k.endswith("images_per_s")):  # throughput: a clock, not a result
            assert got[key] == want[key] or (math.isnan(got[key]) and math.isnan(want[key])), key
    a = load_bundle(Path(fused_cfg.output_dir) / "bundle").model.state_dict()
    b = load_bundle(Path(plain_cfg.output_dir) / "bundle").model.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


class ForgetfulGrid(InProcessGrid):
    """Every site forgets the models it keeps in memory before each message, so each one comes from its disk, as
    when a simulation serves a node's next message from another process."""

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        import client.app

        replies = []
        for msg in messages:
            for runner in client.app._SITES.values():
                runner.held_models.clear()
            replies += super().send_and_receive([msg], timeout=timeout)
        return replies


def test_the_final_model_reaches_each_site_once(scenario, tmp_path: Path) -> None:
    """After training, the first message ships the kept model once, in the T-score refit's part; calibration, the
    calibrated validation and the OOD queries (parts of the same messages) name it by digest, and the frozen
    evaluation carries the refitted branch on top of it; the external site, which kept nothing, gets the final
    model whole. Served from the sites' disks, the run ends exactly as one served from memory."""
    extra = ["tracking.enabled=false", "tscore.rounds=3"]
    cfg = load_config("demo", [*_overrides(scenario, tmp_path / "disk"), *extra])
    grid = ForgetfulGrid(3)
    run_federated(grid, cfg)  # type: ignore[arg-type]
    same = load_config("demo", [*_overrides(scenario, tmp_path / "memory"), *extra])
    run_federated(InProcessGrid(3), same)  # type: ignore[arg-type]
    a, b = (json.loads((Path(c.output_dir) / "summary.json").read_text())["metrics"] for c in (cfg, same))
    assert {k: v for k, v in a.items() if "seconds" not in k} == {k: v for k, v in b.items() if "seconds" not in k}

    model = load_bundle(Path(cfg.output_dir) / "bundle").model
    everything = set(model.state_dict())
    external = 102  # stage2, the third configured site
    shipped: dict[int, list[tuple[str, set[str], bool]]] = {}
    for node, kind, content, _ in grid.parts():
        instruction = content[Key.CONFIG]
        if Field.MODEL_DIGEST not in instruction and kind != MessageKind.FROZEN:
            continue  # the rounds
        keys = set(content[Key.ARRAYS].keys()) if Key.ARRAYS in content else set()
        shipped.setdefault(node, []).append((kind, keys, Field.BASE_DIGEST in instruction))
    for node, sent in shipped.items():
        whole = [kind for kind, keys, _ in sent if keys == everything]
        if node == external:
            assert sent == [(MessageKind.FROZEN, everything, False)]
            continue
        assert whole == [MessageKind.TSCORE_TRAIN], sent  # the kept model, once
        frozen = next(s for s in sent if s[0] == MessageKind.FROZEN)
        assert frozen[2] and frozen[1] == set(branch_keys(model))  # the refitted branch on top of the kept model
        by_digest = [kind for kind, keys, _ in sent if not keys]
        for kind in (MessageKind.CALIBRATE, MessageKind.VAL_STATS, MessageKind.OOD_MOMENTS, MessageKind.OOD_DISTANCES):
            assert kind in by_digest, (kind, sent)


def test_resume_refuses_another_configuration_and_a_tampered_checkpoint(scenario, tmp_path: Path) -> None:
    extra = ["federation.rounds=1", "tracking.enabled=false", "tscore.rounds=0"]
    cfg = load_config("demo", [*_overrides(scenario, tmp_path), *extra])
    with pytest.raises(ConfigError, match="no federation checkpoint"):
        run_federated(InProcessGrid(3), cfg, resume=True)  # type: ignore[arg-type]
    run_federated(InProcessGrid(3), cfg)  # type: ignore[arg-type]
    other = load_config("demo", [*_overrides(scenario, tmp_path), *extra, "train.lr=0.5"])
    with pytest.raises(ConfigError, match="another configuration"):
        run_federated(InProcessGrid(3), other, resume=True)  # type: ignore[arg-type]
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (Path.touch, (marker,))

    torch.save({"format": 1, "history": [Payload()]}, Path(cfg.output_dir) / "federation-checkpoint.pt")
    with pytest.raises(DataError, match="not a plain-data checkpoint"):
        run_federated(InProcessGrid(3), cfg, resume=True)  # type: ignore[arg-type]
    assert not marker.exists()


def test_the_centralized_weight_average_is_refused_before_any_site_is_asked(scenario, tmp_path: Path) -> None:
    cfg = load_config("demo", [*_overrides(scenario, tmp_path), "tracking.enabled=false", "train.ema_decay=0.9"])
    grid = InProcessGrid(3)
    with pytest.raises(ConfigError, match=r"ema_decay=0\.9.*centralized only"):
        run_federated(grid, cfg)  # type: ignore[arg-type]
    assert not Path(cfg.output_dir).exists()
