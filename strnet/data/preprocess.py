"""The paper's deterministic preprocessing: Otsu crop, percentile clip, bilinear resize to a square.

Recipe (arXiv 2604.20268): crop to the Otsu foreground box plus a 3% margin (the whole image when that box
covers under 10% of it, i.e. Otsu found specks, not anatomy), clip intensities to the 1st-99th percentile,
scale to [0, 1], bilinear resize to ``size x size``. Mean/std normalisation comes later, in the dataset,
after augmentation, so that augmentation fills (median, flip) live on the same [0, 1] scale as the cache.

Speed matters because this runs once per radiograph of every cohort: Otsu runs on a downscaled 8-bit copy
(the box only needs to be right to a pixel or two of the full image), and percentiles come from one
histogram pass instead of ``np.percentile``'s full sort.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from strnet.data.imageio import read_radiograph

# Longest side of the 8-bit copy Otsu sees; bigger buys nothing for a bounding box and costs time.
OTSU_MAX_SIDE = 512
# Histogram bins for the percentile clip: the clip level is exact to (max - min) / (HIST_BINS - 1).
HIST_BINS = 4096


@dataclass(frozen=True)
class PreprocessParams:
    """Everything that changes a preprocessed pixel; its fingerprint keys the cache and lives in bundles."""

    size: int = 512
    crop_margin: float = 0.03
    min_crop_fraction: float = 0.10
    clip_percentiles: tuple[float, float] = (1.0, 99.0)
    mean: float = 0.5
    std: float = 0.25

    def __post_init__(self) -> None:
        # Coerce lists from JSON/YAML so equal settings give equal fingerprints and hashable params.
        object.__setattr__(self, "clip_percentiles", tuple(float(p) for p in self.clip_percentiles))
        if int(self.size) != self.size or self.size < 8:
            raise ValueError(f"size={self.size} must be an integer >= 8")
        if not 0.0 <= self.crop_margin < 0.5:
            raise ValueError(f"crop_margin={self.crop_margin} must be in [0, 0.5)")
        if not 0.0 <= self.min_crop_fraction <= 1.0:
            raise ValueError(f"min_crop_fraction={self.min_crop_fraction} must be in [0, 1]")
        lo, hi = self.clip_percentiles if len(self.clip_percentiles) == 2 else (math.nan, math.nan)
        if not 0.0 <= lo < hi <= 100.0:
            raise ValueError(f"clip_percentiles={self.clip_percentiles} must be two values 0 <= low < high <= 100")
        if not self.std > 0:
            raise ValueError(f"std={self.std} must be > 0")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["clip_percentiles"] = list(self.clip_percentiles)
        return d

    def fingerprint(self) -> str:
        """Stable across processes and Python versions (sorted JSON, not ``hash()``)."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_image(path: str | Path, side: str = "") -> np.ndarray:
    """Decode one knee: the whole image for ``side=''``, else that knee via :mod:`strnet.data.bilateral`."""
    if not side:
        return read_radiograph(path)
    from strnet.data.bilateral import load_knee  # lazy: bilateral imports heavier detection code

    return load_knee(path, side)


def load_preprocessed(path: str | Path, side: str, params: PreprocessParams) -> np.ndarray:
    return preprocess(load_image(path, side), params)


def foreground_box(img: np.ndarray, params: PreprocessParams) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1), end-exclusive: the Otsu foreground box plus margin, or the whole image.

    The margin is ``crop_margin`` of the image height (rows) and width (columns), clamped to the image.
    """
    h, w = img.shape
    whole = (0, h, 0, w)
    lo, hi = float(img.min()), float(img.max())
    if not hi > lo:
        return whole
    scale = min(1.0, OTSU_MAX_SIDE / max(h, w))
    small = (
        img
        if scale == 1.0
        else cv2.resize(img, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    )
    small8 = cv2.convertScaleAbs(small, alpha=255.0 / (hi - lo), beta=-lo * 255.0 / (hi - lo))
    _, mask = cv2.threshold(small8, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    bx, by, bw, bh = cv2.boundingRect(mask)
    sh, sw = small8.shape
    if bw * bh < params.min_crop_fraction * sh * sw or bw == 0 or bh == 0:
        return whole
    fy, fx = h / sh, w / sw
    y0, y1 = math.floor(by * fy), math.ceil((by + bh) * fy)
    x0, x1 = math.floor(bx * fx), math.ceil((bx + bw) * fx)
    my, mx = round(params.crop_margin * h), round(params.crop_margin * w)
    return max(0, y0 - my), min(h, y1 + my), max(0, x0 - mx), min(w, x1 + mx)


def histogram_percentiles(img: np.ndarray, percentiles: tuple[float, ...], bins: int = HIST_BINS) -> list[float]:
    """Percentiles from one histogram pass; each within one bin width ``(max - min) / (bins - 1)`` of np.percentile.

    The bins span ``[min, max + width)`` so the maximum falls inside the last bin rather than on the excluded
    upper edge of OpenCV's histogram, which is about twice as fast as a numpy bincount here.
    """
    img = np.asarray(img, dtype=np.float32)
    lo, hi = float(img.min()), float(img.max())
    if not hi > lo:
        return [lo for _ in percentiles]
    width = (hi - lo) / (bins - 1)
    hist = cv2.calcHist([np.ascontiguousarray(img)], [0], None, [bins], [lo, lo + bins * width])
    counts = np.rint(hist.ravel()).astype(np.int64)
    cum = np.cumsum(counts)
    n = int(cum[-1])

    def order_statistic(r: int) -> float:
        # The r-th smallest value (0-based), placed inside its bin as if the bin's values were evenly spread.
        k = min(int(np.searchsorted(cum, r, side="right")), bins - 1)
        before = int(cum[k - 1]) if k > 0 else 0
        return lo + (k + (r - before + 0.5) / max(int(counts[k]), 1)) * width

    out = []
    for p in percentiles:
        rank = p / 100.0 * (n - 1)  # numpy's default "linear" method: interpolate between order statistics
        r0 = math.floor(rank)
        v0 = order_statistic(r0)
        out.append(v0 if rank == r0 else v0 + (rank - r0) * (order_statistic(r0 + 1) - v0))
    return out


def preprocess(img: np.ndarray, params: PreprocessParams) -> np.ndarray:
    """Float32 ``(size, size)`` in [0, 1] (before mean/std) from a 2-D image of any dtype and range.

    A constant image (or crop) becomes all zeros rather than a division by zero.
    """
    img = np.asarray(img)
    if img.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {img.shape}")
    a = img.astype(np.float32, copy=False)
    size = int(params.size)
    y0, y1, x0, x1 = foreground_box(a, params)
    crop = a[y0:y1, x0:x1]
    p_lo, p_hi = histogram_percentiles(crop, params.clip_percentiles)
    if not p_hi > p_lo:
        return np.zeros((size, size), np.float32)
    scaled = (np.clip(crop, p_lo, p_hi) - np.float32(p_lo)) * np.float32(1.0 / (p_hi - p_lo))
    out = cv2.resize(np.ascontiguousarray(scaled, dtype=np.float32), (size, size), interpolation=cv2.INTER_LINEAR)
    return np.clip(out, 0.0, 1.0, out=out)
