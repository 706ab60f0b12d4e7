"""Centralized training (``strnet train``): the pooled training sites' cases on one machine.

Fit with the recipe, choose τ* on validation, evaluate the frozen model on the test split and every external
site, then hand everything to :meth:`strnet.run.Run.finish` — the same finish the federation uses.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from configs.schema import Config, build_model
from strnet.bundle import Bundle
from strnet.calibration import Platt, calibrated, fit_platt_to_logits, labelled_logits
from strnet.cases import (
    audit_summary,
    data_summary,
    external_sites,
    load_cases,
    training_manifests,
    warm_cache,
)
from strnet.data.cache import PreprocessCache
from strnet.data.dataset import KneeDataset
from strnet.data.manifest import read_manifest
from strnet.engine import (
    FitResult,
    autocast_dtype,
    fit,
    make_loader,
    predict_loader,
    resolve_device,
    seed_everything,
    split_frames,
)
from strnet.ensemble import STRNetEnsemble
from strnet.errors import DataError
from strnet.evaluation import EvaluationResult, evaluate_bundle, frame_metrics, predict_frame
from strnet.ood import fit_ood
from strnet.privacy import run_privacy
from strnet.run import Run, RunResult, SiteResult, Tracker, headline, manifest_datasets, recipe
from strnet.scoring import fit_of
from strnet.subgroups import CENTRALIZED_NOTE
from strnet.sufficient import ValidationCounts
from strnet.tscore import DP_OFF, refit_centralized


def fit_config(
    cfg: Config,
    model: torch.nn.Module,
    splits: dict[str, pd.DataFrame],
    *,
    cache: PreprocessCache | None,
    device: torch.device,
    **kwargs: Any,
) -> FitResult:
    """:func:`strnet.engine.fit` on the train and val frames with everything else the configuration says."""
    return fit(
        model,
        splits["train"],
        splits["val"],
        params=cfg.train,
        seed=cfg.seed,
        preprocess=cfg.preprocess,
        augment=cfg.augment,
        loss_weights=cfg.loss,
        cache=cache,
        n_bins=cfg.threshold.histogram_bins,
        num_workers=cfg.data.num_workers,
        device=device,
        config_dict=cfg.to_dict(),
        test_time_mirror=cfg.model.test_time_mirror,
        dp=cfg.privacy.dp,
        **kwargs,
    )


def run_centralized(
    cfg: Config,
    *,
    tracker: Tracker | None = None,
    resume: bool = False,
    progress: bool = True,
    tags: dict[str, str] | None = None,
) -> RunResult:
    with Run(cfg, mode="centralized", tracker=tracker, tags=tags or {}) as run:
        out_dir = Path(cfg.output_dir)
        run.begin("setup")
        seed_everything(cfg.seed)
        cache = PreprocessCache(Path(cfg.data.cache_dir))
        df, skipped = warm_cache(
            load_cases(training_manifests(cfg)), cfg.preprocess, cache, workers=cfg.data.num_workers
        )
        for line in skipped:
            run.problem(f"skipped: {line}")
        splits = split_frames(df)
        for name in ("train", "val"):
            if splits[name].empty or (splits[name]["label_cls"] == "").all():
                where = ", ".join(training_manifests(cfg))
                raise DataError(where, f"no labelled {name} cases: run `strnet data split` first")
        summary = data_summary(df)
        audit = audit_summary(df, cfg.data.audit_max_distance)
        if audit["cross_split_groups"]:
            run.problem(
                f"{audit['cross_split_groups']} duplicate group(s) span two splits (leakage): "
                "re-split with `strnet data split`, which keeps duplicate groups together"
            )
        sources = {s.name: s.manifest for s in cfg.federation.sites}
        run.log_data(
            {"data": summary, "audit": audit},
            datasets=manifest_datasets(df, "training", sources),
            data_fingerprint=summary["fingerprint"],
            sites=",".join(summary["sites"]),
        )

        device = resolve_device()
        run.begin("training")
        trained = [
            _train_member(cfg, k, splits, cache, device, run, resume=resume, progress=progress)
            for k in range(cfg.model.members)
        ]
        run.begin("after_training")
        result, tscore = trained[0].fit, trained[0].tscore
        privacy = run_privacy(cfg.privacy.dp, {"centralized": result.privacy}) if result.privacy else None
        model: torch.nn.Module = trained[0].net
        if len(trained) > 1:
            model = STRNetEnsemble([m.net for m in trained])
            for k, m in enumerate(trained):
                model.set_member_calibration(k, m.calibration["a"], m.calibration["b"])
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        # Calibrate the kept model on validation, then choose τ* on the calibrated scale (the same Newton fit
        # the federation runs on pooled statistics).
        val_raw = _predict(model, splits["val"], cfg, cache, device)
        calibration = fit_platt_to_logits(*labelled_logits(val_raw)) | {
            "fitted_on": "validation split, all training sites' cases (centralized)"
        }
        platt = Platt.from_dict(calibration)
        val_preds = calibrated(val_raw, platt)
        th = cfg.threshold
        val_counts = ValidationCounts.from_predictions(val_preds, grid=th.grid(), n_bins=th.histogram_bins)
        threshold = val_counts.threshold(th.grid(), th.min_sensitivity) | {
            "chosen_on": "validation split, all training sites' cases (centralized)",
            "sites": summary["sites"],
            "n_cases": val_counts.n_cases,
            "grid": [th.grid_start, th.grid_stop, th.grid_step],
        }
        tau = float(threshold["value"])
        n_boot, n_bins = cfg.evaluate.bootstrap, th.histogram_bins
        metadata = {
            "threshold": threshold,
            "calibration": calibration,
            "headline": headline(threshold, calibration, privacy),
            "preprocess": cfg.preprocess.to_dict(),
            "model": {"test_time_mirror": cfg.model.test_time_mirror},
        }
        if cfg.ood.enabled:
            datasets = [KneeDataset(splits[k], cfg.preprocess, cache, augment=None) for k in ("train", "val")]
            amp = autocast_dtype(cfg.train.precision, device)  # the precision predict serves the features at
            ood = fit_ood(
                model, *datasets, quantile=cfg.ood.quantile, margin=cfg.ood.margin, device=device, amp_dtype=amp
            )
            metadata["ood"] = ood.to_dict()
        frozen = Bundle(model.cpu().eval(), metadata)
        val_ev = _evaluate(frozen, splits["val"], out_dir / "val_report", f"{cfg.name}: validation at τ*", cfg)
        val_metrics = val_ev.metrics
        reports: dict[str, Path] = {}
        sites: dict[str, SiteResult] = {}
        test_metrics: dict[str, float] = {}
        test_counts = None
        subgroups: list[dict[str, Any]] = []
        if not splits["test"].empty:
            ev = _evaluate(frozen, splits["test"], out_dir / "test_report", f"{cfg.name}: frozen test evaluation", cfg)
            test_metrics, test_counts, reports["test_report"] = ev.metrics, ev.counts, ev.out_dir
            subgroups = ev.subgroups
            for site, part in ev.predictions.groupby("site"):
                own, _ = frame_metrics(part, tau, n_bins=n_bins, n_boot=n_boot, seed=cfg.seed)
                sites[str(site)] = SiteResult("train", own)
        if not splits["train"].empty:
            # the frozen model on its own training images, un-augmented, per site (scoring.fit_of)
            fitted = predict_frame(frozen, splits["train"], cache=cache, precision=cfg.train.precision, progress=False)
            for site, part in fitted.groupby("site"):
                if str(site) in sites:
                    own, _ = frame_metrics(part, tau, n_bins=n_bins, n_boot=0, seed=cfg.seed)
                    sites[str(site)].fit = fit_of(own)
        for site in external_sites(cfg):
            title = f"{cfg.name}: frozen external evaluation at {site.name}"
            cohort = read_manifest(site.manifest)
            run.log_datasets(manifest_datasets(cohort, "evaluation", {site.name: site.manifest}))
            ev = _evaluate(frozen, cohort, out_dir / f"external_{site.name}", title, cfg)
            sites[site.name] = SiteResult("external", ev.metrics)
            reports[f"external_{site.name}"] = ev.out_dir
        return run.finish(
            state_dict=state,
            threshold=threshold,
            val=val_metrics,
            test=test_metrics,
            sites=sites,
            training={
                "data": summary,
                "audit": audit,
                "epochs_run": result.epochs_run,
                "stopped_early": result.stopped_early,
                "best_score": result.best_score,
                "tscore_refit": tscore,
            }
            | ({"members": [m.describe() for m in trained]} if len(trained) > 1 else {}),
            recipe=recipe(cfg, "centralized"),
            calibration=calibration,
            ood=metadata.get("ood"),
            val_counts=val_ev.counts,
            test_counts=test_counts,
            best_step=result.best_epoch,
            artifacts=reports,
            privacy=privacy,
            subgroups=subgroups,
            subgroups_note=CENTRALIZED_NOTE,
        )


@dataclass
class Member:
    """One trained network of a run: all of a single-network run, or one member of an ensemble."""

    seed: int
    net: torch.nn.Module
    fit: FitResult
    tscore: dict[str, Any]
    calibration: dict[str, Any]  # its own Platt fit on validation (what the ensemble combines on)

    def describe(self) -> dict[str, Any]:
        f = self.fit
        return {
            "seed": self.seed,
            "best_step": f.best_epoch,
            "best_score": f.best_score,
            "epochs_run": f.epochs_run,
            "stopped_early": f.stopped_early,
            "calibration": self.calibration,
            "tscore_refit": self.tscore,
        }


def _train_member(
    cfg: Config,
    k: int,
    splits: dict[str, pd.DataFrame],
    cache: PreprocessCache,
    device: torch.device,
    run: Run,
    *,
    resume: bool,
    progress: bool,
) -> Member:
    """Member ``k`` (seed ``cfg.seed + k``) trained exactly as a one-network run with that seed would be: fit,
    kept state, T-score refit, then its own Platt calibration on validation. Member 0's learning curve is the
    run's; later members log theirs as ``member.<k+1>.history/…``."""
    cfg = replace(cfg, seed=cfg.seed + k)
    seed_everything(cfg.seed)
    net = build_model(cfg)
    name = "checkpoint.pt" if k == 0 else f"checkpoint-member{k + 1}.pt"
    result = fit_config(
        cfg,
        net,
        splits,
        cache=cache,
        device=device,
        checkpoint_path=Path(cfg.output_dir) / name,
        resume=resume,
        on_epoch_end=run.log_step if k == 0 else partial(run.log_member_step, k + 1),
        progress=progress,
    )
    net.load_state_dict(result.best_state)
    ts = cfg.tscore
    tscore = (
        refit_centralized(
            net,
            splits["train"],
            splits["val"],
            cfg.preprocess,
            cache,
            device,
            lr=ts.lr,
            weight_decay=ts.weight_decay,
            **ts.schedule(),
        )
        if ts.rounds and not cfg.privacy.dp.enabled
        else {"status": DP_OFF if ts.rounds else "off"}
    )
    calibration = (
        fit_platt_to_logits(*labelled_logits(_predict(net, splits["val"], cfg, cache, device)))
        if cfg.model.members > 1
        else {}
    )
    return Member(cfg.seed, net, result, tscore, calibration)


def _predict(
    model: torch.nn.Module, df: pd.DataFrame, cfg: Config, cache: PreprocessCache, device: torch.device
) -> dict[str, Any]:
    t = cfg.train
    loader = make_loader(
        df, cfg.preprocess, cache, batch_size=t.eval_batch_size, augment=None, shuffle=False, seed=cfg.seed
    )
    amp = autocast_dtype(t.precision, device)
    return predict_loader(
        model,
        loader,
        device=device,
        amp_dtype=amp,
        channels_last=t.channels_last,
        test_time_mirror=cfg.model.test_time_mirror,
    )


def _evaluate(bundle: Bundle, df: pd.DataFrame, out: Path, title: str, cfg: Config) -> EvaluationResult:
    return evaluate_bundle(
        bundle,
        df,
        out,
        cache=PreprocessCache(Path(cfg.data.cache_dir)),
        title=title,
        n_boot=cfg.evaluate.bootstrap,
        seed=cfg.seed,
        n_bins=cfg.threshold.histogram_bins,
        precision=cfg.train.precision,
        figures=cfg.evaluate.figures,
    )
