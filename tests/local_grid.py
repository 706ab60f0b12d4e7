"""A Grid stand-in that delivers Messages to the real ClientApp in this process (no SuperLink, no Ray)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from flwr.app import Context, Error, Message, RecordDict

from client.app import app as client_app


class LocalGrid:
    """Node 100+i plays partition i, with a persistent ``context.state`` per node as a SuperNode keeps it."""

    def __init__(
        self,
        n_nodes: int,
        fail: Callable[[Message, int], bool] | None = None,
        tamper: Callable[[Message, int], Message] | None = None,
    ) -> None:
        self.contexts = {
            100 + i: Context(
                run_id=1, node_id=100 + i, node_config={"partition-id": i}, state=RecordDict(), run_config={}
            )
            for i in range(n_nodes)
        }
        self.fail = fail
        self.tamper = tamper
        self.sent: list[tuple[int, Message]] = []

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def kinds(self) -> list[tuple[int, str]]:
        return [(node, msg.metadata.message_type) for node, msg in self.sent]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            self.sent.append((node, msg))
            if self.fail is not None and self.fail(msg, node):
                replies.append(Message(Error(code=1, reason="injected failure"), reply_to=msg))
                continue
            try:
                reply = client_app(msg, self.contexts[node])
            except Exception as exc:  # what a SuperNode does: an error reply, not a crash
                reply = Message(Error(code=2, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
            replies.append(self.tamper(reply, node) if self.tamper is not None else reply)
        return replies
