"""DP-SGD (Opacus): the per-case model and loss, ε against a fresh accountant after N rounds/epochs, the
accountant kept across rounds and a restart, ε in the bundle and MLflow, and the settings DP-SGD refuses."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.grad_sample import GradSampleModule
from opacus.validators import ModuleValidator

from client.kept import KeptState
from configs.schema import load_config
from server.compare import comparison_table
from server.federation import run_federated
from server.tracking import Tracker, search_runs
from simulations.inprocess import InProcessGrid
from simulations.scenario import build_synthetic_scenario
from strnet.centralized import run_centralized
from strnet.errors import ConfigError
from strnet.losses import LossWeights, MultiTaskLoss
from strnet.model import batchnorm_keys, build_strnet, freeze_early_stages, per_case_form
from strnet.privacy import DPParams, PrivateTraining, noise_multiplier, sample_rate
from tests.test_federation import ServerStopped, StoppingGrid, _overrides
from tests.test_training import tiny_config

NAN = float("nan")


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return build_synthetic_scenario(tmp_path_factory.mktemp("dp"), seed=42, n_patients=20, image_size=64)


@pytest.mark.parametrize("norm", ["group", "frozen"])
@pytest.mark.parametrize("backbone", ["tiny", "resnet18", "efficientnet_lite0"])
def test_per_case_forms_are_what_opacus_accepts(backbone: str, norm: str) -> None:
    plain, per_case = build_strnet(backbone=backbone), build_strnet(backbone=backbone, norm=norm)
    assert ModuleValidator.validate(plain, strict=False)  # BatchNorm: refused as it is
    assert ModuleValidator.validate(per_case, strict=False) == []
    assert not batchnorm_keys(per_case)
    # everything but the norm layers keeps its name, so the trunk's pretrained convolutions load unchanged
    assert set(plain.state_dict()) - batchnorm_keys(plain) <= set(per_case.state_dict())
    out = per_case(torch.randn(2, 1, 64, 64), torch.zeros(2, 3))
    assert {k: tuple(v.shape) for k, v in out.items()} == {"screen": (2,), "severity": (2,), "t_score": (2,)}


def test_frozen_form_keeps_the_pretrained_batchnorm_as_a_per_case_map() -> None:
    """``frozen`` computes exactly what the BatchNorm model computes in eval mode, in training mode too."""
    torch.manual_seed(0)
    plain = build_strnet(backbone="resnet18")
    plain.train()
    plain(torch.randn(8, 1, 64, 64), torch.zeros(8, 3))  # move the running statistics off their defaults
    plain.eval()
    frozen = per_case_form(plain, "frozen").train()
    x = torch.randn(3, 1, 64, 64)
    frozen.neck[2].p = 0.0  # dropout off, to compare
    torch.testing.assert_close(frozen.neck_features(x), plain.neck_features(x))


def _batch() -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    images, tabular = torch.randn(5, 1, 32, 32, generator=g), torch.randn(5, 3, generator=g)
    batch = {
        "y_screen": torch.tensor([1.0, 0.0, NAN, 1.0, 0.0]),
        "y_severity": torch.tensor([0.0, NAN, NAN, 1.0, NAN]),
        "t_score": torch.tensor([-1.7, NAN, 0.4, -3.1, NAN]),
    }
    return images, tabular, batch


def test_per_case_loss_is_the_mean_of_each_cases_own_terms() -> None:
    _, _, batch = _batch()
    torch.manual_seed(0)
    outputs = {k: torch.randn(5) for k in ("screen", "severity", "t_score")}
    loss_fn = MultiTaskLoss(pos_weight=2.0, weights=LossWeights(warmup_epochs=0), per_case=True)
    total, _ = loss_fn(outputs, batch, epoch=1)
    expected = 0.0
    for i in range(5):
        case = {k: v[i : i + 1] for k, v in outputs.items()}
        ys = {k: v[i : i + 1] for k, v in batch.items()}
        alone, _ = loss_fn(case, ys, epoch=1)
        expected += float(alone)
    assert float(total) == pytest.approx(expected / 5, rel=1e-6)


@pytest.mark.parametrize(("norm", "trainable_stages"), [("group", None), ("frozen", None), ("group", 2)])
def test_per_case_gradients_equal_one_backward_per_case(norm: str, trainable_stages: int | None) -> None:
    """Opacus's per-case gradients of the DP model and loss equal a backward pass through each case alone:
    no case's gradient depends on another case of the batch (what clipping one case at a time needs). With
    early stages frozen, only what trains gets per-case gradients."""
    images, tabular, batch = _batch()
    torch.manual_seed(1)
    model = freeze_early_stages(build_strnet(backbone="tiny", norm=norm, dropout=0.0), trainable_stages)
    loss_fn = MultiTaskLoss(pos_weight=1.5, weights=LossWeights(warmup_epochs=0), per_case=True)
    wrapped = GradSampleModule(model)
    total, _ = loss_fn(wrapped(images, tabular), batch, epoch=1)
    total.backward()
    per_case = {n: p.grad_sample.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert all(getattr(p, "grad_sample", None) is None for p in model.parameters() if not p.requires_grad)
    if trainable_stages is not None:
        assert len(per_case) < len(list(model.parameters()))
    wrapped._close()
    for i in range(5):
        model.zero_grad()
        alone, _ = loss_fn(model(images[i : i + 1], tabular[i : i + 1]), {k: v[i : i + 1] for k, v in batch.items()}, 1)
        alone.backward()
        for name, p in model.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(per_case[name][i], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_target_epsilon_calibrates_the_noise_for_the_planned_steps() -> None:
    params = DPParams(enabled=True, target_epsilon=3.0, delta=1e-5)
    q = sample_rate(100, 8)
    sigma = noise_multiplier(params, q, planned_steps=130)
    acc = RDPAccountant()
    acc.history = [(sigma, q, 130)]
    assert 2.9 <= acc.get_epsilon(1e-5) <= 3.0


def _fed_overrides(scenario, out: Path, *extra: str) -> list[str]:  # type: ignore[no-untyped-def]
    return [*_overrides(scenario, out), "privacy.dp.enabled=true", "privacy.dp.noise_multiplier=1.1", *extra]


@pytest.mark.usefixtures("flower_task_identity")
def test_federated_epsilon_accumulates_over_rounds_and_reaches_bundle_and_mlflow(scenario, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg = load_config("demo", _fed_overrides(scenario, tmp_path, "federation.rounds=3", "train.early_stop_patience=9"))
    assert cfg.model.norm == "group"
    grid = InProcessGrid(3)
    result = run_federated(grid, cfg, tracker=Tracker(uri=cfg.tracking.uri, experiment="dp"))  # type: ignore[arg-type]
    rows = result.history
    assert len(rows) == 3
    for site in ("stage1", "hospital"):
        steps = [row[f"site.{site}.privacy_steps"] for row in rows]
        q = rows[0][f"site.{site}.privacy_sample_rate"]
        assert steps == [steps[0] * r for r in (1, 2, 3)]  # one accountant for the run, never restarted
        for row, n in zip(rows, steps, strict=True):
            acc = RDPAccountant()
            acc.history = [(1.1, q, int(n))]  # N rounds of the same sampling, in one fresh accountant
            assert row[f"site.{site}.privacy_epsilon"] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
        assert rows[-1][f"site.{site}.privacy_epsilon"] > rows[0][f"site.{site}.privacy_epsilon"]
    meta = json.loads((result.bundle_dir / "metadata.json").read_text())
    privacy = meta["training"]["privacy"]
    assert privacy["epsilon"] == max(rows[-1][f"site.{s}.privacy_epsilon"] for s in ("stage1", "hospital"))
    assert set(privacy["sites"]) == {"stage1", "hospital"} and privacy["delta"] == 1e-5
    assert "DP-SGD: ε =" in meta["headline"] and meta["model"]["norm"] == "group"
    assert meta["training"]["tscore_refit"]["status"].startswith("off: under DP-SGD")
    summary = json.loads((Path(cfg.output_dir) / "summary.json").read_text())
    assert summary["privacy"]["epsilon"] == privacy["epsilon"]
    runs = search_runs(cfg.tracking.uri, "dp")
    assert runs.iloc[0]["metrics.privacy_epsilon"] == pytest.approx(privacy["epsilon"])
    assert runs.iloc[0]["metrics.site.stage1.privacy_epsilon"] == pytest.approx(privacy["sites"]["stage1"]["epsilon"])
    table = comparison_table(runs.iloc[:1])
    assert "privacy_epsilon" in table.index and "site.hospital.privacy_epsilon" in table.index
    # the accountant never leaves the site: no reply carries it, each node keeps it in its own state
    assert all("strnet.privacy" in grid.contexts[n].state for n in (100, 101))


def test_a_restarted_site_continues_its_accountant_from_disk(tmp_path: Path) -> None:
    params = DPParams(enabled=True, noise_multiplier=1.3)
    first = PrivateTraining(params, n_train=40, batch_size=8, planned_steps=20)
    first.history = [(1.3, first.sample_rate, 5)]
    store = KeptState(tmp_path, "ab12cd34", "stage1")
    store.save_privacy(first.state())
    again = PrivateTraining(params, n_train=40, batch_size=8, planned_steps=20)
    again.load_state(KeptState(tmp_path, "ab12cd34", "stage1").privacy())
    assert again.epsilon() == pytest.approx(first.epsilon()) and again.steps == 5
    other = PrivateTraining(DPParams(enabled=True, noise_multiplier=2.0), n_train=40, batch_size=8, planned_steps=20)
    with pytest.raises(ValueError, match="different run"):
        other.load_state(first.state())
    (store.folder / "privacy-accountant.json").write_text("{not json")
    with pytest.raises(Exception, match=r"privacy-accountant\.json"):
        store.privacy()


def test_centralized_epsilon_per_epoch_matches_the_accountant(tmp_path: Path) -> None:
    sc = build_synthetic_scenario(tmp_path / "sc", seed=3, n_patients=12, image_size=48)
    cfg = tiny_config(tmp_path, sc.manifest, **{"privacy.dp.enabled": "true", "privacy.dp.target_epsilon": "4"})
    result = run_centralized(cfg, tracker=None, progress=False)
    report = json.loads((result.bundle_dir / "metadata.json").read_text())["training"]["privacy"]["sites"][
        "centralized"
    ]
    per_epoch = report["steps"] // 2
    for epoch, row in enumerate(result.history, start=1):
        acc = RDPAccountant()
        acc.history = [(report["noise_multiplier"], report["sample_rate"], per_epoch * epoch)]
        assert row["privacy_epsilon"] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
    assert 3.9 <= result.history[-1]["privacy_epsilon"] <= 4.0  # calibrated for the planned epochs, all run


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["privacy.dp.enabled=true"], "exactly one of"),
        (["privacy.dp.enabled=true", "privacy.dp.target_epsilon=3", "privacy.dp.noise_multiplier=1"], "exactly one"),
        (["privacy.dp.enabled=true", "privacy.dp.target_epsilon=-1"], "target_epsilon=-1"),
        (["privacy.dp.enabled=true", "privacy.dp.noise_multiplier=1", "privacy.dp.delta=1"], "delta=1"),
        (["privacy.dp.enabled=true", "privacy.dp.noise_multiplier=1", "model.norm=batch"], "BatchNorm"),
        (["privacy.dp.enabled=true", "privacy.dp.noise_multiplier=1", "train.balance=source_label"], "Poisson"),
        (["privacy.dp.enabled=true", "privacy.dp.noise_multiplier=1", "federation.strategy=fedprox"], "FedProx"),
        (["privacy.dp.enabled=true", "privacy.dp.noise_multiplier=1", "federation.strategy=fedbn"], "FedBN"),
    ],
)
def test_settings_dp_sgd_cannot_honour_are_refused(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config("demo", overrides)


def test_no_dp_keeps_the_batchnorm_model() -> None:
    cfg = load_config("demo")
    assert cfg.model.norm == "batch" and not math.isnan(cfg.privacy.dp.delta)


@pytest.mark.usefixtures("flower_task_identity")
def test_a_resumed_federation_keeps_counting_every_round_a_site_released(scenario, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The server dies after the sites trained round 3 and before it recorded it; the resumed run (a new Flower
    run: empty node state) repeats round 3. Each site's accountant comes back from its disk and counts all four
    trained rounds: round 3 was released twice, so ε is that of four rounds, never restarted from zero."""
    cfg = load_config(
        "demo",
        _fed_overrides(
            scenario, tmp_path, "federation.rounds=3", "tracking.enabled=false", "train.early_stop_patience=9"
        ),
    )
    with pytest.raises(ServerStopped):
        run_federated(StoppingGrid(3, stop_at=3), cfg)  # type: ignore[arg-type]
    resumed = run_federated(InProcessGrid(3), cfg, resume=True)  # type: ignore[arg-type]
    last = resumed.history[-1]
    per_round = resumed.history[0]["site.stage1.privacy_steps"]
    assert last["site.stage1.privacy_steps"] == 4 * per_round
    acc = RDPAccountant()
    acc.history = [(1.1, last["site.stage1.privacy_sample_rate"], int(4 * per_round))]
    assert last["site.stage1.privacy_epsilon"] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
