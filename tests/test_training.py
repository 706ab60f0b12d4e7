"""Centralized pipeline on a tiny synthetic scenario: train -> τ* -> bundle -> evaluate -> predict -> MLflow."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from configs import load_config
from server.tracking import Tracker, search_runs
from simulations.scenario import build_synthetic_scenario
from strnet import metrics as M
from strnet.bundle import Bundle, load_bundle
from strnet.centralized import run_centralized
from strnet.cli import main as cli_main
from strnet.errors import DataError
from strnet.evaluation import evaluate_bundle, predict_frame
from strnet.predict import predict_files


def tiny_config(root: Path, manifest: Path, **extra: str):  # type: ignore[no-untyped-def]
    overrides = [
        f"data.manifests=[{manifest}]",
        f"data.cache_dir={root / 'cache'}",
        f"output_dir={root / 'run'}",
        "model.backbone=tiny",
        "preprocess.size=48",
        "train.epochs=2",
        "train.batch_size=8",
        "train.lr=0.001",
        "loss.warmup_epochs=1",
        "evaluate.bootstrap=50",
        "evaluate.figures=false",
        "train.precision=fp32",
        *[f"{k}={v}" for k, v in extra.items()],
    ]
    return load_config("demo", overrides)


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return build_synthetic_scenario(tmp_path_factory.mktemp("scenario"), seed=3, n_patients=14, image_size=64)


@pytest.fixture(scope="module")
def trained(scenario, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("train")
    cfg = tiny_config(root, scenario.manifest)
    tracker = Tracker(uri=f"sqlite:///{root / 'mlflow.db'}", experiment="test")
    result = run_centralized(cfg, tracker=tracker, progress=False)
    return root, cfg, result, tracker


def test_training_writes_bundle_with_frozen_threshold(trained) -> None:  # type: ignore[no-untyped-def]
    root, _cfg, result, _ = trained
    meta = json.loads((result.bundle_dir / "metadata.json").read_text())
    assert meta["threshold"]["value"] == result.threshold["value"]
    assert 0.2 <= meta["threshold"]["value"] <= 0.8
    assert meta["threshold"]["rule"] in (M.RULE_CONSTRAINED, M.RULE_FALLBACK)
    assert meta["model"]["backbone"] == "tiny" and meta["preprocess"]["size"] == 48
    assert meta["training"]["data"]["fingerprint"]
    assert meta["training"]["audit"]["cross_split_groups"] == 0
    assert meta["training"]["audit"]["n_images"] == len(set(pd.read_csv(_cfg.data.manifests[0])["path"]))
    assert (root / "run" / "checkpoint.pt").exists()
    assert (root / "run" / "test_report" / "report.html").exists()
    assert len(result.history) == 2


def test_same_seed_gives_same_metrics(scenario, trained, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The same seed again, this time drawing the figures (``evaluate.figures``), which change nothing else."""
    root, _, first, _ = trained
    cfg = tiny_config(tmp_path, scenario.manifest, **{"evaluate.figures": "true"})
    again = run_centralized(cfg, tracker=None, progress=False)
    a = [h["train_loss_total"] for h in first.history]
    b = [h["train_loss_total"] for h in again.history]
    assert a == pytest.approx(b, rel=1e-6)
    assert again.threshold["value"] == first.threshold["value"]
    assert not list((root / "run").rglob("*.png"))
    drawn = {p.relative_to(tmp_path / "run").as_posix() for p in (tmp_path / "run").rglob("*.png")}
    assert {"figures/learning_curve.png", "figures/test_roc.png", "test_report/figures/roc.png"} <= drawn, drawn
    off, on = (json.loads((d / "summary.json").read_text())["metrics"] for d in (root / "run", tmp_path / "run"))
    clock = ("seconds", "per_s")  # timings differ from run to run
    assert {k: v for k, v in off.items() if not k.endswith(clock)} == {
        k: v for k, v in on.items() if not k.endswith(clock)
    }
    reports = [(d / "test_report" / "report.md").read_text() for d in (root / "run", tmp_path / "run")]
    assert "roc.png" in reports[1] and "roc.png" not in reports[0]


