"""Which input carries bone-loss signal *within* one source: frozen-feature and covariate probes.

A model trained on pooled sources can score well by telling the sources apart. This probe asks, inside one
source and on the training and validation splits only, how well each candidate input separates bone loss from
normal: frozen ImageNet features of the knee crop (as the pipeline cuts it), of a square crop centred on the
joint (``preprocess.crop: joint``), and of the whole film, at several sizes, each under a logistic regression with
cross-validation grouped by film — beside the same regression on the clinical covariates alone. Frozen features
are a floor, not what fine-tuning reaches, but an input whose frozen features carry nothing within a source at
this sample size is not one to spend CPU hours on.

    python -m simulations.source_probe --manifest runs/real/split.csv --source mendeley
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from strnet.data.bilateral import load_knee
from strnet.data.dataset import encode_tabular
from strnet.data.imageio import read_radiograph
from strnet.data.preprocess import PreprocessParams, preprocess
from strnet.model import build_backbone

VARIANTS = ("knee224", "joint224", "joint448", "film224")
COVARIATES = {"age": ("age",), "age, sex, BMI": ("age", "sex", "bmi")}


def variant_image(row: pd.Series, variant: str) -> np.ndarray:
    """The preprocessed [0, 1] image of one manifest row under ``variant`` (``knee|joint|film`` + size)."""
    match = re.fullmatch(r"(knee|joint|film)(\d+)", variant)
    if match is None:
        raise ValueError(f"variant {variant!r} must be knee|joint|film followed by a size, e.g. joint448")
    kind, size = match.group(1), int(match.group(2))
    side = row["side"] if isinstance(row["side"], str) else ""
    img = read_radiograph(row["path"]) if kind == "film" else load_knee(row["path"], side)
    return preprocess(img, PreprocessParams(size=size, crop="joint" if kind == "joint" else "foreground"))


def grouped_cv_auroc(x: np.ndarray, y: np.ndarray, groups: np.ndarray, repeats: int) -> tuple[float, float]:
    """Mean and SD over repeats of the out-of-fold AUROC of a ridge-penalised, class-balanced logistic model."""
    folds = min(5, int(np.bincount(y).min()))
    if folds < 2:
        raise ValueError("each class needs at least two cases for grouped cross-validation")
    aucs = []
    for rep in range(repeats):
        cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=rep)
        oof = np.zeros(len(y))
        for tr, te in cv.split(x, y, groups):
            model = make_pipeline(StandardScaler(), LogisticRegression(C=0.01, max_iter=5000, class_weight="balanced"))
            model.fit(x[tr], y[tr])
            oof[te] = model.predict_proba(x[te])[:, 1]
        aucs.append(roc_auc_score(y, oof))
    return float(np.mean(aucs)), float(np.std(aucs))


@torch.no_grad()
def frozen_features(frame: pd.DataFrame, variant: str, net: torch.nn.Module) -> np.ndarray:
    """Pooled backbone features, averaged with the mirrored image's (as the served model averages outputs)."""
    rows = []
    for _, row in frame.iterrows():
        img = torch.from_numpy((variant_image(row, variant) - 0.5) / 0.25)[None, None]
        rows.append(((net(img) + net(img.flip(-1))) / 2)[0].numpy())
    return np.stack(rows)


def probe(
    frame: pd.DataFrame,
    variants: Sequence[str],
    *,
    backbone: str = "efficientnet_lite0",
    weights: str = "imagenet",
    repeats: int = 5,
) -> list[dict[str, object]]:
    """One row per input: what it is, knees, normal knees, grouped-CV AUROC (mean, SD)."""
    frame = frame.reset_index(drop=True)
    y = (frame["label_cls"] != "normal").to_numpy(np.int64)
    groups = frame["path"].to_numpy()
    out: list[dict[str, object]] = []
    for name, columns in COVARIATES.items():
        known = frame[list(columns)].notna().all(axis=1).to_numpy()
        if known.sum() < len(frame):
            continue  # a source without these covariates: nothing to compare
        tab = np.stack(
            [
                encode_tabular(r["age"], r["sex"] if "sex" in columns else None, r["bmi"] if "bmi" in columns else None)
                for _, r in frame.iterrows()
            ]
        )
        mean, sd = grouped_cv_auroc(tab, y, groups, repeats)
        out.append(
            {"input": f"covariates: {name}", "knees": len(y), "normal": int((y == 0).sum()), "auroc": mean, "sd": sd}
        )
    net, _ = build_backbone(backbone, weights)
    net.eval()
    for variant in variants:
        mean, sd = grouped_cv_auroc(frozen_features(frame, variant, net), y, groups, repeats)
        out.append(
            {
                "input": f"frozen {backbone}: {variant}",
                "knees": len(y),
                "normal": int((y == 0).sum()),
                "auroc": mean,
                "sd": sd,
            }
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, required=True, help="a split manifest (strnet data split)")
    parser.add_argument("--source", required=True, help="rows whose source contains this text")
    parser.add_argument("--splits", nargs="+", default=["train", "val"], help="never the test split")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--weights", default="imagenet")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if "test" in args.splits:
        parser.error("the probe informs choices, so it never reads the test split")
    df = pd.read_csv(args.manifest, dtype={"side": str, "sex": str}, keep_default_na=True)
    frame = df[df["source"].str.contains(args.source, case=False) & df["split"].isin(args.splits)]
    frame = frame[frame["label_cls"].isin(["normal", "osteopenia", "osteoporosis"])]
    if frame.empty:
        parser.error(f"{args.manifest}: no labelled rows of source {args.source!r} in splits {args.splits}")
    print("| input | knees | normal | grouped-CV AUROC (mean ± SD over repeats) |\n|---|---|---|---|")
    for row in probe(frame, args.variants, backbone=args.backbone, weights=args.weights, repeats=args.repeats):
        print(f"| {row['input']} | {row['knees']} | {row['normal']} | {row['auroc']:.3f} ± {row['sd']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
