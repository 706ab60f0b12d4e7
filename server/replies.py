"""Reading a site's reply: error replies, protocol version and malformed records become a SiteError naming it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from configs.schema import Config
from strnet.errors import SiteError
from strnet.protocol import PROTOCOL_VERSION, Field, Key, check_version


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


def ask_sites(
    grid: Grid,
    cfg: Config,
    train_nodes: dict[int, str],
    kind: str,
    config: dict[str, Any],
    arrays: ArrayRecord | None,
    problem: Callable[[str], None],
    stats: ArrayRecord | None = None,
) -> dict[str, dict[str, np.ndarray]]:
    """Send one instruction (and optionally weights) to every training node; site -> its reply's stats arrays.
    Failed or malformed replies are reported through ``problem`` and left out."""
    instruction = ConfigRecord({Field.VERSION: PROTOCOL_VERSION, **config})
    content = RecordDict(
        {Key.CONFIG: instruction}
        | ({Key.ARRAYS: arrays} if arrays is not None else {})
        | ({Key.STATS: stats} if stats is not None else {})
    )
    messages = [Message(content=content, message_type=kind, dst_node_id=n) for n in sorted(train_nodes)]
    out: dict[str, dict[str, np.ndarray]] = {}
    for msg in grid.send_and_receive(messages, timeout=cfg.federation.round_timeout):
        site = train_nodes.get(msg.metadata.src_node_id, f"<unknown node {msg.metadata.src_node_id}>")
        try:
            out[site] = stats_arrays(reply_content(msg, site), site)
        except SiteError as exc:
            problem(f"{kind}: {exc}")
    return out
