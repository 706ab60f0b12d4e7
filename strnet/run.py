"""One way a run ends, for both modes: bundle, ``summary.json``, evaluation table, figures, tracking, status.

``strnet train`` and the federation's ServerApp both do their own training and evaluation, then hand the
results to :meth:`Run.finish`; neither writes an output file or a tracked metric by hand. ``with Run(...)``
marks the tracked run FAILED on any exception (MLflow's ``with start_run()`` idiom), in both modes.

The tracker is any object with the small interface of :class:`Tracker` (``server.tracking.Tracker``
implements it with MLflow), so this module stays free of MLflow.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import pandas as pd
import torch

from configs.loader import flatten
from configs.schema import Config, build_model
from strnet import metrics as M
from strnet import plots
from strnet.bundle import save_bundle
from strnet.cases import data_fingerprint
from strnet.engine import numeric_environment, precision_words, resolve_device
from strnet.evaluation import report_sections, strict_json
from strnet.model import count_params
from strnet.report import QUALITY_NAMES, write_report
from strnet.scoring import prefixed
from strnet.sufficient import EvaluationCounts
from strnet.tscore import image_path_note

Mode = Literal["centralized", "federated"]
# How far the bundle's pooled validation AUROC may fall below the one the schedule chose its step by before the run
# names it as a problem. The two differ by design only in what the bundle adds after training (calibration keeps
# the ranking; mirror averaging and an ensemble's later members move it by about ±0.01 on the real data); FedBN's
# bundles fell 0.02-0.12 below, three of four by more than 0.07 (docs/real-data.md, "FedAvg again").
SHIPPED_AUROC_DROP = 0.03
MIN_PAIRS = 100  # so that the drop is at least three discordant pairs' worth (1 / pairs each)

TABLE_METRICS = (
    "screening_auroc",
    "screening_auprc",
    "screening_sensitivity",
    "screening_specificity",
    "screening_ppv",
    "screening_npv",
    "severity_auroc",
    "t_score_mae",
    "t_score_rmse",
    "t_score_pearson_r",
)


class Tracker(Protocol):
    def start(self, run_name: str, tags: dict[str, str], params: dict[str, Any]) -> str | None: ...
    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_dict(self, data: dict[str, Any], name: str) -> None: ...
    def set_tags(self, tags: dict[str, Any]) -> None: ...
    def log_datasets(self, datasets: list[DatasetEntry]) -> None: ...
    def log_model(self, bundle_dir: Path, tags: dict[str, str]) -> str | None: ...
    def end(self, status: str = "FINISHED") -> None: ...


@dataclass(frozen=True)
class DatasetEntry:
    """What one site contributed to a run, as the tracker shows it (MLflow: a dataset input of the run).

    ``rows`` are the site's manifest rows when the run saw them (centralized); a federation's server never
    does, so there it is None and ``counts`` (the site-info counts every site sends) are all there is.
    ``digest`` is the rows' fingerprint (:func:`strnet.cases.data_fingerprint`) or, without rows, a hash of the
    counts; ``context`` is ``training`` for a training site and ``evaluation`` for an external one."""

    name: str
    context: str
    digest: str
    counts: dict[str, int]
    source: str
    rows: pd.DataFrame | None = None


def manifest_datasets(df: pd.DataFrame, context: str, sources: dict[str, str]) -> list[DatasetEntry]:
    """One entry per site of a manifest table the run read: its rows, per-split counts and fingerprint."""
    out = []
    for site, part in df.groupby("site", sort=True):
        split = part["split"].astype(str)
        counts = {"n_rows": len(part), "n_labelled": int((part["label_cls"] != "").sum())}
        counts |= {f"n_{name}": int((split == name).sum()) for name in ("train", "val", "test")}
        rows = part.drop(columns=[c for c in ("path",) if c in part.columns]).reset_index(drop=True)
        source = sources.get(str(site), "manifest")
        out.append(DatasetEntry(str(site), context, data_fingerprint(part), counts, source, rows))
    return out


def site_datasets(sites: dict[str, dict[str, Any]]) -> list[DatasetEntry]:
    """A federation's sites as the server knows them: role and site-info counts, never a row."""
    out = []
    for site, info in sorted(sites.items()):
        counts = {k: int(v) for k, v in info.items() if k.startswith("n_")}
        digest = hashlib.sha256(json.dumps([site, counts], sort_keys=True).encode()).hexdigest()
        context = "training" if info.get("role") == "train" else "evaluation"
        out.append(DatasetEntry(site, context, digest, counts, f"federated site {site}"))
    return out


