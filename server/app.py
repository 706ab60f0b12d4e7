"""Flower ServerApp: discover sites -> FedAvg rounds -> pooled τ* -> bundle -> frozen per-site evaluation -> MLflow.

The run config (pyproject ``[tool.flwr.app.config]``) carries only ``config`` (preset name or YAML path),
``overrides`` (space-separated ``key=value``) and ``num-server-rounds`` (0 = the config's); the resolved
configuration travels to every site as JSON, so all sites run exactly the server's settings. Everything after
the Grid is plain Python (:func:`run_federation`), testable in-process with a Grid stand-in.
"""

from __future__ import annotations

import json
import shlex
import time
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from configs.loader import flatten
from configs.schema import Config, load_config
from server.pooled import (
    QuorumError,
    SiteError,
    count_metrics,
    curves_from_histogram,
    pool_test_metrics,
    pooled_threshold,
)
from server.strategy import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, SiteFedAvg, decode_reply
from server.tracking import Tracker
from strnet.bundle import save_bundle
from strnet.engine import seed_everything
from strnet.errors import ConfigError
from strnet.evaluation import flat_metrics, strict_json
from strnet.model import build_strnet, count_params
from strnet.site import decode_statistics, threshold_grid
from strnet.training import Tracker as TrackerProtocol

app = ServerApp()

