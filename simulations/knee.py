"""Procedural AP knee radiographs whose bone texture carries a latent T-score.

Why procedural: tests, demos and the federation need many labelled radiographs from several "scanners"
without shipping patient data. The bone status is encoded the way radiologists describe it — sparser,
lower-contrast trabeculae and a thinner cortex at low T-scores — while anatomy size, position, rotation,
soft tissue, exposure and noise vary independently, so a model has to look at texture and cannot read the
answer off the mean brightness.

Geometry follows the radiological convention: the patient's RIGHT knee is on the viewer's LEFT, and the
fibula sits on the lateral side (viewer's left for a right knee, viewer's right for a left knee).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

# T-score range the texture model maps onto [0, 1]; values outside are clipped.
T_LOW, T_HIGH = -4.0, 2.0


@dataclass(frozen=True)
class ScannerProfile:
    """What a site's acquisition chain does to the ideal image.

    ``scale`` and ``aspect`` turn the caller's base size into the output resolution (height = scale * size,
    width = aspect * height) so one ``image_size`` knob sizes every site while sites still differ.
    """

    name: str = "generic"
    exposure: tuple[float, float] = (0.75, 1.25)  # multiplicative gain range
    offset: tuple[float, float] = (-0.08, 0.08)  # additive level range
    gamma: float = 1.0
    noise_sigma: float = 0.015  # white detector noise, in units of full scale
    blur_sigma: float = 0.5  # detector/geometric unsharpness, pixels at 256 px height
    border_prob: float = 0.0  # chance of an unexposed (bright) collimation border
    border_width: float = 0.06  # border width as a fraction of the side
    scale: float = 1.0
    aspect: float = 1.0
    bit_depth: int = 8  # 8 or 16
    bits_stored: int = 8  # <= bit_depth; e.g. 12 for a 12-bit detector in 16-bit words

    def __post_init__(self) -> None:
        if self.bit_depth not in (8, 16):
            raise ValueError(f"bit_depth must be 8 or 16, got {self.bit_depth}")
        if not 1 <= self.bits_stored <= self.bit_depth:
            raise ValueError(f"bits_stored must be in [1, {self.bit_depth}], got {self.bits_stored}")

    def shape(self, image_size: int) -> tuple[int, int]:
        h = max(16, round(image_size * self.scale))
        return h, max(16, round(h * self.aspect))

    @property
    def max_value(self) -> int:
        return (1 << self.bits_stored) - 1


@dataclass(frozen=True)
class KneeImage:
    """A rendered radiograph: quantized pixels (bone bright) plus the ground-truth bone mask for tests."""

    pixels: np.ndarray  # uint8 or uint16, 2-D
    bone_mask: np.ndarray  # bool, same shape
    t_score: float
    bilateral: bool
    marker: str  # '', 'R' or 'L'


def _bone_quality(t_score: float) -> float:
    """0 for severe osteoporosis, 1 for dense bone; the single latent every texture cue derives from."""
    return float(np.clip((t_score - T_LOW) / (T_HIGH - T_LOW), 0.0, 1.0))


def _rotate(points: np.ndarray, center: tuple[float, float], angle_deg: float) -> np.ndarray:
    a = math.radians(angle_deg)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    c = np.asarray(center)
    return (points - c) @ rot.T + c


def _poly(mask: np.ndarray, points: np.ndarray) -> None:
    cv2.fillPoly(mask, [np.round(points).astype(np.int32)], 255, lineType=cv2.LINE_8)


def _ellipse(
    mask: np.ndarray,
    center: np.ndarray,
    axes: tuple[float, float],
    angle_deg: float,
    value: int = 255,
) -> None:
    cv2.ellipse(
        mask,
        (round(float(center[0])), round(float(center[1]))),
        (max(1, round(axes[0])), max(1, round(axes[1]))),
        angle_deg,
        0,
        360,
        value,
        thickness=-1,
    )


def _bandpass(rng: np.random.Generator, shape: tuple[int, int], fine: float) -> np.ndarray:
    """Unit-variance band-pass noise: a cheap stand-in for the trabecular network's spatial spectrum."""
    noise = rng.standard_normal(shape).astype(np.float32)
    lo = cv2.GaussianBlur(noise, (0, 0), fine)
    hi = cv2.GaussianBlur(noise, (0, 0), fine * 3.0)
    band = lo - hi
    return band / (float(band.std()) + 1e-6)


