from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from strnet.data.bilateral import column_medians, load_knee, percentiles, split_bilateral
from strnet.data.imageio import is_image_file, read_radiograph


def _legs(width: int, height: int, bands: list[tuple[float, float, float]], seed: int = 0) -> np.ndarray:
    """Dark background with vertical bright bands (start, stop as width fractions, level 0..255) and noise."""
    rng = np.random.default_rng(seed)
    img = np.full((height, width), 12.0, dtype=np.float32)
    for start, stop, level in bands:
        img[:, int(start * width) : int(stop * width)] = level
    return np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.float32)


BILATERAL = [(0.08, 0.40, 200.0), (0.58, 0.92, 190.0)]


def test_two_legs_are_split_in_the_gap_and_halves_rebuild_the_image() -> None:
    img = _legs(96, 80, BILATERAL)
    parts = split_bilateral(img)
    assert parts is not None
    right, left = parts
    assert 0.40 * 96 <= right.shape[1] <= 0.58 * 96
    np.testing.assert_array_equal(np.hstack([right, left]), img)
    # The viewer-left leg (patient's right knee) lies entirely in the first part.
    assert right[:, int(0.08 * 96) : int(0.40 * 96)].mean() > 150
    assert left[:, : int(0.58 * 96) - right.shape[1]].mean() < 30


def test_square_bilateral_is_detected_from_content_not_aspect_ratio() -> None:
    assert split_bilateral(_legs(64, 64, BILATERAL)) is not None
    assert split_bilateral(_legs(64, 64, [(0.3, 0.7, 200.0)])) is None


@pytest.mark.parametrize(
    "bands",
    [
        [(0.30, 0.70, 200.0)],  # one centred leg
        [(0.05, 0.45, 200.0)],  # one leg off-centre, empty right side
        [(0.05, 0.55, 200.0), (0.55, 0.62, 110.0), (0.62, 0.95, 190.0)],  # zoomed knee, soft-tissue dip only
        [(0.10, 0.40, 200.0), (0.60, 0.90, 60.0)],  # one knee plus faint soft tissue
    ],
)
def test_single_knees_are_not_split(bands: list[tuple[float, float, float]]) -> None:
    assert split_bilateral(_legs(96, 96, bands)) is None


def test_blank_tiny_and_non_2d_inputs() -> None:
    assert split_bilateral(np.zeros((64, 64), np.float32)) is None
    assert split_bilateral(np.ones((8, 8), np.float32)) is None
    with pytest.raises(ValueError, match="2-D"):
        split_bilateral(np.zeros((8, 8, 3), np.float32))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_percentiles_and_column_medians_equal_numpy_to_the_last_bit(dtype: type) -> None:
    """The detection's one-partition shortcuts against ``np.percentile`` / ``np.median`` (the thresholds were set
    with those): odd and even sizes, ties, ranks that fall on an order statistic and ones between two."""
    rng = np.random.default_rng(7)
    for n in (1, 2, 3, 95, 128, 1000):
        for values in (rng.random(n) * 100, np.round(rng.random(n) * 5)):
            a = values.astype(dtype)
            qs = (0.0, 1.0, 2.0, 50.0, 97.5, 99.0, 100.0)
            assert np.array_equal(np.array(percentiles(a, qs)), np.percentile(a, qs))
        for rows in (1, 2, 7, 8):
            m = rng.random((rows, 13)).astype(dtype)
            assert np.array_equal(column_medians(m), np.median(m, axis=0))


def test_detection_is_fast_on_a_1024_square() -> None:
    img = _legs(1024, 1024, BILATERAL)
    timings = []
    for _ in range(15):
        t0 = time.perf_counter()
        assert split_bilateral(img) is not None
        timings.append(time.perf_counter() - t0)
    assert min(timings) < 0.005


def test_load_knee_crops_the_requested_side(tmp_path: Path) -> None:
    img = _legs(96, 64, BILATERAL).astype(np.uint8)
    path = tmp_path / "both.png"
    assert cv2.imwrite(str(path), img)
    full = read_radiograph(path)
    right, left = load_knee(path, "R"), load_knee(path, "L")
    np.testing.assert_array_equal(np.hstack([right, left]), full)
    assert right.shape[1] < 96 and left.shape[1] < 96
    np.testing.assert_array_equal(load_knee(path, ""), full)


def test_load_knee_returns_a_single_knee_whole_and_rejects_bad_side(tmp_path: Path) -> None:
    path = tmp_path / "one.png"
    assert cv2.imwrite(str(path), _legs(96, 64, [(0.3, 0.7, 200.0)]).astype(np.uint8))
    np.testing.assert_array_equal(load_knee(path, "L"), read_radiograph(path))
    with pytest.raises(ValueError, match="side"):
        load_knee(path, "left")


def _detection_rate(folder: Path) -> float:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and is_image_file(p))
    assert files, f"no images under {folder}"
    return sum(split_bilateral(read_radiograph(p)) is not None for p in files) / len(files)


@pytest.mark.realdata
def test_detection_rates_on_real_data(real_data_dir: Path) -> None:
    # Visual review: about 55 % of the Mendeley images are bilateral, the rest single knees; the 224-px set
    # is mostly single knees with the re-distributed Mendeley images among them.
    mendeley = _detection_rate(real_data_dir / "knee-xray-osteoporosis-mendeley")
    small = _detection_rate(real_data_dir / "os-collected-data-224")
    assert 0.5 <= mendeley <= 0.65
    assert 0.05 <= small <= 0.2
