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
from sklearn.metrics import roc_auc_score

from strnet.bundle import load_bundle
from strnet.data.cache import PreprocessCache
from strnet.data.knee_copies import DEFAULT_MIN_CORRELATION, audit_knees
from strnet.data.manifest import normalize, read_manifest
from strnet.evaluation import predict_frame


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
        for knees, kept in (("all", part), ("unseen", part[~part["seen_in_training"]])):
            row: dict[str, object] = {
                "cohort": site,
                "knees": knees,
                "n": len(kept),
                "normal": int((kept["y"] == 0).sum()),
            }
            for name in scores:
                ok = kept["y"].nunique() == 2
                row[name] = float(roc_auc_score(kept["y"], kept[name])) if ok else float("nan")
            rows.append(row)
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", required=True, type=Path, help="the split manifest the bundles trained on")
    parser.add_argument("--bundle", action="append", required=True, help="NAME=BUNDLE_DIR, once per model")
    parser.add_argument("--split", default="test", help="the evaluation split to score (default test)")
    parser.add_argument("--cache", type=Path, default=Path(".cache/preprocessed"))
    args = parser.parse_args(argv)
    named = dict(b.split("=", 1) for b in args.bundle if "=" in b)
    if len(named) != len(args.bundle):
        parser.error(f"every --bundle as NAME=DIR with distinct names, got {args.bundle}")
    df = read_manifest(args.manifest).reset_index(drop=True)
    df = df.assign(seen_in_training=seen_in_training(df))
    frame = df[(df["split"] == args.split) & (df["label_cls"] != "")].reset_index(drop=True)
    if frame.empty:
        parser.error(f"{args.manifest}: no labelled knee in split {args.split!r}")
    cache = PreprocessCache(args.cache)
    scores = {
        name: predict_frame(load_bundle(path), frame, cache=cache, progress=False)["prob_bone_loss"].to_numpy(float)
        for name, path in named.items()
    }
    with pd.option_context("display.width", 200):
        print(auroc_without_seen(frame, scores).round(3).to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