def run_name(cfg: Config, mode: Mode) -> str:
    """``cpu · centralized`` or ``cpu · federated · fedbn``: what a user reads first in MLflow's runs table."""
    parts = [cfg.name, mode] + ([cfg.federation.strategy] if mode == "federated" else [])
    return " · ".join(parts)


@dataclass
class SiteResult:
    """One site's frozen evaluation: its role and its own ``{task}_{metric}`` values (test split / cohort)."""

    role: str
    metrics: dict[str, float]
    # a training site's own training split (scoring.fit_of); empty for an external site
    fit: dict[str, float] = field(default_factory=dict)


@dataclass
class RunResult:
    bundle_dir: Path
    threshold: dict[str, Any]
    metrics: dict[str, float]  # pooled: val_*, test_*, tau_star, best_step, wall_seconds
    sites: dict[str, SiteResult]
    table: pd.DataFrame
    history: list[dict[str, float]]
    problems: list[str]
    seconds: float
    run_id: str | None
    headline: str = ""

    def describe(self) -> str:
        """A few readable lines for the console: where the model is, τ*, pooled and per-site results."""
        m, th = self.metrics, self.threshold
        lines = [
            self.headline,
            f"bundle: {self.bundle_dir}",
            f"tau* = {th['value']:.2f} ({th['rule']}, chosen on {th['n_cases']} validation cases), "
            f"kept step {m['best_step']:.0f}, {self.seconds:.0f} s",
        ]
        keys = ("auroc", "auprc", "sensitivity", "specificity", "ece")
        for split in ("val", "test"):
            values = ", ".join(f"{k} {m.get(f'{split}_screening_{k}', math.nan):.3f}" for k in keys)
            lines.append(f"  pooled {split:4s} {values}")
            lines.append(
                f"         per radiograph AUROC {m.get(f'{split}_radiograph_auroc', math.nan):.3f}; bilateral "
                f"films {m.get(f'{split}_bilateral_n_pairs', 0):.0f}: flags differ "
                f"{m.get(f'{split}_bilateral_flag_disagreement', math.nan):.1%}, Spearman R/L "
                f"{m.get(f'{split}_bilateral_spearman', math.nan):.2f}; mirror |ΔP| "
                f"{m.get(f'{split}_mirror_mean_abs_dp', math.nan):.3f}"
            )
        for name, s in sorted(self.sites.items()):
            lines.append(
                f"  {name} ({s.role}, n={s.metrics['screening_n']:.0f}): AUROC {s.metrics['screening_auroc']:.3f}, "
                f"sensitivity {s.metrics['screening_sensitivity']:.3f}, specificity "
                f"{s.metrics['screening_specificity']:.3f}"
                + (f"; own training split AUROC {s.fit['screening_auroc']:.3f}" if s.fit else "")
            )
        if self.problems:
            lines.append(f"  {len(self.problems)} problem(s), listed in summary.json")
        if self.run_id:
            lines.append(f"  MLflow run {self.run_id}")
        return "\n".join(lines)


