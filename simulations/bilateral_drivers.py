"""What drives the two knees of one film apart: crop position, exposure, markers, or the knees themselves?

    python -m simulations.bilateral_drivers runs/cv/epochs24 --out runs/cv/epochs24-drivers

Issue 8 names four suspects for left–right disagreement (markers, crop position, side, exposure). Side was
tested by mirroring (``simulations.side_bias``) and markers by painting them out (``cross_validate markers``);
this tests the other two on a cross-validation run's bilateral films, with each film scored by the fold network
that scored it out of fold, in two ways:

* **Association.** Per knee, the crop's geometry (its edges as fractions of the knee's half of the film, measured
  from the film's top, the cut between the legs and the film's outer edge) and its exposure (the clip window and
  the crop's median on the film's own 1st–99th percentile scale), and the side markers found in the half. Per
  film, Spearman's ρ of P(R) − P(L) against the same difference of each feature, and of |P(R) − P(L)| against
  its absolute difference. Many features on 57 films: read the p-values as a screen, not a finding.
* **Intervention.** The same networks score the same knees rendered differently: both knees with one shared
  clip window (the percentiles of their two crops together), each knee with its partner's window, both with one
  matched crop (the union of the two boxes, mirrored), and each knee alone under small shifts of its crop or its
  clip percentiles. If making the exposure (or the crop) alike makes the two answers alike, that is a driver; if
  a knee's answer moves under a small nudge as much as it differs from its partner's, the disagreement is noise
  in what the network reads, and matching the inputs cannot fix it.

The first variant re-renders the knees exactly as training did and must reproduce ``oof.csv``'s probabilities
(checked, to 1e-5); that ties every other number here to the run's own.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import stats

from strnet.bundle import Bundle, load_bundle
from strnet.calibration import calibrated
from strnet.data.bilateral import split_bilateral
from strnet.data.cache import dequantize, quantize
from strnet.data.imageio import read_radiograph
from strnet.data.joint import fibula_separation
from strnet.data.markers import marker_boxes
from strnet.data.preprocess import PreprocessParams, crop_box, histogram_percentiles, render, working_image
from strnet.engine import predict_loader
from strnet.model import TABULAR_DIM

Box = tuple[int, int, int, int]
# A nudge of the crop: this fraction of the crop's height or width, in each of four directions.
SHIFT = 0.05
# Clip percentiles a little wider and a little narrower than the recipe's (1, 99).
WINDOWS = ((0.5, 99.5), (2.0, 98.0))
# A reproduced probability further than this from oof.csv's means the re-rendering is not the run's.
REPRODUCE_ATOL = 1e-5


@dataclass
class Knee:
    """One knee of a bilateral film as the recipe cut it, with what the diagnosis varies."""

    film: str
    side: str  # "R": the viewer-left half (the patient's right), "L": the viewer-right half
    fold: int
    label: float
    source: str
    prob: float  # oof.csv's served probability
    flag: float
    work: np.ndarray  # the half of the film the crop is cut from
    box: Box
    window: tuple[float, float]
    film_window: tuple[float, float]  # the whole film's clip percentiles: a common scale for exposure
    markers: int

    @property
    def crop(self) -> np.ndarray:
        y0, y1, x0, x1 = self.box
        return self.work[y0:y1, x0:x1]


def load_films(oof: pd.DataFrame, params: PreprocessParams) -> list[tuple[Knee, Knee]]:
    """Every film of ``oof`` scored with one right and one left knee, as (right, left) pairs; a film whose two
    rows the loader could not split (both read the whole film) is not a pair of knees and is left out."""
    side = oof["side"].fillna("").astype(str).str.upper()
    knees = oof[side.isin(["R", "L"])].assign(side=side)
    counts = knees.groupby("path")["side"].agg(lambda s: "".join(sorted(s)))
    pairs = []
    for path in sorted(counts.index[counts == "LR"]):
        img = read_radiograph(path)
        parts = split_bilateral(img)
        if parts is None:  # the loader then gave both rows the whole film (strnet.data.bilateral.load_knee)
            continue
        film_window = tuple(histogram_percentiles(working_image(img, params), params.clip_percentiles))
        rows = knees[knees["path"] == path].set_index("side")
        pair = []
        for s, half in zip(("R", "L"), parts, strict=True):
            work = working_image(np.ascontiguousarray(half), params)
            box = crop_box(work, params)
            y0, y1, x0, x1 = box
            row = rows.loc[s]
            pair.append(
                Knee(
                    film=path,
                    side=s,
                    fold=int(row["fold"]),
                    label=float(row["label_cls"] != "normal"),
                    source=str(row["source"]),
                    prob=float(row["prob_bone_loss"]),
                    flag=float(row["flag_bone_loss"]),
                    work=work,
                    box=box,
                    window=tuple(histogram_percentiles(work[y0:y1, x0:x1], params.clip_percentiles)),
                    film_window=film_window,
                    markers=len(marker_boxes(work)),
                )
            )
        pairs.append((pair[0], pair[1]))
    return pairs


def features(knee: Knee) -> dict[str, float]:
    """Geometry in fractions of the half, mirrored for the left knee so 'inner' is always the cut between the legs;
    exposure on the film's own 1st–99th percentile scale, so two knees of one film compare directly; and a rough
    rotation proxy (:func:`strnet.data.joint.fibula_separation`)."""
    h, w = knee.work.shape
    y0, y1, x0, x1 = knee.box
    inner, outer = (w - x1, x0) if knee.side == "R" else (x0, w - x1)
    lo, hi = knee.film_window
    scale = (hi - lo) or 1.0
    return {
        "crop_top": y0 / h,
        "crop_bottom_gap": (h - y1) / h,
        "crop_inner_gap": inner / w,
        "crop_outer_gap": outer / w,
        "crop_area": (y1 - y0) * (x1 - x0) / (h * w),
        "crop_aspect": (y1 - y0) / max(x1 - x0, 1),
        "half_width": w / (h or 1),
        "window_low": (knee.window[0] - lo) / scale,
        "window_high": (knee.window[1] - lo) / scale,
        "window_width": (knee.window[1] - knee.window[0]) / scale,
        "crop_median": (float(np.median(knee.crop)) - lo) / scale,
        "markers": float(knee.markers),
        "fibula_separation": fibula_separation(knee.crop),
    }


def association(pairs: list[tuple[Knee, Knee]]) -> pd.DataFrame:
    """Per feature: Spearman of ΔP with Δfeature (signed) and of |ΔP| with |Δfeature|, over the films."""
    right = pd.DataFrame([features(r) for r, _ in pairs])
    left = pd.DataFrame([features(sub) for _, sub in pairs])
    dp = np.array([r.prob - sub.prob for r, sub in pairs])
    rows = []
    for name in right.columns:
        d = (right[name] - left[name]).to_numpy(float)
        known = ~np.isnan(d)  # a proxy that could not be measured on one knee leaves its film out of that row
        d, dp_known = d[known], dp[known]
        signed = stats.spearmanr(dp_known, d) if len(d) >= 3 and np.ptp(d) > 0 else None
        absolute = stats.spearmanr(np.abs(dp_known), np.abs(d)) if len(d) >= 3 and np.ptp(np.abs(d)) > 0 else None
        rows.append(
            {
                "feature": name,
                "films": len(d),
                "mean_abs_difference": float(np.abs(d).mean()) if len(d) else float("nan"),
                "rho_signed": float(signed.statistic) if signed else float("nan"),
                "p_signed": float(signed.pvalue) if signed else float("nan"),
                "rho_abs": float(absolute.statistic) if absolute else float("nan"),
                "p_abs": float(absolute.pvalue) if absolute else float("nan"),
            }
        )
    return pd.DataFrame(rows)


def shifted(box: Box, shape: tuple[int, int], dy: float, dx: float) -> Box:
    """``box`` moved by (dy, dx) of its own height and width, kept inside the image at its own size."""
    y0, y1, x0, x1 = box
    h, w = shape
    oy, ox = round(dy * (y1 - y0)), round(dx * (x1 - x0))
    oy = int(np.clip(oy, -y0, h - y1))
    ox = int(np.clip(ox, -x0, w - x1))
    return y0 + oy, y1 + oy, x0 + ox, x1 + ox


def matched_boxes(right: Knee, left: Knee) -> tuple[Box, Box]:
    """One crop for both knees: rows of the union (one film, one height); columns the union of the two boxes'
    distances from the cut between the legs and from the film's outer edge, each in its own half's pixels."""
    (ry0, ry1, rx0, rx1), (ly0, ly1, lx0, lx1) = right.box, left.box
    rw, lw = right.work.shape[1], left.work.shape[1]
    y0, y1 = min(ry0, ly0), max(ry1, ly1)
    inner = min(rw - rx1, lx0)
    outer = min(rx0, lw - lx1)
    return (y0, y1, min(outer, rw - 1), rw - min(inner, rw - 1)), (y0, y1, min(inner, lw - 1), lw - min(outer, lw - 1))


def _pooled_window(a: np.ndarray, b: np.ndarray, params: PreprocessParams) -> tuple[float, float]:
    both = np.concatenate([a.ravel(), b.ravel()]).reshape(1, -1)
    lo, hi = histogram_percentiles(both, params.clip_percentiles)
    return lo, hi


Variant = Callable[[Knee, Knee, PreprocessParams], tuple[np.ndarray, np.ndarray]]


def _as_trained(r: Knee, sub: Knee, p: PreprocessParams) -> tuple[np.ndarray, np.ndarray]:
    return render(r.crop, r.window, p.size), render(sub.crop, sub.window, p.size)


def _shared_window(r: Knee, sub: Knee, p: PreprocessParams) -> tuple[np.ndarray, np.ndarray]:
    window = _pooled_window(r.crop, sub.crop, p)
    return render(r.crop, window, p.size), render(sub.crop, window, p.size)


def _swapped_window(r: Knee, sub: Knee, p: PreprocessParams) -> tuple[np.ndarray, np.ndarray]:
    return render(r.crop, sub.window, p.size), render(sub.crop, r.window, p.size)


def _cropped(knee: Knee, box: Box, percentiles: tuple[float, float], size: int) -> np.ndarray:
    """``knee`` cut at ``box`` and rendered with that crop's own clip percentiles, as the pipeline would."""
    y0, y1, x0, x1 = box
    crop = knee.work[y0:y1, x0:x1]
    return render(crop, histogram_percentiles(crop, percentiles), size)


