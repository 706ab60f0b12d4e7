"""FedAvg over the training sites only, driven by the training recipe, with a quorum and named-site errors.

Differences from Flower's stock FedAvg, each for a reason:
- every *training* site takes part in every round (no unseeded random sampling; external sites never train);
- the server runs the recipe (:class:`strnet.engine.RecipeSchedule`): each round's learning rate comes from a
  plateau on the pooled validation score and is sent with the round; early stopping ends the run, and the
  round with the best pooled score is kept — as ``strnet train`` does per epoch;
- one malformed or failed reply is dropped with a message naming the site, and the round still completes
  when ``quorum`` usable replies remain (stock FedAvg aborts on one inconsistent reply, or accepts one reply);
- integer buffers (BatchNorm ``num_batches_tracked``) are cast back to their dtype after averaging;
- weights travel at ``federation.transport`` precision (fp16 by default) both ways, the sites' as updates on
  the weights they were sent (:func:`strnet.protocol.update_to_wire`); replies are added to / cast back to the
  global record's dtypes (fp32) before averaging, so the average, the global record, a server optimizer's state
  (FedAvgM momentum, FedAdam moments: Flower keeps them from the fp32 record this strategy is given) and the
  checkpoint all stay fp32;
- the evaluate step pools the sites' *additive* validation counts instead of averaging per-site metrics;
- one exchange per round: a round's train message also asks each site to validate the weights it carries (the
  previous round's average) before training from them, so the weights reach a site once per round instead of
  twice. The learning rate that validation sets is speculated: the round trains at the current one, and in the
  rare round where the pooled validation changes it (a plateau), the server sends the round again at the new
  rate and each site trains again from the state it kept before (:meth:`SiteFedAvg.start`). Early stopping
  discards the round that trained meanwhile. The weights, the history and the kept round are exactly those of
  a train-then-validate loop (``tests/test_federation.py``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedProx, Result
from flwr.supercore import log

from configs.schema import FederationConfig, ThresholdConfig
from server.exchange import send_and_receive
from server.pooled import QuorumError, pool, weighted_average
from server.replies import reply_content, stats_arrays, withheld
from strnet.engine import RecipeSchedule, history_row, with_site_auroc
from strnet.errors import SiteError
from strnet.npy import array_numpy, arrays_numpy, reading_arrays
from strnet.privacy import PRIVACY_METRICS
from strnet.protocol import (
    PROTOCOL_VERSION,
    WEIGHT,
    Field,
    Key,
    MessageKind,
    decode_validation,
    encode,
    to_wire,
    update_from_wire,
    wire_dtype,
)
from strnet.released import StatisticsLedger, restore_validation
from strnet.sufficient import ValidationCounts


class SiteFedAvg(FedAvg):
    """FedAvg weighted by each site's training-set size (or equally: ``federation.site_weights``), over a fixed
    node -> site map of training sites."""

    def __init__(
        self,
        *,
        train_nodes: Mapping[int, str],
        quorum: int,
        threshold: ThresholdConfig,
        schedule: RecipeSchedule,
        monitor: str,
        config_digest: str,
        on_round: Callable[[int, dict[str, float]], None] | None = None,
        problem: Callable[[str], None] | None = None,
        local_keys: frozenset[str] = frozenset(),
        ledger: StatisticsLedger | None = None,
        transport: str = FederationConfig.transport,
        equal_weights: bool = False,
        refresh: Callable[[ArrayRecord], ArrayRecord] | None = None,
    ) -> None:
        n = len(train_nodes)
        super().__init__(min_train_nodes=n, min_evaluate_nodes=n, min_available_nodes=n, weighted_by_key=WEIGHT)
        if not 1 <= quorum <= max(n, 1):
            raise QuorumError(f"quorum {quorum} cannot be met by {n} training site(s) {sorted(train_nodes.values())}")
        self.train_nodes = dict(train_nodes)
        self.quorum = quorum
        self.threshold = threshold
        self.schedule = schedule
        self.monitor = monitor
        self.config_digest = config_digest
        self.on_round = on_round
        self.problems: list[str] = []
        self._problem_sink = problem
        self.round_pooled: dict[int, ValidationCounts] = {}
        self.round_sites: dict[int, list[str]] = {}
        self.rounds_run = 0
        self.best_round: int | None = None
        self.best_arrays: ArrayRecord | None = None
        self._train_row: dict[str, float] = {}
        self._evaluated: ArrayRecord | None = None
        self._lr = schedule.lr  # the learning rate of the round whose training numbers are in _train_row
        self._sent_lr = schedule.lr  # ... and of the latest train message
        self.redone_rounds: list[int] = []  # rounds sent again at the learning rate their validation set
        self._reference: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        # FedBN: tensors that stay at the sites; they travel to a site once (round 1, the starting weights) and
        # never come back in a reply. The global record keeps its starting values for them.
        self.local_keys = local_keys
        self._global: ArrayRecord | None = None
        self.last_average: dict[str, np.ndarray] = {}
        self.ledger = ledger  # privacy.statistics: every noised validation histogram received
        wire_dtype(transport)  # a clear error for an unknown name
        self.transport = transport  # the weights' precision on the wire, both ways (strnet.protocol.to_wire)
        self.equal_weights = equal_weights  # federation.site_weights=equal: every usable reply weighs 1
        # federation.batchnorm=pooled: the global weights with the sites' pooled BatchNorm statistics, asked for
        # before every exchange that validates or trains them
        self.refresh = refresh

    # The server optimizer's state in Flower's FedAvgM (current_arrays, momentum_vector) and FedOpt/FedAdam
    # (current_arrays, m_t, v_t): what a resumed run must restore to take the same steps.
    SERVER_OPTIMIZER_STATE = ("current_arrays", "momentum_vector", "m_t", "v_t")

    def state_dict(self) -> dict[str, Any]:
        """Everything the next round depends on, as plain data (see :mod:`server.checkpoint`)."""
        return {
            "schedule": self.schedule.state_dict(),
            "rounds_run": self.rounds_run,
            "best_round": -1 if self.best_round is None else self.best_round,
            "best_arrays": self.best_arrays,
            "round_pooled": {str(r): encode(c) for r, c in self.round_pooled.items()},
            "round_sites": {str(r): v for r, v in self.round_sites.items()},
            "problems": list(self.problems),
            "redone_rounds": list(self.redone_rounds),
            "server_optimizer": {k: getattr(self, k) for k in self.SERVER_OPTIMIZER_STATE if hasattr(self, k)},
            "statistics_releases": self.ledger.state_dict() if self.ledger is not None else {},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        th = self.threshold
        noised = self.ledger is not None and self.ledger.policy.noised
        self.schedule.load_state_dict(state["schedule"])
        self._lr = self._sent_lr = self.schedule.lr
        self.redone_rounds = list(state.get("redone_rounds", []))
        self.rounds_run = int(state["rounds_run"])
        self.best_round = None if int(state["best_round"]) < 0 else int(state["best_round"])
        self.best_arrays = state["best_arrays"]
        self.round_pooled = {
            int(r): decode_validation("checkpoint", c, n_bins=th.histogram_bins, n_grid=len(th.grid()), noised=noised)
            for r, c in state["round_pooled"].items()
        }
        self.round_sites = {int(r): list(v) for r, v in state["round_sites"].items()}
        self.problems = list(state["problems"])
        for key, value in state["server_optimizer"].items():
            setattr(self, key, value)
        if self.ledger is not None:
            self.ledger.load_state_dict(state.get("statistics_releases", {}))

    def summary(self) -> None:
        super().summary()
        log(INFO, "\t└──> Training sites: %s (quorum %d)", ", ".join(sorted(self.train_nodes.values())), self.quorum)

    def site_of(self, node_id: int) -> str:
        return self.train_nodes.get(node_id, f"<unknown node {node_id}>")

    def _problem(self, server_round: int, step: str, exc: Exception) -> None:
        text = f"round {server_round} {step}: {exc}"
        self.problems.append(text)
        if self._problem_sink is not None:
            self._problem_sink(text)

    def _silent(self, server_round: int, step: str, replies: list[Message]) -> None:
        """Name every training site that sent nothing back: a lost node times out silently in Flower."""
        answered = {msg.metadata.src_node_id for msg in replies}
        for node in sorted(set(self.train_nodes) - answered):
            self._problem(server_round, step, SiteError(self.site_of(node), "no reply (node lost or round timed out)"))

    def _instruction(self, server_round: int, **values: Any) -> ConfigRecord:
        return ConfigRecord(
            {
                Field.VERSION: PROTOCOL_VERSION,
                Field.CONFIG_DIGEST: self.config_digest,
                Field.SERVER_ROUND: server_round,
                **values,
            }
        )

    def _messages(self, record: RecordDict, message_type: str, server_round: int) -> list[Message]:
        return [
            Message(content=record, message_type=message_type, dst_node_id=node, group_id=str(server_round))
            for node in sorted(self.train_nodes)
        ]

    # ------------------------------------------------------------------------------------------------ rounds

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
        *,
        start_round: int = 1,
        on_round_end: Callable[[int, ArrayRecord, bool], None] | None = None,
    ) -> Result:
        """Flower's round loop, one exchange per round, ended early by the recipe's early stopping.

        ``arrays`` at the top of round r are the average of round r − 1, not yet validated (round 1: the starting
        weights, which nobody validates): round r's message asks every site to validate them and then to train
        from them at the learning rate in force. Their pooled validation steps the recipe; when it stops the run,
        round r's training is discarded; when it changes the learning rate, round r is sent again at the new one
        (sites take their state from before round r). A last validation-only exchange scores the final round.

        ``start_round`` > 1 continues a run restored with :meth:`load_state_dict` from ``initial_arrays`` (the
        average of round ``start_round`` − 1, not yet validated); ``on_round_end(round, arrays, finished)``
        follows every completed round with the same meaning (the checkpoint)."""
        self.summary()
        result = Result()
        arrays = initial_arrays
        t0 = time.time()
        stopped = False
        for server_round in range(start_round, num_rounds + 1):
            log(INFO, "[ROUND %s/%s] lr %.3g", server_round, num_rounds, self.schedule.lr)
            validate = server_round > 1
            if self.refresh is not None:
                arrays = self.refresh(arrays)
            config = ConfigRecord({**dict(train_config or ConfigRecord()), Field.VALIDATE: validate})
            replies = send_and_receive(grid, self.configure_train(server_round, arrays, config, grid), timeout=timeout)
            if validate:
                val_metrics = self.aggregate_evaluate(server_round - 1, replies, kind=MessageKind.TRAIN)
                if val_metrics is not None:
                    result.evaluate_metrics_clientapp[server_round - 1] = val_metrics
                self.rounds_run = server_round - 1
                if self.schedule.should_stop:
                    stopped = True
                    if on_round_end is not None:
                        on_round_end(server_round - 1, arrays, True)
                    log(
                        INFO,
                        "early stop after round %d: no better pooled validation %s",
                        server_round - 1,
                        self.monitor,
                    )
                    break
                if self.schedule.lr != self._sent_lr:
                    log(
                        INFO,
                        "round %d again: its validation set the learning rate to %.3g",
                        server_round,
                        self.schedule.lr,
                    )
                    self.redone_rounds.append(server_round)
                    config = ConfigRecord({**dict(train_config or ConfigRecord()), Field.VALIDATE: False})
                    replies = send_and_receive(
                        grid, self.configure_train(server_round, arrays, config, grid), timeout=timeout
                    )
            new_arrays, train_metrics = self.aggregate_train(server_round, replies)
            if new_arrays is not None:
                arrays = result.arrays = new_arrays
            if train_metrics is not None:
                result.train_metrics_clientapp[server_round] = train_metrics
            if on_round_end is not None:
                on_round_end(server_round, arrays, False)
        if not stopped and self.rounds_run < num_rounds:
            if self.refresh is not None:
                arrays = result.arrays = self.refresh(arrays)
            replies = send_and_receive(
                grid,
                self.configure_evaluate(num_rounds, arrays, evaluate_config or ConfigRecord(), grid),
                timeout=timeout,
            )
            val_metrics = self.aggregate_evaluate(num_rounds, replies)
            if val_metrics is not None:
                result.evaluate_metrics_clientapp[num_rounds] = val_metrics
            self.rounds_run = num_rounds
            if on_round_end is not None:
                on_round_end(num_rounds, arrays, True)
        log(INFO, "%d round(s) in %.0f s; kept round %s", self.rounds_run, time.time() - t0, self.best_round)
        return result

    # ------------------------------------------------------------------------------------------------ train

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Every training site, every round, at the recipe's current learning rate; with ``Field.VALIDATE`` in
        ``config`` the sites first return validation counts of ``arrays`` (which :meth:`aggregate_evaluate` then
        scores and may keep)."""
        if config.get(Field.VALIDATE):
            self._evaluated = arrays
        self._global = arrays
        self._base: dict[str, np.ndarray] | None = None  # the sent weights at fp32, for the sites' fp16 updates
        self._reference = {
            k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in arrays.items() if k not in self.local_keys
        }
        if self.local_keys and server_round > 1:
            arrays = self.shared(arrays)
        self._sent_lr = self.schedule.lr
        # ``config`` carries what a Flower strategy mixed in front of this one adds (FedProx: ``proximal-mu``)
        instruction = self._instruction(server_round, **dict(config), **{Field.LEARNING_RATE: self._sent_lr})
        return self._messages(
            RecordDict({Key.ARRAYS: self.wire(arrays), Key.CONFIG: instruction}), MessageKind.TRAIN, server_round
        )

    def check_train_reply(self, msg: Message) -> tuple[str, dict[str, np.ndarray], dict[str, float], float]:
        """(site, arrays, metrics, weight) of a usable reply, else :class:`SiteError` naming the site."""
        site = self.site_of(msg.metadata.src_node_id)
        if msg.metadata.src_node_id not in self.train_nodes:
            raise SiteError(site, "reply from a node that is not a training site")
        content = reply_content(msg, site)
        if Key.ARRAYS not in content.array_records or Key.METRICS not in content.metric_records:
            raise SiteError(site, f"malformed train reply: expected {Key.ARRAYS!r} arrays and {Key.METRICS!r}")
        # fp16 updates added to the fp32 weights sent (strnet.protocol.update_to_wire), values back in the global
        # record's dtypes, before anything is averaged
        dtypes = {k: dtype for k, (_, dtype) in self._reference.items()}
        if self._base is None and self._global is not None:
            self._base = {k: v for k, v in arrays_numpy(self._global).items() if k in self._reference}
        received = arrays_numpy(content.array_records[Key.ARRAYS])
        arrays = update_from_wire(received, self._base or {}, dtypes)
        metrics = dict(content.metric_records[Key.METRICS])
        if self._reference:
            missing = sorted(set(self._reference) - set(arrays))
            extra = sorted(set(arrays) - set(self._reference))
            if missing or extra:
                raise SiteError(site, f"malformed weights: missing {missing[:3]}, unexpected {extra[:3]}")
            for k, (shape, _) in self._reference.items():
                if tuple(arrays[k].shape) != shape:
                    raise SiteError(site, f"malformed weights: {k} has shape {arrays[k].shape}, expected {shape}")
                if not np.isfinite(arrays[k]).all():
                    raise SiteError(site, f"weights {k} hold NaN or infinite values (diverged training?)")
        weight = metrics.get(WEIGHT)
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight > 0:
            raise SiteError(site, f"malformed train reply: {WEIGHT} must be a positive number, got {weight!r}")
        scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and k != WEIGHT}
        return site, arrays, scalars, float(weight)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        usable: list[tuple[str, dict[str, np.ndarray], dict[str, float], float]] = []
        replies = list(replies)
        for msg in replies:
            try:
                usable.append(self.check_train_reply(msg))
            except SiteError as exc:
                self._problem(server_round, "train", exc)
        self._silent(server_round, "train", replies)
        if len(usable) < self.quorum:
            raise QuorumError(
                f"round {server_round}: {len(usable)} of {len(self.train_nodes)} training site(s) replied usably "
                f"({sorted(u[0] for u in usable)}), quorum is {self.quorum}; problems: "
                + ("; ".join(p for p in self.problems if p.startswith(f"round {server_round} ")) or "no reply")
            )
        weights = [1.0 if self.equal_weights else u[3] for u in usable]
        averaged = weighted_average([u[1] for u in usable], weights, self._reference)
        self._lr = self._sent_lr
        total = sum(u[3] for u in usable)
        common = set.intersection(*(set(u[2]) for u in usable)) - set(PRIVACY_METRICS)
        self._train_row = {k: sum(u[2][k] * u[3] for u in usable) / total for k in sorted(common)}
        spent = [u[2]["privacy_epsilon"] for u in usable if "privacy_epsilon" in u[2]]
        if spent:  # DP-SGD: the run's ε is the largest site's, never an average
            self._train_row["privacy_epsilon"] = max(spent)
        for site, _, metrics, _ in usable:
            self._train_row |= {f"site.{site}.{k}": v for k, v in metrics.items()}
        metrics = {k: v for k, v in self._train_row.items() if not k.startswith("site.")}
        self.last_average = averaged
        if self.local_keys and self._global is not None:  # the sites' own BatchNorm tensors are not averaged
            averaged |= {k: v for k, v in arrays_numpy(self._global).items() if k in self.local_keys}
        return ArrayRecord({k: Array(v) for k, v in averaged.items()}), MetricRecord(
            metrics | {"num_sites": len(usable)}
        )

    def wire(self, arrays: ArrayRecord) -> ArrayRecord:
        """The global record as it travels in a round: at ``transport`` precision (the server keeps fp32)."""
        return ArrayRecord({k: Array(v) for k, v in to_wire(arrays_numpy(arrays), self.transport).items()})

    def shared(self, arrays: ArrayRecord) -> ArrayRecord:
        """The arrays without the site-local ones (all of them unless FedBN)."""
        return ArrayRecord({k: v for k, v in arrays.items() if k not in self.local_keys})

    # ------------------------------------------------------------------------------------------------ validation

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Ask the training sites for additive validation counts of the new global model."""
        self._evaluated = arrays
        record = RecordDict({Key.ARRAYS: self.wire(self.shared(arrays)), Key.CONFIG: self._instruction(server_round)})
        return self._messages(record, MessageKind.VAL_STATS, server_round)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message], kind: str = MessageKind.VAL_STATS
    ) -> MetricRecord | None:
        """Pool the counts, step the recipe on the pooled score, keep the best round's weights. ``kind``: the
        message the counts came back in (a validation query, or the next round's train message).

        A round whose pooled counts miss the quorum is skipped by the schedule (no score, no decision); the
        run fails later only if no round at all produced pooled validation counts.
        """
        th = self.threshold
        per_site: dict[str, ValidationCounts] = {}
        replies = list(replies)
        self._silent(server_round, "validation statistics", replies)
        for msg in replies:
            site = self.site_of(msg.metadata.src_node_id)
            try:
                content = reply_content(msg, site)
                arrays = stats_arrays(content, site)
                if self.ledger is not None:
                    self.ledger.record(site, kind, arrays)
                for exc in withheld(content, kind, site).values():
                    raise exc  # privacy.statistics: fewer than k validation cases
                noised = self.ledger is not None and self.ledger.policy.noised
                if noised:  # τ-grid counts from the noised histogram
                    arrays = restore_validation(arrays, th.grid())
                per_site[site] = decode_validation(
                    site, arrays, n_bins=th.histogram_bins, n_grid=len(th.grid()), noised=noised
                )
            except SiteError as exc:
                self._problem(server_round, "validation statistics", exc)
        try:
            pooled = pool(per_site, quorum=self.quorum, what="pooled validation statistics")
        except QuorumError as exc:
            self._problem(server_round, "validation statistics", exc)
            return None
        self.round_pooled[server_round] = pooled
        self.round_sites[server_round] = sorted(per_site)
        ranking = with_site_auroc(pooled.ranking(), {site: c.ranking() for site, c in per_site.items()})
        if self.schedule.step(ranking[self.monitor]):
            self.best_round, self.best_arrays = server_round, self._evaluated
        row = history_row(self._lr, {k: v for k, v in self._train_row.items() if not k.startswith("site.")}, ranking)
        for site, counts in per_site.items():
            row |= {f"site.{site}.val_screening_{k}": v for k, v in counts.ranking().items()}
        row |= {k: v for k, v in self._train_row.items() if k.startswith("site.")}
        if self.on_round is not None:
            self.on_round(server_round, row)
        return MetricRecord({k: v for k, v in row.items() if np.isfinite(v)})


# ---------------------------------------------------------------------------------------------------- strategies
# Flower's own strategies in front of SiteFedAvg: their configure_train / aggregate_train run first and reach
# SiteFedAvg's (every training site, quorum, named-site errors, dtype-safe averaging) through ``super()``.
# Their __init__ is not cooperative with SiteFedAvg's, so each class sets the parent's attributes itself.


class SiteFedProx(FedProx, SiteFedAvg):
    """FedProx: Flower's FedProx sends ``proximal-mu``; each site adds (mu/2)·Σ‖w − w_global‖² to its loss."""

    def __init__(self, *, proximal_mu: float, **site: Any) -> None:
        SiteFedAvg.__init__(self, **site)
        self.proximal_mu = float(proximal_mu)


STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


class ServerOptimizerStatistics:
    """A server optimizer steps the *parameters*; BatchNorm's running statistics and counters are estimates, not
    parameters, and an Adam or momentum step on them drives running variances negative (NaN outputs within a
    few rounds on the real sites). They take the plain weighted average instead.

    The stepped parameters are cast back to the global record's dtypes: Flower's FedAdam multiplies by a numpy
    float64 scalar (its bias-corrected step size), which made the global record, the checkpoint and the bundle
    float64 (twice fp32's bytes on an fp32 wire)."""

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        with reading_arrays():  # Flower's FedAvgM and FedAdam read the records with Array.numpy()
            arrays, metrics = super().aggregate_train(server_round, replies)  # type: ignore[misc]
        if arrays is None:
            return arrays, metrics
        average = self.last_average  # type: ignore[attr-defined]
        dtypes = {k: dtype for k, (_, dtype) in self._reference.items()}  # type: ignore[attr-defined]

        def kept(key: str, value: Array) -> Array:
            if key.endswith(STATISTICS) and key in average:
                return Array(average[key])
            array = array_numpy(value)
            return value if array.dtype == dtypes.get(key, array.dtype) else Array(array.astype(dtypes[key]))

        fixed = ArrayRecord({k: kept(k, v) for k, v in arrays.items()})
        if getattr(self, "current_arrays", None) is not None and isinstance(self.current_arrays, ArrayRecord):  # type: ignore[attr-defined]
            self.current_arrays = fixed  # FedAvgM keeps the last global record
        return fixed, metrics


class SiteFedAvgM(ServerOptimizerStatistics, FedAvgM, SiteFedAvg):
    """FedAvgM: server momentum on the averaged update (Hsu et al. 2019), Flower's implementation."""

    def __init__(self, *, server_lr: float, server_momentum: float, **site: Any) -> None:
        SiteFedAvg.__init__(self, **site)
        self.server_learning_rate = float(server_lr)
        self.server_momentum = float(server_momentum)
        self.server_opt = self.server_momentum != 0.0 or self.server_learning_rate != 1.0
        self.momentum_vector = None
        self.current_arrays = None


class SiteFedAdam(ServerOptimizerStatistics, FedAdam, SiteFedAvg):
    """FedAdam: Adam on the averaged update (Reddi et al. 2021), Flower's implementation."""

    def __init__(self, *, server_lr: float, beta_1: float = 0.9, beta_2: float = 0.99, tau: float = 1e-9, **site: Any):
        SiteFedAvg.__init__(self, **site)
        self.eta, self.eta_l, self.tau = float(server_lr), float("nan"), float(tau)
        self.beta_1, self.beta_2 = float(beta_1), float(beta_2)
        self.current_arrays = self.m_t = self.v_t = None


def build_strategy(fed: FederationConfig, **site: Any) -> SiteFedAvg:
    """The configured strategy over the training sites (``federation.strategy``); FedBN is SiteFedAvg with the
    BatchNorm keys as ``local_keys``. Weights travel at ``fed.transport`` precision."""
    site["transport"] = fed.transport
    site["equal_weights"] = fed.site_weights == "equal"
    if fed.strategy != "fedbn":
        site.pop("local_keys", None)
    if fed.strategy == "fedavg":
        return SiteFedAvg(**site)
    if fed.strategy == "fedbn":
        if not site.get("local_keys"):
            raise ValueError("federation.strategy=fedbn: the model has no BatchNorm layers to keep at the sites")
        return SiteFedAvg(**site)
    if fed.strategy == "fedprox":
        return SiteFedProx(proximal_mu=fed.proximal_mu, **site)
    if fed.strategy == "fedavgm":
        return SiteFedAvgM(server_lr=fed.server_lr, server_momentum=fed.server_momentum, **site)
    if fed.strategy == "fedadam":
        return SiteFedAdam(server_lr=fed.server_lr, **site)
    raise ValueError(f"unknown federation.strategy {fed.strategy!r}")