INFO_KEY = "info"
SITE_INFO_TYPE = f"{MessageType.QUERY}.site_info"
FROZEN_TYPE = f"{MessageType.EVALUATE}.frozen"
TABLE_COLUMNS = (
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


@dataclass
class SiteNode:
    node_id: int
    site: str
    role: str
    counts: dict[str, int] = field(default_factory=dict)


@dataclass
class FederatedResult:
    bundle_dir: Path
    threshold: dict[str, Any]
    val_metrics: dict[str, float]
    test_metrics: dict[str, Any]
    site_metrics: dict[str, dict[str, Any]]
    table: pd.DataFrame
    history: dict[int, dict[str, float]]
    problems: list[str]
    seconds: float
    run_id: str | None


def config_from_run_config(run_config: dict[str, Any]) -> Config:
    """``config`` + ``overrides`` + ``num-server-rounds`` (flat Flower run config) -> validated Config."""
    overrides = shlex.split(str(run_config.get("overrides", "") or ""))
    rounds = int(run_config.get("num-server-rounds", 0) or 0)
    if rounds > 0:
        overrides.append(f"federation.rounds={rounds}")
    cfg = load_config(str(run_config.get("config", "demo")), overrides)
    if not cfg.federation.sites:
        raise ConfigError("federation.sites is empty: list the sites (name, role, manifest) in the config")
    return cfg


def _problem(problems: list[str], text: str) -> None:
    problems.append(text)
    log(WARNING, "%s", text)


def discover_sites(grid: Grid, cfg: Config, config_json: str, problems: list[str]) -> dict[int, SiteNode]:
    """Ask every connected node which site it plays; build the node -> site map used for every later step."""
    expected = len(cfg.federation.sites)
    deadline = time.monotonic() + cfg.federation.round_timeout
    while len(nodes := sorted(grid.get_node_ids())) < expected and time.monotonic() < deadline:
        log(INFO, "waiting for nodes: %d of %d connected", len(nodes), expected)
        time.sleep(1.0)
    record = RecordDict({CONFIG_KEY: ConfigRecord({"config-json": config_json})})
    messages = [Message(content=record, message_type=SITE_INFO_TYPE, dst_node_id=n) for n in nodes]
    replies = grid.send_and_receive(messages, timeout=cfg.federation.round_timeout)
    found: dict[int, SiteNode] = {}
    for msg in replies:
        node = msg.metadata.src_node_id
        if msg.has_error():
            _problem(problems, f"site_info: node {node} (site unknown) failed: {msg.error.reason}")
            continue
        try:
            info = msg.content[INFO_KEY]
            counts = decode_statistics(msg.content[METRICS_KEY])
            entry = SiteNode(node, str(info["site"]), str(info["role"]), {k: int(v) for k, v in counts.items()})
            if entry.role not in ("train", "external"):
                raise ValueError(f"site {entry.site!r} reports unknown role {entry.role!r}")
        except (KeyError, TypeError, ValueError) as exc:
            _problem(problems, f"site_info: node {node}: malformed reply ({exc})")
            continue
        if any(e.site == entry.site for e in found.values()):
            _problem(problems, f"site_info: site {entry.site!r} claimed by two nodes; ignoring node {node}")
            continue
        found[node] = entry
    for site in cfg.federation.sites:
        if not any(e.site == site.name for e in found.values()):
            _problem(problems, f"site_info: site {site.name!r} ({site.role}) did not answer; it is left out")
    n_train = sum(e.role == "train" for e in found.values())
    if n_train < cfg.federation.quorum:
        raise QuorumError(
            f"only {n_train} training site(s) answered ({sorted(e.site for e in found.values())}), "
            f"quorum is {cfg.federation.quorum}: " + "; ".join(problems)
        )
    return found


def initial_state(cfg: Config) -> dict[str, Any]:
    """The global model's starting weights (pretrained weights load here, on the server, from a path)."""
    seed_everything(cfg.seed)
    m = cfg.model
    model = build_strnet(backbone=m.backbone, weights=m.weights, neck_dim=m.neck_dim, dropout=m.dropout)
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def run_federation(grid: Grid, cfg: Config, *, tracker: TrackerProtocol | None = None) -> FederatedResult:
    t0 = time.perf_counter()
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fed = cfg.federation
    config_json = json.dumps(cfg.to_dict())
    problems: list[str] = []
    nodes = discover_sites(grid, cfg, config_json, problems)
    train_nodes = {n: e.site for n, e in nodes.items() if e.role == "train"}
    site_table = {e.site: {"role": e.role, "node_id": n, **e.counts} for n, e in nodes.items()}
    run_id = None
    if tracker is not None:
        run_id = tracker.start(
            cfg.name,
            tags={
                "mode": "federated",
                "strategy": fed.strategy,
                "sites": ",".join(sorted(site_table)),
                "train_sites": ",".join(sorted(train_nodes.values())),
            },
            params=flatten(cfg.to_dict()),
        )
        tracker.log_dict({"sites": site_table}, "data_summary.json")
    grid_values = threshold_grid(cfg)
    strategy = SiteFedAvg(
        train_nodes=train_nodes,
        quorum=fed.quorum,
        n_bins=cfg.threshold.histogram_bins,
        grid=grid_values,
        min_sensitivity=cfg.threshold.min_sensitivity,
        tracker=tracker,
        monitor=cfg.train.monitor,
    )
    state = initial_state(cfg)
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(state),
        num_rounds=fed.rounds,
        timeout=fed.round_timeout,
        train_config=ConfigRecord({"config-json": config_json, "local-epochs": fed.local_epochs}),
        evaluate_config=ConfigRecord({"config-json": config_json}),
    )
    problems += strategy.problems
    if strategy.best_round is None or strategy.best_arrays is None:
        raise QuorumError(
            f"no round produced pooled validation statistics (quorum {fed.quorum}): " + "; ".join(strategy.problems)
        )
    # Keep the round with the best pooled validation score, as centralized training keeps its best epoch;
    # τ* is chosen on that same round's pooled validation counts.
    best_round, best_arrays = strategy.best_round, strategy.best_arrays
    pooled = strategy.round_pooled[best_round]
    threshold = pooled_threshold(pooled, grid_values, cfg.threshold.min_sensitivity)
    tau = float(threshold["value"])
    i = int(np.argmin(np.abs(grid_values - tau)))
    val_metrics = {**pooled.ranking(), **count_metrics(pooled.tp[i], pooled.fp[i], pooled.tn[i], pooled.fn[i])}
    final_state = best_arrays.to_torch_state_dict()
    model = build_strnet(backbone=cfg.model.backbone, weights="none", neck_dim=cfg.model.neck_dim)
    model.load_state_dict(final_state)
    bundle_dir = save_bundle(
        out_dir / "bundle",
        state_dict=final_state,
        model_config={
            **cfg.model.__dict__,
            "weights": "none",
            "init_weights": cfg.model.weights,
            **count_params(model),
        },
        preprocess=cfg.preprocess,
        threshold=threshold,
        training={
            "mode": "federated",
            "strategy": fed.strategy,
            "rounds": fed.rounds,
            "best_round": best_round,
            "monitor": f"pooled val {cfg.train.monitor}",
            "local_epochs": fed.local_epochs,
            "quorum": fed.quorum,
            "sites": site_table,
            "config": cfg.to_dict(),
            "problems": problems,
        },
    )
    site_metrics = frozen_evaluation(grid, cfg, nodes, best_arrays, tau, config_json, problems)
    train_sites = {s: m for s, m in site_metrics.items() if site_table[s]["role"] == "train"}
    test_metrics, test_problems = pool_test_metrics(train_sites, n_bins=cfg.threshold.histogram_bins)
    for text in test_problems:
        _problem(problems, f"frozen evaluation: {text}")
    table = evaluation_table(site_metrics, site_table, test_metrics)
    seconds = time.perf_counter() - t0
    table.to_csv(out_dir / "evaluation.csv", index=False)
    figures = make_figures(out_dir / "figures", strategy.history, table, test_metrics, pooled.hist, tau)
    summary = {
        "threshold": threshold,
        "val": val_metrics,
        "test": test_metrics,
        "sites": {s: _scalars(m) for s, m in site_metrics.items()},
        "problems": problems,
        "seconds": seconds,
    }
    (out_dir / "summary.json").write_text(json.dumps(strict_json(summary), indent=2, allow_nan=False))
    if tracker is not None:
        tracker.log_metrics({f"val_at_tau_{k}": v for k, v in val_metrics.items()})
        tracker.log_metrics({"tau_star": tau, "wall_seconds": seconds, "rounds": fed.rounds})
        tracker.log_metrics(flat_metrics(test_metrics, prefix="test_"))
        for site, m in site_metrics.items():
            tracker.log_metrics(_scalars(m), prefix=f"site.{site}.")
        tracker.log_dict({"rows": json.loads(table.to_json(orient="records"))}, "external_evaluation.json")
        tracker.log_artifact(out_dir / "evaluation.csv", "evaluation")
        tracker.log_artifact(out_dir / "summary.json")
        for path in figures.values():
            tracker.log_artifact(path, "figures")
        tracker.log_artifact(bundle_dir, "bundle")
        if problems:
            tracker.log_dict({"problems": problems}, "problems.json")
        tracker.end()
    return FederatedResult(
        bundle_dir=bundle_dir,
        threshold=threshold,
        val_metrics=val_metrics,
        test_metrics=test_metrics,
        site_metrics=site_metrics,
        table=table,
        history=strategy.history,
        problems=problems,
        seconds=seconds,
        run_id=run_id,
    )


