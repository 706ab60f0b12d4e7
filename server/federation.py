"""A federated run: discover the sites, FedAvg rounds under the recipe, pooled τ*, frozen evaluation, finish.

Everything after the Grid is plain Python, testable in-process with a Grid stand-in; the finish (bundle,
``summary.json``, table, figures, tracking) is :meth:`strnet.run.Run.finish`, the same as ``strnet train``'s.
"""

from __future__ import annotations

import json
import uuid
from functools import partial
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from flwr.serverapp import Grid

from configs.schema import Config, build_model
from server import exchange
from server.calibration import calibrated_validation_counts, pooled_calibration
from server.checkpoint import CheckpointWriter, RoundCheckpoint
from server.discovery import discover_sites
from server.frozen import frozen_evaluation
from server.ood import pooled_ood
from server.pooled import QuorumError, pool, pooled_threshold, weighted_average
from server.replies import TrainingSites
from server.strategy import build_strategy
from server.subgroups import FEDERATED_NOTE, federated_subgroups
from server.together import together
from server.tscore import pooled_tscore_refit
from strnet import batchnorm
from strnet.calibration import Platt
from strnet.engine import RecipeSchedule, seed_everything
from strnet.errors import ConfigError
from strnet.model import batchnorm_keys
from strnet.npy import arrays_numpy
from strnet.privacy import run_privacy, site_reports_from_history
from strnet.protocol import WEIGHT, Field, MessageKind, config_digest, round_nbytes
from strnet.released import StatisticsLedger, usable
from strnet.run import Run, RunResult, SiteResult, Tracker, recipe, site_datasets
from strnet.scoring import fit_of, task_metrics
from strnet.sufficient import EvaluationCounts, ValidationCounts


def initial_state(cfg: Config) -> tuple[dict[str, torch.Tensor], frozenset[str]]:
    """The global model's starting weights, built as ``strnet train`` builds its model (same seed, same init);
    pretrained weights load here, on the server, from a path. Also the model's BatchNorm keys (FedBN)."""
    seed_everything(cfg.seed)
    model = build_model(cfg)
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, batchnorm_keys(model)


def gather_batchnorm(sites: TrainingSites, arrays: ArrayRecord, best_round: int, keys: frozenset[str]) -> ArrayRecord:
    """FedBN after training: each site sends its BatchNorm tensors of the kept round once; their average weighted
    by training cases completes the global model that is calibrated, evaluated everywhere and bundled."""
    cfg, problem = sites.cfg, sites.problem
    replies = sites.ask(MessageKind.BATCHNORM, {Field.SERVER_ROUND: best_round})
    usable: dict[str, dict[str, np.ndarray]] = {}
    for site, values in replies.items():
        got = set(values) - {WEIGHT}
        if got != set(keys) or WEIGHT not in values:
            problem(f"batchnorm: site {site} sent {len(got)} tensors, expected the model's {len(keys)} and a weight")
            continue
        usable[site] = values
    if len(usable) < cfg.federation.quorum:
        raise QuorumError(f"batchnorm: {len(usable)} usable site(s) {sorted(usable)}, quorum {cfg.federation.quorum}")
    reference = {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in arrays.items()}
    weights = [float(v[WEIGHT][0]) for v in usable.values()]
    averaged = weighted_average([{k: v[k] for k in keys} for v in usable.values()], weights, reference)
    return ArrayRecord({k: (Array(averaged[k]) if k in keys else v) for k, v in arrays.items()})


def pooled_batchnorm_statistics(sites: TrainingSites, arrays: ArrayRecord) -> ArrayRecord:
    """BatchNorm running statistics re-estimated by each site under ``arrays``' weights on its training images,
    pooled by their moments (:mod:`strnet.batchnorm`): FedBN's bundle, and every round's global model under
    ``federation.batchnorm: pooled``. ``arrays``' own statistics stay where fewer than the quorum of sites answer
    usably (named in the run's problems)."""
    cfg, problem = sites.cfg, sites.problem
    expected = {k for k in arrays if k.endswith((f".{batchnorm.MEAN}", f".{batchnorm.VAR}"))}
    usable: list[tuple[dict[str, np.ndarray], int]] = []
    for site, values in sites.ask(MessageKind.BN_STATISTICS, {}, model=arrays).items():
        stats = {k: v for k, v in values.items() if k != "n"}
        if set(stats) != expected or "n" not in values:
            problem(f"bn statistics: site {site} sent {len(stats)} arrays, expected the model's {len(expected)}")
            continue
        shapes = [k for k in expected if tuple(stats[k].shape) != tuple(arrays[k].shape)]
        negative = [k for k in expected if k.endswith(batchnorm.VAR) and (stats[k] < 0).any()]
        bad = [k for k in expected if not np.isfinite(stats[k]).all()] + negative
        if shapes or bad:
            problem(f"bn statistics: site {site}: malformed {(shapes + bad)[:3]}")
            continue
        usable.append((stats, int(values["n"][0])))
    if len(usable) < cfg.federation.quorum:
        problem(
            f"bn statistics: {len(usable)} usable site(s), quorum {cfg.federation.quorum}: the model keeps the "
            "BatchNorm statistics it had"
        )
        return arrays
    pooled = batchnorm.pool(usable)
    return ArrayRecord({k: Array(pooled[k].astype(v.dtype)) if k in pooled else v for k, v in arrays.items()})