@dataclass
class Run:
    """A run of either mode, from its start (tracked parameters, tags) to its finished outputs."""

    cfg: Config
    mode: Mode
    tracker: Tracker | None = None
    tags: dict[str, str] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    run_id: str | None = None

    def __post_init__(self) -> None:
        self.out_dir = Path(self.cfg.output_dir)
        self._t0 = time.perf_counter()
        self._t_training: float | None = None
        self.timings: dict[str, float] = {}
        self.measures: dict[str, float] = {}  # other timing figures, as named (a federation's message exchanges)
        self._phase: tuple[str, float] | None = None

    def begin(self, phase: str) -> None:
        """Start timing a part of the run (``setup``, ``training``, ``after_training``), ending the one before.

        Both modes name the same parts, so ``strnet bench`` can set a federation's wall from its first round to
        its written bundle against a centralized run's from its first epoch, without the start-up either pays.
        The parts land in ``summary.json``'s ``timings`` and in MLflow as ``timing.<part>_seconds``."""
        now = time.perf_counter()
        self._close_phase(now)
        if phase == "training" and self._t_training is None:
            self._t_training = now
        self._phase = (phase, now)

    def _close_phase(self, now: float) -> None:
        if self._phase is not None:
            name, start = self._phase
            self.timings[name] = self.timings.get(name, 0.0) + now - start
            self._phase = None

    def __enter__(self) -> Run:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._t0 = time.perf_counter()
        if self.tracker is not None:
            tags = {"mode": self.mode, "preset": self.cfg.name, **self.tags}
            if self.mode == "federated":
                tags.setdefault("strategy", self.cfg.federation.strategy)
            self.run_id = self.tracker.start(
                run_name(self.cfg, self.mode), tags=tags, params=flatten(self.cfg.to_dict())
            )
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if exc_type is not None and self.tracker is not None:
            self.tracker.log_dict({"error": f"{exc_type.__name__}: {exc}", "problems": self.problems}, "problems.json")
            self.tracker.end(status="FAILED")

    def log_data(self, summary: dict[str, Any], datasets: list[DatasetEntry] | None = None, **tags: str) -> None:
        """What the run saw (counts and fingerprints only), as an artifact, tags and one dataset input per site."""
        if self.tracker is not None:
            self.tracker.log_dict(strict_json(summary), "data_summary.json")
            if tags:
                self.tracker.set_tags(tags)
            if datasets:
                self.tracker.log_datasets(datasets)

    def log_datasets(self, datasets: list[DatasetEntry]) -> None:
        """Sites the run reads later (a centralized run's external cohorts), as further dataset inputs."""
        if self.tracker is not None and datasets:
            self.tracker.log_datasets(datasets)

    def log_step(self, step: int, row: dict[str, float]) -> None:
        """One epoch (centralized) or round (federated) of the learning curve, under ``history/``."""
        self.history.append({"step": float(step), **row})
        if self.tracker is not None:
            self.tracker.log_metrics({history_name(k): v for k, v in row.items()}, step=step)

    def log_member_step(self, member: int, step: int, row: dict[str, float]) -> None:
        """One epoch of an ensemble's later member (``member`` 2, 3, …), as ``member.<n>.history/…`` in MLflow;
        the run's own curve (``history``, the learning-curve figure) is the first member's."""
        if self.tracker is not None:
            self.tracker.log_metrics({f"member.{member}.{history_name(k)}": v for k, v in row.items()}, step=step)

    def problem(self, text: str) -> None:
        self.problems.append(text)
        print(f"warning: {text}", file=sys.stderr)

    def finish(
        self,
        *,
        state_dict: dict[str, torch.Tensor],
        threshold: dict[str, Any],
        val: dict[str, float],
        test: dict[str, float],
        sites: dict[str, SiteResult],
        training: dict[str, Any],
        recipe: dict[str, Any],
        calibration: dict[str, Any],
        ood: dict[str, Any] | None,
        val_counts: EvaluationCounts | None,
        test_counts: EvaluationCounts | None,
        best_step: int,
        artifacts: dict[str, Path] | None = None,
        privacy: dict[str, Any] | None = None,
        subgroups: list[dict[str, Any]] | None = None,
        subgroups_note: str = "",
    ) -> RunResult:
        """Write every output of a finished run, log it, and end the tracked run as FINISHED.

        ``subgroups`` (the pooled test split's rows, same keys in both modes: :mod:`strnet.subgroups` from
        per-knee predictions, ``server/subgroups.py`` from the sites' histograms) and ``subgroups_note`` (how they
        were computed) go into ``summary.json`` and MLflow's ``subgroups.json``. A federated run's report of the
        pooled test split (``test_report/``: a centralized run's evaluation wrote its own) shows them too.

        ``privacy`` (DP-SGD runs, :func:`strnet.privacy.run_privacy`): ε per site goes into the bundle, the
        summary, the headline every report opens with, and MLflow."""
        first_line = headline(threshold, calibration, privacy)
        environment = numeric_environment()
        monitored = monitored_auroc(self.history, best_step)
        if (text := shipped_problem(monitored, val, best_step)) is not None:
            self.problem(text)
        bundle_dir = save_bundle(
            self.out_dir / "bundle",
            state_dict=state_dict,
            model_config=model_config(self.cfg, self.mode),
            preprocess=self.cfg.preprocess,
            threshold=threshold,
            training={
                "mode": self.mode,
                "recipe": recipe,
                "best_step": best_step,
                "environment": environment,
                **training,
                "config": self.cfg.to_dict(),
                "problems": self.problems,
            }
            | ({"privacy": privacy} if privacy else {}),
            extra={"calibration": calibration, "headline": first_line} | ({"ood": ood} if ood else {}),
        )
        bundle_written = time.perf_counter()
        self._close_phase(bundle_written)
        seconds = bundle_written - self._t0
        timings = {f"{k}_seconds": v for k, v in self.timings.items()} | self.measures | {"wall_seconds": seconds}
        if self._t_training is not None:
            timings["training_to_bundle_seconds"] = bundle_written - self._t_training
        metrics = {
            **prefixed(val, "val"),
            **prefixed(test, "test"),
            "tau_star": float(threshold["value"]),
            "best_step": float(best_step),
            "val_monitored_screening_auroc": monitored,
            "wall_seconds": seconds,
        }
        table = evaluation_table(sites, test)
        table.to_csv(self.out_dir / "evaluation.csv", index=False)
        figures = (
            plots.run_figures(
                self.out_dir / "figures",
                self.history,
                table,
                {"val": val_counts, "test": test_counts},
                float(threshold["value"]),
            )
            if self.cfg.evaluate.figures
            else {}
        )
        artifacts = dict(artifacts or {})
        if self.mode == "federated":
            artifacts["test_report"] = self._pooled_report(
                test, threshold, first_line, figures, subgroups or [], subgroups_note, image_path_note(training)
            )
        summary = {
            "mode": self.mode,
            "headline": first_line,
            "threshold": threshold,
            "calibration": calibration,
            "ood": {k: v for k, v in (ood or {}).items() if k != "gaussian"},
            "recipe": recipe,
            "metrics": metrics,
            "sites": {
                name: {"role": s.role, **prefixed(s.metrics, "test"), **prefixed(s.fit, "train")}
                for name, s in sorted(sites.items())
            },
            "timings": timings,
            "environment": environment,
            "problems": self.problems,
            "subgroups": {
                "cohort": "pooled test split of the training sites",
                "rows": subgroups or [],
                "note": subgroups_note,
            },
        } | ({"privacy": privacy} if privacy else {})
        summary_path = self.out_dir / "summary.json"
        summary_path.write_text(json.dumps(strict_json(summary), indent=2, allow_nan=False))
        if self.tracker is not None:
            self.tracker.set_tags({f"recipe.{k}": v for k, v in recipe.items()})
            self.tracker.set_tags({f"env.{k}": v for k, v in environment.items()})
            # the parts both modes time (a federation's exchange counts stay in summary.json: one vocabulary)
            parts = {f"timing.{k}": v for k, v in timings.items() if k.endswith("_seconds") and k != "wall_seconds"}
            parts.pop("timing.exchange_seconds", None)
            self.tracker.log_metrics(metrics | parts)
            if privacy:
                self.tracker.set_tags({"privacy": "dp-sgd"})
                self.tracker.log_metrics(privacy_metrics(privacy))
            for name, s in sites.items():
                self.tracker.log_metrics(prefixed(s.metrics, "test", site=name) | prefixed(s.fit, "train", site=name))
            self.tracker.log_dict(strict_json(summary["subgroups"]), "subgroups.json")
            for path in (summary_path, self.out_dir / "evaluation.csv"):
                self.tracker.log_artifact(path)
            for path in figures.values():
                self.tracker.log_artifact(path, "figures")
            self.tracker.log_artifact(bundle_dir, "bundle")
            # the bundle again as an MLflow model (pyfunc), so it can be registered and served by alias
            sha = json.loads((bundle_dir / "metadata.json").read_text())["weights_sha256"]
            try:
                self.tracker.log_model(bundle_dir, {"mode": self.mode, "preset": self.cfg.name, "weights_sha256": sha})
            except Exception as exc:  # every output is written: a tracking extra must not fail the run
                self.problem(f"the bundle was not logged as an MLflow model ({type(exc).__name__}: {exc})")
            for name, path in artifacts.items():
                self.tracker.log_artifact(path, name)
            if self.problems:
                self.tracker.log_dict({"problems": self.problems}, "problems.json")
            self.tracker.end()
        return RunResult(
            bundle_dir=bundle_dir,
            threshold=threshold,
            metrics=metrics,
            sites=sites,
            table=table,
            history=self.history,
            problems=self.problems,
            seconds=seconds,
            run_id=self.run_id,
            headline=summary["headline"],
        )

    def _pooled_report(
        self,
        test: dict[str, float],
        threshold: dict[str, Any],
        first_line: str,
        figures: dict[str, Path],
        subgroups: list[dict[str, Any]],
        subgroups_note: str,
        tscore_note: str,
    ) -> Path:
        """``test_report/report.{md,html}`` of a federation's pooled test split: the same one-page report a
        centralized evaluation writes, from the pooled metrics (the server holds no prediction to draw from)."""
        out = self.out_dir / "test_report"
        labelled = bool(test.get("screening_n"))
        sections = report_sections(test) if labelled else {}
        write_report(
            out,
            title=f"{self.cfg.name}: federated frozen test evaluation (pooled over the training sites' test splits)",
            metrics=sections.get("screening", {}),
            cis=sections.get("cis", {}),
            threshold_info=threshold,
            figures={k: v for k, v in figures.items() if k.startswith("test_")},
            severity=sections.get("severity") if test.get("severity_n") else None,
            regression=sections.get("t_score") if test.get("t_score_n", 0) >= 2 else None,
            dataset_summary={"labelled knees (pooled test splits)": int(test.get("screening_n", 0))},
            notes=[tscore_note] if tscore_note else [],
            headline=first_line,
            quality={k: test[k] for k in QUALITY_NAMES if k in test} if labelled else None,
            subgroups=subgroups,
            interval_method="a stratified bootstrap of the pooled histogram counts (the server holds no per-knee "
            "score, so it cannot resample radiographs)",
            subgroup_note=subgroups_note,
        )
        return out


