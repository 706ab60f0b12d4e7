"""What a user sees in MLflow after both modes ran: runs told apart by name and tags, the model-training view,
one dataset input per site, and the bundle as a registered model that ``strnet predict`` loads by alias."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from configs.schema import Config, load_config
from server.federation import run_federated
from server.models import phantom_example, predict_images
from server.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, Tracker
from simulations.inprocess import InProcessGrid
from simulations.scenario import build_synthetic_scenario
from strnet.bundle import load_bundle
from strnet.centralized import run_centralized
from strnet.cli import main as cli_main
from tests.tiny import TINY_RUN

pytestmark = pytest.mark.usefixtures("flower_task_identity")
EXPERIMENT = "views"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, flower_task_identity_module: None) -> dict:
    root = tmp_path_factory.mktemp("views")
    scenario = build_synthetic_scenario(root, seed=5, n_patients=16, image_size=64)
    sites = scenario.federation_sites(external="hospital")
    uri = f"sqlite:///{root / 'mlflow.db'}"

    def cfg(mode: str, *extra: str) -> Config:
        return load_config(
            "demo",
            [
                *TINY_RUN,
                "tscore.rounds=0",
                f"federation.sites={json.dumps(sites)}",
                f"output_dir={json.dumps(str(root / mode))}",
                f"data.cache_dir={json.dumps(str(root / 'cache'))}",
                f"tracking.uri={json.dumps(uri)}",
                f"tracking.experiment={EXPERIMENT}",
                *extra,
            ],
        )

    cen = run_centralized(cfg("centralized", "train.epochs=1"), tracker=Tracker(uri, EXPERIMENT), progress=False)
    fed_cfg = cfg("federated", "federation.rounds=1", "federation.local_epochs=1")
    fed = run_federated(InProcessGrid(3), fed_cfg, tracker=Tracker(uri, EXPERIMENT))  # type: ignore[arg-type]
    return {"uri": uri, "root": root, "cen": cen, "fed": fed, "scenario": scenario}


@pytest.fixture(scope="module")
def flower_task_identity_module() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def test_runs_are_named_and_tagged_by_mode_and_the_experiment_opens_the_training_view(runs: dict) -> None:
    mlflow.set_tracking_uri(runs["uri"])
    table = mlflow.search_runs(experiment_names=[EXPERIMENT])
    names = dict(zip(table["tags.mode"], table["tags.mlflow.runName"], strict=True))
    assert names == {"centralized": "demo · centralized", "federated": "demo · federated · fedavg"}
    fed = table[table["tags.mode"] == "federated"].iloc[0]
    assert fed["tags.strategy"] == "fedavg" and fed["tags.sites"] == "hospital,stage1,stage2"
    cen = table[table["tags.mode"] == "centralized"].iloc[0]
    assert cen["tags.sites"] == "stage1,stage2" and len(cen["tags.data_fingerprint"]) == 64
    assert (table["tags.preset"] == "demo").all()
    experiment = MlflowClient().get_experiment_by_name(EXPERIMENT)
    assert experiment.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"


def test_every_site_is_a_dataset_input_with_counts(runs: dict) -> None:
    client = MlflowClient(runs["uri"])
    cen = client.get_run(runs["cen"].run_id).inputs.dataset_inputs
    fed = client.get_run(runs["fed"].run_id).inputs.dataset_inputs

    def by_name(inputs: list) -> dict[str, tuple[str, dict[str, str], str]]:
        return {
            d.dataset.name: (
                {t.key: t.value for t in d.tags}["mlflow.data.context"],
                {t.key: t.value for t in d.tags},
                d.dataset.source_type,
            )
            for d in inputs
        }

    c, f = by_name(cen), by_name(fed)
    assert set(c) == set(f) == {"stage1", "stage2", "hospital"}
    assert (
        {k: v[0] for k, v in c.items()}
        == {k: v[0] for k, v in f.items()}
        == {
            "stage1": "training",
            "stage2": "training",
            "hospital": "evaluation",
        }
    )
    frame = pd.read_csv(runs["scenario"].site_manifests["stage1"], keep_default_na=False)
    for name in ("stage1", "hospital"):
        frame = pd.read_csv(runs["scenario"].site_manifests[name], keep_default_na=False)
        for counts in (c[name][1], f[name][1]):
            assert int(counts["n_rows"]) == len(frame), name
        # a training site's split counts, as the manifest has them, in both modes
        for split in ("train", "val", "test"):
            assert (
                int(c[name][1][f"n_{split}"]) == int((frame["split"] == split).sum()) == int(f[name][1][f"n_{split}"])
            )
    # centralized: the rows' fingerprint (schema and row count in the UI); federated: counts only, no rows
    assert {v[2] for v in c.values()} == {"local"} and {v[2] for v in f.values()} == {"federated_site"}
    assert all(v[1]["digest_of"] == "manifest rows" for v in c.values())
    assert all("counts" in v[1]["digest_of"] for v in f.values())


def test_a_registered_model_predicts_like_its_bundle(runs: dict, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    uri, fed = runs["uri"], runs["fed"]
    common = ["--tracking-uri", uri]
    assert cli_main(["register", "--run-id", fed.run_id, "--name", "screening", "--alias", "champion", *common]) == 0
    assert "models:/screening@champion" in capsys.readouterr().out
    mv = MlflowClient(uri).get_model_version_by_alias("screening", "champion")
    bundle_meta = json.loads((fed.bundle_dir / "metadata.json").read_text())
    assert mv.tags["weights_sha256"] == bundle_meta["weights_sha256"] and mv.tags["mode"] == "federated"

    images = runs["scenario"].site_dirs["hospital"] / "dicom"
    via_bundle, via_registry = tmp_path / "bundle.csv", tmp_path / "registry.csv"
    assert cli_main(["predict", "--model", str(fed.bundle_dir), str(images), "--out", str(via_bundle)]) == 0
    assert (
        cli_main(["predict", "--model", "models:/screening@champion", str(images), "--out", str(via_registry), *common])
        == 0
    )
    a, b = pd.read_csv(via_bundle), pd.read_csv(via_registry)
    assert len(a) > 0 and a["prob_bone_loss"].notna().any()
    pd.testing.assert_frame_equal(a, b)

    # the pyfunc itself, loaded by MLflow, answers the phantom example exactly as the bundle does
    model = mlflow.pyfunc.load_model("models:/screening@champion")
    example = phantom_example(load_bundle(fed.bundle_dir))
    pd.testing.assert_frame_equal(model.predict(example), predict_images(load_bundle(fed.bundle_dir), example))
    assert model.metadata.get_input_schema().input_names() == ["image", "age", "sex", "bmi"]


def test_registry_errors_name_the_problem(runs: dict, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    uri = runs["uri"]
    code = cli_main(
        ["register", "--run-id", runs["cen"].run_id, "--name", "s", "--alias", "best", "--tracking-uri", uri]
    )
    assert code == 2 and "alias 'best'" in capsys.readouterr().err
    out = str(tmp_path / "x.csv")
    code = cli_main(
        ["predict", "--model", "models:/nothing@champion", str(tmp_path), "--out", out, "--tracking-uri", uri]
    )
    assert code == 2 and "models:/nothing@champion" in capsys.readouterr().err
    # a version whose recorded SHA-256 is not its bundle's is refused, naming both
    assert (
        cli_main(
            [
                "register",
                "--mode",
                "centralized",
                "--experiment",
                EXPERIMENT,
                "--name",
                "t",
                "--alias",
                "candidate",
                "--tracking-uri",
                uri,
            ]
        )
        == 0
    )
    MlflowClient(uri).set_model_version_tag("t", "1", "weights_sha256", "0" * 64)
    code = cli_main(["predict", "--model", "models:/t@candidate", str(tmp_path), "--out", out, "--tracking-uri", uri])
    err = capsys.readouterr().err
    assert code == 2 and "SHA-256 mismatch" in err and "0" * 64 in err


def test_subgroups_reach_summary_mlflow_and_the_report_in_both_modes_with_the_same_keys(runs: dict) -> None:
    cen, fed = runs["cen"], runs["fed"]
    cen_summary = json.loads((cen.bundle_dir.parent / "summary.json").read_text())
    fed_summary = json.loads((fed.bundle_dir.parent / "summary.json").read_text())
    rows = cen_summary["subgroups"]["rows"]
    assert {r["variable"] for r in rows} == {"sex", "age band", "BMI band", "source"}
    n_test = int(cen.metrics["test_screening_n"])
    assert sum(r["n"] for r in rows if r["variable"] == "sex") == n_test
    assert all(r["small"] for r in rows)  # a 16-patient test split: every subgroup is small, and says so
    # the federation's table, from the sites' per-level histograms: the same keys, every variable, one source per
    # training site, every knee of the pooled test split in one level of each variable
    fed_rows = fed_summary["subgroups"]["rows"]
    assert set(fed_summary["subgroups"]) == set(cen_summary["subgroups"])
    assert {tuple(sorted(r)) for r in fed_rows} == {tuple(sorted(rows[0]))}
    assert {r["variable"] for r in fed_rows} == {"sex", "age band", "BMI band", "source"}
    assert [r["level"] for r in fed_rows if r["variable"] == "source"] == ["stage1", "stage2"]
    for variable in ("sex", "age band", "BMI band", "source"):
        assert sum(r["n"] for r in fed_rows if r["variable"] == variable) == fed.metrics["test_screening_n"]
    mlflow.set_tracking_uri(runs["uri"])
    for run, expected in ((cen, rows), (fed, fed_rows)):
        logged = mlflow.artifacts.load_dict(f"runs:/{run.run_id}/subgroups.json")
        assert logged["rows"] == expected
    for run in (cen, fed):
        report = (run.bundle_dir.parent / "test_report" / "report.md").read_text(encoding="utf-8")
        assert "Screening by subgroup" in report and "small: n &lt; 30" in report
