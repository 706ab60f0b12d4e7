from __future__ import annotations

import sys
import types
import warnings
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from strnet.data import preprocess as pre
from strnet.data.cache import PreprocessCache
from strnet.data.imageio import read_radiograph
from strnet.data.preprocess import PreprocessParams, foreground_box, histogram_percentiles, preprocess
from strnet.errors import DataError

RNG = np.random.default_rng(0)


def _knee_like(h: int = 96, w: int = 72, seed: int = 0) -> np.ndarray:
    """uint8: black surround, a textured bright body, like a collimated radiograph."""
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w), np.uint8)
    body = rng.integers(60, 250, (h - 20, w - 16)).astype(np.float32)
    img[10 : h - 10, 8 : w - 8] = cv2.GaussianBlur(body, (0, 0), 1.5).astype(np.uint8)
    return img


# --- parameters ----------------------------------------------------------------------------------------


def test_params_fingerprint_is_stable_and_sensitive() -> None:
    a = PreprocessParams(size=64)
    again = PreprocessParams(**a.to_dict())  # lists from JSON come back as tuples
    assert again == a and again.fingerprint() == a.fingerprint()
    assert PreprocessParams(size=64, clip_percentiles=[1, 99]).fingerprint() == a.fingerprint()  # type: ignore[arg-type]
    assert PreprocessParams(size=128).fingerprint() != a.fingerprint()
    assert PreprocessParams(size=64, crop_margin=0.05).fingerprint() != a.fingerprint()
    assert PreprocessParams(size=64, crop="joint").fingerprint() != a.fingerprint()


def test_default_fingerprint_is_the_one_caches_and_bundles_were_keyed_by() -> None:
    # values from before preprocess.crop existed: adding the option must not invalidate existing caches or bundles
    assert PreprocessParams().fingerprint() == "1c311cb970feca51"
    assert PreprocessParams(size=224).fingerprint() == "44e7f96b97cde8f1"


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"size": 4}, "size"),
        ({"clip_percentiles": (99.0, 1.0)}, "clip_percentiles"),
        ({"std": 0.0}, "std"),
        ({"crop": "knee"}, "crop"),
    ],
)
def test_params_reject_nonsense(kwargs: dict, word: str) -> None:
    with pytest.raises(ValueError, match=word):
        PreprocessParams(**kwargs)


# --- percentile clip -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "img",
    [
        RNG.random((120, 90), dtype=np.float32),
        RNG.exponential(300.0, (150, 100)).astype(np.float32),
        RNG.integers(0, 65535, (100, 100)).astype(np.float32),
        (RNG.normal(-500, 200, (80, 130))).astype(np.float32),  # CT-like negative range
        np.repeat(np.arange(8, dtype=np.float32), 200).reshape(40, 40),  # few distinct values
    ],
)
def test_histogram_percentiles_match_numpy_within_one_bin(img: np.ndarray) -> None:
    qs = (0.0, 1.0, 25.0, 50.0, 99.0, 100.0)
    got = histogram_percentiles(img, qs)
    want = np.percentile(img.astype(np.float64), qs)
    bin_width = (float(img.max()) - float(img.min())) / (pre.HIST_BINS - 1)
    np.testing.assert_allclose(got, want, atol=bin_width * 1.0001)


def test_clip_and_scale_match_a_numpy_reference() -> None:
    img = RNG.gamma(2.0, 1000.0, (64, 64)).astype(np.float32)  # full frame: no crop, same size: no resize
    params = PreprocessParams(size=64, min_crop_fraction=1.0)
    out = preprocess(img, params)
    lo, hi = np.percentile(img.astype(np.float64), [1, 99])
    ref = np.clip((img - lo) / (hi - lo), 0, 1)
    tol = 2 * (float(img.max()) - float(img.min())) / (pre.HIST_BINS - 1) / (hi - lo)
    np.testing.assert_allclose(out, ref, atol=tol)
    assert out.dtype == np.float32 and out.shape == (64, 64)
    assert abs((out == 0).mean() - 0.01) < 0.005 and abs((out == 1).mean() - 0.01) < 0.005


