"""Which film formats a model scores as what: mean score per (format, label, cohort), and each cohort's AUROC
without one format at a time.

A source often holds films from several devices or exports, told apart by their pixel size and mode. A model
that scores one format high or low whatever the label has learnt something about the film, not the bone, and a
cohort's AUROC then depends on how many films of that format it happens to hold. The training split is in the
table on purpose: a format a model cannot fit on its own training films is a conflict in what it learnt, not
an unlucky test draw.

    python -m simulations.format_probe --manifest runs/real/split.csv --sites stage2 stage2-holdout \\
        --bundle central=runs/real/centralized/bundle --bundle federated=runs/real/federated/bundle

Reported only: nothing here chooses a recipe.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from simulations.bundle_scores import auroc_row, bundle_scores, named_bundles
from strnet.data.imageio import read_radiograph
from strnet.data.manifest import read_manifest


def film_format(path: str | Path) -> str:
    """``"<width>x<height> <mode>"`` from the file's header (PIL reads no pixels for it); DICOM and other files
    PIL cannot open are decoded whole: ``"<width>x<height> <suffix>"``."""
    try:
        with Image.open(path) as img:
            return f"{img.size[0]}x{img.size[1]} {img.mode}"
    except (UnidentifiedImageError, OSError):
        pixels = read_radiograph(path)
        return f"{pixels.shape[1]}x{pixels.shape[0]} {Path(path).suffix.lower() or 'file'}"


def cohort_of(frame: pd.DataFrame) -> pd.Series:
    """``<site>:<split>`` (an external site's rows all count as one cohort, whatever their split column)."""
    return frame["site"].astype(str) + ":" + frame["split"].astype(str)


def format_table(frame: pd.DataFrame, scores: Mapping[str, np.ndarray]) -> pd.DataFrame:
    """One row per (format, bone loss, cohort): knees, films and each model's mean score."""
    df = frame.assign(bone_loss=frame["label_cls"] != "normal", cohort=cohort_of(frame), **scores)
    keys = ["format", "bone_loss", "cohort"]
    table = df.groupby(keys).agg(knees=("path", "size"), films=("path", "nunique"), **{n: (n, "mean") for n in scores})
    return table.reset_index()


def auroc_without_each_format(frame: pd.DataFrame, scores: Mapping[str, np.ndarray]) -> pd.DataFrame:
    """Per cohort and model: the AUROC over every knee, then without each format in turn (NaN where one class is
    left without a knee)."""
    df = frame.assign(y=(frame["label_cls"] != "normal").astype(int), cohort=cohort_of(frame), **scores)
    rows = []
    for cohort, part in df.groupby("cohort"):
        for left_out in [None, *sorted(part["format"].unique())]:
            kept = part if left_out is None else part[part["format"] != left_out]
            rows.append(auroc_row(kept, list(scores), cohort=cohort, without=left_out or "-"))
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", action="append", required=True, help="NAME=BUNDLE_DIR, once per model to score")
    parser.add_argument("--manifest", required=True, type=Path, help="split manifest (site, split, path, side, ...)")
    parser.add_argument("--sites", nargs="+", required=True, help="the sites whose knees to score")
    parser.add_argument("--cache", type=Path, default=Path(".cache/preprocessed"))
    args = parser.parse_args(argv)
    named = named_bundles(parser, args.bundle)
    df = read_manifest(args.manifest)
    frame = df[df["site"].isin(args.sites) & (df["label_cls"] != "")].reset_index(drop=True)
    if frame.empty:
        parser.error(f"{args.manifest}: no labelled knee of the sites {args.sites}")
    frame["format"] = frame["path"].map({p: film_format(p) for p in frame["path"].unique()})
    scores = bundle_scores(named, frame, args.cache)
    with pd.option_context("display.width", 200, "display.max_rows", None):
        print(format_table(frame, scores).round(2).to_string(index=False))
        print()
        print(auroc_without_each_format(frame, scores).round(3).to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
