"""Resume a federated run from its last completed round.

Flower 1.42 has no resume: a stopped ServerApp or SuperLink loses the run. After every round the server writes
what the next round depends on — the global weights (the round's average, whose validation rides in the next
round's train message, so a resumed run validates them first; format 2), the strategy's state (the recipe's
learning-rate schedule and early-stopping counters, the best round and its weights, every round's pooled
validation counts, the server optimizer's momentum or Adam moments) and the learning curve — to ``<output_dir>/
federation-checkpoint.pt``. A resumed run is a new Flower run whose nodes start with an empty
``context.state``, so what a site keeps between rounds (its AdamW moments, FedBN's BatchNorm tensors) is
also written at the site, under its cache, keyed by the federation id this checkpoint carries.

The file is plain data (tensors, numbers, strings, lists, dicts) and is read with ``weights_only=True``: a
tampered checkpoint fails to load instead of running code.
"""

from __future__ import annotations

import pickle
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from strnet.errors import ConfigError, DataError
from strnet.npy import arrays_numpy

CHECKPOINT = "federation-checkpoint.pt"
ROUNDS = "federation-rounds"  # federation.keep_rounds: every round's global weights, round-<r>.pt
FORMAT = 2  # 2: the weights of an unfinished checkpoint are not validated yet


def to_plain(value: Any) -> Any:
    """ArrayRecords, numpy arrays and containers of them -> tensors in tagged dicts (weights_only-loadable)."""
    if isinstance(value, ArrayRecord):
        return {"__arrayrecord__": {k: torch.from_numpy(np.array(v)) for k, v in arrays_numpy(value).items()}}
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.array(value))
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_plain(v) for v in value]
    return value


def from_plain(value: Any, *, arrays_as_numpy: bool = True) -> Any:
    """The inverse of :func:`to_plain` (tensors come back as numpy arrays)."""
    if isinstance(value, dict) and set(value) == {"__arrayrecord__"}:
        return ArrayRecord({k: Array(v.numpy()) for k, v in value["__arrayrecord__"].items()})
    if isinstance(value, torch.Tensor):
        return value.numpy() if arrays_as_numpy else value
    if isinstance(value, dict):
        return {k: from_plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_plain(v) for v in value]
    return value


@dataclass(frozen=True)
class RoundCheckpoint:
    server_round: int
    federation_id: str
    config_digest: str
    arrays: ArrayRecord
    strategy: dict[str, Any]
    history: list[dict[str, float]]
    finished: bool  # the round loop ended (last round or early stop): a resume goes straight to the finish

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / CHECKPOINT
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(
            {
                "format": FORMAT,
                "server_round": self.server_round,
                "federation_id": self.federation_id,
                "config_digest": self.config_digest,
                "arrays": to_plain(self.arrays),
                "strategy": to_plain(self.strategy),
                "history": self.history,
                "finished": self.finished,
            },
            tmp,
        )
        tmp.replace(path)
        return path

    def save_round(self, folder: str | Path) -> Path:
        """This round's global weights alone, under ``<folder>/federation-rounds/`` (``federation.keep_rounds``),
        for what reads a run's rounds after the fact (``simulations.round_soup``). Plain data, as the checkpoint."""
        path = Path(folder) / ROUNDS / f"round-{self.server_round}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"format": FORMAT, "server_round": self.server_round, "arrays": to_plain(self.arrays)}, tmp)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, folder: str | Path, *, config_digest: str) -> RoundCheckpoint:
        path = Path(folder) / CHECKPOINT
        if not path.is_file():
            raise ConfigError(f"{path}: no federation checkpoint to resume from (run without resume first)")
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise DataError(path, f"not a plain-data checkpoint, refused ({str(exc).splitlines()[0]})") from exc
        if raw.get("format") != FORMAT:
            raise DataError(path, f"checkpoint format {raw.get('format')} is not {FORMAT}")
        if raw["config_digest"] != config_digest:
            raise ConfigError(
                f"{path}: the checkpoint was written by a run with another configuration; resume with the same one"
            )
        return cls(
            server_round=int(raw["server_round"]),
            federation_id=str(raw["federation_id"]),
            config_digest=str(raw["config_digest"]),
            arrays=from_plain(raw["arrays"]),
            strategy=from_plain(raw["strategy"]),
            history=list(raw["history"]),
            finished=bool(raw["finished"]),
        )


class CheckpointWriter:
    """Writes each round's checkpoint on one background thread while the next round trains at the sites.

    Written inline, the file (two fp32 models: the global and the kept round's weights) held the server for
    ~0.15 s a round between exchanges, time the sites waited for the next message. Writes stay in order, one at
    a time; a failed write surfaces at the next :meth:`submit` or at :meth:`wait`; leaving the ``with`` block
    waits for the last one, also when the run fails, so a stopped run still leaves its last completed round."""

    def __init__(self, folder: str | Path, *, keep_rounds: bool = False) -> None:
        self.folder = Path(folder)
        self.keep_rounds = keep_rounds
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self._pending: Future[Path] | None = None

    def submit(self, checkpoint: RoundCheckpoint) -> None:
        self.wait()
        self._pending = self._pool.submit(self._write, checkpoint)

    def _write(self, checkpoint: RoundCheckpoint) -> Path:
        if self.keep_rounds:
            checkpoint.save_round(self.folder)
        return checkpoint.save(self.folder)

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown()


def load_rounds(folder: str | Path) -> dict[int, dict[str, np.ndarray]]:
    """round -> its global weights, from a run folder written with ``federation.keep_rounds``."""
    paths = sorted((Path(folder) / ROUNDS).glob("round-*.pt"))
    if not paths:
        raise ConfigError(f"{Path(folder) / ROUNDS}: no rounds kept (run the federation with federation.keep_rounds)")
    rounds: dict[int, dict[str, np.ndarray]] = {}
    for path in paths:
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise DataError(path, f"not a plain-data round file, refused ({str(exc).splitlines()[0]})") from exc
        except (RuntimeError, EOFError) as exc:  # truncated or not a torch file
            raise DataError(path, f"unreadable round file ({str(exc).splitlines()[0]})") from exc
        try:
            rounds[int(raw["server_round"])] = {k: v.numpy() for k, v in raw["arrays"]["__arrayrecord__"].items()}
        except (KeyError, TypeError, AttributeError) as exc:
            raise DataError(path, f"not a round file of federation.keep_rounds (missing {exc})") from exc
    return dict(sorted(rounds.items()))