def privacy_metrics(privacy: dict[str, Any]) -> dict[str, float]:
    """``privacy_epsilon`` (the largest over sites) and ``site.<name>.privacy_epsilon`` for MLflow."""
    out = {"privacy_epsilon": float(privacy["epsilon"]), "privacy_delta": float(privacy["delta"])}
    out |= {f"site.{name}.privacy_epsilon": float(r["epsilon"]) for name, r in privacy["sites"].items()}
    return out


def privacy_sentence(privacy: dict[str, Any] | None) -> str:
    if not privacy:
        return ""
    per_site = ", ".join(f"{name} {r['epsilon']:.2f}" for name, r in sorted(privacy["sites"].items()))
    return (
        f" DP-SGD: ε = {privacy['epsilon']:.2f} at δ = {privacy['delta']:g} (largest over sites; {per_site}; "
        f"clip {privacy['max_grad_norm']:g})."
    )


def headline(threshold: dict[str, Any], calibration: dict[str, Any], privacy: dict[str, Any] | None = None) -> str:
    """The first line of every summary and report: how τ* was found, and loudly when the paper's rule fell back;
    a DP-SGD run's ε per site follows."""
    return _threshold_headline(threshold, calibration) + privacy_sentence(privacy)


def _threshold_headline(threshold: dict[str, Any], calibration: dict[str, Any]) -> str:
    cal = (
        f"Platt calibration a={calibration['a']:.3g}, b={calibration['b']:.3g}"
        if calibration.get("status") == "fitted"
        else f"no calibration ({calibration.get('status', 'not fitted')})"
    )
    if threshold.get("rule") == M.RULE_CONSTRAINED:
        return (
            f"τ* = {threshold['value']:.2f} meets validation sensitivity >= {threshold['min_sensitivity']:.2f} "
            f"(sensitivity {threshold['sensitivity']:.3f}, specificity {threshold['specificity']:.3f}); {cal}."
        )
    need, sens, spec = (threshold.get(k, math.nan) for k in ("min_sensitivity", "sensitivity", "specificity"))
    return (
        f"WARNING: no grid threshold reached validation sensitivity >= {need:.2f}; τ* = {threshold['value']:.2f} "
        f"is the fallback ({threshold.get('rule')}): validation sensitivity {sens:.3f}, specificity {spec:.3f}; {cal}."
    )


