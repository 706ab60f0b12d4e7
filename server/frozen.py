"""Frozen evaluation: the kept model, its calibration and τ* go to every site (external ones included); no site
updates it."""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from configs.schema import Config
from server.discovery import SiteNode
from server.exchange import send_and_receive
from server.replies import ModelShipping, reply_content, stats_arrays, withheld
from strnet.calibration import Platt
from strnet.errors import SiteError
from strnet.protocol import PROTOCOL_VERSION, Field, Key, MessageKind, decode_splits
from strnet.released import StatisticsLedger, restore_evaluation
from strnet.sufficient import EvaluationCounts


def frozen_evaluation(
    grid: Grid,
    cfg: Config,
    nodes: dict[int, SiteNode],
    arrays: ArrayRecord,
    tau: float,
    platt: Platt,
    config_digest: str,
    problem: Callable[[str], None],
    ledger: StatisticsLedger | None = None,
    shipping: ModelShipping | None = None,
) -> tuple[dict[str, dict[str, EvaluationCounts]], dict[str, set[str]]]:
    """site -> split (``test``: its evaluation cohort; ``val``: a training site's validation split) -> counts, and
    site -> the ids (``<split>.<statistic>``) of the statistics it withheld.

    Under ``privacy.statistics`` a statistic a site withheld counts as zeros (named in the problems; the ids let
    the subgroup table say "withheld" instead of reading those zeros as data) and the counts at τ* are read off
    the noised histograms; ``ledger`` counts the noised releases. ``shipping``: the models the training sites
    keep from the messages after training (they get the final model's digest; external sites get the model)."""
    policy = cfg.privacy.statistics
    n_bins = cfg.threshold.histogram_bins
    instruction = {
        Field.VERSION: PROTOCOL_VERSION,
        Field.CONFIG_DIGEST: config_digest,
        Field.THRESHOLD: float(tau),
        Field.PLATT_A: platt.a,
        Field.PLATT_B: platt.b,
    }
    shipping = shipping if shipping is not None else ModelShipping()
    messages = []
    for n in sorted(nodes):
        sent, fields = shipping.pack(n, arrays)
        record = RecordDict(
            {Key.CONFIG: ConfigRecord(instruction | fields)} | ({Key.ARRAYS: sent} if sent is not None else {})
        )
        messages.append(Message(content=record, message_type=MessageKind.FROZEN, dst_node_id=n))
    out: dict[str, dict[str, EvaluationCounts]] = {}
    held_by: dict[str, set[str]] = {}
    for msg in send_and_receive(grid, messages, timeout=cfg.federation.round_timeout):
        node = msg.metadata.src_node_id
        site = nodes[node].site if node in nodes else f"<unknown node {node}>"
        try:
            if node not in nodes:
                raise SiteError(site, "reply from a node that never announced its site")
            content = reply_content(msg, site)
            arrays_in = stats_arrays(content, site)
            if policy.enabled:
                if ledger is not None:
                    ledger.record(site, MessageKind.FROZEN, arrays_in)
                held = withheld(content, MessageKind.FROZEN, site)
                held_by[site] = set(held)
                for exc in held.values():
                    problem(f"frozen evaluation: {exc}")
                empty = EvaluationCounts.empty(n_bins).arrays()
                arrays_in = restore_evaluation(arrays_in, held, threshold=tau, empty=empty)
            out[site] = decode_splits(site, arrays_in, n_bins=n_bins, noised=policy.noised)
        except SiteError as exc:
            problem(f"frozen evaluation: {exc}")
    return out, {site: ids for site, ids in held_by.items() if site in out}