# --- crop ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("h", "w"), [(200, 160), (1300, 1000)])  # second one goes through the downscaled Otsu
def test_crop_is_bright_box_plus_three_percent(h: int, w: int) -> None:
    img = np.zeros((h, w), np.float32)
    y0, y1, x0, x1 = h // 4, h // 4 * 3, w // 5, w // 5 * 3
    img[y0:y1, x0:x1] = RNG.uniform(500, 900, (y1 - y0, x1 - x0))
    my, mx = round(0.03 * h), round(0.03 * w)
    got = foreground_box(img, PreprocessParams(size=64))
    tol = int(np.ceil(max(h, w) / pre.OTSU_MAX_SIDE))  # one pixel of the downscaled copy
    np.testing.assert_allclose(got, (y0 - my, y1 + my, x0 - mx, x1 + mx), atol=tol)
    # The preprocessed output shows the box, not the black surround: only the 3% margin stays dark.
    out = preprocess(img, PreprocessParams(size=100, crop_margin=0.0))
    assert (out[5:-5, 5:-5] > 0).mean() > 0.95


def test_margin_is_clamped_at_the_image_edge() -> None:
    img = np.zeros((100, 100), np.float32)
    img[0:60, 0:70] = 1.0
    assert foreground_box(img, PreprocessParams()) == (0, 63, 0, 73)


def test_small_foreground_falls_back_to_whole_image() -> None:
    img = np.zeros((100, 100), np.float32)
    img[40:70, 40:70] = 1.0  # 9% of the area
    assert foreground_box(img, PreprocessParams()) == (0, 100, 0, 100)
    img[40:72, 40:72] = 1.0  # 10.24%
    assert foreground_box(img, PreprocessParams(crop_margin=0.0)) == (40, 72, 40, 72)


# --- dtypes and degenerate input -----------------------------------------------------------------------


def test_8bit_and_16bit_versions_of_an_image_agree() -> None:
    img8 = _knee_like(160, 120)
    img16 = img8.astype(np.uint16) * 257
    params = PreprocessParams(size=64)
    a, b = preprocess(img8, params), preprocess(img16, params)
    assert np.abs(a - b).max() < 2e-3
    c = preprocess(img8.astype(np.float32) * 3.5 - 1000.0, params)  # affine intensity change: same picture
    assert np.abs(a - c).max() < 2e-3


@pytest.mark.parametrize("value", [0, 7, 65535])
def test_constant_image_gives_zeros_without_warnings(value: int) -> None:
    img = np.full((50, 40), value, np.uint16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = preprocess(img, PreprocessParams(size=32))
    assert out.shape == (32, 32) and out.dtype == np.float32 and not out.any()


def test_non_2d_input_is_rejected() -> None:
    with pytest.raises(ValueError, match="2-D"):
        preprocess(np.zeros((4, 8, 8)), PreprocessParams(size=32))


# --- fast path against a straightforward oracle --------------------------------------------------------


def _film(h: int = 600, w: int = 450, seed: int = 0) -> np.ndarray:
    """uint16, film-like: dark collimated border, bright soft-tissue column, a blurred bone block, noise."""
    from strnet.data.speed import synthetic_film

    return synthetic_film((h, w), seed)


def _oracle(img: np.ndarray, params: PreprocessParams, box: tuple[int, int, int, int]) -> np.ndarray:
    """The recipe written out plainly: float64, np.percentile on the crop, clip, scale, then cv2 bilinear."""
    y0, y1, x0, x1 = box
    crop = np.asarray(img, dtype=np.float64)[y0:y1, x0:x1]
    lo, hi = np.percentile(crop, params.clip_percentiles)
    if not hi > lo:
        return np.zeros((params.size, params.size), np.float32)
    scaled = ((np.clip(crop, lo, hi) - lo) / (hi - lo)).astype(np.float32)
    out = cv2.resize(scaled, (params.size, params.size), interpolation=cv2.INTER_LINEAR)
    return np.clip(out, 0.0, 1.0)


def _box_oracle(img: np.ndarray, params: PreprocessParams) -> tuple[int, int, int, int]:
    """Otsu on a float copy area-averaged to a longest side of OTSU_MAX_SIDE, scaled back outwards, then margin.

    This is the box the real-data results were made with (the preprocessing before the speed work); an
    integer-factor downscale, faster, moved some Mendeley boxes by up to 100 px and the run with them.
    """
    a = np.asarray(img, dtype=np.float32)
    h, w = a.shape
    s = min(1.0, pre.OTSU_MAX_SIDE / max(h, w))
    sh, sw = max(1, round(h * s)), max(1, round(w * s))
    small = a if s == 1.0 else cv2.resize(a, (sw, sh), interpolation=cv2.INTER_AREA)
    lo, hi = float(a.min()), float(a.max())
    small8 = np.clip(np.rint(np.abs(small.astype(np.float64) * (255.0 / (hi - lo)) - lo * 255.0 / (hi - lo))), 0, 255)
    _, mask = cv2.threshold(small8.astype(np.uint8), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    ys, xs = np.nonzero(mask)
    if (np.ptp(ys) + 1) * (np.ptp(xs) + 1) < params.min_crop_fraction * sh * sw:
        return 0, h, 0, w
    fy, fx = h / sh, w / sw
    y0, y1 = int(np.floor(ys.min() * fy)), int(np.ceil((ys.max() + 1) * fy))
    x0, x1 = int(np.floor(xs.min() * fx)), int(np.ceil((xs.max() + 1) * fx))
    my, mx = round(params.crop_margin * h), round(params.crop_margin * w)
    return max(0, y0 - my), min(h, y1 + my), max(0, x0 - mx), min(w, x1 + mx)


@pytest.mark.parametrize(("h", "w", "seed"), [(600, 450, 0), (1301, 999, 1), (2000, 1500, 2)])
def test_box_matches_an_area_average_otsu_oracle(h: int, w: int, seed: int) -> None:
    img = _film(h, w, seed)
    got = foreground_box(img, PreprocessParams())
    # A different 8-bit rounding than OpenCV's could move Otsu's level by one grey; on these films it does not.
    assert got == _box_oracle(img, PreprocessParams())
    assert foreground_box(img.astype(np.float32), PreprocessParams()) == got  # integer-valued float: same


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32, np.float64, np.int32])
@pytest.mark.parametrize(("h", "w"), [(600, 450), (1301, 999)])
def test_preprocess_matches_the_oracle_for_integer_valued_images(dtype: type, h: int, w: int) -> None:
    film = _film(h, w, seed=h)
    img = (film >> 8).astype(dtype) if dtype == np.uint8 else film.astype(dtype)
    params = PreprocessParams(size=128)
    out = preprocess(img, params)
    ref = _oracle(img, params, foreground_box(img, params))
    assert out.dtype == np.float32 and out.shape == (128, 128)
    # Exact percentiles for integer pixels: only float32 rounding separates the two.
    np.testing.assert_allclose(out, ref, rtol=0, atol=2e-6)


