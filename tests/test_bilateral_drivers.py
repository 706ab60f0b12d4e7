"""The left–right diagnosis: crop geometry seen from the cut between the legs for both knees, the matched and
nudged crops it renders, and its association table against scipy. Its end-to-end check (re-rendered knees
reproduce a run's out-of-fold scores) runs in the tiny cross-validation of tests/test_cross_validate.py."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from scipy import stats

from simulations import bilateral_drivers as BD
from strnet.data.preprocess import PreprocessParams, crop_box, histogram_percentiles, preprocess, render


def _knee(side: str, box: tuple[int, int, int, int], *, shape=(100, 60), prob=0.5, seed=0) -> BD.Knee:
    rng = np.random.default_rng(seed)
    work = rng.integers(0, 4000, size=shape).astype(np.uint16)
    y0, y1, x0, x1 = box
    return BD.Knee(
        film="f.png",
        side=side,
        fold=0,
        label=1.0,
        source="s",
        prob=prob,
        flag=1.0,
        work=work,
        box=box,
        window=tuple(histogram_percentiles(work[y0:y1, x0:x1], (1.0, 99.0))),
        film_window=(0.0, 4000.0),
        markers=0,
    )


def test_preprocess_is_its_crop_box_rendered_with_the_crops_own_window() -> None:
    """The diagnosis re-renders knees from these steps, so they must be the pipeline's, bit for bit."""
    rng = np.random.default_rng(1)
    img = rng.integers(0, 300, size=(180, 120)).astype(np.uint16)
    img[40:150, 30:95] += 2000  # a bright leg on a dark background: a real crop, not the whole image
    for params in (PreprocessParams(size=32), PreprocessParams(size=32, crop="joint")):
        y0, y1, x0, x1 = crop_box(img, params)
        assert (y1 - y0, x1 - x0) != img.shape
        crop = img[y0:y1, x0:x1]
        want = render(crop, histogram_percentiles(crop, params.clip_percentiles), params.size)
        np.testing.assert_array_equal(preprocess(img, params), want)
    assert not render(crop, (5.0, 5.0), 8).any()  # an empty window is a blank knee, not a division by zero


def test_geometry_is_measured_from_the_cut_between_the_legs_for_both_knees() -> None:
    # viewer-left half (right knee): the cut is its right edge; viewer-right half (left knee): its left edge
    right = BD.features(_knee("R", (10, 90, 5, 50)))
    left = BD.features(_knee("L", (10, 90, 10, 55)))
    assert right["crop_inner_gap"] == pytest.approx(10 / 60) and right["crop_outer_gap"] == pytest.approx(5 / 60)
    assert left["crop_inner_gap"] == pytest.approx(10 / 60) and left["crop_outer_gap"] == pytest.approx(5 / 60)
    assert right["crop_area"] == pytest.approx(80 * 45 / 6000) and right["crop_top"] == pytest.approx(0.1)


def test_matched_crops_are_the_mirrored_union_of_the_two_boxes() -> None:
    right = _knee("R", (10, 80, 8, 52), shape=(100, 60))  # inner gap 8, outer gap 8
    left = _knee("L", (20, 95, 4, 40), shape=(100, 50))  # inner gap 4, outer gap 10
    box_r, box_l = BD.matched_boxes(right, left)
    assert box_r == (10, 95, 8, 56) and box_l == (10, 95, 4, 42)  # inner gap 4 and outer gap 8 on both sides
    r_f = BD.features(replace(right, box=box_r))
    l_f = BD.features(replace(left, box=box_l))
    assert (r_f["crop_top"], r_f["crop_bottom_gap"]) == (l_f["crop_top"], l_f["crop_bottom_gap"])


def test_a_nudged_crop_keeps_its_size_and_stays_inside_the_image() -> None:
    assert BD.shifted((10, 60, 10, 50), (100, 60), 0.1, -0.1) == (15, 65, 6, 46)
    assert BD.shifted((10, 60, 10, 50), (100, 60), -0.5, 0.5) == (0, 50, 20, 60)  # clamped at the edges


def test_association_pairs_each_films_right_minus_left_and_matches_scipy() -> None:
    rng = np.random.default_rng(2)
    pairs = []
    for i in range(12):
        r_w, l_w = int(rng.integers(30, 60)), int(rng.integers(30, 60))
        right = _knee("R", (0, 100, 2, r_w), prob=float(rng.random()), seed=i)
        left = _knee("L", (0, 100, 60 - l_w, 58), prob=float(rng.random()), seed=100 + i)
        pairs.append((right, left))
    table = BD.association(pairs).set_index("feature")
    d_area = np.array([BD.features(r)["crop_area"] - BD.features(sub)["crop_area"] for r, sub in pairs])
    d_p = np.array([r.prob - sub.prob for r, sub in pairs])
    assert table.loc["crop_area", "rho_signed"] == pytest.approx(stats.spearmanr(d_p, d_area).statistic)
    assert table.loc["crop_area", "rho_abs"] == pytest.approx(stats.spearmanr(abs(d_p), abs(d_area)).statistic)
    assert np.isnan(table.loc["crop_top", "rho_signed"])  # no difference between the knees: no correlation


def test_agreement_counts_flags_at_each_films_own_threshold() -> None:
    p_r, p_l = np.array([0.6, 0.6, 0.2, 0.9]), np.array([0.5, 0.7, 0.3, 0.1])
    got = BD.agreement(p_r, p_l, np.array([0.45, 0.5, 0.25, 0.5]))
    assert got["flags_differ"] == 0.5  # the last two films (0.2 < 0.25 <= 0.3; 0.1 < 0.5 <= 0.9)
    assert got["mean_abs_dp"] == pytest.approx(np.abs(p_r - p_l).mean())
    assert got["spearman"] == pytest.approx(stats.spearmanr(p_r, p_l).statistic)
