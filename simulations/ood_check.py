"""How often does the OOD guard reject real knees, and does it reject things that are not knees?

Synthetic non-radiographs (:func:`non_radiographs`) stand in for what lands in an inbox by mistake: charts
(colour and grey, PNG and JPEG), colour photographs, noise, a blank frame, and grey renders of other body parts
(a chest, a hand) that pass every image check and must be caught by the feature distance.

``python -m simulations.ood_check --bundle runs/real/centralized/bundle --split runs/real/split.csv`` fits the
Gaussian on the split's *train* knees with the bundle's model, sets the limit on its *val* knees and prints the
rejection rate of the *test* knees, of all images of the developer share (image checks), and of the synthetic
non-radiographs (image checks and feature distance separately). Nothing is written.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

Maker = Callable[[np.random.Generator, int], np.ndarray]


def _figure_rgb(draw: Callable[..., None], rng: np.random.Generator, size: int, aspect: float) -> np.ndarray:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    h = size
    w = round(size * aspect)
    fig = Figure(figsize=(w / 100, h / 100), dpi=100)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    draw(ax, rng)
    fig.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[:, :, :3].copy()


def bar_chart(rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """A matplotlib bar chart (RGB): bars, axes, tick labels and a title on white."""

    def draw(ax, rng: np.random.Generator) -> None:  # type: ignore[no-untyped-def]
        n = int(rng.integers(3, 8))
        ax.bar(range(n), rng.uniform(1, 10, n), color=[f"C{i}" for i in range(n)])
        ax.set_title("Monthly volume")
        ax.set_xticks(range(n), [f"Q{i + 1}" for i in range(n)])

    return _figure_rgb(draw, rng, size, float(rng.uniform(1.0, 1.6)))


def line_chart(rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """A matplotlib line plot (RGB) with grid and legend."""

    def draw(ax, rng: np.random.Generator) -> None:  # type: ignore[no-untyped-def]
        x = np.linspace(0, 10, 50)
        for i in range(int(rng.integers(1, 4))):
            ax.plot(x, np.cumsum(rng.normal(0, 1, 50)), label=f"series {i}")
        ax.grid(True)
        ax.legend()
        ax.set_xlabel("time")

    return _figure_rgb(draw, rng, size, float(rng.uniform(1.0, 1.6)))


def gray_chart(rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """A grey-only bar chart drawn with OpenCV: black bars and text on white, no colour to give it away."""
    h, w = size, round(size * rng.uniform(1.0, 1.5))
    img = np.full((h, w), 255, np.uint8)
    n = int(rng.integers(3, 7))
    x0, base = w // 8, h - h // 8
    cv2.line(img, (x0, h // 10), (x0, base), 0, 1)
    cv2.line(img, (x0, base), (w - w // 16, base), 0, 1)
    bw = (w - x0 - w // 16) // (2 * n)
    for i in range(n):
        top = int(base - rng.uniform(0.2, 0.8) * (base - h // 10))
        left = x0 + (2 * i + 1) * bw
        cv2.rectangle(img, (left, top), (left + bw, base), int(rng.integers(40, 200)), -1)
        cv2.putText(img, str(i + 1), (left, base + h // 16), cv2.FONT_HERSHEY_SIMPLEX, size / 700, 0, 1, cv2.LINE_AA)
    cv2.putText(img, "Results", (w // 3, h // 14), cv2.FONT_HERSHEY_SIMPLEX, size / 500, 0, 1, cv2.LINE_AA)
    return img


def colour_photo(rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """A 'photograph': smooth colour gradients (sky/ground), coloured blobs and sensor noise (RGB)."""
    h, w = size, round(size * rng.uniform(1.0, 1.5))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = yy / h
    top, bottom = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    img = (1 - t)[..., None] * top + t[..., None] * bottom + 30 * np.sin(xx / w * rng.uniform(2, 6))[..., None]
    for _ in range(int(rng.integers(3, 8))):
        c = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        axes = (int(rng.integers(size // 20, size // 4)), int(rng.integers(size // 20, size // 4)))
        cv2.ellipse(img, c, axes, float(rng.uniform(0, 180)), 0, 360, rng.uniform(0, 255, 3).tolist(), -1)
    img = cv2.GaussianBlur(img, (0, 0), 1.5) + rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def uniform_noise(rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """Grey uniform noise: every grey level, no flat area, no colour — only the spatial structure is wrong."""
    return rng.integers(0, 256, (size, size), dtype=np.uint8)


def blank(rng: np.random.Generator, size: int = 256) -> np.ndarray:
    return np.full((size, size), int(rng.integers(0, 256)), np.uint8)


def _acquire(rng: np.random.Generator, att: np.ndarray) -> np.ndarray:
    """Detector response, blur and noise as for the knee renders, so only the anatomy differs."""
    img = 0.9 * (1.0 - np.exp(-1.3 * att)) * rng.uniform(0.8, 1.2) + 0.05
    img = cv2.GaussianBlur(img.astype(np.float32), (0, 0), max(0.6, att.shape[0] / 300))
    img = img + rng.normal(0, 0.015, img.shape).astype(np.float32)
    return np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)


def chest_render(rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """A grey PA chest: soft-tissue torso, two dark lungs, a bright spine/mediastinum, rib arcs, clavicles."""
    h = w = size
    att = np.zeros((h, w), np.float32)
    cv2.ellipse(att, (w // 2, int(h * 0.55)), (int(w * 0.46), int(h * 0.55)), 0, 0, 360, 0.6, -1)
    for sgn in (-1, 1):
        cv2.ellipse(
            att, (w // 2 + sgn * int(w * 0.2), int(h * 0.5)), (int(w * 0.15), int(h * 0.3)), 0, 0, 360, 0.15, -1
        )
    cv2.rectangle(att, (w // 2 - w // 22, 0), (w // 2 + w // 22, h), 1.0, -1)
    cv2.ellipse(att, (w // 2 + w // 30, int(h * 0.62)), (int(w * 0.13), int(h * 0.12)), 0, 0, 360, 0.8, -1)
    for i in range(9):
        y = int(h * (0.22 + 0.07 * i + rng.uniform(-0.01, 0.01)))
        for sgn in (-1, 1):
            cv2.ellipse(att, (w // 2, y), (int(w * 0.36), int(h * 0.09)), 0, 90 - sgn * 90, 90, 0.9, max(1, h // 80))
    for sgn in (-1, 1):
        cv2.line(att, (w // 2, int(h * 0.17)), (w // 2 + sgn * int(w * 0.38), int(h * 0.12)), 1.0, max(2, h // 50))
    return _acquire(rng, att)


def hand_render(rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """A grey PA hand: soft tissue, metacarpals and phalanges as bright segmented rods, on dark air."""
    h = w = size
    soft = np.zeros((h, w), np.float32)
    bone = np.zeros((h, w), np.float32)
    palm = (w // 2, int(h * 0.72))
    cv2.ellipse(soft, palm, (int(w * 0.22), int(h * 0.2)), 0, 0, 360, 0.35, -1)
    angles = np.array([-35.0, -15.0, -3.0, 9.0, 22.0]) + rng.uniform(-4, 4, 5)
    lengths = (0.32, 0.46, 0.5, 0.46, 0.38)
    for k, (ang, length) in enumerate(zip(angles, lengths, strict=True)):
        a = math.radians(ang)
        base = np.array([palm[0] + (k - 2) * w * 0.08, palm[1] + h * 0.12])
        direction = np.array([math.sin(a), -math.cos(a)])
        tip = base + direction * length * h * 1.3
        cv2.line(soft, tuple(base.astype(int)), tuple(tip.astype(int)), 0.35, max(3, w // 18))
        for s0, s1 in ((0.0, 0.42), (0.46, 0.68), (0.72, 0.86), (0.89, 0.98)):
            p0, p1 = base + direction * s0 * length * h * 1.3, base + direction * s1 * length * h * 1.3
            cv2.line(bone, tuple(p0.astype(int)), tuple(p1.astype(int)), 0.8, max(2, w // 40))
    return _acquire(rng, soft + bone)


NON_RADIOGRAPHS: dict[str, Maker] = {
    "bar_chart": bar_chart,
    "line_chart": line_chart,
    "gray_chart": gray_chart,
    "colour_photo": colour_photo,
    "uniform_noise": uniform_noise,
    "blank": blank,
    "chest": chest_render,
    "hand": hand_render,
}
# What the image checks alone cannot be expected to reject: grey, noisy, spatially smooth X-ray-like renders.
RADIOGRAPH_LIKE = ("chest", "hand")


def write_non_radiographs(out_dir: Path, seed: int = 0, per_kind: int = 3, size: int = 256) -> dict[str, list[Path]]:
    """PNG files (charts also as JPEG, as a screenshot pasted into a PACS export would be) per kind."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths: dict[str, list[Path]] = {}
    for kind, make in NON_RADIOGRAPHS.items():
        paths[kind] = []
        for i in range(per_kind):
            img = make(rng, size)
            bgr = img if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
            suffix = ".jpg" if kind.endswith("chart") and i % 2 else ".png"
            path = out_dir / f"{kind}_{i}{suffix}"
            if not cv2.imwrite(str(path), bgr):
                raise OSError(f"could not write {path}")
            paths[kind].append(path)
    return paths