def run_federated(
    grid: Grid,
    cfg: Config,
    *,
    tracker: Tracker | None = None,
    tags: dict[str, str] | None = None,
    resume: bool = False,
) -> RunResult:
    """The whole federated run; ``resume`` continues from ``<output_dir>/federation-checkpoint.pt`` (the last
    completed round of a stopped run with the same configuration) and reaches the same final weights."""
    fed, th = cfg.federation, cfg.threshold
    if cfg.train.ema_decay:
        # A site's round is ~1/(1 - decay) steps or fewer: its average would mostly hold the weights it was sent.
        raise ConfigError(f"train.ema_decay={cfg.train.ema_decay}: the weight average is centralized only; set 0")
    config_json = json.dumps(cfg.to_dict())
    digest = config_digest(config_json)
    checkpoint = RoundCheckpoint.load(cfg.output_dir, config_digest=digest) if resume else None
    federation_id = checkpoint.federation_id if checkpoint is not None else uuid.uuid4().hex
    run_tags = {"strategy": fed.strategy, "federation_id": federation_id, **(tags or {})}
    if checkpoint is not None:
        run_tags["resumed_from_round"] = str(checkpoint.server_round)
    exchanges = exchange.LOG.count, exchange.LOG.seconds
    with Run(cfg, mode="federated", tracker=tracker, tags=run_tags) as run:
        run.begin("setup")
        nodes = discover_sites(grid, cfg, config_json, run.problem, federation_id=federation_id)
        roles = {e.site: e.role for e in nodes.values()}
        site_table = {e.site: {"role": e.role, "node_id": n, **e.counts} for n, e in nodes.items()}
        train_nodes = {n: e.site for n, e in nodes.items() if e.role == "train"}
        run.log_data(
            {"sites": site_table},
            datasets=site_datasets(site_table),
            sites=",".join(sorted(roles)),
            train_sites=",".join(sorted(train_nodes.values())),
        )
        state, bn_keys = initial_state(cfg)
        ledger = StatisticsLedger(cfg.privacy.statistics)  # every noised statistic of the run, for its ε
        refresh = (  # federation.batchnorm=pooled: every round's global model under the sites' pooled statistics
            partial(pooled_batchnorm_statistics, TrainingSites(grid, cfg, train_nodes, digest, run.problem, ledger))
            if fed.batchnorm == "pooled"
            else None
        )
        strategy = build_strategy(
            fed,
            train_nodes=train_nodes,
            quorum=fed.quorum,
            threshold=th,
            schedule=RecipeSchedule(cfg.federated_train()),
            monitor=cfg.train.monitor,
            config_digest=digest,
            on_round=run.log_step,
            problem=run.problem,
            local_keys=bn_keys,
            ledger=ledger,
            refresh=refresh,
        )
        arrays, start_round, finished = ArrayRecord(state), 1, False
        if checkpoint is not None:
            strategy.load_state_dict(checkpoint.strategy)
            arrays, start_round, finished = checkpoint.arrays, checkpoint.server_round + 1, checkpoint.finished
            run.problems.extend(strategy.problems)
            for row in checkpoint.history:  # the resumed run's record holds the whole curve
                run.log_step(int(row["step"]), {k: v for k, v in row.items() if k != "step"})

        run.begin("training")
        if not finished:
            with CheckpointWriter(cfg.output_dir, keep_rounds=fed.keep_rounds) as writer:

                def save(server_round: int, arrays: ArrayRecord, finished: bool) -> None:
                    # the state as of now (the history grows while the file is written); the records are replaced,
                    # never changed in place, from round to round
                    state = strategy.state_dict()
                    history = [dict(row) for row in run.history]
                    writer.submit(
                        RoundCheckpoint(server_round, federation_id, digest, arrays, state, history, finished)
                    )

                strategy.start(
                    grid=grid,
                    initial_arrays=arrays,
                    num_rounds=fed.rounds,
                    timeout=fed.round_timeout,
                    start_round=start_round,
                    on_round_end=save,
                )
        if strategy.best_round is None or strategy.best_arrays is None:
            raise QuorumError(
                f"no round produced pooled validation statistics (quorum {fed.quorum}): " + "; ".join(strategy.problems)
            )
        run.begin("after_training")
        sites = TrainingSites(grid, cfg, train_nodes, digest, run.problem, ledger)
        kept = strategy.best_arrays
        if strategy.local_keys:
            kept = gather_batchnorm(sites, kept, strategy.best_round, strategy.local_keys)
            kept = pooled_batchnorm_statistics(sites, kept)
        best_val = strategy.round_pooled[strategy.best_round]

        def calibrate(sites: TrainingSites) -> tuple[dict[str, Any], Platt, ValidationCounts, list[str]]:
            """Calibration and τ*'s counts from the kept round's pooled validation statistics, as centralized
            training fits them on its best epoch: Newton steps on summed statistics, then the calibrated
            pooled counts. (The screening output does not depend on the T-score branch being refitted.)"""
            calibration = pooled_calibration(sites, kept, best_val)
            platt = Platt.from_dict(calibration)
            return calibration, platt, *calibrated_validation_counts(sites, kept, platt)

        # three independent conversations about the kept model, sharing exchanges (server.together)
        (refitted, tscore), (calibration, platt, cal_val, pooled_sites), ood = together(
            sites,
            lambda s: pooled_tscore_refit(s, kept),
            calibrate,
            lambda s: pooled_ood(s, kept) if cfg.ood.enabled else None,
        )
        kept = refitted
        excluded = [p for p in strategy.problems if p.startswith(f"round {strategy.best_round} ")]
        threshold = pooled_threshold(
            cal_val, th, sites=pooled_sites, excluded=excluded, noised=cfg.privacy.statistics.noised
        )
        tau = float(threshold["value"])
        frozen, withheld = frozen_evaluation(
            grid, cfg, nodes, kept, tau, platt, digest, run.problem, ledger, shipping=sites.shipping
        )
        if cfg.privacy.statistics.enabled:  # beside τ*, which it chose: summary.json and the bundle
            threshold["statistics_privacy"] = ledger.report()
            if run.tracker is not None and cfg.privacy.statistics.noised:
                run.tracker.log_metrics({"privacy_statistics_epsilon": threshold["statistics_privacy"]["epsilon"]})

        def pooled(split: str) -> EvaluationCounts:
            parts = {s: c[split] for s, c in frozen.items() if roles[s] == "train" and split in c}
            if not parts:
                run.problem(f"frozen evaluation: no training site returned its {split} counts")
                return EvaluationCounts.empty(th.histogram_bins)
            return pool(parts, quorum=1, what=f"pooled {split}")

        def score(counts: EvaluationCounts) -> dict[str, float]:
            return task_metrics(usable(counts), tau, n_boot=cfg.evaluate.bootstrap, seed=cfg.seed)

        def fit(counts: EvaluationCounts) -> dict[str, float]:
            return task_metrics(usable(counts), tau, n_boot=0, seed=cfg.seed)

        # usable: noised histograms (privacy.statistics) clipped once, after pooling; the identity on exact counts
        val_counts, test_counts = usable(pooled("val")), usable(pooled("test"))
        # the pooled test split by sex, age band, BMI band and site, from the per-level histograms the sites sent
        subgroups = federated_subgroups(
            {s: c["test"] for s, c in frozen.items() if roles[s] == "train" and "test" in c},
            withheld,
            tau,
            min_cases=cfg.privacy.statistics.min_cases,
            n_boot=cfg.evaluate.bootstrap,
            seed=cfg.seed,
        )
        dp = cfg.privacy.dp
        training: dict[str, Any] = {
            "rounds_run": strategy.rounds_run,
            "resumed_from_round": checkpoint.server_round if checkpoint is not None else None,
            "federation_id": federation_id,
            "stopped_early": strategy.rounds_run < fed.rounds,
            # rounds sent again because their validation changed the learning rate (server.strategy.SiteFedAvg)
            "redone_rounds": list(strategy.redone_rounds),
            "best_score": strategy.schedule.best_score,
            "quorum": fed.quorum,
            # the weights' precision on the wire in every round, and the bytes per training site per round
            "transport": {"dtype": fed.transport, **round_nbytes(state, fed.transport, local_keys=strategy.local_keys)},
            "tscore_refit": tscore,
            "sites": site_table,
        }
        # site compute plus the transport's latency, per exchange: where a federation's extra wall goes
        run.measures["exchanges"] = float(exchange.LOG.count - exchanges[0])
        run.measures["exchange_seconds"] = exchange.LOG.seconds - exchanges[1]
        return run.finish(
            state_dict={k: torch.from_numpy(v) for k, v in arrays_numpy(kept).items()},
            threshold=threshold,
            val=score(val_counts),
            test=score(test_counts),
            sites={
                s: SiteResult(roles[s], score(c["test"]), fit_of(fit(c["train"])) if "train" in c else {})
                for s, c in frozen.items()
            },
            training=training,
            recipe=recipe(cfg, "federated", site_table),
            calibration=calibration,
            ood=ood,
            val_counts=val_counts,
            test_counts=test_counts,
            best_step=strategy.best_round,
            privacy=run_privacy(dp, site_reports_from_history(dp, run.history)) if dp.enabled else None,
            subgroups=subgroups,
            subgroups_note=FEDERATED_NOTE,
        )
