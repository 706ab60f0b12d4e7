"""Side markers: found on background and on soft tissue, never on bone, painted out with the tissue around them;
an image without markers passes untouched, and the option keeps old caches' keys."""

from __future__ import annotations

import numpy as np
import pytest

from strnet.data.markers import marker_boxes, mask_markers
from strnet.data.preprocess import PreprocessParams, preprocess

BONE = (slice(0, 1024), slice(250, 330))  # a femoral shaft, wider than the top-hat square
CONDYLE = (slice(480, 560), slice(220, 360))


def _leg() -> np.ndarray:
    """A 1024 x 640 knee half: dark background, a soft-tissue band, a bright bone shaft and condyles, mild noise."""
    rng = np.random.default_rng(0)
    img = np.full((1024, 640), 15.0) + rng.normal(0, 3, (1024, 640))
    img[:, 150:450] += 70  # soft tissue
    img[BONE] += 110
    img[CONDYLE] += 110
    return np.clip(img, 0, 255).astype(np.uint8)


def _marker(img: np.ndarray, y: int, x: int, level: int) -> tuple[int, int, int, int]:
    """A 28 px "L" square: bright box, dark glyph inside (as the lead letters image)."""
    img[y : y + 28, x : x + 28] = level
    img[y + 6 : y + 22, x + 8 : x + 12] = level - 90
    img[y + 18 : y + 22, x + 8 : x + 20] = level - 90
    return y, y + 28, x, x + 28


def _covers(box: tuple[int, int, int, int], target: tuple[int, int, int, int]) -> bool:
    return box[0] <= target[0] and box[1] >= target[1] and box[2] <= target[2] and box[3] >= target[3]


def _touches(box: tuple[int, int, int, int], region: tuple[slice, slice]) -> bool:
    ys, xs = region
    return box[0] < ys.stop and box[1] > ys.start and box[2] < xs.stop and box[3] > xs.start


def test_markers_on_background_and_soft_tissue_are_found_and_bone_is_not() -> None:
    img = _leg()
    on_background = _marker(img, 100, 40, 250)
    on_tissue = _marker(img, 700, 170, 250)
    boxes = marker_boxes(img)
    assert len(boxes) == 2
    assert any(_covers(b, on_background) for b in boxes) and any(_covers(b, on_tissue) for b in boxes)
    assert not any(_touches(b, BONE) or _touches(b, CONDYLE) for b in boxes)


def test_masking_paints_each_marker_with_the_tissue_around_it_and_keeps_the_rest() -> None:
    img = _leg()
    clean = img.copy()
    y0, y1, x0, x1 = _marker(img, 700, 170, 250)
    out = mask_markers(img)
    assert out is not img and out.dtype == img.dtype
    assert abs(float(np.median(out[y0:y1, x0:x1])) - float(np.median(clean[y0:y1, x0:x1]))) < 10  # tissue again
    assert out[y0:y1, x0:x1].max() < 250
    (box,) = marker_boxes(img)
    outside = np.ones(img.shape, bool)
    outside[box[0] : box[1], box[2] : box[3]] = False
    np.testing.assert_array_equal(out[outside], img[outside])
    assert img[y0 + 1, x0 + 1] == 250  # the input is left as it was


def test_an_image_without_markers_passes_untouched() -> None:
    img = _leg()
    assert marker_boxes(img) == []
    assert mask_markers(img) is img
    assert marker_boxes(np.zeros((50, 40), np.uint16)) == []
    with pytest.raises(ValueError, match="2-D"):
        marker_boxes(np.zeros((4, 4, 3), np.uint8))


def test_the_option_changes_pixels_and_keys_but_not_old_keys() -> None:
    img = _leg()
    _marker(img, 100, 40, 250)
    plain, masked = PreprocessParams(size=64), PreprocessParams(size=64, mask_markers=True)
    assert plain.fingerprint() == PreprocessParams(size=64, mask_markers=False).fingerprint()
    assert masked.fingerprint() != plain.fingerprint()
    assert "mask_markers" not in PreprocessParams(size=64).fingerprint()
    assert not np.array_equal(preprocess(img, plain), preprocess(img, masked))
    with pytest.raises(ValueError, match="mask_markers"):
        PreprocessParams(mask_markers="yes")  # type: ignore[arg-type]