def monitored_auroc(history: list[dict[str, float]], best_step: int) -> float:
    """The pooled validation AUROC the schedule saw at the kept step (NaN without that step's row)."""
    row = next((r for r in history if int(r["step"]) == best_step), {})
    return float(row.get("val_screening_auroc", math.nan))


def shipped_problem(monitored: float, val: dict[str, float], best_step: int) -> str | None:
    """A problem's text when the bundle validates more than SHIPPED_AUROC_DROP below the kept step, on a
    validation split with at least MIN_PAIRS (normal, bone loss) pairs: on fewer, a drop that size is a couple of
    swapped pairs (a barely trained model, whose scores tie, turns them over with fp16 rounding alone)."""
    shipped = float(val.get("screening_auroc", math.nan))
    pairs = float(val.get("screening_n_pos", 0.0)) * float(val.get("screening_n_neg", 0.0))
    if pairs < MIN_PAIRS or not monitored - shipped > SHIPPED_AUROC_DROP:
        return None
    return (
        f"the bundle's pooled validation AUROC {shipped:.3f} is {monitored - shipped:.3f} below the {monitored:.3f} "
        f"the schedule kept step {best_step} for: the model served is not the one validated during training "
        "(FedBN, for one, averages the sites' BatchNorm layers only after it)"
    )


