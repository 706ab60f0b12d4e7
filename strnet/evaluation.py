"""Frozen evaluation of a bundle on a manifest: metrics with CIs, figures, a one-page report.

τ* comes from the bundle and is never re-tuned here: the test split (or an external cohort) is
evaluated once at the operating point chosen on validation, as in the paper.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from strnet import metrics as M
from strnet import plots
from strnet.bundle import Bundle
from strnet.calibration import calibrated
from strnet.data.cache import PreprocessCache
from strnet.data.manifest import screening_target, severity_target
from strnet.engine import autocast_dtype, make_loader, predict_loader, resolve_device
from strnet.report import QUALITY_NAMES, write_report
from strnet.scoring import COUNT_METRICS, TASKS, evaluation_metrics
from strnet.subgroups import level_codes, subgroup_metrics
from strnet.sufficient import SIDE_CODES, EvaluationCounts, Predictions
from strnet.tscore import image_path_note


@dataclass
class EvaluationResult:
    metrics: dict[str, float]  # strnet.scoring names
    counts: EvaluationCounts
    n_labelled: int
    predictions: pd.DataFrame
    out_dir: Path
    figures: dict[str, Path]
    report: Path | None
    subgroups: list[dict[str, Any]] = field(default_factory=list)  # strnet.subgroups rows of the labelled knees


def predict_frame(
    bundle: Bundle,
    df: pd.DataFrame,
    *,
    cache: PreprocessCache | None,
    batch_size: int = 32,
    precision: str | None = None,
    device: torch.device | None = None,
    with_mirror: bool = False,
    with_features: bool = False,
    progress: bool = True,
) -> pd.DataFrame:
    """One row per manifest row: calibrated and uncalibrated probability, flag at τ*, severity, T-score estimate,
    and the targets; ``with_mirror`` adds the probability served for the mirrored image (mirror stability),
    ``with_features`` a ``neck_features`` column (one array per row: what out-of-distribution scoring reads).
    ``precision`` None serves at the bundle's own (:attr:`Bundle.precision`), where its τ* was chosen.

    Channels-last on every device: on CPU it is what the training step runs (1.2-2x faster convolutions)."""
    device = device or resolve_device()
    model = bundle.model.to(device).to(memory_format=torch.channels_last)
    loader = make_loader(df, bundle.preprocess, cache, batch_size=batch_size, augment=None, shuffle=False, seed=0)
    preds = predict_loader(
        model,
        loader,
        device=device,
        amp_dtype=autocast_dtype(precision or bundle.precision, device),
        channels_last=True,
        test_time_mirror=bundle.test_time_mirror,
        with_mirror=with_mirror,
        with_features=with_features,
        progress=progress,
    )
    preds = calibrated(preds, bundle.calibration)
    out = df.reset_index(drop=True).copy()
    order = preds["index"]
    out.loc[order, "prob_bone_loss"] = preds["prob_screen"]
    out.loc[order, "prob_bone_loss_uncalibrated"] = preds["prob_screen_raw"]
    if with_mirror:
        out.loc[order, "prob_bone_loss_mirror"] = preds["prob_screen_mirror"]
    out.loc[order, "flag_bone_loss"] = (preds["prob_screen"] >= bundle.threshold).astype(int)
    out.loc[order, "prob_osteoporosis_given_bone_loss"] = preds["prob_severity"]
    out.loc[order, "t_score_estimate"] = preds["t_pred"]
    if with_features:
        features = np.empty(len(out), dtype=object)
        features[order] = list(preds["neck_features"])
        out["neck_features"] = features
    out["threshold"] = bundle.threshold
    return out


def predictions_from_frame(pred: pd.DataFrame) -> Predictions:
    """A :func:`predict_frame` table as the arrays :mod:`strnet.scoring` reads (NaN where a label is unknown)."""
    label = pred["label_cls"].astype(str)
    extra = (
        {"prob_screen_mirror": pred["prob_bone_loss_mirror"].to_numpy(float)} if "prob_bone_loss_mirror" in pred else {}
    )
    film, _ = pd.factorize(pred["path"].astype(str).str.lower())
    side = pred["side"].fillna("").astype(str).map(SIDE_CODES).fillna(0).to_numpy(np.int64)
    return extra | {
        "film": np.asarray(film, np.int64),
        "side": side,
        "subgroup": level_codes(pred.reset_index(drop=True)),
        "y_screen": label.map(screening_target).to_numpy(float),
        "prob_screen": pred["prob_bone_loss"].to_numpy(float),
        "prob_screen_raw": pred["prob_bone_loss_uncalibrated"].to_numpy(float),
        "y_severity": label.map(severity_target).to_numpy(float),
        "prob_severity": pred["prob_osteoporosis_given_bone_loss"].to_numpy(float),
        "t_true": pd.to_numeric(pred["t_score"], errors="coerce").to_numpy(float),
        "t_pred": pred["t_score_estimate"].to_numpy(float),
    }


def frame_metrics(
    pred: pd.DataFrame, threshold: float, *, n_bins: int, n_boot: int, seed: int
) -> tuple[dict[str, float], EvaluationCounts]:
    """:func:`strnet.scoring.task_metrics` of a prediction table, with the counts behind them."""
    return evaluation_metrics(predictions_from_frame(pred), threshold, n_bins=n_bins, n_boot=n_boot, seed=seed)


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
        raw = labelled["prob_bone_loss_uncalibrated"].to_numpy(float)
        figs["reliability"] = plots.reliability_plot(
            {"uncalibrated": M.score_histogram(y, raw, 1000), "calibrated": M.score_histogram(y, p, 1000)},
            out_dir / "reliability.png",
        )
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
    n_boot: int,
    seed: int,
    n_bins: int,
    precision: str | None = None,
    figures: bool = True,
) -> EvaluationResult:
    """Predict, score at the bundle's τ*, draw figures (unless ``figures`` is false: ``evaluate.figures``) and
    write predictions.csv, metrics.json and the report."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pred = predict_frame(bundle, df, cache=cache, precision=precision, with_mirror=True)
    pred.to_csv(out / "predictions.csv", index=False)
    threshold = bundle.threshold
    metrics, counts = frame_metrics(pred, threshold, n_bins=n_bins, n_boot=n_boot, seed=seed)
    n_labelled = int((pred["label_cls"] != "").sum())
    subgroups = subgroup_metrics(pred, threshold, n_boot=n_boot, seed=seed)
    drawn = make_figures(pred, threshold, out / "figures") if figures else {}
    notes = []
    if n_labelled == 0:
        notes.append("The manifest carries no labels: predictions only, no metrics.")
    if (pred["source"].str.contains("mendeley", case=False)).any():
        notes.append("Mendeley T-scores are calcaneal QUS, not DXA: T-score agreement there is indicative only.")
    if note := image_path_note(bundle.metadata.get("training", {})):
        notes.append(note)
    summary = {
        "cases": len(pred),
        "labelled": n_labelled,
        "sites": ", ".join(sorted(set(pred["site"]))),
        "sources": ", ".join(sorted(set(pred["source"]))),
        "labels": pred["label_cls"].replace("", "unlabelled").value_counts().to_dict(),
    }
    sections = report_sections(metrics) if n_labelled else {}
    report = write_report(
        out,
        title=title,
        metrics=sections.get("screening", {}),
        cis=sections.get("cis", {}),
        threshold_info=bundle.metadata.get("threshold", {"value": threshold}),
        figures=drawn,
        severity=sections.get("severity") if metrics["severity_n"] else None,
        regression=sections.get("t_score") if metrics["t_score_n"] >= 2 else None,
        dataset_summary=summary,
        notes=notes,
        headline=bundle.metadata.get("headline", ""),
        quality={k: metrics[k] for k in QUALITY_NAMES if k in metrics} if n_labelled else None,
        subgroups=subgroups,
    )
    record = {"threshold": threshold, "n": len(pred), "n_labelled": n_labelled, **metrics, "subgroups": subgroups}
    (out / "metrics.json").write_text(json.dumps(strict_json(record), indent=2, allow_nan=False))
    return EvaluationResult(
        metrics=metrics,
        counts=counts,
        n_labelled=n_labelled,
        predictions=pred,
        out_dir=out,
        figures=drawn,
        report=report,
        subgroups=subgroups,
    )


def report_sections(metrics: dict[str, float]) -> dict[str, Any]:
    """Flat ``{task}_{metric}`` names -> the report's per-task tables, intervals beside their metric."""
    out: dict[str, Any] = {task: {} for task in TASKS} | {"cis": {}}
    for key, value in metrics.items():
        task = next(t for t in TASKS if key.startswith(f"{t}_"))
        name = key[len(task) + 1 :]
        if name.endswith(("_ci_lo", "_ci_hi")):
            if task == "screening":
                base = name[: -len("_ci_lo")]
                lo, hi = out["cis"].get(base, (math.nan, math.nan))
                out["cis"][base] = (value, hi) if name.endswith("_lo") else (lo, value)
            elif task == "t_score":
                out["t_score"].setdefault("pearson_ci", [math.nan, math.nan])[name.endswith("_hi")] = value
            continue
        out[task][name] = int(value) if name in COUNT_METRICS and math.isfinite(value) else value
    return out


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
