"""How much of a cohort's score rides on knees the model saw in training: AUROC per evaluation cohort over all
knees, then without those whose knee (:mod:`strnet.data.knee_copies`) also sits in a training split.

Meant for a split made before the knee-level audit existed (the old ``runs/real/split.csv`` and its bundles): a
cohort whose AUROC falls without its seen knees was inflated by them.

    python -m simulations.leak_probe --manifest OLD_SPLIT.csv --bundle central=OLD/centralized/bundle \\
        --bundle federated=OLD/federated/bundle

Reported only: nothing here chooses a recipe.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from simulations.bundle_scores import auroc_row, bundle_scores, named_bundles
from strnet.data.knee_copies import DEFAULT_MIN_CORRELATION, audit_knees
from strnet.data.manifest import normalize, read_manifest


def seen_in_training(df: pd.DataFrame, min_correlation: float = DEFAULT_MIN_CORRELATION) -> pd.Series:
    """Per row: does another row of the same knee sit in a training split (the row's own split may be any)?"""
    df = normalize(df).reset_index(drop=True)
    audit = audit_knees(df, min_correlation=min_correlation)
    group = pd.Series(audit.row_group, index=df.index)
    trained = set(group[(df["split"] == "train") & (group >= 0)])
    copies = {g.group for g in audit.groups}
    seen = group.isin(trained & copies) & (df["split"] != "train")
    return seen.rename("seen_in_training")


def auroc_without_seen(frame: pd.DataFrame, scores: Mapping[str, np.ndarray]) -> pd.DataFrame:
    """Per cohort (site) and model: AUROC over every knee and over the unseen ones (NaN with one class left)."""
    df = frame.assign(y=(frame["label_cls"] != "normal").astype(int), **scores)
    rows = []
    for site, part in df.groupby("site"):
        for subset, kept in (("all", part), ("unseen", part[~part["seen_in_training"]])):
            rows.append(auroc_row(kept, list(scores), cohort=site, subset=subset))
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", required=True, type=Path, help="the split manifest the bundles trained on")
    parser.add_argument("--bundle", action="append", required=True, help="NAME=BUNDLE_DIR, once per model")
    parser.add_argument("--split", default="test", help="the evaluation split to score (default test)")
    parser.add_argument("--cache", type=Path, default=Path(".cache/preprocessed"))
    args = parser.parse_args(argv)
    named = named_bundles(parser, args.bundle)
    df = read_manifest(args.manifest).reset_index(drop=True)
    df = df.assign(seen_in_training=seen_in_training(df))
    frame = df[(df["split"] == args.split) & (df["label_cls"] != "")].reset_index(drop=True)
    if frame.empty:
        parser.error(f"{args.manifest}: no labelled knee in split {args.split!r}")
    scores = bundle_scores(named, frame, args.cache)
    with pd.option_context("display.width", 200):
        print(auroc_without_seen(frame, scores).round(3).to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
