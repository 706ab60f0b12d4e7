"""STR-Net model: parameter budget, offline weight loading, stop-gradient, channels_last/bf16, argument checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from strnet.errors import DataError
from strnet.losses import LossWeights, MultiTaskLoss
from strnet.model import (
    EfficientNetLite0,
    build_backbone,
    build_strnet,
    count_params,
    efficientnet_lite0_checkpoint,
    freeze_early_stages,
    model_info,
    register_backbone,
    served_state,
)

PAPER_PARAMS = 23.95e6


def _inputs(b: int = 2, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(b, 1, size, size, generator=g), torch.randn(b, 3, generator=g)


def test_paper_configuration_matches_reported_parameter_count() -> None:
    model = build_strnet(backbone="resnet50")
    counts = count_params(model)
    assert abs(counts["trainable_params"] - PAPER_PARAMS) / PAPER_PARAMS < 0.01
    assert model.backbone.body.conv1.in_channels == 1
    assert model.neck[0].in_features == 2048 and model.neck[0].out_features == 128
    assert model.neck[2].p == pytest.approx(0.3)
    model.eval()
    with torch.no_grad():
        out = model(*_inputs())
    assert {k: tuple(v.shape) for k, v in out.items()} == {"screen": (2,), "severity": (2,), "t_score": (2,)}
    assert model.backbone_name == "resnet50"
    assert model.gradcam_layer is model.backbone.body.layer4[-1]


def test_model_info_reports_counts_and_feature_dim() -> None:
    info = model_info("tiny")
    model = build_strnet(backbone="tiny")
    assert info["trainable_params"] == sum(p.numel() for p in model.parameters())
    assert info["feature_dim"] == 64 and info["backbone"] == "tiny" and info["input_channels"] == 1
    assert sum(info["params_by_part"].values()) == info["total_params"]


def _fake_resnet18_file(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    torch.manual_seed(1)
    ref = torchvision.models.resnet18(weights=None)
    with torch.no_grad():
        ref.conv1.weight.copy_(torch.randn_like(ref.conv1.weight))
        for m in ref.modules():  # non-trivial BN statistics, so a wrong mapping cannot pass by accident
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    state = ref.state_dict()
    path = tmp_path / "resnet18_fake.pth"
    torch.save(state, path)
    return path, state


def test_local_resnet_weights_average_conv1_and_match_rgb_network(tmp_path: Path) -> None:
    path, state = _fake_resnet18_file(tmp_path)
    trunk, feat_dim = build_backbone("resnet18", str(path))
    assert feat_dim == 512
    loaded = trunk.body.conv1.weight.detach()
    assert loaded.shape == (64, 1, 7, 7)
    torch.testing.assert_close(loaded, state["conv1.weight"].mean(dim=1, keepdim=True))
    torch.testing.assert_close(trunk.body.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])

    # Oracle: the original RGB network on a grey image (R=G=B=g) equals the 1-channel trunk on 3*g.
    ref = torchvision.models.resnet18(weights=None)
    ref.load_state_dict(state)
    ref.fc = nn.Identity()
    ref.eval()
    trunk.eval()
    grey, _ = _inputs(2, 64)
    with torch.no_grad():
        torch.testing.assert_close(trunk(3.0 * grey), ref(grey.expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-4)


def test_weight_file_problems_name_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "nope.pth"
    with pytest.raises(DataError, match=r"nope\.pth.*not found"):
        build_strnet(backbone="resnet18", weights=str(missing))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match=r"garbage\.pth.*cannot read"):
        build_backbone("resnet18", str(garbage))
    r18, _ = _fake_resnet18_file(tmp_path)
    with pytest.raises(DataError, match=r"resnet18_fake.pth.*not a torchvision resnet50 state dict"):
        build_backbone("resnet50", str(r18))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(DataError, match=r"hub.*never downloaded.*weights="):
        build_backbone("resnet50", "imagenet")


def test_argument_checks() -> None:
    with pytest.raises(ValueError, match=r"unknown backbone 'vgg'.*efficientnet_lite0.*resnet18.*resnet50.*tiny"):
        build_strnet(backbone="vgg")
    with pytest.raises(ValueError, match="tiny"):
        build_strnet(backbone="tiny", weights="imagenet")
    with pytest.raises(ValueError, match="efficientnet_lite0"):
        build_backbone("efficientnet_lite0", "/some/file.pth")
    with pytest.raises(ValueError, match="neck_dim"):
        build_strnet(backbone="tiny", neck_dim=0)
    with pytest.raises(ValueError, match="dropout"):
        build_strnet(backbone="tiny", dropout=1.0)
    with pytest.raises(TypeError):
        build_strnet("tiny")  # type: ignore[misc]  # keyword-only on purpose
    with pytest.raises(ValueError, match="already registered"):
        register_backbone("tiny")(lambda w: (nn.Identity(), 1))
    model = build_strnet(backbone="tiny")
    image, tab = _inputs()
    with pytest.raises(ValueError, match="tabular"):
        model(image, tab[:, :2])
    with pytest.raises(ValueError, match=r"\[B,1,H,W\]"):
        model(image.expand(-1, 3, -1, -1), tab)


def test_efficientnet_lite0_loads_packaged_weights_offline() -> None:
    model = build_strnet(backbone="efficientnet_lite0", weights="imagenet")
    packaged = torch.load(efficientnet_lite0_checkpoint(), map_location="cpu", weights_only=True)
    stem = model.backbone._conv_stem.weight.detach()
    torch.testing.assert_close(stem, packaged["_conv_stem.weight"].mean(dim=1, keepdim=True))
    torch.testing.assert_close(
        model.backbone._blocks[15]._project_conv.weight, packaged["_blocks.15._project_conv.weight"]
    )
    model.eval()
    with torch.no_grad():
        out = model(*_inputs(2, 64))
    assert all(v.shape == (2,) and torch.isfinite(v).all() for v in out.values())
    assert model.gradcam_layer is model.backbone._head_act


def test_efficientnet_lite0_architecture_reproduces_imagenet_classifier() -> None:
    """Oracle for the hand-written architecture: the packaged classifier must call Grace Hopper a military uniform."""
    mpl = pytest.importorskip("matplotlib.cbook")
    from PIL import Image

    try:
        path = mpl.get_sample_data("grace_hopper.jpg", asfileobj=False)
    except (FileNotFoundError, ValueError):
        pytest.skip("matplotlib sample data not installed")
    net = EfficientNetLite0(in_chans=3, num_classes=1000)
    net.load_state_dict(torch.load(efficientnet_lite0_checkpoint(), map_location="cpu", weights_only=True), strict=True)
    net.eval()
    rgb = np.asarray(Image.open(path).convert("RGB").resize((224, 224)), np.float32)
    x = (torch.from_numpy(rgb).permute(2, 0, 1)[None] - 127.0) / 128.0
    with torch.no_grad():
        probs = net(x).softmax(1)[0]
    assert int(probs.argmax()) == 652  # ImageNet "military uniform"
    assert float(probs[652]) > 0.2


def test_tiny_backbone_forward_backward() -> None:
    model = build_strnet(backbone="tiny")
    assert 40_000 <= count_params(model.backbone)["trainable_params"] <= 60_000
    image, tab = _inputs(4, 48)
    out = model(image, tab)
    batch = {
        "y_screen": torch.tensor([1.0, 0.0, 1.0, 0.0]),
        "y_severity": torch.tensor([1.0, float("nan"), 0.0, float("nan")]),
        "t_score": torch.tensor([-2.8, -0.2, -1.5, 0.5]),
    }
    loss, _ = MultiTaskLoss(pos_weight=1.0, weights=LossWeights())(out, batch, epoch=5)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.gradcam_layer is model.backbone.blocks[-1]


@pytest.mark.parametrize(("backbone", "n_stages"), [("tiny", 4), ("resnet18", 5), ("efficientnet_lite0", 9)])
def test_stages_cover_every_backbone_parameter_once(backbone: str, n_stages: int) -> None:
    trunk, _ = build_backbone(backbone)
    stages = trunk.stages()
    assert len(stages) == n_stages
    in_stages = [id(p) for stage in stages for module in stage for p in module.parameters()]
    assert sorted(in_stages) == sorted(id(p) for p in trunk.parameters())


def test_frozen_stages_keep_their_weights_and_the_rest_learns() -> None:
    torch.manual_seed(0)
    model = freeze_early_stages(build_strnet(backbone="tiny"), 1)
    stages = model.backbone.stages()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {f"backbone.blocks.{i}.{k}" for i in range(3) for k in ("0.weight", "1.weight", "1.bias")}
    assert count_params(model)["trainable_params"] == count_params(build_strnet(backbone="tiny"))[
        "trainable_params"
    ] - sum(p.numel() for stage in stages[:3] for m in stage for p in m.parameters())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    image, tab = _inputs(4, 48)
    batch = {
        "y_screen": torch.tensor([1.0, 0.0, 1.0, 0.0]),
        "y_severity": torch.tensor([1.0, float("nan"), 0.0, float("nan")]),
        "t_score": torch.tensor([-2.8, -0.2, -1.5, 0.5]),
    }
    MultiTaskLoss(pos_weight=1.0, weights=LossWeights())(model(image, tab), batch, epoch=5)[0].backward()
    optimizer.step()
    for name, p in model.named_parameters():
        assert torch.equal(before[name], p.detach()) == (name in frozen), name
    # the frozen stages' BatchNorm still tracks the batch statistics (only weights are frozen)
    assert model.backbone.blocks[0][1].num_batches_tracked.item() == 1


def test_trainable_stages_are_checked() -> None:
    assert freeze_early_stages(build_strnet(backbone="tiny"), None) is not None
    assert count_params(freeze_early_stages(build_strnet(backbone="tiny"), 4)) == count_params(
        build_strnet(backbone="tiny")
    )
    for bad in (-1, 5, True, 1.5):
        with pytest.raises(ValueError, match="trainable_stages"):
            freeze_early_stages(build_strnet(backbone="tiny"), bad)  # type: ignore[arg-type]


def test_t_score_path_sends_no_gradient_into_shared_layers() -> None:
    model = build_strnet(backbone="tiny")
    image, tab = _inputs(3, 48)
    model(image, tab)["t_score"].sum().backward()
    shared = ("backbone.", "neck.", "tarr.", "screen_head.", "severity_head.")
    for name, p in model.named_parameters():
        if name.startswith(shared):
            assert p.grad is None or torch.count_nonzero(p.grad) == 0, name
        else:  # t_image, t_tabular, t_fusion
            assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name


def test_image_t_score_head_trains_the_shared_layers_and_is_left_out_of_served_state() -> None:
    """The training-only head (loss.t_score_image) reads the screening route with its gradient, unlike the
    paper's detached branch; a bundle's state leaves it out, so a served model is the paper's network."""
    model = build_strnet(backbone="tiny", image_tscore=True)
    image, tab = _inputs(3, 48)
    model(image, tab)["t_score_image"].sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    for name in ("backbone.", "neck.", "tarr.routes.screen.", "image_tscore_head."):
        assert any(g is not None and torch.count_nonzero(g) > 0 for n, g in grads.items() if n.startswith(name)), name
    for name in ("tarr.routes.severity.", "screen_head.", "severity_head.", "t_"):
        assert all(g is None or torch.count_nonzero(g) == 0 for n, g in grads.items() if n.startswith(name)), name

    served = served_state(model.state_dict())
    assert set(model.state_dict()) - set(served) == {"image_tscore_head.weight", "image_tscore_head.bias"}
    paper = build_strnet(backbone="tiny")
    paper.load_state_dict(served)  # strict: exactly the paper's tensors
    assert "t_score_image" not in paper(image, tab)


