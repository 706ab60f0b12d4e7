"""The server's message exchange: every reply that arrives in time, seen within milliseconds, none after the timeout."""

from __future__ import annotations

import itertools
import time
from types import SimpleNamespace

import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from server import exchange
from strnet.protocol import Field, Key, MessageKind


def reply(to: str, src: int = 7) -> SimpleNamespace:
    return SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=to, src_node_id=src))


class SlowGrid:
    """A grid whose replies become available ``after`` seconds after the push (one reply per message)."""

    def __init__(self, after: dict[str, float]) -> None:
        self.after = after
        self.pushed_at = 0.0
        self.pulls = 0

    def push_messages(self, messages):  # type: ignore[no-untyped-def]
        self.pushed_at = time.monotonic()
        return [m for m in messages]

    def pull_messages(self, ids):  # type: ignore[no-untyped-def]
        self.pulls += 1
        now = time.monotonic() - self.pushed_at
        ready = [i for i in ids if self.after[i] <= now]
        return [reply(i) for i in ready]


def test_quick_replies_are_collected_in_milliseconds_not_on_a_3_second_tick() -> None:
    grid = SlowGrid({"a": 0.0, "b": 0.05})
    start = time.monotonic()
    replies = exchange.send_and_receive(grid, ["a", "b"], timeout=10)  # type: ignore[arg-type]
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["a", "b"]
    assert time.monotonic() - start < 0.5  # Flower's GrpcGrid would return after its 3 s sleep
    assert grid.pulls >= 2


def test_late_replies_are_dropped_at_the_timeout() -> None:
    grid = SlowGrid({"a": 0.0, "b": 60.0})
    start = time.monotonic()
    replies = exchange.send_and_receive(grid, ["a", "b"], timeout=0.3)  # type: ignore[arg-type]
    assert [r.metadata.reply_to_message_id for r in replies] == ["a"]
    assert 0.3 <= time.monotonic() - start < 1.5


def test_a_node_the_superlink_reports_lost_is_not_waited_for_nor_read_as_a_reply() -> None:
    grid = SlowGrid({"a": 0.0, "lost": 0.0})
    pull = grid.pull_messages
    # what flwr 1.42's SuperLink returns for a message whose node went offline: an error from its own node id
    grid.pull_messages = lambda ids: [  # type: ignore[method-assign]
        reply(m.metadata.reply_to_message_id, src=1 if m.metadata.reply_to_message_id == "lost" else 7)
        for m in pull(ids)
    ]
    start = time.monotonic()
    replies = exchange.send_and_receive(grid, ["a", "lost"], timeout=30)  # type: ignore[arg-type]
    assert [r.metadata.reply_to_message_id for r in replies] == ["a"]
    assert time.monotonic() - start < 1.0  # not the 30 s timeout


def test_the_poll_interval_grows_to_its_ceiling(monkeypatch: pytest.MonkeyPatch) -> None:
    sleeps: list[float] = []
    monkeypatch.setattr(exchange.time, "sleep", sleeps.append)
    grid = SlowGrid({"a": float("inf")})
    monkeypatch.setattr(
        grid,
        "pull_messages",
        lambda ids: [] if len(sleeps) < 30 else [reply("a")],
    )
    exchange.send_and_receive(grid, ["a"], timeout=None)  # type: ignore[arg-type]
    assert sleeps[0] == exchange.FIRST_POLL_S and max(sleeps) == exchange.LAST_POLL_S
    assert all(b >= a for a, b in itertools.pairwise(sleeps))


def test_a_grid_without_push_is_asked_directly() -> None:
    calls = []

    class Direct:
        def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
            calls.append((list(messages), timeout))
            return iter(["reply"])

    assert exchange.send_and_receive(Direct(), ["m"], timeout=5) == ["reply"]  # type: ignore[arg-type]
    assert calls == [(["m"], 5)]


def _latency(pacer: exchange.Pacer, ready_at: float) -> tuple[float, int]:
    """Seconds between a reply becoming available and the pull that sees it, and the pulls made."""
    elapsed, pulls = 0.0, 0
    while True:
        pulls += 1
        if elapsed >= ready_at:
            return elapsed - ready_at, pulls
        elapsed += pacer.next_sleep(elapsed)


def test_a_round_as_long_as_the_last_is_seen_within_milliseconds() -> None:
    plain, _ = _latency(exchange.Pacer(), 6.0)
    paced, pulls = _latency(exchange.Pacer(expected=6.0), 6.0)
    assert plain > 0.05  # the plain schedule sits at its 250 ms ceiling by then
    assert paced <= exchange.FIRST_POLL_S and pulls < 60
    late, _ = _latency(exchange.Pacer(expected=6.0), 6.3)  # a slower round: the plain schedule from the guess on
    assert late < 0.1
    for wrong in (0.5, 3.0, 12.0):  # a wrong guess costs no more than the plain schedule's ceiling
        assert _latency(exchange.Pacer(expected=wrong), 6.0)[0] <= exchange.LAST_POLL_S


def test_the_exchange_remembers_how_long_each_message_type_took(monkeypatch: pytest.MonkeyPatch) -> None:
    class Typed(str):
        metadata = SimpleNamespace(message_type="train")

    monkeypatch.setattr(exchange, "LAST_SECONDS", {})
    exchange.send_and_receive(SlowGrid({"a": 0.05}), [Typed("a")], timeout=10)  # type: ignore[list-item]
    assert 0.05 <= exchange.LAST_SECONDS["train"] < 0.5
    exchange.send_and_receive(SlowGrid({"a": 60.0}), [Typed("a")], timeout=0.1)  # type: ignore[list-item]
    assert exchange.LAST_SECONDS["train"] < 0.5  # a timed-out exchange leaves the guess alone


@pytest.mark.usefixtures("flower_task_identity")
def test_batches_are_paced_by_their_parts() -> None:
    """A batch that carries the T-score refit's first step computes for seconds, one with its later steps for
    milliseconds: each keeps its own guess."""

    def batch(*parts: str) -> Message:
        config = ConfigRecord({Field.PARTS: list(parts)})
        return Message(RecordDict({Key.CONFIG: config}), message_type=MessageKind.BATCH, dst_node_id=1)

    first = exchange._message_type([batch("query.tscore_train", "query.ood_moments")] * 2)
    later = exchange._message_type([batch("query.tscore_train")])
    assert first == "query.batch[query.tscore_train+query.ood_moments]" and later == "query.batch[query.tscore_train]"
    assert exchange._message_type([batch("query.a"), batch("query.b")]) == ""