def _knee_panel(
    rng: np.random.Generator, t_score: float, h: int, w: int, side: str, bmi: float
) -> tuple[np.ndarray, np.ndarray]:
    """One knee as (attenuation, bone mask) in an h x w panel; side 'R' puts the fibula on the viewer's left."""
    q = _bone_quality(t_score)
    a = h * rng.uniform(0.8, 1.05)  # anatomy scale
    cx = w / 2 + rng.uniform(-0.06, 0.06) * w
    jy = h * rng.uniform(0.44, 0.56)  # joint line
    angle = rng.uniform(-7.0, 7.0)
    lateral = -1.0 if side == "R" else 1.0
    center = (cx, jy)

    # Soft-tissue envelope: wider for higher BMI, blurred so its edge is not a bone-like step.
    soft = np.zeros((h, w), np.uint8)
    half = a * (0.3 + 0.006 * (bmi - 25.0)) * rng.uniform(0.92, 1.08)
    env = np.array(
        [
            [cx - half * 0.85, -0.3 * h],
            [cx + half * 0.85, -0.3 * h],
            [cx + half * 1.05, jy],
            [cx + half * 0.8, 1.3 * h],
            [cx - half * 0.8, 1.3 * h],
            [cx - half * 1.05, jy],
        ]
    )
    _poly(soft, _rotate(env, center, angle))
    sigma_px = max(0.7, h / 256.0)
    soft_f = cv2.GaussianBlur(soft.astype(np.float32) / 255.0, (0, 0), 3 * sigma_px)

    femur = np.zeros((h, w), np.uint8)
    shaft = np.array(
        [
            [cx - 0.12 * a, -0.3 * h],
            [cx + 0.12 * a, -0.3 * h],
            [cx + 0.13 * a, jy - 0.22 * a],
            [cx + 0.23 * a, jy - 0.07 * a],
            [cx - 0.23 * a, jy - 0.07 * a],
            [cx - 0.13 * a, jy - 0.22 * a],
        ]
    )
    _poly(femur, _rotate(shaft, center, angle))
    for sgn in (-1.0, 1.0):
        c = _rotate(np.array([[cx + sgn * 0.115 * a, jy - 0.07 * a]]), center, angle)[0]
        _ellipse(femur, c, (0.115 * a, 0.065 * a), angle)
    notch = _rotate(np.array([[cx, jy - 0.015 * a]]), center, angle)[0]
    _ellipse(femur, notch, (0.03 * a, 0.045 * a), angle, value=0)

    gap = a * rng.uniform(0.02, 0.04)
    tibia = np.zeros((h, w), np.uint8)
    top = jy + gap / 2
    plateau = np.array(
        [
            [cx - 0.24 * a, top],
            [cx - 0.02 * a, top - 0.02 * a],  # tibial spines
            [cx + 0.02 * a, top - 0.02 * a],
            [cx + 0.24 * a, top],
            [cx + 0.22 * a, top + 0.08 * a],
            [cx + 0.12 * a, top + 0.22 * a],
            [cx + 0.11 * a, 1.3 * h],
            [cx - 0.11 * a, 1.3 * h],
            [cx - 0.12 * a, top + 0.22 * a],
            [cx - 0.22 * a, top + 0.08 * a],
        ]
    )
    _poly(tibia, _rotate(plateau, center, angle))

    fibula = np.zeros((h, w), np.uint8)
    fx = cx + lateral * 0.21 * a
    head = _rotate(np.array([[fx, top + 0.12 * a]]), center, angle)[0]
    _ellipse(fibula, head, (0.045 * a, 0.04 * a), angle)
    fshaft = np.array(
        [
            [fx - 0.022 * a, top + 0.12 * a],
            [fx + 0.022 * a, top + 0.12 * a],
            [fx - lateral * 0.02 * a + 0.018 * a, 1.3 * h],
            [fx - lateral * 0.02 * a - 0.018 * a, 1.3 * h],
        ]
    )
    _poly(fibula, _rotate(fshaft, center, angle))

    # Texture: denser and higher-contrast trabeculae for higher T-scores; thicker cortex too.
    band = _bandpass(rng, (h, w), sigma_px)
    # Per-patient biological variability the T-score does not explain keeps the task from being trivial.
    threshold = 0.9 - 1.2 * q + rng.normal(0.0, 0.2)
    trabeculae = 1.0 / (1.0 + np.exp(-(band - threshold) * 3.0))
    trab_contrast = (0.10 + 0.35 * q) * rng.uniform(0.75, 1.25)
    cortex_px = max(1, round(a * (0.012 + 0.022 * q) * rng.uniform(0.85, 1.15)))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * cortex_px + 1, 2 * cortex_px + 1))

    att = 0.35 * soft_f
    bone_any = np.zeros((h, w), bool)
    base = rng.uniform(0.32, 0.42)
    for mask in (femur, tibia, fibula):
        inner = cv2.erode(mask, kernel)
        m = mask > 0
        i = inner > 0
        bone_any |= m
        att[i] += base + trab_contrast * trabeculae[i]
        cortex = m & ~i
        att[cortex] += base + 0.55
    return att, bone_any