def test_preprocess_matches_the_oracle_within_a_bin_for_fractional_floats() -> None:
    img = _film(500, 400).astype(np.float32) * np.float32(0.01) - np.float32(3.3)  # fractional, negative
    params = PreprocessParams(size=96)
    out = preprocess(img, params)
    ref = _oracle(img, params, foreground_box(img, params))
    y0, y1, x0, x1 = foreground_box(img, params)
    lo, hi = np.percentile(img[y0:y1, x0:x1], [1, 99])
    tol = 2 * (float(img.max()) - float(img.min())) / (pre.HIST_BINS - 1) / (hi - lo)
    np.testing.assert_allclose(out, ref, rtol=0, atol=tol)


def test_same_pixels_in_any_dtype_give_identical_output() -> None:
    film8 = (_film(700, 520, seed=3) >> 8).astype(np.uint8)
    params = PreprocessParams(size=64)
    want = preprocess(film8, params)
    for dtype in (np.uint16, np.int16, np.int64, np.float32, np.float64):
        assert np.array_equal(preprocess(film8.astype(dtype), params), want), dtype
    assert np.array_equal(preprocess(np.ascontiguousarray(film8.T).T, params), want)  # column-major view
    flipped = film8[::-1]  # negative strides
    assert np.array_equal(preprocess(flipped, params), preprocess(np.ascontiguousarray(flipped), params))


@pytest.mark.parametrize("bad", [0.5, -1.0, 65536.0, np.nan, np.inf])
def test_float_images_become_uint16_only_when_every_pixel_is_a_16_bit_integer(bad: float) -> None:
    img = RNG.integers(0, 65536, (300, 1000)).astype(np.float32)  # several of the check's blocks
    assert np.array_equal(pre._as_uint16_if_integral(img), img.astype(np.uint16))
    img[250, 999] = bad  # in the last block
    assert pre._as_uint16_if_integral(img) is None
    assert pre._working_image(img).dtype == np.float32


