"""Centralized training end to end: manifests -> fit -> τ* on validation -> bundle -> frozen test report.

The tracker is any object with the small interface of :class:`Tracker` below (``server.tracking.Tracker``
implements it with MLflow), so this module stays free of MLflow and is reused unchanged by tests.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd

from configs.loader import flatten
from configs.schema import Config, SiteConfig
from strnet import metrics as M
from strnet.bundle import load_bundle, save_bundle
from strnet.data.audit import audit_manifest
from strnet.data.cache import PreprocessCache
from strnet.data.manifest import merge_manifests, read_manifest
from strnet.engine import (
    EngineSettings,
    autocast_dtype,
    choose_threshold,
    fit,
    make_loader,
    predict_loader,
    resolve_device,
    seed_everything,
)
from strnet.errors import DataError
from strnet.evaluation import compute_metrics, evaluate_bundle, flat_metrics, strict_json
from strnet.model import build_strnet, count_params


class Tracker(Protocol):
    def start(self, run_name: str, tags: dict[str, str], params: dict[str, Any]) -> str | None: ...
    def log_metrics(self, metrics: dict[str, Any], step: int | None = None, prefix: str = "") -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_dict(self, data: dict[str, Any], name: str) -> None: ...
    def set_tags(self, tags: dict[str, Any]) -> None: ...
    def end(self, status: str = "FINISHED") -> None: ...


def engine_settings(cfg: Config) -> EngineSettings:
    t, th = cfg.train, cfg.threshold
    grid = np.round(np.arange(th.grid_start, th.grid_stop + th.grid_step / 2, th.grid_step), 4)
    return EngineSettings(
        train=t,
        num_workers=cfg.data.num_workers,
        seed=cfg.seed,
        min_sensitivity=th.min_sensitivity,
        threshold_grid=tuple(float(x) for x in grid),
    )


def training_manifests(cfg: Config) -> list[str]:
    """``data.manifests`` if given, else the manifests of the federation's training sites (same data, one schema)."""
    if cfg.data.manifests:
        return list(cfg.data.manifests)
    return [s.manifest for s in cfg.federation.sites if s.role == "train"]


def external_sites(cfg: Config) -> list[SiteConfig]:
    return [s for s in cfg.federation.sites if s.role == "external"]


def load_cases(manifests: tuple[str, ...] | list[str]) -> pd.DataFrame:
    if not manifests:
        raise DataError("<config>", "no manifests: set data.manifests or federation.sites")
    return merge_manifests(read_manifest(m) for m in manifests)


def data_fingerprint(df: pd.DataFrame) -> str:
    """SHA-256 of the manifest content that defines the experiment (paths, labels, splits, targets)."""
    cols = ["path", "side", "site", "split", "label_cls", "t_score"]
    text = df[cols].sort_values(["path", "side"]).to_csv(index=False)
    return hashlib.sha256(text.encode()).hexdigest()


def data_summary(df: pd.DataFrame) -> dict[str, Any]:
    table = df.groupby(["split", "label_cls"]).size().unstack(fill_value=0)
    return {
        "n_rows": len(df),
        "n_images": int(df["path"].nunique()),
        "sites": sorted(set(df["site"])),
        "sources": sorted(set(df["source"])),
        "by_split": {str(k): {str(c): int(v) for c, v in row.items()} for k, row in table.iterrows()},
        "fingerprint": data_fingerprint(df),
    }


def warm_cache(df: pd.DataFrame, cfg: Config, cache: PreprocessCache) -> tuple[pd.DataFrame, list[str]]:
    """Preprocess every case once; cases whose image cannot be read are dropped with their reason."""
    problems = cache.warm(df, cfg.preprocess, workers=max(1, cfg.data.num_workers))
    bad = {p.split(": ", 1)[0] for p in problems}
    keep = ~df["path"].isin(bad)
    return df[keep].reset_index(drop=True), problems


def audit_summary(df: pd.DataFrame, max_distance: int) -> dict[str, Any]:
    """The audit's counts for the bundle (the member lists stay in `strnet data audit --json`)."""
    report = audit_manifest(df, max_distance=max_distance).to_dict()
    return {k: v for k, v in report.items() if not isinstance(v, list)}


@dataclass
class TrainResult:
    bundle_dir: Path
    threshold: dict[str, Any]
    val_metrics: dict[str, float]
    test_metrics: dict[str, Any]
    history: list[dict[str, float]]
    seconds: float
    run_id: str | None


