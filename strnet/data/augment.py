"""Training-time augmentation: flip, small affine, and median-filled border masks.

The ranges are the paper's and deliberately mild: knee radiographs are acquired in a standard position, so
large rotations would teach the model poses it never meets. The border mask imitates collimation and
cropping differences between hospitals; it and the affine corners are filled with the image median, not
black, so the network cannot learn "black wedge" as a site or augmentation signature.

All randomness comes from the caller's ``torch.Generator`` (one per sample, see
:class:`strnet.data.dataset.KneeDataset`), so a sample's augmentation does not depend on which DataLoader
worker produced it.

:func:`augment_batch` is the same augmentation for a whole batch on any device (one ``grid_sample``, no
per-sample Python): given the same ``N_DRAWS`` uniforms per sample it gives what :class:`Augmenter` gives, to
float rounding (tested), so a GPU-resident training loop can use the recipe's augmentation unchanged.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torchvision.transforms.v2.functional as F
from torchvision.transforms import InterpolationMode

# Fixed number of uniform draws per call, so each parameter always comes from the same draw:
# 0 flip, 1 angle, 2-3 translation, 4 scale, 5 border mask on/off, 6-9 which borders, 10-13 their widths.
N_DRAWS = 15


@dataclass(frozen=True)
class AugmentParams:
    hflip_p: float = 0.5
    max_rotation_deg: float = 8.0
    max_translate: float = 0.04
    scale_range: tuple[float, float] = (0.95, 1.05)
    border_mask_p: float = 0.5
    border_mask_max_frac: float = 0.08

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale_range", tuple(float(s) for s in self.scale_range))
        for name in ("hflip_p", "border_mask_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1]")
        if not 0.0 <= self.max_rotation_deg <= 180.0:
            raise ValueError(f"max_rotation_deg={self.max_rotation_deg} must be in [0, 180]")
        if not 0.0 <= self.max_translate < 0.5:
            raise ValueError(f"max_translate={self.max_translate} must be in [0, 0.5)")
        if not 0.0 <= self.border_mask_max_frac < 0.5:
            raise ValueError(f"border_mask_max_frac={self.border_mask_max_frac} must be in [0, 0.5)")
        if len(self.scale_range) != 2 or not 0.0 < self.scale_range[0] <= self.scale_range[1]:
            raise ValueError(f"scale_range={self.scale_range} must be two values 0 < low <= high")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["scale_range"] = list(self.scale_range)
        return d


class Augmenter:
    """Callable on a ``[1, H, W]`` float tensor in [0, 1]; returns the same shape and dtype."""

    def __init__(self, params: AugmentParams) -> None:
        self.params = params

    def __call__(self, img: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if img.ndim != 3 or img.shape[0] != 1:
            raise ValueError(f"expected a [1, H, W] tensor, got shape {tuple(img.shape)}")
        p = self.params
        u = torch.rand(N_DRAWS, generator=generator, dtype=torch.float64).tolist()
        _, h, w = img.shape
        fill = float(img.median())
        out = img
        if u[0] < p.hflip_p:
            out = F.horizontal_flip(out)
        angle = (2 * u[1] - 1) * p.max_rotation_deg
        tx = round((2 * u[2] - 1) * p.max_translate * w)
        ty = round((2 * u[3] - 1) * p.max_translate * h)
        lo, hi = p.scale_range
        scale = lo + u[4] * (hi - lo)
        if angle != 0.0 or tx != 0 or ty != 0 or scale != 1.0:
            out = F.affine(
                out,
                angle=angle,
                translate=[float(tx), float(ty)],
                scale=scale,
                shear=[0.0, 0.0],
                interpolation=InterpolationMode.BILINEAR,
                fill=[fill],
            )
        if u[5] < p.border_mask_p and p.border_mask_max_frac > 0:
            out = _mask_borders(out, u[6:10], u[10:14], p.border_mask_max_frac, fill)
        return out


def _mask_borders(
    img: torch.Tensor, pick: list[float], widths: list[float], max_frac: float, fill: float
) -> torch.Tensor:
    """Fill a strip at each picked border (top, bottom, left, right); at least one border is always picked."""
    _, h, w = img.shape
    chosen = [x < 0.5 for x in pick]
    if not any(chosen):
        chosen[pick.index(min(pick))] = True
    out = img.clone()
    for border, (on, frac) in enumerate(zip(chosen, widths, strict=True)):
        if not on:
            continue
        extent = h if border < 2 else w
        n = max(1, round(frac * max_frac * extent))
        if border == 0:
            out[:, :n, :] = fill
        elif border == 1:
            out[:, h - n :, :] = fill
        elif border == 2:
            out[:, :, :n] = fill
        else:
            out[:, :, w - n :] = fill
    return out


def augment_batch(images: torch.Tensor, draws: torch.Tensor, params: AugmentParams) -> torch.Tensor:
    """:class:`Augmenter` for a batch: ``[B, 1, H, W]`` floats in [0, 1], ``[B, N_DRAWS]`` uniforms -> ``[B, 1, H, W]``.

    Sample ``i`` gets exactly the flip, rotation, translation, scale and border strips :class:`Augmenter` draws
    from a generator whose first ``N_DRAWS`` float64 uniforms are ``draws[i]``, filled with the sample's own
    (lower) median, through torchvision's inverse affine matrix, grid and fill rule (``grid_sample`` with an
    appended ones channel, bilinear, zeros padding) batched into one call. Equal to the per-sample result up to
    float rounding of the matrix (torch's cos/sin against Python's math). Everything stays on ``images``' device
    and nothing synchronises with it (no data-dependent branch), so it can run inside a GPU training loop.
    """
    if images.ndim != 4 or images.shape[1] != 1 or not images.is_floating_point():
        raise ValueError(f"expected a float [B, 1, H, W] tensor, got {images.dtype} {tuple(images.shape)}")
    b, _, h, w = images.shape
    if draws.shape != (b, N_DRAWS):
        raise ValueError(f"expected draws of shape ({b}, {N_DRAWS}), got {tuple(draws.shape)}")
    p = params
    dev, dtype = images.device, images.dtype
    u = draws.to(device=dev, dtype=torch.float64)
    fill = images.flatten(1).median(dim=1).values.view(b, 1, 1, 1)  # Tensor.median(): the lower median
    out = torch.where((u[:, 0] < p.hflip_p).view(b, 1, 1, 1), images.flip(-1), images)

    # Augmenter's parameters, in the same float64 arithmetic as its Python floats
    angle = (2 * u[:, 1] - 1) * p.max_rotation_deg
    tx = torch.round((2 * u[:, 2] - 1) * p.max_translate * w)  # round half to even, as Python's round()
    ty = torch.round((2 * u[:, 3] - 1) * p.max_translate * h)
    lo, hi = p.scale_range
    scale = lo + u[:, 4] * (hi - lo)
    moved = (angle != 0) | (tx != 0) | (ty != 0) | (scale != 1.0)
    # torchvision's _get_inverse_affine_matrix with no shear and the centre at the image centre
    rot = angle * (math.pi / 180.0)
    cos, sin = torch.cos(rot), torch.sin(rot)
    m0, m1, m3, m4 = cos / scale, sin / scale, -sin / scale, cos / scale
    m2 = -(m0 * tx) - m1 * ty
    m5 = -(m3 * tx) - m4 * ty
    theta = torch.stack([m0, m1, m2, m3, m4, m5], 1).to(dtype).view(b, 2, 3)
    # torchvision's _affine_grid: pixel-centre base grid, theta rescaled to normalised coordinates
    base = torch.empty(1, h, w, 3, dtype=dtype, device=dev)
    base[..., 0].copy_(torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, steps=w, device=dev))
    base[..., 1].copy_(torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, steps=h, device=dev).unsqueeze_(-1))
    base[..., 2].fill_(1)
    rescaled = theta.transpose(1, 2) / torch.tensor([0.5 * w, 0.5 * h], dtype=dtype, device=dev)
    grid = base.view(1, h * w, 3).expand(b, -1, -1).bmm(rescaled).view(b, h, w, 2)
    # torchvision's _apply_grid_transform with a fill: sample the image and a ones mask together
    sampled = torch.nn.functional.grid_sample(
        torch.cat([out, torch.ones_like(out)], 1), grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    img, mask = sampled[:, :1], sampled[:, 1:]
    out = torch.where(moved.view(b, 1, 1, 1), (img - fill) * mask + fill, out)

    if p.border_mask_p > 0 and p.border_mask_max_frac > 0:
        pick = u[:, 6:10]
        chosen = pick < 0.5
        first_min = torch.nn.functional.one_hot(pick.argmin(1), 4).bool()  # argmin: the first minimum, as .index
        chosen = chosen | (first_min & ~chosen.any(1, keepdim=True))
        extent = torch.tensor([h, h, w, w], dtype=torch.float64, device=dev)
        n = torch.round(u[:, 10:14] * p.border_mask_max_frac * extent).clamp(min=1)
        rows = torch.arange(h, device=dev, dtype=torch.float64).view(1, h, 1)
        cols = torch.arange(w, device=dev, dtype=torch.float64).view(1, 1, w)
        on = chosen & (u[:, 5] < p.border_mask_p).unsqueeze(1)
        strips = (
            (on[:, 0].view(b, 1, 1) & (rows < n[:, 0].view(b, 1, 1)))
            | (on[:, 1].view(b, 1, 1) & (rows >= h - n[:, 1].view(b, 1, 1)))
            | (on[:, 2].view(b, 1, 1) & (cols < n[:, 2].view(b, 1, 1)))
            | (on[:, 3].view(b, 1, 1) & (cols >= w - n[:, 3].view(b, 1, 1)))
        )
        out = torch.where(strips.unsqueeze(1), fill, out)
    return out
