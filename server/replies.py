"""Reading a site's reply: error replies, protocol version and malformed records become a SiteError naming it."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from configs.schema import Config
from server.exchange import send_and_receive
from strnet.errors import SiteError
from strnet.npy import array_numpy, arrays_numpy
from strnet.protocol import (
    PROTOCOL_VERSION,
    Field,
    Key,
    MessageKind,
    check_version,
    model_digest,
    part_name,
    part_records,
)
from strnet.released import WITHHELD, StatisticsLedger, withheld_problem


def reply_content(msg: Message, site: str) -> RecordDict:
    """The reply's records once it is known to be no error and to speak this protocol version."""
    if msg.has_error():
        raise SiteError(site, f"error reply (code {msg.error.code}): {msg.error.reason}")
    content = msg.content
    if Key.INFO not in content.config_records:
        raise SiteError(site, f"malformed reply: no {Key.INFO!r} record (an older or foreign ClientApp?)")
    check_version(content.config_records[Key.INFO].get(Field.VERSION), site)
    return content


def stats_arrays(content: RecordDict, site: str) -> dict[str, np.ndarray]:
    if Key.STATS not in content.array_records:
        raise SiteError(site, f"malformed reply: no {Key.STATS!r} arrays")
    return arrays_numpy(content.array_records[Key.STATS])


def withheld(content: RecordDict, kind: str, site: str) -> dict[str, SiteError]:
    """Statistics the site withheld under ``privacy.statistics``: id -> the problem, naming site and statistic."""
    record = content.metric_records.get(WITHHELD)
    if record is None:
        return {}
    return {str(k): SiteError(site, withheld_problem(kind, str(k), int(v))) for k, v in record.items()}  # type: ignore[arg-type]


class ModelShipping:
    """Which whole models each node keeps, so the final model travels to a site once after training.

    Six messages after training are about the same final model (calibration, calibrated validation, two OOD
    queries, frozen evaluation; the T-score refit's first message about the kept one, which differs from it in the
    ~14 k weights of the T-score branch). Each carried it whole, at fp32: ~585 MB over the demo's sites, ~3 GB
    for ResNet-50 over three hospitals. (On loopback the demo's wall did not change: its after-training phase is
    paid per exchange, not per byte.) Now the first message to a node carries the model (or only the tensors
    that differ from a model it keeps, with that model's digest) and asks the node to keep it; later messages
    name it by digest. A node counts as keeping a model once it replied usably to a message that carried it."""

    def __init__(self) -> None:
        self._held: dict[int, dict[str, ArrayRecord]] = {}  # node -> digest -> the model
        self._digests: dict[int, tuple[ArrayRecord, str]] = {}  # id(record) -> (record, digest)
        self._lock = threading.Lock()

    def digest(self, model: ArrayRecord) -> str:
        """The model's digest, hashed once per record (~0.1 s for the demo's model; the conversations after
        training all name the same one, from their own threads: server.together)."""
        with self._lock:
            known = self._digests.get(id(model))
            if known is None or known[0] is not model:
                known = (model, model_digest(arrays_numpy(model)))
                self._digests[id(model)] = known
            return known[1]

    def pack(self, node: int, model: ArrayRecord) -> tuple[ArrayRecord | None, dict[str, Any]]:
        """(arrays, instruction fields) that give ``node`` the whole ``model``: nothing when it keeps it, else the
        tensors that differ from the model it keeps that shares most (when that is under half the bytes), else
        the model."""
        digest = self.digest(model)
        held = self._held.get(node, {})
        if digest in held:
            return None, {Field.MODEL_DIGEST: digest}
        best: tuple[int, str, list[str]] | None = None
        for base_digest, base in held.items():
            if set(base.keys()) != set(model.keys()):
                continue
            changed = [k for k in model if not np.array_equal(array_numpy(model[k]), array_numpy(base[k]))]
            size = sum(array_numpy(model[k]).nbytes for k in changed)
            if best is None or size < best[0]:
                best = (size, base_digest, changed)
        fields: dict[str, Any] = {Field.MODEL_DIGEST: digest, Field.KEEP_MODEL: True}
        total = sum(v.nbytes for v in arrays_numpy(model).values())
        if best is not None and best[0] < total / 2:
            return ArrayRecord({k: model[k] for k in best[2]}), fields | {Field.BASE_DIGEST: best[1]}
        return model, fields

    def delivered(self, node: int, model: ArrayRecord) -> None:
        """``node`` keeps ``model`` now (and, like the site, only its two latest)."""
        held = self._held.setdefault(node, {})
        held[self.digest(model)] = model
        while len(held) > 2:
            held.pop(next(iter(held)))