def train_centralized(
    cfg: Config,
    *,
    tracker: Tracker | None = None,
    resume: bool = False,
    progress: bool = True,
    extra_tags: dict[str, str] | None = None,
) -> TrainResult:
    t0 = time.perf_counter()
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    manifests = training_manifests(cfg)
    df = load_cases(manifests)
    cache = PreprocessCache(Path(cfg.data.cache_dir))
    df, problems = warm_cache(df, cfg, cache)
    for line in problems:
        print(f"skipped: {line}")
    splits = {name: df[df["split"] == name].reset_index(drop=True) for name in ("train", "val", "test")}
    for name in ("train", "val"):
        if splits[name].empty or (splits[name]["label_cls"] == "").all():
            raise DataError(", ".join(cfg.data.manifests), f"no labelled {name} cases: run `strnet data split` first")
    summary = data_summary(df)
    audit = audit_summary(df, cfg.data.audit_max_distance)
    if audit["cross_split_groups"]:
        print(
            f"warning: {audit['cross_split_groups']} duplicate group(s) span two splits (leakage): "
            "re-split with `strnet data split`, which keeps duplicate groups together"
        )
    run_id = None
    if tracker is not None:
        run_id = tracker.start(
            cfg.name,
            tags={"mode": "centralized", "data_fingerprint": summary["fingerprint"], **(extra_tags or {})},
            params=flatten(cfg.to_dict()),
        )
        tracker.log_dict(summary, "data_summary.json")

    settings = engine_settings(cfg)
    device = resolve_device()
    model = build_strnet(
        backbone=cfg.model.backbone, weights=cfg.model.weights, neck_dim=cfg.model.neck_dim, dropout=cfg.model.dropout
    )

    def log_epoch(epoch: int, row: dict[str, float]) -> None:
        if tracker is not None:
            tracker.log_metrics(row, step=epoch)

    result = fit(
        model,
        splits["train"],
        splits["val"],
        settings=settings,
        preprocess=cfg.preprocess,
        augment=cfg.augment,
        loss_weights=cfg.loss,
        cache=cache,
        device=device,
        checkpoint_path=out_dir / "checkpoint.pt",
        resume=resume,
        config_dict=cfg.to_dict(),
        on_epoch_end=log_epoch,
        progress=progress,
    )
    model.load_state_dict(result.best_state)
    val_loader = make_loader(
        splits["val"],
        cfg.preprocess,
        cache,
        batch_size=settings.train.eval_batch_size,
        augment=None,
        shuffle=False,
        seed=cfg.seed,
    )
    val_preds = predict_loader(
        model,
        val_loader,
        device=device,
        amp_dtype=autocast_dtype(settings.train.precision, device),
        channels_last=settings.train.channels_last,
    )
    threshold = choose_threshold(val_preds, settings)
    threshold.update(
        chosen_on="validation split (pooled over training sites)",
        sites=summary["sites"],
        min_sensitivity=settings.min_sensitivity,
        grid=[settings.threshold_grid[0], settings.threshold_grid[-1], cfg.threshold.grid_step],
    )
    known = ~np.isnan(val_preds["y_screen"])
    val_metrics = M.classification_metrics(
        val_preds["y_screen"][known].astype(int), val_preds["prob_screen"][known], threshold["value"]
    )
    bundle_dir = save_bundle(
        out_dir / "bundle",
        state_dict=result.best_state,
        model_config={
            **cfg.model.__dict__,
            "weights": "none",
            "init_weights": cfg.model.weights,
            **count_params(model),
        },
        preprocess=cfg.preprocess,
        threshold=threshold,
        training={
            "mode": "centralized",
            "data": summary,
            "audit": audit,
            "best_epoch": result.best_epoch,
            "epochs_run": result.epochs_run,
            "stopped_early": result.stopped_early,
            "monitor": f"val {settings.train.monitor}",
            "best_score": result.best_score,
            "config": cfg.to_dict(),
            "skipped_images": problems,
        },
    )
    bundle = load_bundle(bundle_dir)
    test_metrics: dict[str, Any] = {}
    site_metrics: dict[str, dict[str, Any]] = {}
    if not splits["test"].empty:
        ev = evaluate_bundle(
            bundle,
            splits["test"],
            out_dir / "test_report",
            cache=cache,
            title=f"{cfg.name}: frozen test evaluation",
            n_boot=cfg.evaluate.bootstrap,
            seed=cfg.seed,
            precision=settings.train.precision,
        )
        test_metrics = ev.metrics
        for site, part in ev.predictions.groupby("site"):
            site_metrics[str(site)] = compute_metrics(part, bundle.threshold, n_boot=0)
    for site in external_sites(cfg):
        ext = read_manifest(site.manifest)
        ev = evaluate_bundle(
            bundle,
            ext,
            out_dir / f"external_{site.name}",
            cache=cache,
            title=f"{cfg.name}: frozen external evaluation at {site.name}",
            n_boot=cfg.evaluate.bootstrap,
            seed=cfg.seed,
            precision=settings.train.precision,
        )
        site_metrics[site.name] = ev.metrics
    seconds = time.perf_counter() - t0
    (out_dir / "summary.json").write_text(
        json.dumps(
            strict_json(
                {
                    "threshold": threshold,
                    "val": val_metrics,
                    "test": test_metrics,
                    "sites": site_metrics,
                    "seconds": seconds,
                }
            ),
            indent=2,
            allow_nan=False,
        )
    )
    if tracker is not None:
        tracker.log_metrics({f"val_at_tau_{k}": v for k, v in val_metrics.items()})
        tracker.log_metrics({"tau_star": threshold["value"], "wall_seconds": seconds, "best_epoch": result.best_epoch})
        tracker.log_metrics(flat_metrics(test_metrics, prefix="test_"))
        for site, m in site_metrics.items():
            tracker.log_metrics(flat_metrics(m, prefix=f"site.{site}."))
        tracker.log_artifact(bundle_dir, "bundle")
        if (out_dir / "test_report").exists():
            tracker.log_artifact(out_dir / "test_report", "test_report")
        tracker.end()
    return TrainResult(
        bundle_dir=bundle_dir,
        threshold=threshold,
        val_metrics=val_metrics,
        test_metrics=test_metrics,
        history=result.history,
        seconds=seconds,
        run_id=run_id,
    )
