"""Conversations that run at once share exchanges (server.together): fewer exchanges, the same answers."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from configs.schema import load_config
from server.replies import TrainingSites
from server.together import together
from strnet.protocol import PROTOCOL_VERSION, Field, Key, MessageKind, part_name, split_part


class EchoGrid:
    """Every node answers each query with its step times the node id (whole messages and batch parts alike)."""

    def __init__(self, nodes: Iterable[int], broken: str | None = None) -> None:
        self.nodes = list(nodes)
        self.broken = broken  # a kind whose part fails at node 2
        self.exchanges: list[list[str]] = []  # the kinds each exchange carried

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        kinds = messages[0].metadata.message_type
        parts = list(messages[0].content[Key.CONFIG][Field.PARTS]) if kinds == MessageKind.BATCH else [kinds]
        self.exchanges.append(parts)
        return [self._answer(msg) for msg in messages]

    def _answer(self, msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        info = ConfigRecord({Field.SITE: f"site{node}", Field.ROLE: "train", Field.VERSION: PROTOCOL_VERSION})
        records: dict = {Key.INFO: info}
        if msg.metadata.message_type != MessageKind.BATCH:
            step = msg.content[Key.CONFIG]["step"]
            records[Key.STATS] = ArrayRecord({"echo": Array(np.array([step * node]))})
            return Message(RecordDict(records), reply_to=msg)
        for name, record in msg.content.items():
            part = split_part(name)
            if part is None or part[1] != Key.CONFIG:
                continue
            if part[0] == self.broken and node == 2:
                records[part_name(part[0], Key.ERROR)] = ConfigRecord({Field.REASON: "ValueError: an unexpected error"})
                continue
            records[part_name(part[0], Key.STATS)] = ArrayRecord({"echo": Array(np.array([record["step"] * node]))})
        return Message(RecordDict(records), reply_to=msg)


def _sites(grid: EchoGrid, problems: list[str]) -> TrainingSites:
    cfg = load_config("demo", ["tracking.enabled=false"])
    return TrainingSites(grid, cfg, {1: "site1", 2: "site2"}, "digest", problems.append)  # type: ignore[arg-type]


def _conversation(kind: str, steps: int):  # type: ignore[no-untyped-def]
    def talk(sites: TrainingSites) -> list[dict[str, int]]:
        heard = []
        for step in range(1, steps + 1):
            replies = sites.ask(kind, {"step": step})
            heard.append({site: int(values["echo"][0]) for site, values in replies.items()})
        return heard

    return talk


@pytest.mark.usefixtures("flower_task_identity")
def test_conversations_share_exchanges_and_hear_their_own_answers() -> None:
    grid, problems = EchoGrid([1, 2]), []
    sites = _sites(grid, problems)
    lengths = {"query.a": 5, "query.b": 2, "query.c": 3}
    results = together(sites, *(_conversation(k, n) for k, n in lengths.items()))
    # as many exchanges as the longest conversation; each carried every conversation still talking
    assert grid.exchanges == [["query.a", "query.b", "query.c"]] * 2 + [["query.a", "query.c"]] + [["query.a"]] * 2
    alone = []
    for kind, n in lengths.items():  # each conversation on its own: one exchange per question, the same answers
        solo = EchoGrid([1, 2])
        alone.append(_conversation(kind, n)(_sites(solo, [])))
        assert len(solo.exchanges) == n
    assert results == alone and not problems
    assert results[0][-1] == {"site1": 5, "site2": 10}


@pytest.mark.usefixtures("flower_task_identity")
def test_a_part_failing_at_one_site_is_named_and_the_others_go_on() -> None:
    grid, problems = EchoGrid([1, 2], broken="query.b"), []
    a, b = together(_sites(grid, problems), _conversation("query.a", 2), _conversation("query.b", 2))
    assert a == [{"site1": 1, "site2": 2}, {"site1": 2, "site2": 4}]
    assert b == [{"site1": 1}, {"site1": 2}]
    assert problems == ["query.b: site 'site2': error in its part: ValueError: an unexpected error"] * 2


@pytest.mark.usefixtures("flower_task_identity")
def test_an_exception_in_one_conversation_is_raised_after_the_others_end() -> None:
    grid = EchoGrid([1, 2])

    def fails(sites: TrainingSites) -> None:
        sites.ask("query.b", {"step": 1})
        raise RuntimeError("conversation b broke")

    finished: list[int] = []

    def long(sites: TrainingSites) -> None:
        finished.append(len(_conversation("query.a", 4)(sites)))

    with pytest.raises(RuntimeError, match="conversation b broke"):
        together(_sites(grid, []), long, fails)
    assert finished == [4] and len(grid.exchanges) == 4


def test_one_query_per_kind_in_a_batch() -> None:
    with pytest.raises(ValueError, match="one query per kind"):
        together(_sites(EchoGrid([1, 2]), []), _conversation("query.a", 1), _conversation("query.a", 1))
