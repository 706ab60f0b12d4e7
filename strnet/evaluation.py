"""Frozen evaluation of a bundle on a manifest: metrics with CIs, figures, a one-page report.

τ* comes from the bundle and is never re-tuned here: the test split (or an external cohort) is
evaluated once at the operating point chosen on validation, as in the paper.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from strnet import metrics as M
from strnet import plots
from strnet.bundle import Bundle
from strnet.data.cache import PreprocessCache
from strnet.engine import autocast_dtype, make_loader, predict_loader, resolve_device
from strnet.report import write_report


@dataclass
class EvaluationResult:
    metrics: dict[str, Any]
    predictions: pd.DataFrame
    out_dir: Path
    figures: dict[str, Path]
    report: Path | None


def predict_frame(
    bundle: Bundle,
    df: pd.DataFrame,
    *,
    cache: PreprocessCache | None,
    batch_size: int = 32,
    precision: str = "auto",
    device: torch.device | None = None,
) -> pd.DataFrame:
    """One row per manifest row: probabilities, flag at τ*, severity, T-score estimate, and the targets."""
    device = device or resolve_device()
    model = bundle.model.to(device)
    loader = make_loader(df, bundle.preprocess, cache, batch_size=batch_size, augment=None, shuffle=False, seed=0)
    preds = predict_loader(model, loader, device=device, amp_dtype=autocast_dtype(precision, device))
    out = df.reset_index(drop=True).copy()
    order = preds["index"]
    out.loc[order, "prob_bone_loss"] = preds["prob_screen"]
    out.loc[order, "flag_bone_loss"] = (preds["prob_screen"] >= bundle.threshold).astype(int)
    out.loc[order, "prob_osteoporosis_given_bone_loss"] = preds["prob_severity"]
    out.loc[order, "t_score_estimate"] = preds["t_pred"]
    out["threshold"] = bundle.threshold
    return out


def compute_metrics(pred: pd.DataFrame, threshold: float, *, n_boot: int = 2000, seed: int = 42) -> dict[str, Any]:
    """Screening metrics with stratified-bootstrap CIs, severity on bone-loss cases, T-score agreement."""
    result: dict[str, Any] = {"threshold": threshold, "n": len(pred)}
    labelled = pred[pred["label_cls"] != ""]
    result["n_labelled"] = len(labelled)
    if len(labelled):
        y = (labelled["label_cls"] != "normal").to_numpy(int)
        p = labelled["prob_bone_loss"].to_numpy(float)
        result["screening"] = M.classification_metrics(y, p, threshold)
        if n_boot > 0:
            cis = M.bootstrap_ci(y, p, threshold, n_boot=n_boot, seed=seed)
            result["screening_ci"] = {k: list(v) for k, v in cis.items()}
        result["prevalence"] = float(y.mean())
        bl = labelled[labelled["label_cls"] != "normal"]
        if len(bl):
            ys = (bl["label_cls"] == "osteoporosis").to_numpy(int)
            result["severity"] = M.classification_metrics(ys, bl["prob_osteoporosis_given_bone_loss"].to_numpy(), 0.5)
            result["severity"]["n"] = len(bl)
    t = pred.dropna(subset=["t_score"])
    if len(t) >= 2:
        result["t_score"] = M.regression_metrics(t["t_score"].to_numpy(), t["t_score_estimate"].to_numpy())
    return result


def make_figures(pred: pd.DataFrame, threshold: float, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    figs: dict[str, Path] = {}
    labelled = pred[pred["label_cls"] != ""]
    if len(labelled):
        y = (labelled["label_cls"] != "normal").to_numpy(int)
        p = labelled["prob_bone_loss"].to_numpy(float)
        figs["roc"] = plots.roc_curve_plot(y, p, threshold, out_dir / "roc.png")
        figs["pr"] = plots.pr_curve_plot(y, p, threshold, out_dir / "pr.png")
        figs["confusion"] = plots.confusion_matrix_plot(y, p, threshold, out_dir / "confusion.png")
        figs["histogram"] = plots.score_histogram_plot(y, p, threshold, out_dir / "score_histogram.png")
        figs["calibration"] = plots.calibration_plot(y, p, out_dir / "calibration.png")
    t = pred.dropna(subset=["t_score"])
    if len(t) >= 2:
        tt, tp = t["t_score"].to_numpy(), t["t_score_estimate"].to_numpy()
        figs["tscore"] = plots.tscore_scatter_plot(tt, tp, out_dir / "tscore_scatter.png")
        figs["bland_altman"] = plots.bland_altman_plot(tt, tp, out_dir / "bland_altman.png")
    return figs


def evaluate_bundle(
    bundle: Bundle,
    df: pd.DataFrame,
    out_dir: str | Path,
    *,
    cache: PreprocessCache | None,
    title: str = "STR-Net frozen evaluation",
    n_boot: int = 2000,
    seed: int = 42,
    precision: str = "auto",
) -> EvaluationResult:
    """Predict, score at the bundle's τ*, draw figures and write predictions.csv, metrics.json and the report."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pred = predict_frame(bundle, df, cache=cache, precision=precision)
    pred.to_csv(out / "predictions.csv", index=False)
    threshold = bundle.threshold
    metrics = compute_metrics(pred, threshold, n_boot=n_boot, seed=seed)
    figures = make_figures(pred, threshold, out / "figures")
    notes = []
    if metrics["n_labelled"] == 0:
        notes.append("The manifest carries no labels: predictions only, no metrics.")
    if (pred["source"].str.contains("mendeley", case=False)).any():
        notes.append("Mendeley T-scores are calcaneal QUS, not DXA: T-score agreement there is indicative only.")
    summary = {
        "cases": len(pred),
        "labelled": metrics["n_labelled"],
        "sites": ", ".join(sorted(set(pred["site"]))),
        "sources": ", ".join(sorted(set(pred["source"]))),
        "labels": pred["label_cls"].replace("", "unlabelled").value_counts().to_dict(),
    }
    report = write_report(
        out,
        title=title,
        metrics=metrics.get("screening", {}),
        cis={k: tuple(v) for k, v in metrics.get("screening_ci", {}).items()},
        threshold_info=bundle.metadata.get("threshold", {"value": threshold}),
        figures=figures,
        severity=metrics.get("severity"),
        regression=metrics.get("t_score"),
        dataset_summary=summary,
        notes=notes,
    )
    (out / "metrics.json").write_text(json.dumps(strict_json(metrics), indent=2, allow_nan=False))
    return EvaluationResult(metrics=metrics, predictions=pred, out_dir=out, figures=figures, report=report)


def strict_json(obj: Any) -> Any:
    """Recursively make ``obj`` strict-JSON-able: NaN/inf -> null, numpy scalars/arrays -> Python, tuples -> lists.

    Undefined metrics (AUROC with one class) are NaN in Python; ``json.dumps`` would write the non-standard
    token ``NaN``, which browsers and most JSON parsers reject.
    """
    if isinstance(obj, dict):
        return {str(k): strict_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [strict_json(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return strict_json(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def flat_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """``{'screening': {'auroc': .9}}`` -> ``{'screening_auroc': .9}`` for tracking (CIs as _lo/_hi)."""
    out: dict[str, float] = {}
    for section in ("screening", "severity", "t_score"):
        for k, v in (metrics.get(section) or {}).items():
            if isinstance(v, int | float) and not isinstance(v, bool):
                out[f"{prefix}{section}_{k}"] = float(v)
    for k, (lo, hi) in (metrics.get("screening_ci") or {}).items():
        out[f"{prefix}screening_{k}_ci_lo"] = float(lo)
        out[f"{prefix}screening_{k}_ci_hi"] = float(hi)
    return out
