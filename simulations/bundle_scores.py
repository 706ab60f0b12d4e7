"""What the probes share: ``--bundle NAME=DIR`` arguments, each bundle's calibrated scores on a frame, and a row
of per-model AUROCs for one group of knees."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from strnet.bundle import load_bundle
from strnet.data.cache import PreprocessCache
from strnet.evaluation import predict_frame


def named_bundles(parser: argparse.ArgumentParser, values: Sequence[str]) -> dict[str, str]:
    """``NAME=DIR`` values as a mapping; the parser's error (exit 2) names a malformed or repeated one."""
    named = dict(v.split("=", 1) for v in values if "=" in v)
    if len(named) != len(values):
        parser.error(f"every --bundle as NAME=DIR with distinct names, got {list(values)}")
    return named


def bundle_scores(named: Mapping[str, str], frame: pd.DataFrame, cache: Path) -> dict[str, np.ndarray]:
    """Each bundle's calibrated P(bone loss) per row of ``frame``."""
    store = PreprocessCache(cache)
    return {
        name: predict_frame(load_bundle(path), frame, cache=store, progress=False)["prob_bone_loss"].to_numpy(float)
        for name, path in named.items()
    }


def auroc_row(kept: pd.DataFrame, models: Sequence[str], **fields: object) -> dict[str, object]:
    """``fields``, the knee and normal counts of ``kept`` (a frame with a 0/1 ``y`` and one score column per
    model), then each model's AUROC (NaN when one class is left)."""
    row: dict[str, object] = {**fields, "knees": len(kept), "normal": int((kept["y"] == 0).sum())}
    both = kept["y"].nunique() == 2
    for name in models:
        row[name] = float(roc_auc_score(kept["y"], kept[name])) if both else float("nan")
    return row
