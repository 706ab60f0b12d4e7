"""The node's last step before a reply leaves: ``privacy.statistics`` applied to its statistics.

One Flower mod for every message, so no handler can forget it: the handler computes exact statistics, this mod
withholds those over fewer than k cases, noises the per-class histograms and drops the counts the server derives
from them (:func:`strnet.released.protect`), and refuses a statistic :data:`strnet.released.REGISTRY` does not
list. It sits inside the audit mod, so the audit log shows what really left. A batch reply's parts are each
protected as their own message kind's reply.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord

from strnet.npy import arrays_numpy
from strnet.protocol import Key, MessageKind, part_name, split_part
from strnet.released import WITHHELD, StatisticsPrivacy, protect

Mod = Callable[[Message, Context, Callable[[Message, Context], Message]], Message]


def released_mod(policy_of: Callable[[Context], StatisticsPrivacy | None]) -> Mod:
    """A mod protecting every reply's ``stats`` record under the run's policy (``policy_of(context)``; None before
    the node knows the run)."""

    def mod(message: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
        reply = call_next(message, context)
        if reply.has_error():
            return reply
        kind = reply.metadata.message_type
        if kind == MessageKind.BATCH:
            parts = [split_part(name) for name in list(reply.content.array_records)]
            released = [
                (p[0], part_name(p[0], Key.STATS), part_name(p[0], WITHHELD)) for p in parts if p and p[1] == Key.STATS
            ]
        else:
            released = [(kind, Key.STATS, WITHHELD)] if Key.STATS in reply.content.array_records else []
        if not released:
            return reply
        policy = policy_of(context)
        if policy is None or not policy.enabled:
            return reply
        for kind, stats, withheld in released:
            record = reply.content.array_records[stats]
            release = protect(kind, arrays_numpy(record), policy)
            reply.content.array_records[stats] = ArrayRecord(
                {k: Array(np.ascontiguousarray(v)) for k, v in release.arrays.items()}
            )
            if release.withheld:
                reply.content.metric_records[withheld] = MetricRecord(dict(release.withheld))
        return reply

    return mod
