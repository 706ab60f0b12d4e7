"""The joint square: it must hold the joint space of a tall knee crop and leave square crops alone."""

from __future__ import annotations

import numpy as np
import pytest

from strnet.data.joint import fibula_separation, joint_square
from strnet.data.preprocess import PreprocessParams, foreground_box, preprocess

JOINT_ROWS = (220, 228)  # the phantom's joint space


def knee_phantom(rng: np.random.Generator) -> np.ndarray:
    """A 400 x 240 AP knee: femoral shaft, condyles, joint space, tibial plateau, tibia beside a fibula.

    The tibia and fibula together hold more bone pixels per row than the condyles (80 + 50 > 115), but in two runs:
    a joint finder that counted bone pixels would centre on the lower leg.
    """
    img = np.zeros((400, 240), np.float32)
    img[:, 10:230] = 0.35  # soft tissue
    img[:150, 90:140] = 0.9  # femoral shaft
    img[150 : JOINT_ROWS[0], 60:175] = 0.9  # condyles
    img[JOINT_ROWS[1] : 260, 58:160] = 0.9  # tibial plateau
    img[260:, 50:130] = 0.9  # tibia
    img[265:, 140:190] = 0.9  # fibula
    return img + rng.normal(0, 0.02, img.shape).astype(np.float32)


def test_square_holds_the_joint_space_not_the_lower_leg() -> None:
    img = knee_phantom(np.random.default_rng(0))
    y0, y1, x0, x1 = joint_square(img)
    assert (x0, x1) == (0, 240) and y1 - y0 == 240
    assert y0 <= JOINT_ROWS[0] and JOINT_ROWS[1] <= y1
    assert y0 < 150  # the condyles are in it, not just the plateau and shafts below


@pytest.mark.parametrize("shape", [(224, 224), (200, 224), (260, 224)])
def test_square_or_near_square_crops_are_left_whole(shape: tuple[int, int]) -> None:
    img = np.random.default_rng(1).random(shape, dtype=np.float32)
    assert joint_square(img) == (0, shape[0], 0, shape[1])


def test_flat_and_bad_inputs() -> None:
    assert joint_square(np.zeros((400, 100), np.uint16)) == (0, 400, 0, 100)
    with pytest.raises(ValueError, match="2-D"):
        joint_square(np.zeros((400, 100, 3)))


def test_preprocess_with_joint_crop_is_preprocess_of_the_square() -> None:
    img = (knee_phantom(np.random.default_rng(2)) * 4000).astype(np.uint16)
    joint = PreprocessParams(size=64, crop="joint")
    y0, y1, x0, x1 = foreground_box(img, joint)
    crop = img[y0:y1, x0:x1]
    j0, j1, i0, i1 = joint_square(crop)
    expected = preprocess(crop[j0:j1, i0:i1], PreprocessParams(size=64, crop_margin=0.0))
    got = preprocess(img, joint)
    # the square's own Otsu box is the whole square (soft tissue fills it), so only the margin differs: none
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert not np.allclose(got, preprocess(img, PreprocessParams(size=64)), atol=0.05)


def _leg(fibula_cols: tuple[int, int]) -> np.ndarray:
    """A tall AP phantom: soft tissue, wide condyles, the tibia below them and a fibula at ``fibula_cols``."""
    img = np.full((400, 200), 20.0)  # air on both sides of the leg, as on a film: three classes for Otsu
    img[:, 50:150] = 100
    img[150:190, 55:145] = 250  # the condyles: the widest bone
    img[190:, 70:110] = 250  # the tibia
    img[200:, fibula_cols[0] : fibula_cols[1]] = 250
    noise = np.random.default_rng(0).normal(0, 8, img.shape)  # film grain: Otsu needs spread levels, as on a film
    return np.clip(img + noise, 0, 4095).astype(np.uint16)


def test_fibula_separation_tells_a_fibula_clear_of_the_tibia_from_one_behind_it() -> None:
    assert fibula_separation(_leg((120, 135))) == 1.0  # straight AP: two bones in every row of the band
    assert fibula_separation(_leg((105, 120))) == 0.0  # rotated: the fibula merges with the tibia
    assert np.isnan(fibula_separation(np.zeros((400, 200), np.uint16)))  # no contrast, no band
    with pytest.raises(ValueError, match="2-D"):
        fibula_separation(np.zeros((4, 4, 3)))