def test_crop_fallback_uses_the_whole_image() -> None:
    img = np.full((400, 300), 1000, np.uint16)
    img += RNG.integers(0, 50, img.shape, dtype=np.uint16)
    img[150:230, 120:200] = 30000  # 5 % of the area: specks, not anatomy
    params = PreprocessParams(size=64)
    assert foreground_box(img, params) == (0, 400, 0, 300)
    np.testing.assert_allclose(preprocess(img, params), _oracle(img, params, (0, 400, 0, 300)), atol=2e-6)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32, np.float64])
def test_constant_image_or_crop_gives_zeros(dtype: type) -> None:
    params = PreprocessParams(size=32, crop_margin=0.0)
    assert not preprocess(np.full((60, 50), 200, dtype), params).any()
    img = np.zeros((60, 50), dtype)
    img[10:50, 5:45] = 200  # the crop (no margin) is the constant block
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = preprocess(img, params)
    assert out.shape == (32, 32) and out.dtype == np.float32 and not out.any()


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("big", [False, True])
def test_integer_percentiles_are_exact(dtype: type, big: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if big:  # the path for images too big for cv2's float32 bin counts
        monkeypatch.setattr(pre, "_CALCHIST_MAX_COUNT", 100)
    top = np.iinfo(dtype).max
    img = np.clip(RNG.gamma(2.0, top / 8, (123, 77)), 0, top).astype(dtype)[5:, 3:]  # a strided view
    qs = (0.0, 0.5, 1.0, 25.0, 50.0, 97.3, 99.0, 100.0)
    np.testing.assert_allclose(histogram_percentiles(img, qs), np.percentile(img, qs), rtol=1e-12, atol=0)
    assert histogram_percentiles(np.full((9, 9), 7, dtype), (1.0, 99.0)) == [7.0, 7.0]


def test_throughput_benchmark_runs_and_restores_cv2_threads() -> None:
    from strnet.data.speed import preprocess_throughput

    before = cv2.getNumThreads()
    rate = preprocess_throughput(n_images=4, workers=2, shape=(64, 48), size=16, cv2_threads=1)
    assert np.isfinite(rate) and rate > 0
    assert cv2.getNumThreads() == before


@pytest.mark.realdata
def test_real_radiographs_match_the_oracle(real_data_dir: Path) -> None:
    files = sorted((real_data_dir / "knee-xray-osteoporosis-mendeley").rglob("*.[jJ][pP]*[gG]"))[::50]
    assert files, "no Mendeley JPEGs found"
    params = PreprocessParams(size=512)
    for f in files:
        img = read_radiograph(f)
        out = preprocess(img, params)
        np.testing.assert_allclose(out, _oracle(img, params, foreground_box(img, params)), rtol=0, atol=2e-6)


# --- cache ---------------------------------------------------------------------------------------------


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    paths = []
    for i in range(3):
        p = tmp_path / "img" / f"k{i}.png"
        p.parent.mkdir(exist_ok=True)
        cv2.imwrite(str(p), _knee_like(seed=i))
        paths.append(p)
    return paths


@pytest.fixture
def decode_counter(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []

    def counting(path: str | Path) -> np.ndarray:
        calls.append(str(path))
        return read_radiograph(path)

    monkeypatch.setattr(pre, "read_radiograph", counting)
    return calls


def test_cache_decodes_once_per_size_and_matches_direct_preprocessing(
    tmp_path: Path, images: list[Path], decode_counter: list[str]
) -> None:
    root = tmp_path / "cache"
    p64, p32 = PreprocessParams(size=64), PreprocessParams(size=32)
    cold = PreprocessCache(root).get(images[0], "", p64)
    warm_same = PreprocessCache(root).get(images[0], "", p64)  # new process-like instance: disk hit
    assert len(decode_counter) == 1
    assert np.array_equal(cold, warm_same)
    direct = preprocess(read_radiograph(images[0]), p64)
    assert np.abs(cold - direct).max() <= 0.5 / 65535 + 1e-7
    assert cold.dtype == np.float32 and cold.shape == (64, 64)
    PreprocessCache(root).get(images[0], "", p32)
    assert len(decode_counter) == 2
    entries = sorted(root.rglob("*.npy"))
    assert len(entries) == 2 and not list(root.rglob("*.tmp"))
    for e in entries:
        assert e.parent.name == e.stem[2:4] and e.parent.parent.name == e.stem[:2]
        assert np.load(e).dtype == np.uint16


def test_cache_is_content_addressed(tmp_path: Path, images: list[Path], decode_counter: list[str]) -> None:
    cache, params = PreprocessCache(tmp_path / "cache"), PreprocessParams(size=32)
    cache.get(images[0], "", params)
    copy = tmp_path / "renamed.png"
    copy.write_bytes(images[0].read_bytes())
    cache.get(copy, "", params)
    assert len(decode_counter) == 1  # same bytes under another name: reused
    cv2.imwrite(str(copy), _knee_like(seed=99))
    cache.get(copy, "", params)
    assert len(decode_counter) == 2  # replaced in place: new entry


def test_file_bytes_are_hashed_once_per_process(
    tmp_path: Path, images: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    cache, params = PreprocessCache(tmp_path / "cache"), PreprocessParams(size=32)
    cache.get(images[1], "", params)
    opened: list[str] = []
    real_open = Path.open

    def spy(self: Path, *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        opened.append(str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", spy)
    for _ in range(3):
        cache.get(images[1], "", params)
        cache.get(images[1], "", PreprocessParams(size=32, crop_margin=0.0))
    assert str(images[1]) not in opened
    PreprocessCache(tmp_path / "cache").get(images[1], "", params)  # a fresh process hashes once
    assert opened.count(str(images[1])) == 1


def test_truncated_entry_is_recomputed(tmp_path: Path, images: list[Path], decode_counter: list[str]) -> None:
    cache, params = PreprocessCache(tmp_path / "cache"), PreprocessParams(size=32)
    first = cache.get(images[2], "", params)
    (entry,) = (tmp_path / "cache").rglob("*.npy")
    entry.write_bytes(entry.read_bytes()[:50])
    again = cache.get(images[2], "", params)
    assert len(decode_counter) == 2 and np.array_equal(first, again)


def test_sides_are_separate_entries_loaded_through_bilateral(
    tmp_path: Path, images: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[str, str]] = []

    def load_knee(path: str | Path, side: str) -> np.ndarray:
        seen.append((Path(path).name, side))
        img = read_radiograph(path)
        half = img.shape[1] // 2
        return img[:, :half] if side == "R" else img[:, half:]  # patient's right = viewer's left

    fake = types.ModuleType("strnet.data.bilateral")
    fake.load_knee = load_knee  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "strnet.data.bilateral", fake)
    cache, params = PreprocessCache(tmp_path / "cache"), PreprocessParams(size=32)
    r, l_ = cache.get(images[0], "R", params), cache.get(images[0], "L", params)
    cache.get(images[0], "R", params)
    assert seen == [("k0.png", "R"), ("k0.png", "L")]
    assert not np.array_equal(r, l_)


def test_warm_collects_problems_and_caches_the_good_files(
    tmp_path: Path, images: list[Path], decode_counter: list[str]
) -> None:
    broken = tmp_path / "img" / "broken.png"
    broken.write_bytes(images[0].read_bytes()[:100])
    missing = tmp_path / "img" / "missing.png"
    paths = [*images, broken, missing, images[0]]
    df = pd.DataFrame({"path": [str(p) for p in paths], "side": [""] * 6})  # last row repeats a good file
    cache, params = PreprocessCache(tmp_path / "cache"), PreprocessParams(size=32)
    problems = cache.warm(df, params, workers=2)
    assert len(problems) == 2
    assert problems[0].startswith(f"{broken}: ") and "truncated" in problems[0]
    assert problems[1].startswith(f"{missing}: ") and "not found" in problems[1]
    n = len(decode_counter)
    assert sorted(decode_counter) == sorted({str(p) for p in [*images, broken]})
    for p in images:
        cache.get(p, "", params)
    assert len(decode_counter) == n
    with pytest.raises(DataError, match=r"broken\.png"):
        cache.get(broken, "", params)


@pytest.mark.realdata
def test_real_radiographs_preprocess_through_the_cache(
    real_data_dir: Path, tmp_path: Path, decode_counter: list[str]
) -> None:
    files = sorted((real_data_dir / "knee-xray-osteoporosis-mendeley").rglob("*.[jJ][pP]*[gG]"))[:4]
    assert files, "no Mendeley JPEGs found"
    df = pd.DataFrame({"path": [str(f) for f in files], "side": [""] * len(files)})
    cache, params = PreprocessCache(tmp_path / "cache"), PreprocessParams(size=64)
    assert cache.warm(df, params) == []
    for f in files:
        out = cache.get(f, "", params)
        assert out.shape == (64, 64) and out.min() >= 0.0 and out.max() <= 1.0
        assert out.std() > 0.1  # real contrast, not a flat or clipped-out image
    assert len(decode_counter) == len(files)
