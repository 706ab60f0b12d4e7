"""FedAvg over the training sites only, with a quorum, named-site errors, dtype-safe averaging and monitoring.

Differences from Flower's stock FedAvg, each for a reason:
- every *training* site takes part in every round (no unseeded random sampling; external sites never train);
- one malformed or failed reply is dropped with a message naming the site, and the round still completes
  when ``quorum`` usable replies remain (stock FedAvg aborts on one inconsistent reply, or accepts one reply);
- integer buffers (BatchNorm ``num_batches_tracked``) are cast back to their dtype after averaging;
- the evaluate step of each round asks the training sites for *additive* validation statistics and pools
  them (pooled AUROC/AUPRC and the round's τ*), instead of averaging per-site metrics.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from logging import INFO, WARNING
from typing import Any, Protocol

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from server.pooled import (
    PooledStatistics,
    QuorumError,
    SiteError,
    pool_validation_statistics,
    pooled_threshold,
)
from strnet.site import decode_statistics

ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"
VAL_STATS_TYPE = f"{MessageType.QUERY}.val_stats"
WEIGHT_KEY = "num-examples"


class MetricsLogger(Protocol):
    def log_metrics(self, metrics: dict[str, Any], step: int | None = None, prefix: str = "") -> None: ...


class SiteFedAvg(FedAvg):
    """FedAvg weighted by each site's training-set size, over a fixed node -> site map of training sites."""

    def __init__(
        self,
        *,
        train_nodes: Mapping[int, str],
        quorum: int,
        n_bins: int,
        grid: np.ndarray,
        min_sensitivity: float,
        tracker: MetricsLogger | None = None,
        monitor: str = "auprc",
    ) -> None:
        n = len(train_nodes)
        super().__init__(min_train_nodes=n, min_evaluate_nodes=n, min_available_nodes=n, weighted_by_key=WEIGHT_KEY)
        if not 1 <= quorum <= max(n, 1):
            raise QuorumError(f"quorum {quorum} cannot be met by {n} training site(s) {sorted(train_nodes.values())}")
        self.train_nodes = dict(train_nodes)
        self.quorum = quorum
        self.n_bins = n_bins
        self.grid = np.asarray(grid, dtype=np.float64)
        self.min_sensitivity = min_sensitivity
        self.tracker = tracker
        self.problems: list[str] = []
        self.round_pooled: dict[int, PooledStatistics] = {}
        self.round_train_metrics: dict[int, dict[str, dict[str, float]]] = {}
        self.history: dict[int, dict[str, float]] = {}
        self.monitor = monitor
        self._evaluated_arrays: dict[int, ArrayRecord] = {}
        self.best_round: int | None = None
        self.best_score = -np.inf
        self.best_arrays: ArrayRecord | None = None
        self._reference: dict[str, tuple[tuple[int, ...], np.dtype]] = {}

    def summary(self) -> None:
        super().summary()
        log(INFO, "\t└──> Training sites: %s (quorum %d)", ", ".join(sorted(self.train_nodes.values())), self.quorum)

    def site_of(self, node_id: int) -> str:
        return self.train_nodes.get(node_id, f"<unknown node {node_id}>")

    def _problem(self, server_round: int, step: str, exc: Exception) -> None:
        text = f"round {server_round} {step}: {exc}"
        self.problems.append(text)
        log(WARNING, "%s", text)

    def _messages(self, record: RecordDict, message_type: str, server_round: int) -> list[Message]:
        return [
            Message(content=record, message_type=message_type, dst_node_id=node, group_id=str(server_round))
            for node in sorted(self.train_nodes)
        ]

    # ------------------------------------------------------------------------------------------------ train

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Every training site, every round; remembers the global arrays' shapes and dtypes for the checks."""
        self._reference = {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in arrays.items()}
        config["server-round"] = server_round
        record = RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: config})
        return self._messages(record, MessageType.TRAIN, server_round)

    def check_train_reply(self, msg: Message) -> tuple[str, dict[str, np.ndarray], dict[str, float], float]:
        """(site, arrays, metrics, weight) of a usable reply, else :class:`SiteError` naming the site."""
        site = self.site_of(msg.metadata.src_node_id)
        if msg.metadata.src_node_id not in self.train_nodes:
            raise SiteError(site, "reply from a node that is not a training site")
        if msg.has_error():
            raise SiteError(site, f"error reply (code {msg.error.code}): {msg.error.reason}")
        content = msg.content
        if len(content.array_records) != 1 or len(content.metric_records) != 1:
            raise SiteError(site, "malformed train reply: expected exactly one ArrayRecord and one MetricRecord")
        arrays = {k: v.numpy() for k, v in next(iter(content.array_records.values())).items()}
        metrics = dict(next(iter(content.metric_records.values())))
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
        weight = metrics.get(WEIGHT_KEY)
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight > 0:
            raise SiteError(site, f"malformed train reply: {WEIGHT_KEY} must be a positive number, got {weight!r}")
        scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and k != WEIGHT_KEY}
        return site, arrays, scalars, float(weight)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        usable: list[tuple[str, dict[str, np.ndarray], dict[str, float], float]] = []
        for msg in replies:
            try:
                usable.append(self.check_train_reply(msg))
            except SiteError as exc:
                self._problem(server_round, "train", exc)
        if len(usable) < self.quorum:
            raise QuorumError(
                f"round {server_round}: {len(usable)} of {len(self.train_nodes)} training site(s) replied usably "
                f"({sorted(u[0] for u in usable)}), quorum is {self.quorum}; problems: "
                + ("; ".join(p for p in self.problems if p.startswith(f"round {server_round} ")) or "no reply")
            )
        averaged = weighted_average([u[1] for u in usable], [u[3] for u in usable], self._reference)
        total = sum(u[3] for u in usable)
        common = set.intersection(*(set(u[2]) for u in usable))
        metrics = {k: sum(u[2][k] * u[3] for u in usable) / total for k in sorted(common)}
        metrics.update(num_sites=float(len(usable)), num_examples=total)
        self.round_train_metrics[server_round] = {u[0]: u[2] for u in usable}
        log_row = dict(metrics)
        for site, m in self.round_train_metrics[server_round].items():
            log_row.update({f"site.{site}.{k}": v for k, v in m.items()})
        self._log(log_row, server_round)
        return ArrayRecord({k: Array(v) for k, v in averaged.items()}), MetricRecord(metrics)

    # ------------------------------------------------------------------------------------------------ validation

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Ask the training sites for additive validation statistics of the new global model."""
        config["server-round"] = server_round
        self._evaluated_arrays[server_round] = arrays
        record = RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: config})
        return self._messages(record, VAL_STATS_TYPE, server_round)

    def collect_statistics(self, server_round: int, replies: Iterable[Message]) -> dict[str, dict[str, Any]]:
        """site -> decoded statistics; error replies and replies without metrics become named problems."""
        per_site: dict[str, dict[str, Any]] = {}
        for msg in replies:
            site = self.site_of(msg.metadata.src_node_id)
            try:
                per_site[site] = decode_reply(msg, site)
            except SiteError as exc:
                self._problem(server_round, "validation statistics", exc)
        return per_site

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Pool the statistics; a failed quorum here only skips monitoring (the server checks the final round)."""
        per_site = self.collect_statistics(server_round, replies)
        try:
            pooled = pool_validation_statistics(per_site, n_bins=self.n_bins, n_grid=len(self.grid), quorum=self.quorum)
        except QuorumError as exc:
            self._problem(server_round, "validation statistics", exc)
            return None
        for text in pooled.problems:
            self._problem(server_round, "validation statistics", Exception(text))
        self.round_pooled[server_round] = pooled
        ranking = pooled.ranking()
        score = float(ranking[self.monitor])
        arrays = self._evaluated_arrays.pop(server_round, None)
        if arrays is not None and np.isfinite(score) and score > self.best_score:
            # the same model selection as centralized early stopping: best pooled validation AUPRC
            self.best_round, self.best_score, self.best_arrays = server_round, score, arrays
        row = {
            "val_screen_auroc": float(ranking["auroc"]),
            "val_screen_auprc": float(ranking["auprc"]),
            "val_n_screen": float(pooled.n_cases),
            "val_num_sites": float(len(pooled.sites)),
        }
        try:
            row["val_tau_star"] = float(pooled_threshold(pooled, self.grid, self.min_sensitivity)["value"])
        except ValueError as exc:  # one class absent from every validation split: τ* undefined this round
            self._problem(server_round, "τ*", exc)
        for site, m in pooled.per_site.items():
            row[f"site.{site}.val_screen_auroc"] = m["site_auroc"]
            row[f"site.{site}.val_screen_auprc"] = m["site_auprc"]
            row[f"site.{site}.val_n_screen"] = m["n_val"]
        self._log(row, server_round)
        return MetricRecord({k: v for k, v in row.items() if np.isfinite(v)})

    def _log(self, row: dict[str, float], step: int) -> None:
        self.history.setdefault(step, {}).update(row)
        if self.tracker is not None:
            self.tracker.log_metrics(row, step=step)


