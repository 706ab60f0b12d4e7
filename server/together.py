"""Conversations with the training sites that run at once and share exchanges.

After training, the T-score refit (one exchange per refit round: ~20-30), the Platt fit (one per Newton step,
then the calibrated validation counts) and the OOD model (two queries) are independent loops that each ask the
sites something and wait. One after another they cost one exchange per question — 33 on the demo, about 0.1 s
each under Flower's simulation however little a site computes — where the centralized run pays nothing. Here
each runs on its own thread with a :class:`~server.replies.TrainingSites` whose questions go to a rendezvous:
whenever every unfinished conversation has asked its next question, the calling thread sends them together, one
message per node (:meth:`~server.replies.TrainingSites.ask_batch`), and hands each conversation its own
replies. They then cost as many exchanges as the longest of them. Each conversation sees exactly the replies it
would have seen alone, so its result is the same; only the order of the run's problem lines may differ.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from server.replies import Query, TrainingSites

Replies = dict[str, dict[str, np.ndarray]]


def together(sites: TrainingSites, *conversations: Callable[[TrainingSites], Any]) -> list[Any]:
    """Each conversation's result, in order, the conversations run at once with shared exchanges; the first
    exception a conversation raised is raised once they have all ended."""
    n = len(conversations)
    lock = threading.Condition()
    asked: dict[int, Query] = {}
    answers: dict[int, Replies | BaseException] = {}
    ended: set[int] = set()
    results: list[Any] = [None] * n
    errors: list[BaseException | None] = [None] * n

    def asker(i: int) -> Callable[[Query], Replies]:
        def exchange(query: Query) -> Replies:
            with lock:
                asked[i] = query
                lock.notify_all()
                lock.wait_for(lambda: i in answers)
                answer = answers.pop(i)
            if isinstance(answer, BaseException):
                raise answer
            return answer

        return exchange

    def run(i: int, conversation: Callable[[TrainingSites], Any]) -> None:
        try:
            results[i] = conversation(dataclasses.replace(sites, exchange=asker(i)))
        except BaseException as exc:  # handed to the calling thread
            errors[i] = exc
        finally:
            with lock:
                ended.add(i)
                lock.notify_all()

    threads = [
        threading.Thread(target=run, args=(i, c), name=f"strnet-conversation-{i}", daemon=True)
        for i, c in enumerate(conversations)
    ]
    for thread in threads:
        thread.start()
    with lock:
        while len(ended) < n:
            lock.wait_for(lambda: len(ended) + len(asked) == n)
            if not asked:
                continue
            batch = sorted(asked.items())
            asked.clear()
            lock.release()  # the conversations are all waiting; the exchange runs unlocked
            try:
                replies: list[Replies] | BaseException = sites.ask_batch([q for _, q in batch])
            except Exception as exc:
                replies = exc
            finally:
                lock.acquire()
            for j, (i, _) in enumerate(batch):
                answers[i] = replies if isinstance(replies, BaseException) else replies[j]
            lock.notify_all()
    for thread in threads:
        thread.join()
    for error in errors:
        if error is not None:
            raise error
    return results
