"""Find the lead side markers ("R", "L"), calibration discs and similar small bright labels on a radiograph and
paint them out with the tissue around them, so the network cannot read them.

Issue 8 names lead markers as a likely shortcut behind the two knees of one film getting different answers: a
knee half of a bilateral Mendeley film often holds its "R" or "L" square, and the two glyphs differ. A marker is a
small, compact object much brighter than *everything* around it. Bone near the joint is bright too, but it always
touches bright bone on at least one side; the fibula is compact in width but long. So, on a copy whose long side
is :data:`WORK_SIDE`: a white top-hat (the image minus its opening by a square about :data:`KERNEL` of the side)
keeps small bright things; a component of its response above one of :data:`TOPHAT_LEVELS` is a marker when its box
is between :data:`MIN_SIZE` and :data:`MAX_SIZE` of the side, near square, filled, and the median of each of the
four strips beside it (half the box wide) sits at least :data:`MIN_CONTRAST` grey levels below the box's bright
pixels. Checked by eye on 48 Mendeley knee halves of the split (two draws of 24, with boxes drawn): every marker
square or disc on the background or at a leg's edge found; 2 faint grey squares lying over the leg missed; one
small box on a fibular head; the rest of the boxes on film corners and collimator edges, which the crop drops.

Each box, grown by :data:`GROW` of its size, is filled with the median of those four strips in the full image.
"""

from __future__ import annotations

import cv2
import numpy as np

# The long side of the copy markers are found on: an "R" square is then 10-20 px.
WORK_SIDE = 512
# Top-hat square, as a fraction of the working side: bigger than a marker, smaller than a femoral shaft.
KERNEL = 0.07
# Grey levels (of 255, after a 1st-99.9th percentile stretch) the top-hat must reach, tried in turn: a faint
# marker needs a low level, where a bright one merges with the soft tissue it sits on and needs a high one.
TOPHAT_LEVELS = (20, 35, 60, 90)
# A marker's box, longest side, as a fraction of the working side.
MIN_SIZE, MAX_SIZE = 0.02, 0.07
# Shortest over longest side of the box, and the share of the box the component fills.
MIN_SQUARENESS, MIN_FILL = 0.5, 0.35
# How far the box's 80th percentile must stand above the brightest of the four strips beside it.
MIN_CONTRAST = 35
# Growth of a found box before it is filled (the glyph's halo and the stretch's rounding).
GROW = 0.25


def marker_boxes(img: np.ndarray) -> list[tuple[int, int, int, int]]:
    """``(y0, y1, x0, x1)`` of each marker in ``img`` (full resolution, already grown by :data:`GROW`)."""
    if img.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {img.shape}")
    h, w = img.shape
    scale = WORK_SIDE / max(h, w)
    shrink = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    small = cv2.resize(
        img.astype(np.float32), (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=shrink
    )
    lo, hi = np.percentile(small, (1.0, 99.9))
    if not hi > lo:
        return []
    g = np.clip((small - lo) * (255.0 / (hi - lo)), 0, 255).astype(np.uint8)
    k = max(3, round(KERNEL * WORK_SIDE))
    tophat = cv2.morphologyEx(g, cv2.MORPH_TOPHAT, cv2.getStructuringElement(cv2.MORPH_RECT, (k, k)))
    found: list[tuple[int, int, int, int]] = []
    for level in TOPHAT_LEVELS:
        strong = cv2.morphologyEx((tophat > level).astype(np.uint8), cv2.MORPH_CLOSE, np.ones((3, 3), np.uint8))
        n, _, stats, _ = cv2.connectedComponentsWithStats(strong, connectivity=8)
        found += [b for b in _markers(g, stats[1:n]) if not any(_overlap(b, f) for f in found)]
    out = []
    for x, y, bw, bh in found:
        grow_y, grow_x = GROW * bh, GROW * bw
        y0, y1 = max(0, int((y - grow_y) / scale)), min(h, int(np.ceil((y + bh + grow_y) / scale)))
        x0, x1 = max(0, int((x - grow_x) / scale)), min(w, int(np.ceil((x + bw + grow_x) / scale)))
        out.append((y0, y1, x0, x1))
    return out


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    """Whether two ``(x, y, w, h)`` boxes share a pixel."""
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def _markers(g: np.ndarray, stats: np.ndarray) -> list[tuple[int, int, int, int]]:
    """The ``(x, y, w, h)`` boxes among components' stats that pass the marker tests on the stretched copy ``g``."""
    out = []
    for x, y, bw, bh, area in stats:
        longest, shortest = max(bw, bh), min(bw, bh)
        if not MIN_SIZE * WORK_SIDE <= longest <= MAX_SIZE * WORK_SIDE:
            continue
        if shortest / longest < MIN_SQUARENESS or area / (bw * bh) < MIN_FILL:
            continue
        bright = np.percentile(g[y : y + bh, x : x + bw], 80)
        strips = [s for s in _strips(g, y, y + bh, x, x + bw) if s.size]
        if not strips or max(float(np.median(s)) for s in strips) > bright - MIN_CONTRAST:
            continue
        out.append((int(x), int(y), int(bw), int(bh)))
    return out


def _strips(a: np.ndarray, y0: int, y1: int, x0: int, x1: int) -> list[np.ndarray]:
    """The four strips beside a box, each half the box's longer side wide (cut at the image edge)."""
    d = max(2, max(y1 - y0, x1 - x0) // 2)
    h, w = a.shape
    return [
        a[max(0, y0 - d) : y0, x0:x1],
        a[y1 : min(h, y1 + d), x0:x1],
        a[y0:y1, max(0, x0 - d) : x0],
        a[y0:y1, x1 : min(w, x1 + d)],
    ]


def mask_markers(img: np.ndarray) -> np.ndarray:
    """``img`` with every marker box filled by the median of the strips beside it (a copy; ``img`` is kept)."""
    boxes = marker_boxes(img)
    if not boxes:
        return img
    out = img.copy()
    for y0, y1, x0, x1 in boxes:
        around = np.concatenate([s.ravel() for s in _strips(img, y0, y1, x0, x1)])
        if around.size:
            out[y0:y1, x0:x1] = np.median(around).astype(img.dtype)
    return out