class _Payload:
    """What a tampered checkpoint could carry: unpickling it would run code (here: create a file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (self.marker,))


def test_a_tampered_checkpoint_is_refused_without_running_its_code(scenario, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg = tiny_config(tmp_path / "run", scenario.manifest, **{"train.epochs": "1"})
    marker = tmp_path / "pwned"
    checkpoint = Path(cfg.output_dir) / "checkpoint.pt"
    checkpoint.parent.mkdir(parents=True)
    torch.save({"model": {}, "epoch": 0, "history": [_Payload(marker)]}, checkpoint)
    with pytest.raises(DataError, match=r"checkpoint\.pt.*not a plain-data checkpoint"):
        run_centralized(cfg, resume=True, progress=False)
    assert not marker.exists()


def test_resume_continues_from_checkpoint(scenario, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    full = run_centralized(tiny_config(tmp_path / "full", scenario.manifest, **{"train.epochs": "3"}), progress=False)
    part = tiny_config(tmp_path / "part", scenario.manifest, **{"train.epochs": "2"})
    run_centralized(part, progress=False)
    resumed = run_centralized(
        tiny_config(tmp_path / "part", scenario.manifest, **{"train.epochs": "3"}), resume=True, progress=False
    )
    assert len(resumed.history) == 3
    assert resumed.history[-1]["train_loss_total"] == pytest.approx(full.history[-1]["train_loss_total"], rel=1e-5)


def test_evaluate_matches_sklearn_on_same_predictions(scenario, trained, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, _, result, _ = trained
    bundle = load_bundle(result.bundle_dir)
    df = pd.read_csv(scenario.manifest, keep_default_na=False)
    from strnet.data.manifest import read_manifest

    test = read_manifest(scenario.manifest)
    test = test[test["split"] == "test"].reset_index(drop=True)
    ev = evaluate_bundle(bundle, test, tmp_path / "eval", cache=None, n_boot=50, seed=1, n_bins=1000)
    pred = pd.read_csv(tmp_path / "eval" / "predictions.csv", keep_default_na=False)
    y = (pred["label_cls"] != "normal").astype(int).to_numpy()
    p = pred["prob_bone_loss"].astype(float).to_numpy()
    scr = {k[len("screening_") :]: v for k, v in ev.metrics.items() if k.startswith("screening_")}
    assert scr["auroc"] == pytest.approx(roc_auc_score(y, p))
    assert scr["auprc"] == pytest.approx(average_precision_score(y, p))
    flag = p >= bundle.threshold
    assert scr["sensitivity"] == pytest.approx(flag[y == 1].mean())
    assert scr["specificity"] == pytest.approx((~flag[y == 0]).mean())
    for name in ("roc", "pr", "confusion", "histogram", "reliability"):
        assert ev.figures[name].stat().st_size > 0
    assert len(df) > len(test)


def test_each_site_reports_how_the_model_fits_its_own_training_split(trained) -> None:  # type: ignore[no-untyped-def]
    """The standing fit metric: the frozen model on each site's un-augmented training knees, against sklearn, in
    the summary and in MLflow under the one name both modes use."""
    from strnet.data.manifest import read_manifest

    _, cfg, result, tracker = trained
    train = read_manifest(cfg.data.manifests[0])
    train = train[train["split"] == "train"].reset_index(drop=True)
    pred = predict_frame(load_bundle(result.bundle_dir), train, cache=None, precision="fp32", progress=False)
    summary = json.loads((result.bundle_dir.parent / "summary.json").read_text())
    runs = search_runs(tracker.uri, "test")
    logged = runs[runs["run_id"] == result.run_id].iloc[0]
    # a training site is reported where it has a test split (the tiny synthetic hospital may have none)
    reported = sorted(s for s, r in result.sites.items() if r.fit)
    assert reported == sorted(s for s, r in result.sites.items() if r.role == "train") and reported
    for site, part in pred[pred["site"].isin(reported)].groupby("site"):
        y = (part["label_cls"] != "normal").to_numpy(int)
        p = part["prob_bone_loss"].to_numpy(float)
        fit = result.sites[site].fit
        assert fit["screening_n"] == len(part)
        assert fit["screening_auroc"] == pytest.approx(roc_auc_score(y, p), abs=1e-6)
        assert fit["screening_auprc"] == pytest.approx(average_precision_score(y, p), abs=1e-6)
        assert summary["sites"][site]["train_screening_auroc"] == pytest.approx(fit["screening_auroc"])
        assert logged[f"metrics.site.{site}.train_screening_auroc"] == pytest.approx(fit["screening_auroc"])


def test_a_run_records_the_precision_and_hardware_it_ran_at(trained) -> None:  # type: ignore[no-untyped-def]
    """bf16 and fp32 runs of one recipe and seed are different networks, and kinds of CPU round differently:
    the summary, the bundle and MLflow say which precision and host a run had, so two runs can be told apart."""
    from strnet.engine import cpu_has_native_bf16, precision_words

    _, cfg, result, tracker = trained
    summary = json.loads((result.bundle_dir.parent / "summary.json").read_text())
    env = summary["environment"]
    assert env["torch"] == torch.__version__ and env["torch_threads"] == torch.get_num_threads()
    assert env["native_bf16"] == cpu_has_native_bf16() and env["cpu"]
    assert summary["recipe"]["precision"] == "fp32" == precision_words(cfg.train.precision, torch.device("cpu"))
    meta = json.loads((result.bundle_dir / "metadata.json").read_text())
    assert meta["training"]["environment"] == env
    logged = search_runs(tracker.uri, "test").set_index("run_id").loc[result.run_id]
    assert logged["tags.recipe.precision"] == "fp32" and logged["tags.env.cpu"] == env["cpu"]
    assert logged["tags.env.native_bf16"] == str(env["native_bf16"])


@pytest.mark.parametrize("native", [True, False])
def test_precision_words_say_what_auto_resolved_to(monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    from strnet import engine

    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda: native)
    cpu = torch.device("cpu")
    words = engine.precision_words("auto", cpu)
    assert words == (
        "bf16 autocast (auto: native bf16 on this CPU)" if native else "fp32 (auto: no native bf16 on this CPU)"
    )
    assert (engine.autocast_dtype("auto", cpu) is torch.bfloat16) == native
    assert engine.precision_words("fp32", cpu) == "fp32" and engine.precision_words("bf16", cpu) == "bf16 autocast"


def test_a_bundle_is_served_at_the_precision_its_threshold_was_chosen_at(
    scenario, trained, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """The run pinned fp32 and chose τ* on fp32 probabilities; where ``auto`` means bf16 (a CPU with native bf16),
    serving must still be fp32 unless asked otherwise, or knees near τ* change flags (5 of 333 real knees did)."""
    from strnet import engine

    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda: True)
    _, cfg, result, _ = trained
    bundle = load_bundle(result.bundle_dir)
    assert bundle.precision == cfg.train.precision == "fp32"
    rows = pd.read_csv(scenario.manifest).head(8)
    served = predict_frame(bundle, rows, cache=None, progress=False)["prob_bone_loss"]
    fp32 = predict_frame(bundle, rows, cache=None, precision="fp32", progress=False)["prob_bone_loss"]
    bf16 = predict_frame(bundle, rows, cache=None, precision="auto", progress=False)["prob_bone_loss"]
    np.testing.assert_array_equal(served, fp32)
    assert not np.array_equal(served, bf16)  # auto really is bf16 here: the default is what changed
    legacy = Bundle(bundle.model, {k: v for k, v in bundle.metadata.items() if k != "training"})
    assert legacy.precision == "auto"  # a bundle that records no run config is served as before


def test_tampered_bundle_is_refused(trained, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, _, result, _ = trained
    copy = tmp_path / "bundle"
    shutil.copytree(result.bundle_dir, copy)
    with (copy / "model.pt").open("ab") as fh:
        fh.write(b"\0")
    with pytest.raises(DataError, match="SHA-256 mismatch"):
        load_bundle(copy)


def test_predict_survives_broken_files(scenario, trained, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, _, result, _ = trained
    folder = tmp_path / "inbox"
    shutil.copytree(scenario.site_dirs["hospital"] / "dicom", folder)
    good = sorted(folder.glob("*.dcm"))
    (folder / "truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 50)
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"garbage")
    out = predict_files(load_bundle(result.bundle_dir), [folder], gradcam_dir=tmp_path / "cam")
    ok = out[out["status"] == "ok"]
    errors = out[out["status"] == "error"].set_index(out[out["status"] == "error"]["file"].map(lambda s: Path(s).name))
    assert len(ok) == len(good)
    assert set(errors.index) == {"truncated.jpg", "notes.txt", "broken.dcm"}
    assert all(errors["error"].str.len() > 0)
    assert ((ok["flag_bone_loss"] == 1) == (ok["prob_bone_loss"] >= ok["threshold"])).all()
    assert all(Path(p).exists() for p in ok["gradcam"])
    film = ok.groupby("file")["prob_bone_loss"].transform("mean")  # a film's answer: the mean of its knees
    np.testing.assert_allclose(ok["radiograph_prob_bone_loss"].astype(float), film)
    assert ((ok["radiograph_flag_bone_loss"] == 1) == (film >= ok["threshold"])).all()
    assert (errors["radiograph_flag_bone_loss"] == "").all()
    # PACS identifiers travel from the DICOM tags into every row of that file, and are empty for other files
    for _, row in ok.iterrows():
        ds = pydicom.dcmread(row["file"], stop_before_pixels=True)
        assert (row["study_instance_uid"], row["sop_instance_uid"]) == (ds.StudyInstanceUID, ds.SOPInstanceUID)
        assert (row["accession_number"], row["laterality"]) == (ds.AccessionNumber, ds.ImageLaterality)
    assert (errors.loc[["truncated.jpg", "notes.txt"], "sop_instance_uid"] == "").all()


def test_mlflow_holds_the_run(trained) -> None:  # type: ignore[no-untyped-def]
    _root, _, result, tracker = trained
    runs = search_runs(tracker.uri, "test")
    run = runs[runs["run_id"] == result.run_id].iloc[0]
    assert run["tags.mode"] == "centralized"
    assert run["metrics.tau_star"] == pytest.approx(result.threshold["value"])
    assert not math.isnan(run["metrics.test_screening_auroc"])
    assert run["params.train.epochs"] == "2"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracker.uri)
    names = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"bundle", "test_report"} <= names


def test_cli_train_evaluate_predict(scenario, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    base = [
        f"--set=data.cache_dir={tmp_path / 'cache'}",
        "--set=model.backbone=tiny",
        "--set=preprocess.size=32",
        "--set=train.epochs=1",
        "--set=evaluate.bootstrap=20",
    ]
    rc = cli_main(
        [
            "train",
            "--config",
            "demo",
            "--manifest",
            str(scenario.manifest),
            "--output-dir",
            str(tmp_path / "r"),
            "--no-tracking",
            *base,
        ]
    )
    assert rc == 0
    bundle = tmp_path / "r" / "bundle"
    assert (
        cli_main(["evaluate", "--model", str(bundle), "--manifest", str(scenario.manifest), "--bootstrap", "20"]) == 0
    )
    out = tmp_path / "pred.csv"
    assert cli_main(["predict", "--model", str(bundle), str(scenario.site_dirs["stage1"]), "--out", str(out)]) == 0
    assert len(pd.read_csv(out)) > 0
    assert np.isfinite(pd.read_csv(out)["prob_bone_loss"]).all()


def test_evaluate_without_labels_gives_predictions_only(scenario, trained, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from strnet.data.manifest import read_manifest

    _, _, result, _ = trained
    df = read_manifest(scenario.site_manifests["hospital"]).head(6)
    df["label_cls"] = ""
    df["t_score"] = float("nan")
    ev = evaluate_bundle(
        load_bundle(result.bundle_dir), df, tmp_path / "unlabelled", cache=None, n_boot=10, seed=1, n_bins=1000
    )
    assert ev.n_labelled == 0 and ev.metrics["screening_n"] == 0 and np.isnan(ev.metrics["screening_auroc"])
    pred = pd.read_csv(tmp_path / "unlabelled" / "predictions.csv")
    assert len(pred) == 6 and pred["prob_bone_loss"].between(0, 1).all()
    assert "no labels" in (tmp_path / "unlabelled" / "report.md").read_text()


def test_predict_uses_clinical_csv_and_rejects_a_bad_one(scenario, trained, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, _, result, _ = trained
    bundle = load_bundle(result.bundle_dir)
    files = sorted((scenario.site_dirs["hospital"] / "dicom").glob("*.dcm"))[:2]
    clinical = tmp_path / "clinical.csv"
    pd.DataFrame({"file": [f.name for f in files], "Age": [80, 30], "sex": ["female", "M"], "BMI": [18, 35]}).to_csv(
        clinical, index=False
    )
    with_info = predict_files(bundle, files, clinical_csv=clinical)
    without = predict_files(bundle, files)
    # the T-score branch reads age/sex/BMI; the screening head does not
    assert not np.allclose(with_info["t_score_estimate"], without["t_score_estimate"])
    np.testing.assert_allclose(with_info["prob_bone_loss"], without["prob_bone_loss"])
    bad = tmp_path / "bad.csv"
    bad.write_text("name,age\nx,1\n")
    with pytest.raises(DataError, match="needs a 'file' column"):
        predict_files(bundle, files, clinical_csv=bad)


def test_reports_are_strict_json(trained) -> None:  # type: ignore[no-untyped-def]
    """NaN metrics (undefined AUROC) must be null, not the non-standard NaN token browsers reject."""
    root, _, _, _ = trained

    def reject(token: str) -> None:
        raise ValueError(f"non-standard JSON token {token}")

    for path in [root / "run" / "summary.json", root / "run" / "test_report" / "metrics.json"]:
        json.loads(path.read_text(), parse_constant=reject)


def test_source_label_balance_draws_every_cell_equally_and_reproducibly() -> None:
    import torch

    from strnet.engine import balance_weights

    df = pd.DataFrame(
        {
            "source": ["a"] * 80 + ["b"] * 20,
            "label_cls": ["normal"] * 10 + ["osteopenia"] * 70 + ["normal"] * 15 + ["osteoporosis"] * 5,
        }
    )
    w = balance_weights(df)
    cells = df["source"] + "|" + (df["label_cls"] == "normal").map({True: "n", False: "b"})
    shares = pd.Series(w.numpy()).groupby(cells.to_numpy()).sum()
    np.testing.assert_allclose(shares.to_numpy(), 1.0)  # each of the four cells weighs the same in total
    draw = [
        list(torch.utils.data.WeightedRandomSampler(w, 4000, generator=torch.Generator().manual_seed(3)))
        for _ in range(2)
    ]
    assert draw[0] == draw[1]
    drawn = cells.to_numpy()[draw[0]]
    assert all(abs((drawn == c).mean() - 0.25) < 0.03 for c in set(cells))


def test_predict_decodes_each_file_once_and_serves_what_evaluation_serves(
    scenario, trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """One decode per file feeds the image checks, the model, the OOD score and the Grad-CAM; the numbers are the
    ones the manifest path (KneeDataset decoding the file itself, a separate fp32 feature pass) gives."""
    import strnet.predict as P
    from strnet.data.dataset import KneeDataset
    from strnet.evaluation import predict_frame
    from strnet.ood import OODModel, extract_features

    _, _, result, _ = trained
    bundle = load_bundle(result.bundle_dir)
    assert bundle.metadata.get("ood"), "the tiny run fits an OOD model"
    files = sorted((scenario.site_dirs["hospital"] / "dicom").glob("*.dcm"))
    calls: list[str] = []
    real = P.decode_radiograph
    monkeypatch.setattr(P, "decode_radiograph", lambda p: calls.append(str(p)) or real(p))
    out = predict_files(bundle, files, gradcam_dir=tmp_path / "cam", precision="fp32")
    assert sorted(calls) == sorted(map(str, files))
    ok = out[out["status"] != "error"].reset_index(drop=True)
    assert all(Path(p).exists() for p in ok.loc[ok["status"] == "ok", "gradcam"])

    manifest = pd.DataFrame({"path": ok["file"], "side": ok["side"]})
    reference = predict_frame(bundle, manifest, cache=None, precision="fp32", progress=False)
    judged = ok["status"] == "ok"
    np.testing.assert_allclose(
        ok.loc[judged, "prob_bone_loss"].astype(float), reference.loc[judged, "prob_bone_loss"], atol=1e-5
    )
    ood = OODModel.from_dict(bundle.metadata["ood"])
    features = extract_features(bundle.model, KneeDataset(manifest, bundle.preprocess, None))
    np.testing.assert_allclose(ok["ood_score"].astype(float), ood.scores(features), rtol=1e-4)


def _fit_tiny(cfg, manifest: Path, **kw):  # type: ignore[no-untyped-def]
    from configs.schema import build_model
    from strnet.centralized import fit_config
    from strnet.engine import split_frames

    torch.manual_seed(0)
    frames = split_frames(pd.read_csv(manifest))
    return fit_config(cfg, build_model(cfg), frames, cache=None, device=torch.device("cpu"), progress=False, **kw)


def test_ema_keeps_the_moving_average_of_every_step(scenario, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The kept state is d·EMA + (1 − d)·w after each optimizer step, weights and BatchNorm statistics alike,
    taken at the best epoch; validation scores that EMA copy, not the raw weights."""
    import strnet.engine as E

    decay = 0.6
    snapshots: list[dict[str, torch.Tensor]] = []
    ends: list[int] = []
    real_train = E.train_one_epoch

    class Recording(E.AveragedModel):
        def update_parameters(self, model: torch.nn.Module) -> None:
            snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            super().update_parameters(model)

    monkeypatch.setattr(
        E, "weight_average", lambda m, d: Recording(m, multi_avg_fn=E.get_ema_multi_avg_fn(d), use_buffers=True)
    )
    monkeypatch.setattr(E, "train_one_epoch", lambda *a, **k: (real_train(*a, **k), ends.append(len(snapshots)))[0])
    cfg = tiny_config(tmp_path, scenario.manifest, **{"train.epochs": "3", "train.ema_decay": str(decay)})
    result = _fit_tiny(cfg, scenario.manifest)
    steps = ends[result.best_epoch - 1]
    assert steps >= 2
    for key, value in result.best_state.items():
        if not value.is_floating_point():
            continue
        expected = snapshots[0][key].double()
        for snap in snapshots[1:steps]:
            expected = decay * expected + (1 - decay) * snap[key].double()
        np.testing.assert_allclose(value.double().numpy(), expected.numpy(), rtol=1e-4, atol=1e-6, err_msg=key)
    raw = snapshots[steps - 1]
    assert any(not torch.allclose(v, raw[k]) for k, v in result.best_state.items() if v.is_floating_point())