def _share_images(root: Path) -> list[Path]:
    from strnet.data.imageio import is_image_file

    return sorted(p for p in root.rglob("*") if p.is_file() and is_image_file(p))


def main(argv: list[str] | None = None) -> int:
    import tempfile

    import pandas as pd

    from strnet.bundle import load_bundle
    from strnet.data.dataset import KneeDataset
    from strnet.ood import (
        DEFAULT_QUANTILE,
        FeatureGaussian,
        FeatureMoments,
        OODModel,
        distance_histogram,
        extract_features,
        image_problems,
        read_image_for_checks,
    )

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--split", required=True, help="CSV with path, side, split, site (e.g. runs/real/split.csv)")
    ap.add_argument("--share", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "knee"))
    ap.add_argument("--quantile", type=float, default=DEFAULT_QUANTILE)
    ap.add_argument("--shrinkage", nargs="+", default=["oas", "0.1"], help="'oas' and/or numbers in [0, 1]")
    ap.add_argument("--margin", type=float, nargs="+", default=[1.0, 1.1, 1.2])
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args(argv)

    share = Path(args.share)
    if share.is_dir():
        files = _share_images(share)
        bad = [(p, pr) for p in files if (pr := image_problems(read_image_for_checks(p)))]
        print(f"image checks, all share images: {len(bad)}/{len(files)} rejected ({len(bad) / len(files):.2%})")
        for p, pr in bad[:10]:
            print(f"  {p.relative_to(share)}: {'; '.join(pr)}")

    bundle = load_bundle(args.bundle)
    split = pd.read_csv(args.split, keep_default_na=False)

    def features(rows: pd.DataFrame) -> np.ndarray:
        ds = KneeDataset(rows.reset_index(drop=True), bundle.preprocess, None)
        return extract_features(bundle.model, ds, batch_size=args.batch_size)

    parts = {part: split[split["split"] == part].reset_index(drop=True) for part in ("train", "val", "test")}
    feats = {part: features(rows) for part, rows in parts.items()}
    test = parts["test"]
    test_bad = sum(bool(image_problems(read_image_for_checks(p))) for p in test["path"])
    print(", ".join(f"{k}: {len(v)} knees" for k, v in parts.items()) + f"; image checks reject {test_bad} test knees")

    with tempfile.TemporaryDirectory() as tmp:
        synth = write_non_radiographs(Path(tmp), seed=1, per_kind=5, size=320)
        kinds = np.array([k for k, ps in synth.items() for _ in ps])
        paths = [str(p) for ps in synth.values() for p in ps]
        checked = np.array([bool(image_problems(read_image_for_checks(p))) for p in paths])
        synth_feats = features(pd.DataFrame({"path": paths}))
    print("image checks, synthetic: " + ", ".join(f"{k} {checked[kinds == k].sum()}/5" for k in NON_RADIOGRAPHS))

    moments = FeatureMoments.from_features(feats["train"])
    for shrink in args.shrinkage:
        gaussian = FeatureGaussian.from_moments(moments, "oas" if shrink == "oas" else float(shrink))
        hist = distance_histogram(gaussian.distance(feats["val"]))
        for margin in args.margin:
            ood = OODModel.from_histogram(gaussian, hist, None, args.quantile, margin)
            print(f"\nshrinkage {shrink} (rho {gaussian.shrinkage:.3f}), quantile {args.quantile}, margin {margin:g}:")
            s = ood.scores(feats["test"])
            for site, idx in test.groupby("site").groups.items():
                r = s[np.asarray(idx)]
                print(f"  test {site:15s} {(r > 1).sum():3d}/{len(r):3d} rejected (max score {r.max():.2f})")
            print(f"  test all            {(s > 1).sum():3d}/{len(s):3d} rejected ({(s > 1).mean():.1%})")
            ss = ood.scores(synth_feats)
            row = ", ".join(
                f"{k} {(ss[kinds == k] > 1).sum()}/5 (min {ss[kinds == k].min():.2f})" for k in NON_RADIOGRAPHS
            )
            print(f"  feature distance alone, synthetic: {row}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
