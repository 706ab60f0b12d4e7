"""Inputs the model must not judge: cheap image checks plus a feature-space distance to the training images.

Why: a classifier answers every input. Four bar-chart PNGs dropped into a folder of knee crops were read as
bilateral knees and flagged for bone loss at P = 0.94-0.99 — confidently, because a softmax/sigmoid has no
"none of the above". Two independent guards decide which inputs get *no* answer:

1. **Image checks** (:func:`image_problems`) on the decoded file, before any preprocessing: colour, too few gray
   levels, large perfectly flat areas, no spatial correlation (noise), blank, tiny or strip-shaped images.
   Radiographs are grey, noisy everywhere the patient is and spatially smooth; charts, screenshots and photos
   break at least one of these. They need no model and apply to every bundle.
2. **Feature distance** (:class:`OODModel`): the Mahalanobis distance of the model's neck features
   (:meth:`strnet.model.STRNet.neck_features`) to a Gaussian fitted on the training images, rejected beyond a
   high quantile of the distances of held-out validation images. This catches what passes the image checks
   but is still not a knee radiograph of the kind trained on (another body part, a strange scanner).

Everything the feature guard is fitted from is *additive* so a federation can pool it without sharing images:
sites send :class:`FeatureMoments` (n, sum, sum of outer products) of their training features; the server adds
them and broadcasts the :class:`FeatureGaussian`; sites send a :func:`distance_histogram` of their validation
distances over fixed edges; the server adds those and reads the limit with :func:`limit_from_histogram`.
Centralized training does the same through :func:`fit_ood`, so both modes give the same limit for the same data.

Measured (``python -m simulations.ood_check``): the image checks reject 0 of the 1,820 real images of the developer
share and every synthetic chart, photo, noise and blank image. On the real centralized bundle (Gaussian on the
338 train knees, limit at the 99.5 % quantile of the 74 val knees) the feature distance alone rejects all 40
synthetic non-radiographs including grey chest and hand renders, and 5/126 real test knees (1/73 from the training
sites, 4/53 from the held-out site); ``margin=1.2`` brings that to 1/126 while still rejecting chest, hand, photo,
noise and line-chart inputs by features alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import torch
from scipy.linalg import solve_triangular
from torch.utils.data import DataLoader, Dataset

from strnet.data.imageio import RASTER_SUFFIXES, read_radiograph
from strnet.data.preprocess import level_counts
from strnet.errors import DataError

STATUS_OK = "ok"
STATUS_OOD = "out_of_distribution"
FORMAT_VERSION = 1
# Which features the Gaussian lives on (:meth:`strnet.model.STRNet.neck_features`: the neck's Linear, pre-ReLU).
FEATURE = "neck_linear"

# ------------------------------------------------------------------------------------------------ image checks
# Thresholds were set on the developer share (1,820 real knee images: 224-px crops and bilateral films up to
# 1,280 px, grey and RGB-encoded grey) against synthetic charts, photos, noise and blank images; the real
# extremes are quoted so a reader can see the margin.

# A radiograph is hundreds of pixels across; below this no bone texture survives (synthetic test sites use 64).
MIN_SIDE = 48
# Long side / short side. Single knees and bilateral films measured 0.82-1.27; charts and screenshot strips
# can be far wider. 3 leaves room for a single-knee portrait film or a wide bilateral one.
MAX_ASPECT = 3.0
# A pixel is "clearly coloured" when its channels spread by more than this (0-255 scale). RGB-encoded grey JPEGs
# measured 0 (chroma subsampling artefacts of grey stay within a few levels); a coloured burned-in marker
# covers far less than MAX_COLOUR_FRACTION of the image.
COLOUR_CHROMA = 40.0
MAX_COLOUR_FRACTION = 0.05
# exp(entropy) of the 256-bin histogram: the number of equally used grey levels with the same spread. Real
# knees measured >= 8.2 (large black surround); PNG charts 2.2-3.9 (JPEG ringing lifts some to 7: those are
# caught by the bright-background check below).
MIN_EFFECTIVE_LEVELS = 5.0
# Fraction of pixels whose 3x3 neighbourhood has one exact grey value. Detector noise keeps exposed anatomy from
# being flat; only air/collimation is. Real maximum 0.72 (black surround), grey PNG charts 0.94.
MAX_FLAT_FRACTION = 0.85
# Largest fraction of pixels within +-BACKGROUND_TOLERANCE of one grey level above the darkest quarter of the
# range: a white page or chart background. Tolerant, so JPEG ringing around lines and text does not hide it.
# Real maximum 0.18 (saturated collimation borders in the 224-px set); charts 0.58+, even as JPEG.
MAX_BRIGHT_BACKGROUND_FRACTION = 0.4
BRIGHT_LEVEL = 64
BACKGROUND_TOLERANCE = 2
# Correlation between horizontally/vertically adjacent pixels (on block means, under 2 * CHECK_SIDE px): real knees
# measured >= 0.96, white noise ~0.
MIN_NEIGHBOUR_CORRELATION = 0.5
CHECK_SIDE = 256
# An integer image spanning fewer grey values than this is blank with a little noise.
MIN_INTEGER_RANGE = 16


def read_image_for_checks(path: str | Path) -> np.ndarray:
    """The file as decoded, *with* its colour channels (OpenCV BGR/BGRA order) and native bit depth.

    :func:`strnet.data.imageio.read_radiograph` converts colour to grey, which is right for the model but hides
    the most obvious sign of a photograph or a chart. DICOM is returned as :func:`read_radiograph` gives it.
    Raises :class:`DataError` for an unreadable file.
    """
    p = Path(path)
    if p.suffix.lower() not in RASTER_SUFFIXES:
        return read_radiograph(p)
    if not p.is_file():
        raise DataError(p, "file not found")
    img = cv2.imdecode(np.fromfile(p, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise DataError(p, "not a decodable image (truncated or not an image)")
    return img


def _gray_and_colour(img: np.ndarray) -> tuple[np.ndarray, float]:
    """(grey float32 2-D, fraction of clearly coloured pixels)."""
    if img.ndim == 2:
        return img.astype(np.float32, copy=False), 0.0
    rgb = img[:, :, :3].astype(np.float32)
    if img.dtype == np.uint16:
        rgb /= 257.0
    elif not np.issubdtype(img.dtype, np.integer):
        top = float(np.nanmax(np.abs(rgb))) if rgb.size else 0.0
        rgb *= 255.0 / top if top > 0 else 1.0
    # max - min over channels is zero for any grey, whatever the luminance weights, and unlike HSV saturation
    # it does not blow up for dark pixels where JPEG rounding alone makes the channels differ by a level or two.
    chroma = rgb.max(axis=2) - rgb.min(axis=2)
    gray = rgb @ np.array([0.114, 0.587, 0.299], np.float32)  # BGR order, ITU-R BT.601 like read_radiograph
    return gray, float((chroma > COLOUR_CHROMA).mean())


def _neighbour_correlation(gray: np.ndarray) -> float:
    h, w = gray.shape
    factor = max(h, w) // CHECK_SIDE
    if factor > 1:
        # Means of disjoint factor x factor blocks: white noise stays white (the means are independent) and the
        # statistic hardly depends on the file's resolution. A whole factor skips the resize below 2 * CHECK_SIDE
        # px: with a fractional area resize this statistic took 0.48 of a 280-px knee's 0.81 ms of checks, without
        # it 0.25 ms (predict runs the checks per file).
        hh, ww = h - h % factor, w - w % factor
        gray = cv2.resize(gray[:hh, :ww], (ww // factor, hh // factor), interpolation=cv2.INTER_AREA)
    a = gray.astype(np.float64)  # a copy, centred in place
    a -= a.mean()
    # Contiguous dot products only (BLAS; 0.22 instead of 0.29 ms for a 280² film, and predict runs this per
    # file): the horizontal pairs are the flat array against itself shifted by one, minus the pairs that wrap
    # from one row's end to the next row's start; the vertical ones are whole rows against the rows below.
    flat = a.ravel()
    squares = float(flat @ flat)
    first, last = a[:, 0], a[:, -1]
    horizontal = (
        float(flat[1:] @ flat[:-1]) - float(last[:-1] @ first[1:]),
        squares - float(first @ first),
        squares - float(last @ last),
    )
    top, bottom = a[0], a[-1]
    vertical = (float(a[1:].ravel() @ a[:-1].ravel()), squares - float(top @ top), squares - float(bottom @ bottom))
    corrs = []
    for cross, xx, yy in (horizontal, vertical):
        den = math.sqrt(xx * yy)
        corrs.append(cross / den if den > 0 else 1.0)
    return float(np.mean(corrs))


def image_statistics(img_raw: np.ndarray) -> dict[str, float]:
    """The numbers :func:`image_problems` judges, for inspection and threshold tuning."""
    img = np.asarray(img_raw)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    h, w = img.shape[:2]
    gray, colour = _gray_and_colour(img)
    finite = img.dtype.kind in "iub" or bool(np.isfinite(gray).all())
    lo, hi = (float(gray.min()), float(gray.max())) if finite and gray.size else (0.0, 0.0)
    stats = {
        "height": float(h),
        "width": float(w),
        "aspect": max(h, w) / max(1, min(h, w)),
        "colour_fraction": colour,
        "finite": float(finite),
        "range": hi - lo,
        "integer": float(np.issubdtype(img.dtype, np.integer)),
    }
    if not finite or not hi > lo:
        return stats
    # Relative 8-bit copy: flatness and level counts are then the same for 8-, 12- and 16-bit data.
    q = np.rint((gray - lo) * (255.0 / (hi - lo))).astype(np.uint8)
    hist = level_counts(q, 0, 255).astype(np.float64) / q.size
    nz = hist[hist > 0]
    kernel = np.ones((3, 3), np.uint8)
    flat = cv2.dilate(q, kernel) == cv2.erode(q, kernel)
    # window[c] = share of pixels within +-BACKGROUND_TOLERANCE of level c (windows lie wholly above BRIGHT_LEVEL).
    window = np.convolve(hist, np.ones(2 * BACKGROUND_TOLERANCE + 1), mode="same")
    stats.update(
        effective_levels=float(np.exp(-(nz * np.log(nz)).sum())),
        flat_fraction=float(flat.mean()),
        bright_background_fraction=float(window[BRIGHT_LEVEL + BACKGROUND_TOLERANCE + 1 :].max()),
        neighbour_correlation=_neighbour_correlation(gray),
    )
    return stats


def image_problems(img_raw: np.ndarray) -> list[str]:
    """Human-readable reasons why ``img_raw`` (as decoded, colour kept) does not look like a radiograph; [] if none.

    Accepts [H,W], [H,W,1], [H,W,3] (BGR or RGB: the colour measure is symmetric) or [H,W,4].
    """
    img = np.asarray(img_raw)
    if not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] in (1, 3, 4))):
        return [f"not a single grey or colour image (array shape {img.shape})"]
    s = image_statistics(img)
    h, w = int(s["height"]), int(s["width"])
    problems: list[str] = []
    if min(h, w) < MIN_SIDE:
        problems.append(f"too small ({w}x{h} px; a radiograph is at least {MIN_SIDE} px on its short side)")
    if s["aspect"] > MAX_ASPECT:
        problems.append(f"implausible aspect ratio {s['aspect']:.1f}:1 ({w}x{h} px) for a knee radiograph")
    if s["colour_fraction"] > MAX_COLOUR_FRACTION:
        problems.append(f"colour image ({s['colour_fraction']:.0%} of pixels clearly coloured; radiographs are grey)")
    if not s["finite"]:
        return [*problems, "pixel values are not finite"]
    if s["range"] <= 0:
        return [*problems, "blank image (a single grey level)"]
    if s["integer"] and s["range"] < MIN_INTEGER_RANGE:
        problems.append(f"almost blank (only {s['range']:.0f} grey levels between darkest and brightest pixel)")
    if s["effective_levels"] < MIN_EFFECTIVE_LEVELS:
        problems.append(
            f"too few grey levels (effectively {s['effective_levels']:.1f}): looks like a drawing, chart or screenshot"
        )
    if s["flat_fraction"] > MAX_FLAT_FRACTION:
        problems.append(f"{s['flat_fraction']:.0%} of the image is perfectly flat (no detector noise): not an X-ray")
    if s["bright_background_fraction"] > MAX_BRIGHT_BACKGROUND_FRACTION:
        problems.append(
            f"{s['bright_background_fraction']:.0%} of the image is one bright grey level: a page or chart background"
        )
    if s["neighbour_correlation"] < MIN_NEIGHBOUR_CORRELATION:
        problems.append(
            f"no spatial structure (neighbouring pixels correlate {s['neighbour_correlation']:.2f}): looks like noise"
        )
    return problems


# ------------------------------------------------------------------------------------------------ features


def extract_features(
    model: torch.nn.Module,
    data: Dataset | DataLoader,
    *,
    batch_size: int = 32,
    device: torch.device | str | None = None,
    amp_dtype: torch.dtype | None = None,
) -> np.ndarray:
    """float64 [N, neck_dim] neck features of every item, in dataset order (items carry ``image`` and ``index``).

    ``amp_dtype`` (bf16 autocast, as training and ``strnet predict`` run where it is native): the Gaussian must be
    fitted on features of the precision they are served at. bf16 rounding moved the real bundle's scores by 2 %
    (median) against fp32, and an untrained model's near-constant features by orders of magnitude.

    ``index`` (as :class:`strnet.data.dataset.KneeDataset` gives it) undoes a shuffling loader; where the indices
    are not ``0..N-1`` (a ``Subset``) the rows come in loader order.

    A :class:`DataLoader` is iterated as given (pass one without augmentation: the Gaussian describes the images
    the model will be shown, not augmented ones); a :class:`Dataset` gets a plain sequential loader. The model
    runs in eval mode under ``inference_mode`` and is put back in the mode it came in.
    """
    loader = data if isinstance(data, DataLoader) else DataLoader(data, batch_size=batch_size, shuffle=False)
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    feats: list[np.ndarray] = []
    order: list[np.ndarray] = []
    seen = 0
    try:
        with torch.inference_mode():
            for batch in loader:
                image = batch["image"].to(dev)
                with torch.autocast(dev.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                    neck = model.neck_features(image)
                feats.append(neck.float().cpu().numpy().astype(np.float64))
                idx = batch.get("index")
                order.append(
                    idx.cpu().numpy() if idx is not None else np.arange(seen, seen + image.shape[0], dtype=np.int64)
                )
                seen += image.shape[0]
    finally:
        model.train(was_training)
    if not feats:
        neck = getattr(model, "neck", None)
        return np.zeros((0, int(neck[0].out_features) if neck is not None else 0), np.float64)
    x = np.concatenate(feats)
    idx = np.concatenate(order)
    if not np.array_equal(np.sort(idx), np.arange(len(idx))):
        return x  # indices of a parent dataset (a Subset): loader order is the only order there is
    out = np.empty_like(x)
    out[idx] = x
    return out


def _array(values: Any, dim: int | None = None) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64)
    if dim is not None and a.shape != (dim,):
        raise ValueError(f"expected {dim} values, got shape {a.shape}")
    return a


@dataclass(frozen=True, eq=False)  # numpy fields: no elementwise ==
class FeatureMoments:
    """Count, sum and sum of outer products of feature vectors: adding two gives the moments of the union.

    This is all a site needs to send for the server to fit the same Gaussian as on the pooled features. It is an
    aggregate, not per-image features, but with very few images it still says a lot about each of them.
    """

    n: int
    sum: np.ndarray  # (d,)
    sum_outer: np.ndarray  # (d, d)

    def __post_init__(self) -> None:
        s, so = _array(self.sum), _array(self.sum_outer)
        if s.ndim != 1 or so.shape != (s.shape[0], s.shape[0]):
            raise ValueError(f"sum (d,) and sum_outer (d,d) do not match: {s.shape}, {so.shape}")
        if int(self.n) != self.n or self.n < 0:
            raise ValueError(f"n must be a non-negative integer, got {self.n}")
        object.__setattr__(self, "n", int(self.n))
        object.__setattr__(self, "sum", s)
        object.__setattr__(self, "sum_outer", so)

    @property
    def dim(self) -> int:
        return int(self.sum.shape[0])

    @classmethod
    def zeros(cls, dim: int) -> FeatureMoments:
        return cls(0, np.zeros(dim), np.zeros((dim, dim)))

    @classmethod
    def from_features(cls, x: np.ndarray) -> FeatureMoments:
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2:
            raise ValueError(f"features must be [N, d], got shape {x.shape}")
        return cls(x.shape[0], x.sum(axis=0), x.T @ x)

    def __add__(self, other: FeatureMoments) -> FeatureMoments:
        if not isinstance(other, FeatureMoments):
            return NotImplemented
        if other.dim != self.dim:
            raise ValueError(f"cannot add moments of dimension {self.dim} and {other.dim}")
        return FeatureMoments(self.n + other.n, self.sum + other.sum, self.sum_outer + other.sum_outer)

    def __radd__(self, other: object) -> FeatureMoments:
        if other == 0:  # so that sum(list_of_moments) works
            return self
        return NotImplemented

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "sum": self.sum.tolist(), "sum_outer": self.sum_outer.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureMoments:
        return cls(int(d["n"]), _array(d["sum"]), _array(d["sum_outer"]))


Shrinkage = float | Literal["oas"]


def oas_shrinkage(covariance: np.ndarray, n: int) -> float:
    """Oracle Approximating Shrinkage intensity (Chen et al. 2010) from a covariance and its sample count.

    Needs only the covariance, so it is available from pooled moments; same formula as
    :class:`sklearn.covariance.OAS`, which evaluates it on the maximum-likelihood (divide-by-n) covariance.
    """
    d = covariance.shape[0]
    emp = covariance * (n - 1) / n
    mu = float(np.trace(emp)) / d
    alpha = float(np.mean(emp**2))
    den = (n + 1) * (alpha - mu * mu / d)
    return 1.0 if den <= 0 else float(min((alpha + mu * mu) / den, 1.0))


@dataclass(frozen=True, eq=False)  # numpy fields: no elementwise ==
class FeatureGaussian:
    """Mean and (shrunk) covariance of training features; :meth:`distance` is the Mahalanobis distance.

    With 128-d features and a few hundred images the sample covariance is poorly conditioned (and singular below
    129 images, e.g. at a small site), so it is shrunk towards ``tr(S)/d * I``: the inverse then exists and the
    smallest-variance directions, the noisiest estimates, stop dominating the distance.
    """

    mean: np.ndarray
    covariance: np.ndarray
    shrinkage: float
    n: int
    _chol: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        mean, cov = _array(self.mean), _array(self.covariance)
        if mean.ndim != 1 or cov.shape != (mean.shape[0], mean.shape[0]):
            raise ValueError(f"mean (d,) and covariance (d,d) do not match: {mean.shape}, {cov.shape}")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "covariance", cov)
        object.__setattr__(self, "_chol", _cholesky(cov))

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    @classmethod
    def from_moments(cls, m: FeatureMoments, shrinkage: Shrinkage = "oas") -> FeatureGaussian:
        """Unbiased covariance (as ``np.cov``) shrunk by ``shrinkage`` in [0, 1], or by the OAS intensity."""
        if m.n < 2:
            raise ValueError(f"need at least 2 feature vectors to fit a Gaussian, got {m.n}")
        mean = m.sum / m.n
        cov = (m.sum_outer - m.n * np.outer(mean, mean)) / (m.n - 1)
        cov = (cov + cov.T) / 2.0
        rho = oas_shrinkage(cov, m.n) if shrinkage == "oas" else float(shrinkage)
        if not 0.0 <= rho <= 1.0:
            raise ValueError(f"shrinkage must be in [0, 1] or 'oas', got {shrinkage!r}")
        mu = float(np.trace(cov)) / m.dim
        shrunk = (1.0 - rho) * cov + rho * mu * np.eye(m.dim)
        return cls(mean, shrunk, rho, m.n)

    def distance(self, x: np.ndarray) -> np.ndarray:
        """Mahalanobis distance of each row of ``x`` [N, d] (or of one vector [d], giving shape [])."""
        x = np.asarray(x, dtype=np.float64)
        if x.shape[-1] != self.dim or x.ndim not in (1, 2):
            raise ValueError(f"features must be [d] or [N, d] with d={self.dim}, got shape {x.shape}")
        diff = (x - self.mean).reshape(-1, self.dim).T
        y = solve_triangular(self._chol, diff, lower=True, check_finite=False)
        d = np.sqrt((y * y).sum(axis=0))
        return d.reshape(x.shape[:-1])

    def to_dict(self) -> dict[str, Any]:
        rows, cols = np.tril_indices(self.dim)
        return {
            "n": self.n,
            "shrinkage": self.shrinkage,
            "mean": self.mean.tolist(),
            "covariance_tril": self.covariance[rows, cols].tolist(),  # row-major lower triangle, d(d+1)/2 values
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureGaussian:
        mean = _array(d["mean"])
        dim = mean.shape[0]
        tril = _array(d["covariance_tril"], dim * (dim + 1) // 2)
        cov = np.zeros((dim, dim))
        cov[np.tril_indices(dim)] = tril
        cov = cov + np.tril(cov, -1).T
        return cls(mean, cov, float(d["shrinkage"]), int(d["n"]))


def _cholesky(cov: np.ndarray) -> np.ndarray:
    """Lower Cholesky factor; a small ridge rescues a covariance that is singular to rounding (shrinkage 0, or
    features that barely vary, as an untrained model's do), growing until the factor exists."""
    try:
        return np.linalg.cholesky(cov)
    except np.linalg.LinAlgError:
        scale = max(float(np.trace(cov)) / max(cov.shape[0], 1), 1e-12)
        for ridge in (1e-9, 1e-6, 1e-3):
            try:
                return np.linalg.cholesky(cov + ridge * scale * np.eye(cov.shape[0]))
            except np.linalg.LinAlgError:
                continue
        return np.linalg.cholesky(cov + scale * np.eye(cov.shape[0]))


# ------------------------------------------------------------------------------------------------ the limit


def default_edges() -> np.ndarray:
    """Histogram edges for distances: 0, then geometric from 1e-2 to 1e6 (each bin 0.46 % wide).

    Fixed in advance so every site bins the same way; geometric because a Mahalanobis distance in 128-d sits
    near 11 for typical images and in the hundreds for absurd ones, and the limit should be resolved to the
    same *relative* precision wherever it falls.
    """
    return np.concatenate([[0.0], np.geomspace(1e-2, 1e6, 4001)])


def distance_histogram(d: np.ndarray, edges: np.ndarray | None = None) -> np.ndarray:
    """int64 counts of distances per bin; values outside the edges count in the first/last bin (never lost)."""
    edges = default_edges() if edges is None else np.asarray(edges, dtype=np.float64)
    d = np.asarray(d, dtype=np.float64).ravel()
    if not np.isfinite(d).all():
        raise ValueError("distances must be finite")
    counts, _ = np.histogram(np.clip(d, edges[0], edges[-1]), bins=edges)
    return counts.astype(np.int64)


def limit_from_histogram(hist: np.ndarray, edges: np.ndarray | None, quantile: float) -> float:
    """The ``quantile`` of the binned distances, linear inside its bin (exact to one bin width)."""
    edges = default_edges() if edges is None else np.asarray(edges, dtype=np.float64)
    h = np.asarray(hist, dtype=np.float64)
    if h.shape != (len(edges) - 1,):
        raise ValueError(f"histogram has {h.shape} bins, edges define {len(edges) - 1}")
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"quantile must be in (0, 1], got {quantile}")
    n = float(h.sum())
    if n <= 0:
        raise ValueError("empty histogram: no calibration (validation) images to set the limit from")
    target = quantile * n
    cum = np.cumsum(h)
    k = min(int(np.searchsorted(cum, target, side="left")), len(h) - 1)
    before = float(cum[k - 1]) if k > 0 else 0.0
    frac = (target - before) / h[k] if h[k] > 0 else 1.0
    return float(edges[k] + min(max(frac, 0.0), 1.0) * (edges[k + 1] - edges[k]))