def _matched_crop(r: Knee, sub: Knee, p: PreprocessParams) -> tuple[np.ndarray, np.ndarray]:
    box_r, box_l = matched_boxes(r, sub)
    return _cropped(r, box_r, p.clip_percentiles, p.size), _cropped(sub, box_l, p.clip_percentiles, p.size)


def _shift(dy: float, dx: float) -> Variant:
    def variant(r: Knee, sub: Knee, p: PreprocessParams) -> tuple[np.ndarray, np.ndarray]:
        # the nudge is mirrored for the left knee: +dx moves both crops towards the cut between the legs
        box_r = shifted(r.box, r.work.shape, dy, dx)
        box_l = shifted(sub.box, sub.work.shape, dy, -dx)
        return _cropped(r, box_r, p.clip_percentiles, p.size), _cropped(sub, box_l, p.clip_percentiles, p.size)

    return variant


def _percentiles(window: tuple[float, float]) -> Variant:
    def variant(r: Knee, sub: Knee, p: PreprocessParams) -> tuple[np.ndarray, np.ndarray]:
        return _cropped(r, r.box, window, p.size), _cropped(sub, sub.box, window, p.size)

    return variant


VARIANTS: dict[str, Variant] = {
    "as trained": _as_trained,
    "shared window": _shared_window,
    "swapped window": _swapped_window,
    "matched crop": _matched_crop,
    "crop up 5%": _shift(-SHIFT, 0.0),
    "crop down 5%": _shift(SHIFT, 0.0),
    "crop inward 5%": _shift(0.0, SHIFT),
    "crop outward 5%": _shift(0.0, -SHIFT),
    **{f"percentiles {lo:g}-{hi:g}": _percentiles((lo, hi)) for lo, hi in WINDOWS},
}