def test_ema_decay_outside_the_unit_interval_is_refused(scenario, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from strnet.errors import ConfigError

    with pytest.raises(ConfigError, match="ema_decay"):
        tiny_config(tmp_path, scenario.manifest, **{"train.ema_decay": "1.0"})


def test_the_summary_carries_the_monitored_auroc_of_the_kept_step(trained) -> None:  # type: ignore[no-untyped-def]
    """The pooled validation AUROC the schedule chose its step by, beside the bundle's own: in the summary and in
    MLflow, read from the history row of the kept epoch."""
    _, _, result, tracker = trained
    summary = json.loads((result.bundle_dir.parent / "summary.json").read_text())
    kept = int(summary["metrics"]["best_step"])
    row = next(r for r in result.history if int(r["step"]) == kept)
    assert summary["metrics"]["val_monitored_screening_auroc"] == pytest.approx(row["val_screening_auroc"])
    runs = search_runs(tracker.uri, "test")
    logged = runs[runs["run_id"] == result.run_id].iloc[0]
    assert logged["metrics.val_monitored_screening_auroc"] == pytest.approx(row["val_screening_auroc"])


def test_a_bundle_validating_below_its_kept_step_is_a_problem() -> None:
    """The model served must be the one validated: FedBN's bundle fell up to 0.12 below the monitored AUROC."""
    from strnet.run import SHIPPED_AUROC_DROP, monitored_auroc, shipped_problem

    history = [{"step": 1.0, "val_screening_auroc": 0.70}, {"step": 2.0, "val_screening_auroc": 0.86}]
    assert monitored_auroc(history, 2) == 0.86 and np.isnan(monitored_auroc(history, 3))
    real = {"screening_n_pos": 40.0, "screening_n_neg": 20.0}  # the real data's pooled validation split
    text = shipped_problem(0.86, real | {"screening_auroc": 0.75}, 2)
    assert text is not None and "0.750 is 0.110 below the 0.860" in text and "step 2" in text
    assert shipped_problem(0.86, real | {"screening_auroc": 0.86 - SHIPPED_AUROC_DROP + 1e-9}, 2) is None
    assert shipped_problem(0.86, real | {"screening_auroc": 0.95}, 2) is None  # an ensemble or the mirror may add
    assert shipped_problem(float("nan"), real | {"screening_auroc": 0.5}, 2) is None  # no kept row
    # 6 x 2 validation cases: 0.083 is one swapped pair of 12, not a different model
    assert shipped_problem(0.583, {"screening_n_pos": 6.0, "screening_n_neg": 2.0, "screening_auroc": 0.5}, 1) is None


def test_an_image_t_score_target_trains_and_the_bundle_serves_the_paper_network(scenario, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """With loss.t_score_image the run logs the term and ships a bundle without the training-only head, which
    predicts like the model it validated."""
    cfg = tiny_config(tmp_path, scenario.manifest, **{"loss.t_score_image": "0.3"})
    tracker = Tracker(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="test")
    result = run_centralized(cfg, tracker=tracker, progress=False)
    state = torch.load(result.bundle_dir / "model.pt", weights_only=True)
    assert state and not any("image_tscore_head" in k for k in state)
    bundle = load_bundle(result.bundle_dir)
    assert bundle.model.image_tscore_head is None
    assert all(np.isfinite(h["train_loss_t_score_image"]) for h in result.history)
    test = pd.read_csv(scenario.manifest).query("split == 'test'")
    pred = predict_frame(bundle, test, cache=None, precision="fp32", progress=False)
    assert pred["prob_bone_loss"].between(0, 1).all() and pred["t_score_estimate"].notna().all()


def test_a_federation_records_what_each_training_site_trained_at() -> None:
    """A deployed site resolves ``auto`` on its own CPU: the recipe takes each training site's report, not the
    coordinator's host, and names the sites when they differ."""
    from strnet.run import sites_precision_words

    def site(role: str, bf16: int | None, native: int = 0) -> dict:
        return {"role": role, "n_rows": 5} | ({} if bf16 is None else {"bf16_autocast": bf16, "native_bf16": native})

    same = {"a": site("train", 0), "b": site("train", 0), "ext": site("external", 1, 1)}
    assert sites_precision_words("fp32", same) == "fp32 at every training site"
    mixed = {"a": site("train", 1, 1), "b": site("train", 0, 0), "ext": site("external", 0)}
    assert sites_precision_words("auto", mixed) == (
        "a: bf16 autocast (auto: native bf16 on the site's CPU); b: fp32 (auto: no native bf16 on the site's CPU)"
    )
    # a site on an older release that does not report its precision is named, not guessed
    assert sites_precision_words("auto", {"a": site("train", 1, 1), "b": site("train", None)}).endswith(
        "b: not reported"
    )
    with pytest.raises(ValueError, match="no training site"):
        sites_precision_words("fp32", {"ext": site("external", 0)})


def test_a_bilateral_consistency_term_scores_each_knees_partner_in_the_same_pass(scenario, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """loss.bilateral: the training step runs the drawn knees' film partners with them, and the partners' logits
    are what the network gives those images (checked in eval mode, where BatchNorm reads no batch statistics)."""
    from strnet.data.dataset import partner_indices
    from strnet.engine import _forward, make_loader
    from strnet.errors import ConfigError
    from strnet.model import build_strnet

    rows = pd.read_csv(scenario.manifest).query("split == 'train'").reset_index(drop=True)
    assert (partner_indices(rows) >= 0).sum() >= 4, "the scenario should hold bilateral training films"
    cfg = tiny_config(tmp_path, scenario.manifest)
    loader = make_loader(rows, cfg.preprocess, None, batch_size=16, augment=None, shuffle=False, seed=0, partners=True)
    batch = next(iter(loader))
    model = build_strnet(backbone="tiny", weights="none").eval()
    with torch.no_grad():
        out = _forward(model, batch, torch.device("cpu"), None, channels_last=False)
        alone = model(batch["image"], batch["tabular"])["screen"]
        has = batch["has_partner"]
        partner = model(batch["partner_image"][has], batch["tabular"][has])["screen"]
    torch.testing.assert_close(out["screen"], alone)
    torch.testing.assert_close(out["screen_partner"], partner)
    assert int(has.sum()) == len(partner) > 0
    # a whole run with the term logs it and trains
    cfg = tiny_config(tmp_path / "run", scenario.manifest, **{"loss.bilateral": "0.5"})
    result = run_centralized(cfg, tracker=None, progress=False)
    assert all(np.isfinite(h["train_loss_screen_partner"]) for h in result.history)
    assert any(h["train_loss_screen_partner"] > 0 for h in result.history)
    with pytest.raises(ConfigError, match=r"loss\.bilateral"):
        load_config("demo", ["loss.bilateral=0.1", "privacy.dp.enabled=true"])