# ------------------------------------------------------------------------------------------------ the model

DEFAULT_QUANTILE = 0.995
DEFAULT_SHRINKAGE: Shrinkage = "oas"


@dataclass(frozen=True, eq=False)  # numpy fields: no elementwise ==
class OODModel:
    """Gaussian of training features + rejection limit; stored in a bundle's metadata under ``"ood"``.

    ``limit = margin x`` the ``quantile`` of validation distances. The score is ``distance / limit``: 1.0 is the
    limit, so scores read the same whatever the bundle.

    ``margin`` > 1 widens the limit for sites the validation split does not represent. With a few dozen validation
    images the 99.5 % quantile is their maximum, a noisy estimate of the tail; on the real bundle a held-out site's
    knees reached 1.25x a limit set on the training sites' validation knees while the synthetic chest and hand
    renders stayed above 1.38x (see ``simulations.ood_check``).
    """

    gaussian: FeatureGaussian
    limit: float
    quantile: float
    n_calibration: int
    margin: float = 1.0
    feature: str = FEATURE

    @property
    def feature_dim(self) -> int:
        return self.gaussian.dim

    @classmethod
    def from_histogram(
        cls,
        gaussian: FeatureGaussian,
        hist: np.ndarray,
        edges: np.ndarray | None,
        quantile: float,
        margin: float = 1.0,
    ) -> OODModel:
        """The model from a Gaussian and the (pooled) histogram of validation distances under it."""
        if not margin > 0:
            raise ValueError(f"margin must be positive, got {margin}")
        limit = limit_from_histogram(hist, edges, quantile) * float(margin)
        if not limit > 0:
            raise ValueError(f"rejection limit must be positive, got {limit}")
        return cls(gaussian, limit, float(quantile), int(np.asarray(hist).sum()), float(margin))

    def scores(self, features: np.ndarray) -> np.ndarray:
        """``distance / limit`` per row of ``features`` [N, d]; > 1 is out of distribution."""
        return self.gaussian.distance(features) / self.limit

    def assess(self, features: np.ndarray | None, img_problems: Sequence[str] = ()) -> tuple[float, str, str]:
        """(score, status, reason) for ONE input: features [d] (None when not computed) and its image problems."""
        reasons = list(img_problems)
        score = math.nan
        if features is not None:
            score = float(self.scores(np.asarray(features, dtype=np.float64).reshape(self.feature_dim)))
            if not math.isfinite(score):
                reasons.append("model features are not finite")
            elif score > 1.0:
                reasons.append(
                    f"unlike the training images: feature distance {score:.2f}x the limit "
                    f"({self.margin:g}x the {self.quantile:.1%} quantile of validation images)"
                )
        return score, (STATUS_OOD if reasons else STATUS_OK), "; ".join(reasons)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "method": "Mahalanobis distance of neck features to a Gaussian of the training images",
            "score": "distance / limit; > 1 is out of distribution",
            "feature": self.feature,
            "feature_dim": self.feature_dim,
            "quantile": self.quantile,
            "margin": self.margin,
            "limit": self.limit,
            "n_calibration": self.n_calibration,
            "gaussian": self.gaussian.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OODModel:
        version = int(d.get("format_version", FORMAT_VERSION))
        if version != FORMAT_VERSION:
            raise ValueError(f"unsupported OOD model format_version {version} (this code reads {FORMAT_VERSION})")
        if d.get("feature", FEATURE) != FEATURE:
            raise ValueError(f"OOD model was fitted on {d['feature']!r} features; this code computes {FEATURE!r}")
        gaussian = FeatureGaussian.from_dict(d["gaussian"])
        if int(d.get("feature_dim", gaussian.dim)) != gaussian.dim:
            raise ValueError(f"feature_dim {d['feature_dim']} does not match the Gaussian's {gaussian.dim}")
        return cls(gaussian, float(d["limit"]), float(d["quantile"]), int(d["n_calibration"]), float(d["margin"]))