def score(bundle: Bundle, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Calibrated, served probabilities of preprocessed ``[N, S, S]`` images in [0, 1], as ``predict_frame``
    computes them (the cache's quantisation, normalisation, channels-last fp32, the bundle's mirror averaging
    and Platt scaling)."""
    params = bundle.preprocess
    model = bundle.model.to(memory_format=torch.channels_last)
    images = dequantize(quantize(images))  # the run read its knees from the preprocessing cache's 16-bit copies
    batches = []
    for start in range(0, len(images), batch_size):
        x = (images[start : start + batch_size] - np.float32(params.mean)) / np.float32(params.std)
        n = len(x)
        batches.append(
            {
                "image": torch.from_numpy(np.ascontiguousarray(x, np.float32)).unsqueeze(1),
                "tabular": torch.zeros(n, TABULAR_DIM),
                "y_screen": torch.full((n,), float("nan")),
                "y_severity": torch.full((n,), float("nan")),
                "t_score": torch.full((n,), float("nan")),
                "index": torch.arange(start, start + n),
            }
        )
    preds = predict_loader(
        model, batches, device=torch.device("cpu"), channels_last=True, test_time_mirror=bundle.test_time_mirror
    )
    return calibrated(preds, bundle.calibration)["prob_screen"]


def agreement(p_r: np.ndarray, p_l: np.ndarray, threshold: np.ndarray) -> dict[str, float]:
    differ = (p_r >= threshold) != (p_l >= threshold)
    return {
        "flags_differ": float(differ.mean()),
        "mean_abs_dp": float(np.abs(p_r - p_l).mean()),
        "spearman": float(stats.spearmanr(p_r, p_l).statistic),
    }


def interventions(run_dir: Path, pairs: list[tuple[Knee, Knee]], params: PreprocessParams) -> pd.DataFrame:
    """Every variant scored by each film's own fold network: left–right agreement, and how far each knee's
    answer moved from the one it was served (mean |ΔP| and flags changed) — the size of a nudge's effect."""
    folds = sorted({r.fold for r, _ in pairs})
    bundles = {f: load_bundle(run_dir / f"fold-{f}" / "bundle") for f in folds}
    base_p = np.array([[r.prob, sub.prob] for r, sub in pairs])
    threshold = np.array([bundles[r.fold].threshold for r, _ in pairs])
    rows = []
    for name, variant in VARIANTS.items():
        rendered = [variant(r, sub, params) for r, sub in pairs]
        p = np.zeros((len(pairs), 2))
        for f in folds:
            idx = [i for i, (r, _) in enumerate(pairs) if r.fold == f]
            images = np.stack([rendered[i][k] for i in idx for k in (0, 1)])
            p[idx] = score(bundles[f], images).reshape(-1, 2)
        if name == "as trained" and not np.allclose(p, base_p, atol=REPRODUCE_ATOL, rtol=0):
            worst = float(np.abs(p - base_p).max())
            raise RuntimeError(f"{run_dir}: re-rendered knees do not reproduce oof.csv (max |ΔP| {worst:.2e})")
        moved = np.abs(p - base_p)
        rows.append(
            {
                "variant": name,
                **agreement(p[:, 0], p[:, 1], threshold),
                "knee_moved": float(moved.mean()),
                "knee_flags_changed": float(((p >= threshold[:, None]) != (base_p >= threshold[:, None])).mean()),
            }
        )
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a cross_validate run (oof.csv and fold-*/bundle)")
    parser.add_argument("--out", type=Path, help="write drivers.json and features.csv here")
    args = parser.parse_args(argv)
    oof = pd.read_csv(args.run / "oof.csv")
    params = load_bundle(next(args.run.glob("fold-*")) / "bundle").preprocess
    pairs = load_films(oof, params)
    if not pairs:
        raise SystemExit(f"{args.run}: no film has both a right and a left knee scored")
    sources = pd.Series([r.source for r, _ in pairs]).value_counts().to_dict()
    assoc = association(pairs)
    inter = interventions(args.run, pairs, params)
    with pd.option_context("display.width", 180, "display.precision", 3):
        print(f"{len(pairs)} bilateral films {sources}\n")
        print(assoc.to_string(index=False), "\n")
        print(inter.to_string(index=False))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        table = pd.DataFrame(
            [{"film": k.film, "side": k.side, "fold": k.fold, "prob": k.prob, **features(k)} for p in pairs for k in p]
        )
        table.to_csv(args.out / "features.csv", index=False)
        summary = {
            "films": len(pairs),
            "sources": sources,
            "association": assoc.to_dict("records"),
            "interventions": inter.to_dict("records"),
        }
        (args.out / "drivers.json").write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
