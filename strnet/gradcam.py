"""Grad-CAM for STR-Net: which part of the knee drove the bone-loss score.

Standard Grad-CAM (Selvaraju et al., 2017): channel weights are the spatially averaged gradients of
the chosen logit w.r.t. a layer's activations; the ReLU of the weighted sum is upsampled to the input.
It is written here rather than taken from a library because it needs a dict-output, two-input model,
and it must leave the model exactly as found (train/eval mode, no hooks, no grads) because
``strnet predict`` calls it on a loaded bundle between other inference calls.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from strnet.errors import DataError


def _default_layer(model: nn.Module) -> nn.Module | Sequence[nn.Module]:
    layer = getattr(model, "gradcam_layer", None)
    if isinstance(layer, nn.Module) or (isinstance(layer, tuple) and layer):
        return layer
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError("grad_cam: no layer given, the model has no `gradcam_layer` and no Conv2d")
    return convs[-1]


def grad_cam(
    model: nn.Module,
    image: torch.Tensor,
    tabular: torch.Tensor,
    layer: nn.Module | Sequence[nn.Module] | None = None,
    output: str = "screen",
) -> np.ndarray:
    """Heat map (H, W) in [0, 1] for one image [1, 1, H, W]; all zeros when nothing pushes the logit up.

    ``output`` names the head in the model's dict output ("screen", "severity", "t_score").
    """
    if image.ndim != 4 or image.shape[0] != 1:
        raise ValueError(f"grad_cam expects one image shaped [1, C, H, W], got {tuple(image.shape)}")
    return grad_cams(model, image, tabular, layer, output)[0]


def grad_cams(
    model: nn.Module,
    images: torch.Tensor,
    tabular: torch.Tensor,
    layer: nn.Module | Sequence[nn.Module] | None = None,
    output: str = "screen",
) -> np.ndarray:
    """Heat maps (B, H, W) in [0, 1] for a batch [B, C, H, W], each normalised on its own.

    One backward pass for the batch: in eval mode every case's logit depends on its own activations only, so
    the gradient of the summed logits with respect to the activations holds each case's own gradient.
    """
    if images.ndim != 4 or images.shape[0] < 1:
        raise ValueError(f"grad_cams expects images shaped [B, C, H, W], got {tuple(images.shape)}")
    chosen = layer if layer is not None else _default_layer(model)
    layers = list(chosen) if isinstance(chosen, Sequence) else [chosen]
    store: dict[int, torch.Tensor] = {}

    def keeper(i: int) -> Callable[[nn.Module, tuple, torch.Tensor], None]:
        def keep(_module: nn.Module, _inputs: tuple, out: torch.Tensor) -> None:
            if isinstance(out, torch.Tensor):
                store[i] = out

        return keep

    was_training = model.training
    handles = [lay.register_forward_hook(keeper(i)) for i, lay in enumerate(layers)]
    try:
        model.eval()
        with torch.enable_grad():
            # The input requires grad so the activations do even when a bundle froze every parameter;
            # torch.autograd.grad (not .backward) leaves the parameters' .grad untouched.
            x = images.detach().clone().float().requires_grad_(True)
            outputs = model(x, tabular.detach())
            if isinstance(outputs, dict):
                if output not in outputs:
                    raise KeyError(f"model output has no '{output}' (has {sorted(outputs)})")
                logit = outputs[output]
            else:
                logit = outputs
            if len(store) < len(layers):
                raise RuntimeError("grad_cam: the chosen layer was not used in the forward pass")
            acts = [store[i] for i in range(len(layers))]
            if len({tuple(a.shape[2:]) for a in acts}) > 1:
                raise ValueError(f"grad_cam: the layers' maps differ in size {[tuple(a.shape) for a in acts]}")
            per_case = logit.reshape(images.shape[0], -1)[:, 0]
            grads = torch.autograd.grad(per_case.sum(), acts, retain_graph=False)
        # several layers (an ensemble's members, whose logits the output sums): one map, each layer's
        # gradient-weighted activations added before the ReLU — Grad-CAM of the combined logit
        weighted = [
            (g.mean(dim=(2, 3), keepdim=True) * a).sum(dim=1, keepdim=True) for g, a in zip(grads, acts, strict=True)
        ]
        cam = F.relu(torch.stack(weighted).sum(0)).detach()
        cam = F.interpolate(cam, size=tuple(images.shape[-2:]), mode="bilinear", align_corners=False)[:, 0]
        cams = cam.cpu().numpy().astype(np.float32)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    cams -= cams.min(axis=(1, 2), keepdims=True)
    peak = cams.max(axis=(1, 2), keepdims=True)
    return np.divide(cams, peak, out=np.zeros_like(cams), where=peak > 0)


def overlay(gray: np.ndarray, cam: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """RGB uint8: the radiograph in grey with the JET-coloured CAM blended at ``alpha``."""
    g = np.asarray(gray, dtype=np.float32)
    c = np.asarray(cam, dtype=np.float32)
    if g.ndim != 2 or g.shape != c.shape:
        raise ValueError(f"overlay needs two 2-D arrays of the same shape, got {g.shape} and {c.shape}")
    g8 = (np.clip(g, 0, 1) * 255).round().astype(np.uint8)
    c8 = (np.clip(np.nan_to_num(c), 0, 1) * 255).round().astype(np.uint8)
    heat = cv2.cvtColor(cv2.applyColorMap(c8, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    base = cv2.cvtColor(g8, cv2.COLOR_GRAY2RGB)
    return cv2.addWeighted(heat, alpha, base, 1 - alpha, 0)


def save_overlay(path: str | Path, gray: np.ndarray, cam: np.ndarray) -> Path:
    """Write the overlay as PNG (whatever the suffix); a write failure names the file instead of a cv2 error."""
    out = Path(path)
    ok, buf = cv2.imencode(".png", cv2.cvtColor(overlay(gray, cam), cv2.COLOR_RGB2BGR))
    if not ok:
        raise DataError(out, "could not encode the Grad-CAM overlay as PNG")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(buf.tobytes())
    except OSError as exc:
        raise DataError(out, f"could not write the Grad-CAM overlay: {exc.strerror or exc}") from exc
    return out
