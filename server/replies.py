"""Reading a site's reply: error replies, protocol version and malformed records become a SiteError naming it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from configs.schema import Config
from server.exchange import send_and_receive
from strnet.errors import SiteError
from strnet.protocol import PROTOCOL_VERSION, Field, Key, check_version
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
    return {k: v.numpy() for k, v in content.array_records[Key.STATS].items()}


def withheld(content: RecordDict, kind: str, site: str) -> dict[str, SiteError]:
    """Statistics the site withheld under ``privacy.statistics``: id -> the problem, naming site and statistic."""
    record = content.metric_records.get(WITHHELD)
    if record is None:
        return {}
    return {str(k): SiteError(site, withheld_problem(kind, str(k), int(v))) for k, v in record.items()}  # type: ignore[arg-type]


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

    def ask(
        self,
        kind: str,
        config: dict[str, Any],
        arrays: ArrayRecord | None = None,
        stats: ArrayRecord | None = None,
        *,
        partial: bool = False,
    ) -> dict[str, dict[str, np.ndarray]]:
        """site -> its reply's stats arrays; failed, malformed or withheld (``privacy.statistics``) replies are
        reported and left out. ``partial``: a reply carrying several statistics keeps those not withheld (the
        caller checks which arrays it got), so one statistic under k does not drop the others."""
        instruction = ConfigRecord({Field.VERSION: PROTOCOL_VERSION, Field.CONFIG_DIGEST: self.config_digest, **config})
        content = RecordDict(
            {Key.CONFIG: instruction}
            | ({Key.ARRAYS: arrays} if arrays is not None else {})
            | ({Key.STATS: stats} if stats is not None else {})
        )
        messages = [Message(content=content, message_type=kind, dst_node_id=n) for n in sorted(self.nodes)]
        out: dict[str, dict[str, np.ndarray]] = {}
        replies = send_and_receive(self.grid, messages, timeout=self.cfg.federation.round_timeout)
        for node in sorted(set(self.nodes) - {msg.metadata.src_node_id for msg in replies}):
            self.problem(f"{kind}: site {self.nodes[node]!r}: no reply (node lost or round timed out)")
        for msg in replies:
            site = self.nodes.get(msg.metadata.src_node_id, f"<unknown node {msg.metadata.src_node_id}>")
            try:
                content = reply_content(msg, site)
                arrays = stats_arrays(content, site)
            except SiteError as exc:
                self.problem(f"{kind}: {exc}")
                continue
            if self.ledger is not None:
                self.ledger.record(site, kind, arrays)
            held = withheld(content, kind, site)
            for exc in held.values():
                self.problem(f"{kind}: {exc}")
            if partial or not held:
                out[site] = arrays
        return out
