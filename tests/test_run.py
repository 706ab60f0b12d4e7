"""One pipeline for both modes: the same metric names, the same failure handling, the same recipe."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from configs.schema import Config, load_config
from server.federation import run_federated
from server.pooled import QuorumError
from server.tracking import Tracker
from simulations.inprocess import InProcessGrid
from simulations.scenario import build_synthetic_scenario
from strnet import centralized
from strnet.centralized import run_centralized
from strnet.run import RunResult
from tests.tiny import TINY_RUN

pytestmark = pytest.mark.usefixtures("flower_task_identity")


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory):
    return build_synthetic_scenario(tmp_path_factory.mktemp("run"), seed=11, n_patients=16, image_size=64)


def tiny(out: Path, sites: list[dict[str, str]], *extra: str) -> Config:
    return load_config(
        "demo",
        [
            *TINY_RUN,
            f"federation.sites={json.dumps(sites)}",
            f"output_dir={json.dumps(str(out / 'run'))}",
            f"data.cache_dir={json.dumps(str(out.parent / 'cache'))}",
            f"tracking.uri={json.dumps('sqlite:///' + str(out / 'mlflow.db'))}",
            "tracking.experiment=parity",
            *extra,
        ],
    )


def three_sites(scenario) -> list[dict[str, str]]:  # type: ignore[no-untyped-def]
    return scenario.federation_sites(external="hospital")


def logged_names(cfg: Config, result: RunResult) -> set[str]:
    mlflow.set_tracking_uri(cfg.tracking.uri)
    return set(MlflowClient().get_run(result.run_id).data.metrics)


def test_both_modes_write_the_same_metric_names(scenario, tmp_path: Path) -> None:
    sites = three_sites(scenario)
    cen_cfg = tiny(tmp_path / "cen", sites, "train.epochs=2")
    fed_cfg = tiny(tmp_path / "fed", sites, "federation.rounds=2", "federation.local_epochs=1")
    cen = run_centralized(cen_cfg, tracker=Tracker(cen_cfg.tracking.uri, "parity"), progress=False)
    fed = run_federated(InProcessGrid(3), fed_cfg, tracker=Tracker(fed_cfg.tracking.uri, "parity"))  # type: ignore[arg-type]

    cen_names, fed_names = logged_names(cen_cfg, cen), logged_names(fed_cfg, fed)
    pooled = {n for n in cen_names if not n.startswith("site.")}
    assert pooled == {n for n in fed_names if not n.startswith("site.")}
    assert {"tau_star", "test_screening_auroc_ci_lo", "val_t_score_mae", "history/lr"} <= pooled
    # per-site names differ only by the sites each mode can see (both evaluate every site here)
    assert {n for n in cen_names if n.startswith("site.") and "history/" not in n} == {
        n for n in fed_names if n.startswith("site.") and "history/" not in n
    }
    summaries = [json.loads((Path(c.output_dir) / "summary.json").read_text()) for c in (cen_cfg, fed_cfg)]
    assert set(summaries[0]["metrics"]) == set(summaries[1]["metrics"]) == set(cen.metrics)
    assert {n for n in pooled if not n.startswith(("history/", "timing."))} == set(cen.metrics)
    # both modes time the same parts (strnet bench compares them)
    assert {"timing.setup_seconds", "timing.training_seconds", "timing.training_to_bundle_seconds"} <= pooled
    assert {"exchanges", "exchange_seconds"} <= set(summaries[1]["timings"])
    assert set(summaries[0]["sites"]) == set(summaries[1]["sites"]) == {"stage1", "stage2", "hospital"}
    assert set(summaries[0]["sites"]["hospital"]) == set(summaries[1]["sites"]["hospital"])
    assert [s["mode"] for s in summaries] == ["centralized", "federated"]
    # the precision each mode trained at: this host's for the pooled run, the sites' own reports for a federation
    assert summaries[0]["recipe"]["precision"] == "fp32"
    assert summaries[1]["recipe"]["precision"] == "fp32 at every training site"
    meta = json.loads((fed.bundle_dir / "metadata.json").read_text())
    reported = meta["training"]["sites"]
    assert {s: reported[s]["bf16_autocast"] for s in ("stage1", "stage2", "hospital")} == dict.fromkeys(
        ("stage1", "stage2", "hospital"), 0
    )


def test_a_run_that_raises_is_marked_failed_in_both_modes(scenario, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    sites = three_sites(scenario)
    cfg = tiny(tmp_path / "cen", sites, "train.epochs=1")

    def broken_fit(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("out of memory in epoch 1")

    monkeypatch.setattr(centralized, "fit", broken_fit)
    with pytest.raises(RuntimeError, match="out of memory"):
        run_centralized(cfg, tracker=Tracker(cfg.tracking.uri, "parity"), progress=False)
    fed_cfg = tiny(tmp_path / "fed", sites, "federation.rounds=1", "federation.quorum=2")
    failing = InProcessGrid(3, fail=lambda msg, node: node == 101 and msg.metadata.message_type == "train")
    with pytest.raises(QuorumError):
        run_federated(failing, fed_cfg, tracker=Tracker(fed_cfg.tracking.uri, "parity"))  # type: ignore[arg-type]
    for c in (cfg, fed_cfg):
        mlflow.set_tracking_uri(c.tracking.uri)
        runs = mlflow.search_runs(experiment_names=["parity"])
        assert runs["status"].tolist() == ["FAILED"], c.tracking.uri
        problems = mlflow.artifacts.load_dict(f"runs:/{runs['run_id'][0]}/problems.json")
        assert problems["error"].startswith(("RuntimeError: out of memory", "QuorumError"))


def test_federated_one_site_follows_the_centralized_learning_rate_sequence(scenario, tmp_path: Path) -> None:
    """The recipe is the same in both modes: with one site holding all the data and one local epoch per round,
    the server's plateau on the pooled validation AUPRC takes exactly the centralized run's decisions."""
    sites = [{"name": "all", "role": "train", "manifest": str(scenario.manifest)}]
    recipe = [
        "train.lr=0.02",
        "train.plateau_patience=1",
        "train.plateau_factor=0.5",
        "train.early_stop_patience=50",
        "federation.quorum=1",
    ]
    cen_cfg = tiny(tmp_path / "cen", sites, *recipe, "train.epochs=8", "tracking.enabled=false")
    fed_cfg = tiny(
        tmp_path / "fed",
        sites,
        *recipe,
        "federation.rounds=8",
        "federation.local_epochs=1",
        "federation.transport=fp32",  # exact weights on the wire: fp16 rounding sends training down another path
        "tracking.enabled=false",
    )
    cen = run_centralized(cen_cfg, progress=False)
    fed = run_federated(InProcessGrid(1), fed_cfg)  # type: ignore[arg-type]
    cen_lr = [row["lr"] for row in cen.history]
    fed_lr = [row["lr"] for row in fed.history]
    assert len(cen_lr) == len(fed_lr) == 8
    assert fed_lr == cen_lr
    assert min(cen_lr) < cen_lr[0]  # at least one plateau reduction happened
    cen_auprc = [row["val_screening_auprc"] for row in cen.history]
    assert [row["val_screening_auprc"] for row in fed.history] == pytest.approx(cen_auprc)
    assert fed.metrics["best_step"] == cen.metrics["best_step"]


def test_diagnostic_layouts_keep_every_case_and_patients_whole(scenario, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from simulations.inprocess import layout_sites, main

    manifests = [str(scenario.site_manifests[s]) for s in ("stage1", "stage2")]
    total = sum(len(pd.read_csv(m)) for m in manifests)
    one = layout_sites(manifests, "one-site", tmp_path / "one", seed=0)
    assert len(one) == 1 and len(pd.read_csv(one[0]["manifest"])) == total
    mixed = [pd.read_csv(s["manifest"], keep_default_na=False) for s in layout_sites(manifests, "iid", tmp_path, 0)]
    assert sum(len(m) for m in mixed) == total
    assert not set(mixed[0]["patient_id"]) - {""} & set(mixed[1]["patient_id"])
    assert all(m["source"].nunique() == 2 for m in mixed)  # both sources at both sites

    cfg = tiny(tmp_path / "cfg", three_sites(scenario), "tracking.enabled=false")
    path = tmp_path / "diagnose.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    assert main(["--config", str(path), "--layout", "one-site", "--rounds", "1", "--out", str(tmp_path / "d")]) == 0
    assert "round 1: pooled val AUROC" in capsys.readouterr().out
    assert json.loads((tmp_path / "d" / "summary.json").read_text())["sites"].keys() == {"all", "hospital"}