def test_channels_last_and_bfloat16_autocast_on_cpu() -> None:
    model = build_strnet(backbone="tiny").eval()
    image, tab = _inputs(2, 64)
    with torch.no_grad():
        ref = model(image, tab)
        model = model.to(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(image.contiguous(memory_format=torch.channels_last), tab)
    for k in ref:
        assert low[k].shape == ref[k].shape and torch.isfinite(low[k]).all()
        torch.testing.assert_close(low[k].float(), ref[k], rtol=0.1, atol=0.1)


def test_batchnorm_counters_stay_int64() -> None:
    model = build_strnet(backbone="tiny").to(memory_format=torch.channels_last)
    model(*_inputs(2, 32))  # one training-mode step increments num_batches_tracked
    counters = {k: v for k, v in model.state_dict().items() if k.endswith("num_batches_tracked")}
    assert counters and all(v.dtype == torch.int64 and int(v) == 1 for v in counters.values())


def test_test_time_mirror_makes_the_output_independent_of_the_side() -> None:
    """Averaging a knee with its mirror: a right knee and the same knee mirrored (what a left knee looks like) get
    the same probability, and the mirror-stability column measures exactly the change mirroring causes."""
    from strnet.engine import predict_loader

    torch.manual_seed(0)
    model = build_strnet(backbone="tiny", weights="none")
    image = torch.rand(4, 1, 32, 32)
    batch = {
        "tabular": torch.zeros(4, 3),
        "y_screen": torch.zeros(4),
        "y_severity": torch.zeros(4),
        "t_score": torch.zeros(4),
        "index": torch.arange(4),
    }
    cpu = torch.device("cpu")
    plain = predict_loader(model, [batch | {"image": image}], device=cpu, with_mirror=True)
    flipped = predict_loader(model, [batch | {"image": image.flip(-1)}], device=cpu, with_mirror=True)
    assert np.abs(plain["prob_screen"] - flipped["prob_screen"]).max() > 1e-4  # the network alone is side-dependent
    np.testing.assert_allclose(plain["prob_screen_mirror"], flipped["prob_screen"], atol=1e-6)
    averaged = predict_loader(model, [batch | {"image": image}], device=cpu, test_time_mirror=True, with_mirror=True)
    averaged_flipped = predict_loader(model, [batch | {"image": image.flip(-1)}], device=cpu, test_time_mirror=True)
    np.testing.assert_allclose(averaged["prob_screen"], averaged_flipped["prob_screen"], atol=1e-6)
    np.testing.assert_allclose(averaged["prob_screen_mirror"], averaged["prob_screen"])
    np.testing.assert_allclose(
        averaged["logit_screen"], (plain["logit_screen"] + flipped["logit_screen"]) / 2, atol=1e-5
    )


def test_features_from_the_same_pass_equal_neck_features() -> None:
    """forward(with_features=True) serves the out-of-distribution features without a second backbone pass, and
    its outputs are the plain forward's (the in-place ReLU must not touch the returned features)."""
    torch.manual_seed(0)
    model = build_strnet(backbone="tiny").eval()
    x, tab = torch.rand(3, 1, 48, 48), torch.randn(3, 3)
    with torch.no_grad():
        both = model(x, tab, with_features=True)
        plain = model(x, tab)
        torch.testing.assert_close(both.pop("neck"), model.neck_features(x))
    assert set(both) == set(plain)
    for k in plain:
        torch.testing.assert_close(both[k], plain[k])
