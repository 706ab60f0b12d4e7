"""Send messages to the sites and collect their replies, polling the SuperLink with a short, growing interval.

Flower 1.42's ``GrpcGrid.send_and_receive`` sleeps 3 s between pulls, so every exchange that is not answered at
the first pull ends on a 3-second tick. A run has many exchanges: two per round, two per T-score refit round
(60 by default), one per calibration Newton step, the OOD and frozen-evaluation queries. On the demo that was
57 s of the federation's 101 s from first round to bundle after training alone, against 5 s for the centralized
run's same work. Here the pull interval starts at :data:`FIRST_POLL_S` and grows by :data:`GROWTH` up to
:data:`LAST_POLL_S`: a quick reply is seen within tens of milliseconds, and a real round that trains for an
hour costs four pulls a second.

A federated round is as long as the round before it, give or take: at the ceiling, the last reply of a 6-second
round waited 125 ms on average for the next pull, seven times per demo run. So the pull interval also aims at
the time the previous exchange of the same message type took (:class:`Pacer`): it halves the remaining wait
until then, and from then on starts again at :data:`FIRST_POLL_S`. A wrong guess costs no more than the plain
schedule's ceiling.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from flwr.app import Message
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid

from strnet.protocol import Field, Key, MessageKind

FIRST_POLL_S = 0.005
LAST_POLL_S = 0.25
GROWTH = 1.3


@dataclass
class ExchangeLog:
    """How many exchanges a run made and how long the server waited in them (``summary.json``'s timings): the
    number behind a federation's wall that no amount of site compute explains."""

    count: int = 0
    seconds: float = 0.0

    def as_timings(self) -> dict[str, float]:
        return {"exchanges": float(self.count), "exchange_seconds": self.seconds}


LOG = ExchangeLog()


@dataclass
class Pacer:
    """The pull interval of one exchange, from the time the last exchange of its message type took."""

    expected: float | None = None
    delay: float = FIRST_POLL_S

    def next_sleep(self, elapsed: float) -> float:
        if self.expected is not None and elapsed < self.expected:
            return min(LAST_POLL_S, max(FIRST_POLL_S, (self.expected - elapsed) / 2))
        sleep, self.delay = self.delay, min(self.delay * GROWTH, LAST_POLL_S)
        return sleep


LAST_SECONDS: dict[str, float] = {}  # message type -> how long its last exchange took


def send_and_receive(grid: Grid, messages: Iterable[Message], *, timeout: float | None) -> list[Message]:
    """Flower's ``Grid.send_and_receive`` contract (replies that arrived before ``timeout``; late ones are dropped),
    with :data:`FIRST_POLL_S`..:data:`LAST_POLL_S` between pulls. A grid without ``push_messages`` (an in-process
    stand-in that answers at once) is asked directly."""
    start = time.monotonic()
    try:
        return _exchange(grid, messages, timeout)
    finally:
        LOG.count += 1
        LOG.seconds += time.monotonic() - start


def _exchange(grid: Grid, messages: Iterable[Message], timeout: float | None) -> list[Message]:
    push = getattr(grid, "push_messages", None)
    if push is None:
        return list(grid.send_and_receive(messages, timeout=timeout))
    messages = list(messages)
    kind = _message_type(messages)
    start = time.monotonic()
    waiting = set(push(messages))
    end = None if timeout is None else start + timeout
    replies: list[Message] = []
    pacer = Pacer(LAST_SECONDS.get(kind) if kind else None)
    while waiting:
        got = list(grid.pull_messages(waiting))
        waiting.difference_update(m.metadata.reply_to_message_id for m in got)
        # For a node it has lost, the SuperLink answers itself (Flower's NODE_UNAVAILABLE error, sent from its own
        # node id): no reply will come, so stop waiting for it, and let the caller name the site as not replying
        # rather than read an error from "node 1".
        replies.extend(m for m in got if m.metadata.src_node_id != SUPERLINK_NODE_ID)
        if not waiting:
            break
        left = None if end is None else end - time.monotonic()
        if left is not None and left <= 0:
            break
        delay = pacer.next_sleep(time.monotonic() - start)
        time.sleep(delay if left is None else min(delay, left))
    if kind and not waiting:  # a timed-out exchange says nothing about how long the next one takes
        LAST_SECONDS[kind] = time.monotonic() - start
    return replies


def _message_type(messages: list[Message]) -> str:
    """What the pacing keys an exchange by: the message type, and a batch's parts (their work differs)."""
    types = {_kind(m) for m in messages}
    return types.pop() if len(types) == 1 else ""


def _kind(message: Message) -> str:
    kind = getattr(getattr(message, "metadata", None), "message_type", "")
    if kind != MessageKind.BATCH:
        return kind
    return f"{kind}[{'+'.join(map(str, message.content[Key.CONFIG].get(Field.PARTS, [])))}]"
