"""The paper's deterministic preprocessing: Otsu crop, percentile clip, bilinear resize to a square.

Recipe (arXiv 2604.20268): crop to the Otsu foreground box plus a 3% margin (the whole image when that box
covers under 10% of it, i.e. Otsu found specks, not anatomy), clip intensities to the 1st-99th percentile,
scale to [0, 1], bilinear resize to ``size x size``. Mean/std normalisation comes later, in the dataset,
after augmentation, so that augmentation fills (median, flip) live on the same [0, 1] scale as the cache.

Speed matters because this runs once per radiograph of every cohort (target: 300 radiographs/s of
2000x1500 16-bit films on 2 cores, decoding excluded; :mod:`strnet.data.speed` measures it). So: Otsu runs
on an 8-bit copy area-averaged to OTSU_MAX_SIDE (the box only needs to be right to a pixel or two of the
full image); 8/16-bit pixels, and integer-valued float copies of them, stay in that dtype until the clip;
percentiles come from one histogram pass instead of ``np.percentile``'s sort (exact for integer pixels);
the clip writes the only full-resolution float copy and the [0, 1] scaling is applied after the resize.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np

from strnet.data.imageio import read_radiograph
from strnet.data.joint import joint_square
from strnet.data.markers import mask_markers

# Longest side of the 8-bit copy Otsu sees; bigger buys nothing for a bounding box and costs time.
OTSU_MAX_SIDE = 512
# Histogram bins for the percentile clip: the clip level is exact to (max - min) / (HIST_BINS - 1).
HIST_BINS = 4096
_INT_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16))
_CV_DTYPES = (*_INT_DTYPES, np.dtype(np.float32))
# cv2.calcHist counts in float32, exact up to 2**24; bigger images take numpy's (slower) integer bincount.
_CALCHIST_MAX_COUNT = 1 << 24


@dataclass(frozen=True)
class PreprocessParams:
    """Everything that changes a preprocessed pixel; its fingerprint keys the cache and lives in bundles."""

    size: int = 512
    crop_margin: float = 0.03
    min_crop_fraction: float = 0.10
    clip_percentiles: tuple[float, float] = (1.0, 99.0)
    mean: float = 0.5
    std: float = 0.25
    # "joint": after the foreground crop, a square centred on the knee joint of a tall crop (strnet.data.joint)
    crop: Literal["foreground", "joint"] = "foreground"
    # paint out lead side markers and similar labels before the crop (strnet.data.markers)
    mask_markers: bool = False

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
        if not isinstance(self.mask_markers, bool):
            raise ValueError(f"mask_markers={self.mask_markers!r} must be true or false")
        if self.crop not in ("foreground", "joint"):
            raise ValueError(f"crop={self.crop!r} must be 'foreground' or 'joint'")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["clip_percentiles"] = list(self.clip_percentiles)
        return d

    def fingerprint(self) -> str:
        """Stable across processes and Python versions (sorted JSON, not ``hash()``).

        The default crop and marker setting are left out, so caches and bundles made before the options existed
        keep their keys.
        """
        d = self.to_dict()
        if d["crop"] == "foreground":
            del d["crop"]
        if not d["mask_markers"]:
            del d["mask_markers"]
        blob = json.dumps(d, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_image(path: str | Path, side: str = "") -> np.ndarray:
    """Decode one knee: the whole image for ``side=''``, else that knee via :mod:`strnet.data.bilateral`."""
    if not side:
        return read_radiograph(path)
    from strnet.data.bilateral import load_knee  # lazy: bilateral imports heavier detection code

    return load_knee(path, side)


def load_preprocessed(path: str | Path, side: str, params: PreprocessParams) -> np.ndarray:
    return preprocess(load_image(path, side), params)


@contextmanager
def opencv_threads(n: int) -> Iterator[None]:
    """Run the block with OpenCV's own thread pool at ``n`` threads, then restore the previous setting.

    Use ``opencv_threads(1)`` around a pool of worker threads that each call :func:`preprocess` (as
    :func:`strnet.data.speed.preprocess_throughput` does, and a ``workers > 1`` cache fill should): the
    workers already keep every core busy, one image each, and OpenCV splitting each resize across the same
    cores only adds hand-offs and waits. On 2 cores with 2 workers, 1 OpenCV thread gave 1.3x (16-bit films)
    to 1.5x (float32 copies) the throughput of OpenCV's default 2, and up to 1.9x while other processes
    shared the cores; with one worker it made no difference. The setting is process-wide, so set it around
    the pool, not in the workers.
    """
    previous = cv2.getNumThreads()
    cv2.setNumThreads(n)
    try:
        yield
    finally:
        cv2.setNumThreads(previous)


def _cv_image(img: np.ndarray) -> np.ndarray:
    """``img`` itself when OpenCV's histogram and resize take its dtype natively (8/16-bit, float32), else float32."""
    return img if img.dtype in _CV_DTYPES else img.astype(np.float32)