def decode_reply(msg: Message, site: str) -> dict[str, Any]:
    """A site's statistics reply, decoded; an error or malformed reply raises SiteError naming the site."""
    if msg.has_error():
        raise SiteError(site, f"error reply (code {msg.error.code}): {msg.error.reason}")
    if len(msg.content.metric_records) != 1:
        raise SiteError(site, "malformed reply: expected exactly one MetricRecord")
    return decode_statistics(next(iter(msg.content.metric_records.values())))


def weighted_average(
    states: list[dict[str, np.ndarray]],
    weights: list[float],
    reference: Mapping[str, tuple[tuple[int, ...], np.dtype]] | None = None,
) -> dict[str, np.ndarray]:
    """Σ wᵢ·xᵢ / Σ wᵢ in float64, cast back to each tensor's dtype (integers rounded, never left as floats)."""
    if not states or len(states) != len(weights):
        raise ValueError("need one weight per state and at least one state")
    total = float(sum(weights))
    out: dict[str, np.ndarray] = {}
    for key in states[0]:
        acc = np.zeros(states[0][key].shape, np.float64)
        for state, w in zip(states, weights, strict=True):
            acc += state[key].astype(np.float64) * (w / total)
        dtype = reference[key][1] if reference and key in reference else states[0][key].dtype
        out[key] = np.asarray(np.rint(acc) if np.issubdtype(dtype, np.integer) else acc).astype(dtype)
    return out