# ------------------------------------------------------------------------------------------------ fitting


def site_moments(
    model: torch.nn.Module,
    data: Dataset | DataLoader,
    *,
    batch_size: int = 32,
    device: torch.device | str | None = None,
    amp_dtype: torch.dtype | None = None,
) -> FeatureMoments:
    """Federated step 1 (per site, training images): the moments to send; the server adds them."""
    feats = extract_features(model, data, batch_size=batch_size, device=device, amp_dtype=amp_dtype)
    return FeatureMoments.from_features(feats)


def site_distance_histogram(
    model: torch.nn.Module,
    data: Dataset | DataLoader,
    gaussian: FeatureGaussian,
    edges: np.ndarray | None = None,
    *,
    batch_size: int = 32,
    device: torch.device | str | None = None,
    amp_dtype: torch.dtype | None = None,
) -> np.ndarray:
    """Federated step 2 (per site, validation images, pooled Gaussian): the histogram to send; the server adds them."""
    feats = extract_features(model, data, batch_size=batch_size, device=device, amp_dtype=amp_dtype)
    return distance_histogram(gaussian.distance(feats), edges)


def fit_ood(
    model: torch.nn.Module,
    train: Dataset | DataLoader,
    val: Dataset | DataLoader,
    *,
    quantile: float = DEFAULT_QUANTILE,
    shrinkage: Shrinkage = DEFAULT_SHRINKAGE,
    edges: np.ndarray | None = None,
    margin: float = 1.0,
    batch_size: int = 32,
    device: torch.device | str | None = None,
    amp_dtype: torch.dtype | None = None,
) -> OODModel:
    """Centralized fit: Gaussian on ``train`` features, limit at ``quantile`` of ``val`` distances.

    The limit must come from images the Gaussian did not see: training images sit closer to their own mean than
    new knees do, so a limit set on them would reject several percent of real new knees. Goes through the same
    additive pieces as the federated path, so both give the same model for the same images.
    """
    kw: dict[str, Any] = {"batch_size": batch_size, "device": device, "amp_dtype": amp_dtype}
    gaussian = FeatureGaussian.from_moments(site_moments(model, train, **kw), shrinkage)
    hist = site_distance_histogram(model, val, gaussian, edges, **kw)
    return OODModel.from_histogram(gaussian, hist, edges, quantile, margin)