def _working_image(img: np.ndarray) -> np.ndarray:
    """The cheapest exact representation: uint8/uint16 as given; any other image whose values are all integers
    in [0, 65535] (a decoder's float32 copy of an 8/16-bit file) as uint16; anything else as float32.

    Integer pixels get an exact one-bin-per-value histogram and cheap 2-byte passes, and an integer-valued
    float image preprocesses to exactly the same pixels as its uint16 original. Rows are made contiguous
    once here (a column-major or flipped view), else every OpenCV call would copy the whole image again.
    """
    a = _cv_image(img)
    if a.strides[1] != a.itemsize or a.strides[0] < a.shape[1] * a.itemsize:
        a = np.ascontiguousarray(a)
    if a.dtype == np.float32:
        u = _as_uint16_if_integral(a)
        if u is not None:
            return u
    return a


def _as_uint16_if_integral(a: np.ndarray) -> np.ndarray | None:
    """``a`` as uint16 when every value is an integer in [0, 65535], else None (at the first block that is not).

    Cast and check go block by block (~64 k pixels) so the round trip stays in the CPU cache: about 30 %
    cheaper than ``astype`` plus ``np.array_equal`` over a whole film. No range check is needed: a value
    outside [0, 65535] (or NaN) casts to something else, so it fails the comparison like a fraction does.
    """
    h, w = a.shape
    step = max(1, (1 << 16) // max(w, 1))
    u = np.empty((h, w), np.uint16)
    back = np.empty((min(step, h), w), np.float32)
    same = np.empty(back.shape, bool)
    with np.errstate(invalid="ignore"):
        for r in range(0, h, step):
            block, ub = a[r : r + step], u[r : r + step]
            n = block.shape[0]
            np.copyto(ub, block, casting="unsafe")
            np.copyto(back[:n], ub)
            np.equal(back[:n], block, out=same[:n])
            if not same[:n].all():
                return None
    return u


def _downscale(img: np.ndarray) -> np.ndarray:
    """``img`` area-averaged to a longest side of OTSU_MAX_SIDE (itself when already that small).

    The scale is ``OTSU_MAX_SIDE / max(h, w)`` exactly, not a rounder integer factor: an integer factor is
    faster, but it lands on a different pixel grid, and where a bright speck or marker sits near Otsu's level
    it survived one grid and not the other, moving 4 of 201 Mendeley films' boxes by 43-100 px and the
    real-data run with them. The resize reads a float32 copy: on the native 8/16-bit pixels it is ~15 % faster,
    but OpenCV rounds its output to integers there, which moved 10 of 2114 real knees' boxes (by 2-18 px).
    """
    h, w = img.shape
    scale = min(1.0, OTSU_MAX_SIDE / max(h, w))
    if scale == 1.0:
        return img
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(img.astype(np.float32, copy=False), size, interpolation=cv2.INTER_AREA)


def foreground_box(img: np.ndarray, params: PreprocessParams) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1), end-exclusive: the Otsu foreground box plus margin, or the whole image.

    Otsu runs on an 8-bit copy area-averaged to a longest side of OTSU_MAX_SIDE (a pixel there is
    ``max(h, w) / OTSU_MAX_SIDE`` pixels here). The margin is ``crop_margin`` of the image height (rows)
    and width (columns), clamped to the image.
    """
    img = _cv_image(np.asarray(img))
    h, w = img.shape
    whole = (0, h, 0, w)
    lo, hi, _, _ = cv2.minMaxLoc(img)
    if not hi > lo:
        return whole
    small = _downscale(img)
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
    """Percentiles (numpy's default "linear" method) from one histogram pass instead of a sort.

    uint8/uint16 images: exact (one bin per integer value), equal to ``np.percentile`` up to float rounding.
    Anything else: each within one bin width ``(max - min) / (bins - 1)`` of ``np.percentile``; the bins span
    ``[min, max + width)`` so the maximum falls inside the last bin rather than on the excluded upper edge of
    OpenCV's histogram, which is about twice as fast as a numpy bincount here.
    """
    img = np.asarray(img)
    if img.dtype in _INT_DTYPES:
        return _exact_integer_percentiles(img, percentiles)
    img = img.astype(np.float32, copy=False)
    lo, hi, _, _ = cv2.minMaxLoc(img)
    if not hi > lo:
        return [lo for _ in percentiles]
    width = (hi - lo) / (bins - 1)
    hist = cv2.calcHist([img], [0], None, [bins], [lo, lo + bins * width])
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


def level_counts(img: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """int64 pixel counts of each integer level ``lo..hi`` of an 8/16-bit image: OpenCV's histogram where its float32
    counts are exact (up to 2**24 pixels; about a quarter of ``np.bincount``'s time), numpy's bincount beyond."""
    if img.size <= _CALCHIST_MAX_COUNT:
        return cv2.calcHist([img], [0], None, [hi - lo + 1], [lo, hi + 1]).ravel().astype(np.int64)
    return np.bincount(img.ravel(), minlength=hi + 1)[lo : hi + 1]


def _exact_integer_percentiles(img: np.ndarray, percentiles: tuple[float, ...]) -> list[float]:
    lo_f, hi_f, _, _ = cv2.minMaxLoc(img)
    lo, hi = int(lo_f), int(hi_f)
    if hi == lo:
        return [float(lo) for _ in percentiles]
    n = img.size
    counts = level_counts(img, lo, hi)
    cum = np.cumsum(counts)

    def order_statistic(r: int) -> int:  # the r-th smallest value, 0-based
        return lo + int(np.searchsorted(cum, r, side="right"))

    out = []
    for p in percentiles:
        # Mirrors numpy's "linear" method: virtual index (n - 1) * q, then its two-sided lerp.
        rank = (n - 1) * (p / 100.0)
        r0 = math.floor(rank)
        t = rank - r0
        a = order_statistic(r0)
        b = order_statistic(min(r0 + 1, n - 1))
        d = b - a
        out.append(float(b - d * (1.0 - t) if t >= 0.5 else a + d * t))
    return out


def preprocess(img: np.ndarray, params: PreprocessParams) -> np.ndarray:
    """Float32 ``(size, size)`` in [0, 1] (before mean/std) from a 2-D image of any dtype and range.

    A constant image (or crop) becomes all zeros rather than a division by zero. 8/16-bit images (and
    integer-valued float copies of them) stay in their native dtype up to the clip; the clip writes the only
    full-resolution float32 copy, already shifted to the clip floor, and the scale to [0, 1] is applied to the
    ``size x size`` result (bilinear resize is linear, so that is the same up to float rounding). Clipping still
    comes before the resize, as the recipe says: the two do not commute at the clip levels.
    """
    img = np.asarray(img)
    if img.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {img.shape}")
    work = working_image(img, params)
    y0, y1, x0, x1 = crop_box(work, params)
    crop = work[y0:y1, x0:x1]
    return render(crop, histogram_percentiles(crop, params.clip_percentiles), params.size)


def working_image(img: np.ndarray, params: PreprocessParams) -> np.ndarray:
    """The pixels the crop is cut from: the cheapest exact dtype, side markers painted out when asked."""
    work = _working_image(img)
    return mask_markers(work) if params.mask_markers else work


def crop_box(work: np.ndarray, params: PreprocessParams) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1), end-exclusive, of the knee crop in ``work``: the foreground box, then the joint square."""
    y0, y1, x0, x1 = foreground_box(work, params)
    if params.crop == "joint":
        j0, j1, i0, i1 = joint_square(work[y0:y1, x0:x1])
        y0, y1, x0, x1 = y0 + j0, y0 + j1, x0 + i0, x0 + i1
    return y0, y1, x0, x1


def render(crop: np.ndarray, window: Sequence[float], size: int) -> np.ndarray:
    """``crop`` clipped to ``window`` (low, high), resized to ``size`` squared and scaled to [0, 1].

    Kept apart from the window's choice so a diagnosis can render one knee with another knee's window
    (``simulations.bilateral_drivers``); :func:`preprocess` passes the crop's own percentiles."""
    size = int(size)
    p_lo, p_hi = float(window[0]), float(window[1])
    if not p_hi > p_lo:
        return np.zeros((size, size), np.float32)
    lo32 = np.float32(p_lo)
    # clip(crop - lo, 0, hi - lo) rounds exactly like clip(crop, lo, hi) - lo; the subtraction reads the native
    # dtype and writes the one full-resolution float32 copy, the clip works in place.
    shifted = np.subtract(crop, lo32, dtype=np.float32)
    np.clip(shifted, np.float32(0.0), np.float32(p_hi) - lo32, out=shifted)
    out = cv2.resize(shifted, (size, size), interpolation=cv2.INTER_LINEAR)
    out *= np.float32(1.0 / (p_hi - p_lo))
    return np.clip(out, 0.0, 1.0, out=out)
