"""Training-time augmentation: flip, small affine, and median-filled border masks.

The ranges are the paper's and deliberately mild: knee radiographs are acquired in a standard position, so
large rotations would teach the model poses it never meets. The border mask imitates collimation and
cropping differences between hospitals; it and the affine corners are filled with the image median, not
black, so the network cannot learn "black wedge" as a site or augmentation signature.

All randomness comes from the caller's ``torch.Generator`` (one per sample, see
:class:`strnet.data.dataset.KneeDataset`), so a sample's augmentation does not depend on which DataLoader
worker produced it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torchvision.transforms.v2.functional as F
from torchvision.transforms import InterpolationMode

# Fixed number of uniform draws per call, so each parameter always comes from the same draw.
_N_DRAWS = 15


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
        u = torch.rand(_N_DRAWS, generator=generator, dtype=torch.float64).tolist()
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
