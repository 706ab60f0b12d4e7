"""An ensemble of STR-Nets: its outputs, its Grad-CAM, its bundle, and a centralized run that trains one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from configs import load_config
from configs.schema import ConfigError
from strnet.bundle import load_bundle, save_bundle
from strnet.centralized import run_centralized
from strnet.data.preprocess import PreprocessParams
from strnet.ensemble import STRNetEnsemble, build
from strnet.errors import DataError
from strnet.gradcam import grad_cams
from strnet.model import build_strnet
from strnet.run import model_config, recipe
from tests.test_gradcam import QuadrantNet, _image
from tests.test_training import scenario, tiny_config  # noqa: F401 (the module's synthetic scenario)


class _Recording:
    """The tracker interface (:class:`strnet.run.Tracker`), keeping what is logged (MLflow itself is tested in
    test_mlflow_views; here only the names matter)."""

    def __init__(self) -> None:
        self.metrics: list[tuple[dict, int | None]] = []

    def start(self, run_name, tags, params):  # type: ignore[no-untyped-def]
        return "run"

    def log_metrics(self, metrics, step=None):  # type: ignore[no-untyped-def]
        self.metrics.append((dict(metrics), step))

    def log_artifact(self, path, artifact_path=None): ...  # type: ignore[no-untyped-def]
    def log_dict(self, data, name): ...  # type: ignore[no-untyped-def]
    def set_tags(self, tags): ...  # type: ignore[no-untyped-def]
    def log_datasets(self, datasets): ...  # type: ignore[no-untyped-def]
    def log_model(self, bundle_dir, tags): ...  # type: ignore[no-untyped-def]
    def end(self, status="FINISHED"): ...  # type: ignore[no-untyped-def]


def _nets(k: int) -> list:  # type: ignore[type-arg]
    torch.manual_seed(0)
    return [build_strnet(backbone="tiny").eval() for _ in range(k)]


def test_the_output_is_the_mean_of_the_members_calibrated_logits() -> None:
    nets = _nets(3)
    ensemble = STRNetEnsemble(nets).eval()
    platts = [(2.0, -1.0), (0.5, 0.3), (1.2, 4.0)]
    for k, (a, b) in enumerate(platts):
        ensemble.set_member_calibration(k, a, b)
    image, tabular = torch.rand(4, 1, 32, 32), torch.rand(4, 3)
    with torch.no_grad():
        out = ensemble(image, tabular, with_features=True)
        singles = [net(image, tabular) for net in nets]
        neck = nets[0].neck_features(image)
    expected = torch.stack([a * s["screen"] + b for (a, b), s in zip(platts, singles, strict=True)]).mean(0)
    torch.testing.assert_close(out["screen"], expected)
    for key in ("severity", "t_score"):
        torch.testing.assert_close(out[key], torch.stack([s[key] for s in singles]).mean(0))
    torch.testing.assert_close(out["neck"], neck)
    torch.testing.assert_close(ensemble.neck_features(image), neck)


def test_an_ensemble_needs_two_members_and_a_positive_count() -> None:
    with pytest.raises(ValueError, match="two or more"):
        STRNetEnsemble(_nets(1))
    for bad in (0, True, 1.5):
        with pytest.raises(ValueError, match="positive integer"):
            build(members=bad, backbone="tiny")  # type: ignore[arg-type]
    assert isinstance(build(members=2, backbone="tiny"), STRNetEnsemble)


class _Member(QuadrantNet):
    """Grad-CAM's quadrant network with the STR-Net call signature an ensemble uses."""

    def forward(self, image, tabular, *, with_features=False):  # type: ignore[no-untyped-def, override]
        return super().forward(image, tabular)


def test_grad_cam_of_an_ensemble_sees_every_member_it_listens_to() -> None:
    """A member whose calibration slope is 0 adds nothing to the combined logit, so the ensemble's map is then
    exactly the other member's own map — whichever member that is."""
    image = torch.maximum(_image((0, 0)), _image((1, 1)))
    tabular = torch.zeros(1, 3)
    quadrants = [(0, 0), (1, 1)]
    ensemble = STRNetEnsemble([_Member(q) for q in quadrants]).eval()  # type: ignore[misc]
    for heard, quadrant in enumerate(quadrants):
        for k in range(2):
            ensemble.set_member_calibration(k, float(k == heard), 0.0)
        combined = grad_cams(ensemble, image, tabular, layer=ensemble.gradcam_layer)[0]
        alone = grad_cams(_Member(quadrant).eval(), image, tabular)[0]
        assert combined.max() == pytest.approx(1.0)
        np.testing.assert_allclose(combined, alone, atol=1e-6)