def _draw_marker(img: np.ndarray, letter: str, corner: str) -> None:
    """A lead letter in a plastic holder: near-white glyph on a faint block, like a real L/R marker."""
    h, w = img.shape
    s = max(7, round(0.08 * h))
    m = max(1, round(0.1 * h))  # inside any collimation border, as a real marker is in the exposed field
    x0 = m if corner.endswith("left") else w - m - s
    y0 = m if corner.startswith("top") else h - m - s
    img[y0 : y0 + s, x0 : x0 + s] = np.maximum(img[y0 : y0 + s, x0 : x0 + s], 0.55)
    glyph = np.zeros((s, s), np.uint8)
    scale = s / 30.0
    (tw, th), _ = cv2.getTextSize(letter, cv2.FONT_HERSHEY_SIMPLEX, scale, max(1, s // 10))
    cv2.putText(
        glyph,
        letter,
        ((s - tw) // 2, (s + th) // 2),
        cv2.FONT_HERSHEY_SIMPLEX,
        scale,
        255,
        max(1, s // 10),
        cv2.LINE_AA,
    )
    region = img[y0 : y0 + s, x0 : x0 + s]
    region[:] = np.maximum(region, glyph.astype(np.float32) / 255.0)


def render_knee(
    rng: np.random.Generator,
    t_score: float,
    *,
    image_size: int = 256,
    profile: ScannerProfile | None = None,
    bilateral: bool = False,
    side: str = "R",
    marker: bool = False,
    bmi: float = 25.0,
) -> KneeImage:
    """Render one AP knee radiograph (or a bilateral pair) through a scanner profile.

    ``side`` is the imaged knee for a single-knee film (and the marker letter); a bilateral film always has
    the patient's right knee on the viewer's left and, with ``marker``, an 'R' in the top-left corner.
    """
    if side not in ("R", "L"):
        raise ValueError(f"side must be 'R' or 'L', got {side!r}")
    profile = profile or ScannerProfile()
    h, w = profile.shape(image_size)
    if bilateral:
        half = w // 2
        att_r, bone_r = _knee_panel(rng, t_score, h, half, "R", bmi)
        att_l, bone_l = _knee_panel(rng, t_score, h, w - half, "L", bmi)
        att = np.concatenate([att_r, att_l], axis=1)
        bone = np.concatenate([bone_r, bone_l], axis=1)
    else:
        att, bone = _knee_panel(rng, t_score, h, w, side, bmi)

    img = 0.9 * (1.0 - np.exp(-1.3 * att))  # detector response: saturating, bone bright
    letter = ""
    if marker:
        letter = "R" if bilateral else side
        corner = "top-left" if bilateral else str(rng.choice(["top-left", "top-right"]))
        _draw_marker(img, letter, corner)
    img = _acquire(rng, img, profile, image_size)
    quantized = np.round(img * profile.max_value).astype(np.uint16 if profile.bit_depth == 16 else np.uint8)
    return KneeImage(pixels=quantized, bone_mask=bone, t_score=float(t_score), bilateral=bilateral, marker=letter)


def _acquire(rng: np.random.Generator, img: np.ndarray, profile: ScannerProfile, image_size: int) -> np.ndarray:
    """Exposure, gamma, blur, noise and collimation: the nuisance that must not predict the label."""
    gain = rng.uniform(*profile.exposure)
    offset = rng.uniform(*profile.offset)
    img = np.clip(img * gain + offset + 0.05, 0.0, 1.0) ** profile.gamma
    if profile.blur_sigma > 0:
        img = cv2.GaussianBlur(img, (0, 0), max(0.3, profile.blur_sigma * image_size / 256.0))
    if profile.noise_sigma > 0:
        img = img + rng.normal(0.0, profile.noise_sigma, img.shape).astype(np.float32)
    if profile.border_prob > 0 and rng.random() < profile.border_prob:
        h, w = img.shape
        bh = max(1, round(profile.border_width * h * rng.uniform(0.5, 1.5)))
        bw = max(1, round(profile.border_width * w * rng.uniform(0.5, 1.5)))
        level = rng.uniform(0.85, 0.97)
        img[:bh, :] = level
        img[-bh:, :] = level
        img[:, :bw] = level
        img[:, -bw:] = level
    return np.clip(img, 0.0, 1.0).astype(np.float32)
