"""Reading ``.npy`` data from several threads of one process.

numpy reads an ``.npy`` header with ``ast.literal_eval``. CPython 3.11's AST constructor keeps its recursion
depth in interpreter-wide state, so two threads parsing at once can fail with ``SystemError: AST constructor
recursion depth mismatch`` (python/cpython#106905; tests/test_npy.py reproduces it here). It happened in CI:
the server's checkpoint thread converted a round's weights while the server thread converted the same weights
for the next message. Flower's ``Array.numpy()`` and ``ArrayRecord.to_torch_state_dict()`` go through
``np.load``, as do Flower's FedAvgM and FedAdam when they aggregate, and the preprocessing cache's reads on
its warm-up threads. Every such read in the project runs under one lock: the parse is microseconds and the copy
that follows a memcpy, so the threads lose nothing that matters. ``tests/conftest.py`` fails any test in which
client, server or strnet code reads a Flower ``Array`` without it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import numpy as np

_LOCK = threading.RLock()  # re-entrant: a helper below may run inside reading_arrays()


class SupportsNumpy(Protocol):
    """A Flower ``Array`` (strnet does not import Flower)."""

    def numpy(self) -> np.ndarray: ...


def load_npy(path: str | Path) -> np.ndarray:
    """``np.load`` of one ``.npy`` file (never pickles)."""
    with _LOCK:
        return np.load(path, allow_pickle=False)


def array_numpy(array: SupportsNumpy) -> np.ndarray:
    """One Flower ``Array`` as a numpy array."""
    with _LOCK:
        return array.numpy()


def arrays_numpy(record: Mapping[str, SupportsNumpy]) -> dict[str, np.ndarray]:
    """Every array of a Flower ``ArrayRecord`` (or any mapping of ``Array``), in the record's order."""
    with _LOCK:
        return {k: v.numpy() for k, v in record.items()}


@contextmanager
def reading_arrays() -> Iterator[None]:
    """Held around library code that reads Flower arrays itself (its FedAvgM and FedAdam aggregation)."""
    with _LOCK:
        yield
