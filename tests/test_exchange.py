"""The server's message exchange: every reply that arrives in time, seen within milliseconds, none after the timeout."""

from __future__ import annotations

import itertools
import time
from types import SimpleNamespace

import pytest

from server import exchange


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
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in ready]


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


def test_the_poll_interval_grows_to_its_ceiling(monkeypatch: pytest.MonkeyPatch) -> None:
    sleeps: list[float] = []
    monkeypatch.setattr(exchange.time, "sleep", sleeps.append)
    grid = SlowGrid({"a": float("inf")})
    monkeypatch.setattr(
        grid,
        "pull_messages",
        lambda ids: [] if len(sleeps) < 30 else [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id="a"))],
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