def history_name(key: str) -> str:
    """``val_screening_auroc`` -> ``history/val_screening_auroc``; a site's own value keeps ``site.<name>.`` in
    front (``site.a.history/val_screening_auroc``), so MLflow groups the curves by site."""
    if key.startswith("site."):
        site, _, rest = key[len("site.") :].partition(".")
        return f"site.{site}.history/{rest}"
    return f"history/{key}"


def sites_precision_words(precision: str, sites: Mapping[str, Mapping[str, Any]]) -> str:
    """What a federation's training sites trained at, from their own site-info reports.

    A deployed site resolves ``train.precision: auto`` on its own CPU, which the server's host cannot answer for;
    one word when every training site agrees, else each site's (a site that did not report says so)."""

    def words(info: Mapping[str, Any]) -> str:
        if "bf16_autocast" not in info:
            return "not reported"
        resolved = "bf16 autocast" if info["bf16_autocast"] else "fp32"
        if precision != "auto":
            return resolved
        return f"{resolved} (auto: {'native' if info.get('native_bf16') else 'no native'} bf16 on the site's CPU)"

    by_site = {site: words(info) for site, info in sorted(sites.items()) if info.get("role") == "train"}
    if not by_site:
        raise ValueError("no training site in the site table")
    if len(set(by_site.values())) == 1:
        return f"{next(iter(by_site.values()))} at every training site"
    return "; ".join(f"{site}: {w}" for site, w in by_site.items())