@dataclass
class TrainingSites:
    """The training nodes of a run and how to ask them something after training (calibration, OOD model,
    T-score refit, FedBN's BatchNorm): one instruction to every node, usable replies back by site name."""

    grid: Grid
    cfg: Config
    nodes: dict[int, str]  # node id -> site name
    config_digest: str
    problem: Callable[[str], None]
    ledger: StatisticsLedger | None = None  # privacy.statistics: the noised releases of the run
    shipping: ModelShipping = field(default_factory=ModelShipping)
    # how a query reaches the sites: its own exchange (None), or a share of one (server.together)
    exchange: Callable[[Query], dict[str, dict[str, np.ndarray]]] | None = None

    def ask(
        self,
        kind: str,
        config: dict[str, Any],
        arrays: ArrayRecord | None = None,
        stats: ArrayRecord | None = None,
        *,
        model: ArrayRecord | None = None,
        partial: bool = False,
    ) -> dict[str, dict[str, np.ndarray]]:
        """site -> its reply's stats arrays; failed, malformed or withheld (``privacy.statistics``) replies are
        reported and left out. ``model``: the whole model the message is about, shipped as :class:`ModelShipping`
        says (instead of ``arrays``). ``partial``: a reply carrying several statistics keeps those not withheld
        (the caller checks which arrays it got), so one statistic under k does not drop the others."""
        query = Query(kind, config, arrays, stats, model=model, partial=partial)
        return self.exchange(query) if self.exchange is not None else self.ask_batch([query])[0]

    def ask_batch(self, queries: Sequence[Query]) -> list[dict[str, dict[str, np.ndarray]]]:
        """:meth:`ask` for several queries of different kinds in one exchange: one message per node (a
        ``query.batch`` when there are several), each query's usable replies by site, in order. A whole model
        several queries are about travels once per node, with the first of them."""
        kinds = [q.kind for q in queries]
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"ask_batch: one query per kind, got {kinds}")
        messages = []
        for node in sorted(self.nodes):
            parts: list[RecordDict] = []
            sending: set[str] = set()  # models this message delivers, so later parts name them
            for q in queries:
                if q.model is not None and q.arrays is not None:
                    raise ValueError("ask: a message carries a whole model or arrays, not both")
                if q.model is not None and self.shipping.digest(q.model) in sending:
                    sent, fields = None, {Field.MODEL_DIGEST: self.shipping.digest(q.model)}
                elif q.model is not None:
                    sent, fields = self.shipping.pack(node, q.model)
                    if fields.get(Field.KEEP_MODEL):
                        sending.add(fields[Field.MODEL_DIGEST])
                else:
                    sent, fields = q.arrays, {}
                fields = {
                    Field.VERSION: PROTOCOL_VERSION,
                    Field.CONFIG_DIGEST: self.config_digest,
                    **q.config,
                    **fields,
                }
                parts.append(
                    RecordDict(
                        {Key.CONFIG: ConfigRecord(fields)}
                        | ({Key.ARRAYS: sent} if sent is not None else {})
                        | ({Key.STATS: q.stats} if q.stats is not None else {})
                    )
                )
            if len(queries) == 1:
                content, kind = parts[0], queries[0].kind
            else:
                head = {Field.VERSION: PROTOCOL_VERSION, Field.CONFIG_DIGEST: self.config_digest, Field.PARTS: kinds}
                content = RecordDict(
                    {Key.CONFIG: ConfigRecord(head)}
                    | {
                        part_name(k, name): record
                        for k, part in zip(kinds, parts, strict=True)
                        for name, record in part.items()
                    }
                )
                kind = MessageKind.BATCH
            messages.append(Message(content=content, message_type=kind, dst_node_id=node))
        outs: list[dict[str, dict[str, np.ndarray]]] = [{} for _ in queries]
        replies = send_and_receive(self.grid, messages, timeout=self.cfg.federation.round_timeout)
        what = kinds[0] if len(kinds) == 1 else " + ".join(kinds)
        for node in sorted(set(self.nodes) - {msg.metadata.src_node_id for msg in replies}):
            self.problem(f"{what}: site {self.nodes[node]!r}: no reply (node lost or round timed out)")
        for msg in replies:
            node = msg.metadata.src_node_id
            site = self.nodes.get(node, f"<unknown node {node}>")
            try:
                content = reply_content(msg, site)
            except SiteError as exc:
                self.problem(f"{what}: {exc}")
                continue
            for q, out in zip(queries, outs, strict=True):
                part = content if len(queries) == 1 else RecordDict(part_records(content, q.kind))
                try:
                    if Key.ERROR in part.config_records:
                        raise SiteError(site, f"error in its part: {part.config_records[Key.ERROR].get(Field.REASON)}")
                    arrays = stats_arrays(part, site)
                except SiteError as exc:
                    self.problem(f"{q.kind}: {exc}")
                    continue
                if q.model is not None:
                    self.shipping.delivered(node, q.model)
                if self.ledger is not None:
                    self.ledger.record(site, q.kind, arrays)
                held = withheld(part, q.kind, site)
                for problem in held.values():
                    self.problem(f"{q.kind}: {problem}")
                if q.partial or not held:
                    out[site] = arrays
        return outs


@dataclass(frozen=True)
class Query:
    """One question to every training node (:meth:`TrainingSites.ask`'s arguments)."""

    kind: str
    config: dict[str, Any]
    arrays: ArrayRecord | None = None
    stats: ArrayRecord | None = None
    model: ArrayRecord | None = None
    partial: bool = False