def test_a_bundle_of_an_ensemble_loads_with_its_calibrations(tmp_path: Path) -> None:
    ensemble = STRNetEnsemble(_nets(2)).eval()
    ensemble.set_member_calibration(1, 0.7, -2.0)
    bundle = save_bundle(
        tmp_path / "bundle",
        state_dict=ensemble.state_dict(),
        model_config={"backbone": "tiny", "members": 2},
        preprocess=PreprocessParams(size=32),
        threshold={"value": 0.5, "rule": "test"},
        training={},
    )
    loaded = load_bundle(bundle).model
    assert isinstance(loaded, STRNetEnsemble)
    torch.testing.assert_close(loaded.member_calibration, torch.tensor([[1.0, 0.0], [0.7, -2.0]]))
    image, tabular = torch.rand(2, 1, 32, 32), torch.rand(2, 3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(image, tabular)["screen"], ensemble(image, tabular)["screen"])
    # metadata edited to another member count: the weights no longer fit, and the error names the file
    meta = json.loads((bundle / "metadata.json").read_text())
    (bundle / "metadata.json").write_text(json.dumps(meta | {"model": meta["model"] | {"members": 3}}))
    with pytest.raises(DataError, match=r"model\.pt.*do not fit the model metadata\.json describes \(tiny, 3"):
        load_bundle(bundle)


def test_members_are_checked_and_a_federation_serves_one_network() -> None:
    for bad in ("0", "true"):
        with pytest.raises(ConfigError, match=r"model\.members"):
            load_config("demo", [f"model.members={bad}"])
    with pytest.raises(ConfigError, match="privacy budget"):
        load_config("demo", ["model.members=2", "privacy.dp.enabled=true"])
    cfg = load_config("demo", ["model.backbone=tiny", "model.members=3"])
    one = model_config(load_config("demo", ["model.backbone=tiny"]))
    assert model_config(cfg)["members"] == 3
    assert model_config(cfg)["trainable_params"] == 3 * one["trainable_params"]
    assert model_config(cfg, "federated")["members"] == 1
    assert model_config(cfg, "federated")["trainable_params"] == one["trainable_params"]
    assert recipe(cfg, "centralized")["members"].startswith("3 networks (seeds 42-44)")
    assert "applies to centralized runs" in recipe(cfg, "federated")["members"]


@pytest.mark.slow
def test_a_centralized_ensemble_is_its_members_runs_combined(scenario, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    """Member 2 is exactly the one-network run with seed 43 (weights, kept epoch); its calibration is the Platt
    fit of that run's validation logits; the tracker gets its curve as ``member.2.history/…``; a resumed finished run
    trains nothing more."""
    tracker = _Recording()
    stop_early = {"train.epochs": "4", "train.early_stop_patience": "1"}
    result = run_centralized(
        tiny_config(tmp_path / "ens", scenario.manifest, **{"model.members": "2"}, **stop_early),
        tracker=tracker,
        progress=False,
    )
    single = run_centralized(
        tiny_config(tmp_path / "one", scenario.manifest, seed="43", **stop_early), tracker=None, progress=False
    )
    bundle, alone = load_bundle(result.bundle_dir), load_bundle(single.bundle_dir)
    assert isinstance(bundle.model, STRNetEnsemble)
    meta = json.loads((result.bundle_dir / "metadata.json").read_text())
    members = meta["training"]["members"]
    assert [m["seed"] for m in members] == [42, 43] and meta["model"]["members"] == 2
    second = bundle.model.members[1].state_dict()
    for key, value in alone.model.state_dict().items():
        torch.testing.assert_close(second[key], value, rtol=0, atol=0)
    assert members[1]["best_step"] == single.metrics["best_step"]

    # its calibration is the one the seed-43 run fitted on the same validation logits
    a, b = bundle.model.member_calibration[1].tolist()
    assert (a, b) == pytest.approx((alone.calibration.a, alone.calibration.b), rel=1e-5)
    assert members[1]["calibration"]["a"] == pytest.approx(a) and members[1]["calibration"]["b"] == pytest.approx(b)

    curve = [step for metrics, step in tracker.metrics if "member.2.history/val_screening_auprc" in metrics]
    assert curve == list(range(1, members[1]["epochs_run"] + 1))
    assert not any(k.startswith("member.1.") for metrics, _ in tracker.metrics for k in metrics)

    again = run_centralized(
        tiny_config(tmp_path / "ens", scenario.manifest, **{"model.members": "2"}, **stop_early),
        resume=True,
        progress=False,
    )
    resumed = json.loads((again.bundle_dir / "metadata.json").read_text())
    assert [m["epochs_run"] for m in resumed["training"]["members"]] == [m["epochs_run"] for m in members]
    assert resumed["weights_sha256"] == meta["weights_sha256"]
