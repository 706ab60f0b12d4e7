"""Which node plays which site: asked once at the start of a run, used for every later step."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from logging import INFO

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from configs.schema import Config
from server.exchange import send_and_receive
from server.pooled import QuorumError
from server.replies import reply_content
from strnet.errors import SiteError
from strnet.protocol import PROTOCOL_VERSION, Field, Key, MessageKind


@dataclass
class SiteNode:
    node_id: int
    site: str
    role: str
    counts: dict[str, int] = field(default_factory=dict)


def discover_sites(
    grid: Grid, cfg: Config, config_json: str, problem: Callable[[str], None], *, federation_id: str = ""
) -> dict[int, SiteNode]:
    """Send every connected node the run's configuration (and the federation id a resume carries over) and ask
    which site it plays; enforce the quorum."""
    expected = len(cfg.federation.sites)
    deadline = time.monotonic() + cfg.federation.round_timeout
    while len(nodes := sorted(grid.get_node_ids())) < expected and time.monotonic() < deadline:
        log(INFO, "waiting for nodes: %d of %d connected", len(nodes), expected)
        time.sleep(1.0)
    record = ConfigRecord(
        {Field.VERSION: PROTOCOL_VERSION, Field.CONFIG_JSON: config_json, Field.FEDERATION_ID: federation_id}
    )
    messages = [
        Message(content=RecordDict({Key.CONFIG: record}), message_type=MessageKind.SITE_INFO, dst_node_id=n)
        for n in nodes
    ]
    found: dict[int, SiteNode] = {}
    for msg in send_and_receive(grid, messages, timeout=cfg.federation.round_timeout):
        node = msg.metadata.src_node_id
        try:
            content = reply_content(msg, f"<node {node}>")
            info = content.config_records[Key.INFO]
            counts = {k: int(v) for k, v in content.metric_records[Key.METRICS].items()}
            entry = SiteNode(node, str(info[Field.SITE]), str(info[Field.ROLE]), counts)
            if entry.role not in ("train", "external"):
                raise SiteError(entry.site, f"reports unknown role {entry.role!r}")
        except (KeyError, TypeError, ValueError, SiteError) as exc:
            problem(f"site_info: node {node}: {exc}")
            continue
        if any(e.site == entry.site for e in found.values()):
            problem(f"site_info: site {entry.site!r} claimed by two nodes; ignoring node {node}")
            continue
        found[node] = entry
    for site in cfg.federation.sites:
        if not any(e.site == site.name for e in found.values()):
            problem(f"site_info: site {site.name!r} ({site.role}) did not answer; it is left out")
    n_train = sum(e.role == "train" for e in found.values())
    if n_train < cfg.federation.quorum:
        raise QuorumError(
            f"only {n_train} training site(s) answered ({sorted(e.site for e in found.values())}), "
            f"quorum is {cfg.federation.quorum}"
        )
    return found