def frozen_evaluation(
    grid: Grid,
    cfg: Config,
    nodes: dict[int, SiteNode],
    arrays: ArrayRecord,
    tau: float,
    config_json: str,
    problems: list[str],
) -> dict[str, dict[str, Any]]:
    """Send the final model and τ* to every site (external included); each evaluates without any update."""
    record = RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: ConfigRecord({"config-json": config_json, "threshold": tau})})
    messages = [Message(content=record, message_type=FROZEN_TYPE, dst_node_id=n) for n in sorted(nodes)]
    out: dict[str, dict[str, Any]] = {}
    for msg in grid.send_and_receive(messages, timeout=cfg.federation.round_timeout):
        node = msg.metadata.src_node_id
        site = nodes[node].site if node in nodes else f"<unknown node {node}>"
        try:
            if node not in nodes:
                raise SiteError(site, "reply from a node that never announced its site")
            out[site] = decode_reply(msg, site)
        except SiteError as exc:
            _problem(problems, f"frozen evaluation: {exc}")
    return out


def _scalars(m: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in m.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def evaluation_table(
    site_metrics: dict[str, dict[str, Any]], site_table: dict[str, dict[str, Any]], pooled_test: dict[str, Any]
) -> pd.DataFrame:
    """One row per site (its own frozen metrics at τ*) plus the pooled row over the training sites' test splits."""
    rows = []
    for site, m in sorted(site_metrics.items()):
        rows.append({"site": site, "role": site_table[site]["role"], "n": m.get("n_eval", 0)} | _pick(m))
    flat = flat_metrics(pooled_test)
    pooled_row = {"site": "pooled (training sites' test splits)", "role": "pooled"}
    pooled_row["n"] = pooled_test["screening"].get("n", 0)
    rows.append(pooled_row | {k: flat.get(k, np.nan) for k in TABLE_COLUMNS})
    return pd.DataFrame(rows, columns=["site", "role", "n", *TABLE_COLUMNS])


def _pick(m: dict[str, Any]) -> dict[str, float]:
    return {k: float(m[k]) if k in m else np.nan for k in TABLE_COLUMNS}


def make_figures(
    out: Path,
    history: dict[int, dict[str, float]],
    table: pd.DataFrame,
    pooled_test: dict[str, Any],
    val_hist: np.ndarray,
    tau: float,
) -> dict[str, Path]:
    """Per-round pooled validation curves, per-site bars, pooled ROC/PR (from histograms, not raw scores)."""
    out.mkdir(parents=True, exist_ok=True)
    figs: dict[str, Path] = {}
    rounds = sorted(history)
    if rounds:
        fig = Figure(figsize=(5, 3.5))
        ax = fig.subplots()
        for key, label in (("val_screen_auroc", "pooled AUROC"), ("val_screen_auprc", "pooled AUPRC")):
            ax.plot(rounds, [history[r].get(key, np.nan) for r in rounds], marker="o", label=label)
        for site in sorted({k.split(".")[1] for r in rounds for k in history[r] if k.startswith("site.")}):
            ax.plot(
                rounds,
                [history[r].get(f"site.{site}.val_screen_auroc", np.nan) for r in rounds],
                linestyle="--",
                label=f"{site} AUROC",
            )
        ax.set(xlabel="round", ylabel="validation", ylim=(0, 1.02), title="Validation by round")
        ax.legend(fontsize=7)
        figs["rounds"] = _save(fig, out / "rounds.png")
    fig = Figure(figsize=(5.5, 3.5))
    ax = fig.subplots()
    keys = ("screening_auroc", "screening_sensitivity", "screening_specificity")
    x = np.arange(len(table))
    for j, key in enumerate(keys):
        ax.bar(x + (j - 1) * 0.27, table[key].astype(float).fillna(0.0), width=0.27, label=key.split("_", 1)[1])
    ax.set_xticks(x, [str(s)[:18] for s in table["site"]], rotation=20, fontsize=7)
    ax.set(ylim=(0, 1.05), title=f"Frozen evaluation per site at τ*={tau:.2f}")
    ax.legend(fontsize=7)
    figs["sites"] = _save(fig, out / "sites.png")
    for name, hist in (("validation", val_hist), ("test", pooled_test.get("hist"))):
        h = np.asarray(hist) if hist is not None else None
        if h is None or h[0].sum() == 0 or h[1].sum() == 0:
            continue
        c = curves_from_histogram(h)
        fig = Figure(figsize=(8, 3.5))
        a1, a2 = fig.subplots(1, 2)
        a1.plot(c["fpr"], c["tpr"])
        a1.plot([0, 1], [0, 1], color="grey", linewidth=0.5)
        a1.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"Pooled ROC ({name})")
        a2.plot(c["recall"], c["precision"])
        a2.set(xlabel="recall", ylabel="precision", title=f"Pooled PR ({name})")
        figs[f"pooled_{name}"] = _save(fig, out / f"pooled_roc_pr_{name}.png")
    return figs


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)  # no pyplot: no global figure state in a long-running server process
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return path


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = config_from_run_config(dict(context.run_config))
    tracker = Tracker(uri=cfg.tracking.uri, experiment=cfg.tracking.experiment, enabled=cfg.tracking.enabled)
    try:
        result = run_federation(grid, cfg, tracker=tracker)
    except BaseException:
        tracker.end(status="FAILED")
        raise
    sc = result.test_metrics.get("screening", {})
    log(
        INFO,
        "federated run done in %.0f s: τ*=%.2f pooled test AUROC=%.3f; bundle %s",
        result.seconds,
        result.threshold["value"],
        sc.get("auroc", float("nan")),
        result.bundle_dir,
    )
    for text in result.problems:
        log(WARNING, "problem: %s", text)