def recipe(cfg: Config, mode: Mode, sites: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """The training recipe as run, in words both modes share; ``strnet compare`` prints where they differ.
    ``sites``: a federation's site table (site-info reports), whose training sites say what they trained at."""
    t, fed = (cfg.train if mode == "centralized" else cfg.federated_train()), cfg.federation
    out: dict[str, Any] = {
        "optimizer": f"AdamW lr {t.lr:g}, weight decay {t.weight_decay:g}, clip {t.grad_clip:g}, batch {t.batch_size}",
        "schedule": f"plateau x{t.plateau_factor:g} after {t.plateau_patience}, early stop after "
        f"{t.early_stop_patience} (after a warm-up of {t.min_epochs})",
        "monitor": f"validation {t.monitor} from the score histograms of the training sites' cases",
        "warmup_epochs": cfg.loss.warmup_epochs,
        "members": _members_words(cfg, mode),
    }
    # as resolved where the training ran: this host for a centralized run, each training site's own report for
    # a federation (a deployed site resolves `auto` on its own CPU); summary.json's environment names this host
    out["precision"] = (
        sites_precision_words(t.precision, sites)
        if mode == "federated" and sites is not None
        else precision_words(t.precision, resolve_device())
    )
    if mode == "centralized":
        return out | {
            "step": "epoch",
            "max_epochs": t.epochs,
            "optimizer_state": "continuous",
            "batchnorm": "batch statistics",
        }
    kept = "kept at each site between rounds" if fed.keep_optimizer_state else "reset every round"
    local = f"{fed.local_steps} local step(s)" if fed.local_steps else f"{fed.local_epochs} local epoch(s)"
    return out | {
        "step": f"round of {local}, FedAvg "
        + ("weighted by training cases" if fed.site_weights == "cases" else "with the sites weighted equally"),
        "max_epochs": fed.rounds * (1 if fed.local_steps else fed.local_epochs),
        "optimizer_state": kept,
        "batchnorm": "the sites' pooled statistics, re-estimated before every round"
        if fed.batchnorm == "pooled"
        else "batch statistics",
    }


def _members_words(cfg: Config, mode: Mode) -> str:
    n, k = served_members(cfg, mode), cfg.model.members
    if n > 1:
        return f"{n} networks (seeds {cfg.seed}-{cfg.seed + n - 1}), their calibrated screening logits averaged"
    return "1 network" + (f" (model.members={k} applies to centralized runs)" if k > 1 else "")


def model_config(cfg: Config, mode: Mode = "centralized") -> dict[str, Any]:
    """The bundle's model section: the config's model, weights loaded from the bundle, parameter counts (of
    every member: what the bundle's weights hold). A federation's bundle is one network (``members`` 1)."""
    members = served_members(cfg, mode)
    counts = {k: n * members for k, n in count_params(build_model(cfg, weights="none")).items()}
    return {**cfg.model.__dict__, "members": members, "weights": "none", "init_weights": cfg.model.weights, **counts}


def served_members(cfg: Config, mode: Mode) -> int:
    """How many networks a run of ``mode`` trains and serves: ``model.members`` centralized, one federated."""
    return cfg.model.members if mode == "centralized" else 1


def evaluation_table(sites: dict[str, SiteResult], pooled_test: dict[str, float]) -> pd.DataFrame:
    """One row per site (its own frozen metrics at τ*) plus the pooled row over the training sites' test splits."""
    rows = [
        {"site": name, "role": s.role, "n": s.metrics.get("screening_n", math.nan)}
        | {k: s.metrics.get(k, math.nan) for k in TABLE_METRICS}
        for name, s in sorted(sites.items())
    ]
    rows.append(
        {"site": "pooled (training sites' test splits)", "role": "pooled", "n": pooled_test.get("screening_n")}
        | {k: pooled_test.get(k, math.nan) for k in TABLE_METRICS}
    )
    return pd.DataFrame(rows, columns=["site", "role", "n", *TABLE_METRICS])
