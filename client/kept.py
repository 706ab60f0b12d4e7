"""What a site keeps between rounds, on its own disk, so a resumed federation finds it.

A node keeps its AdamW moments and (FedBN) its BatchNorm tensors in ``context.state``, which lives as long as
one Flower run. A resumed federation is a new run, so the same state is also written under the site's cache,
in a folder named by the federation id the server sends: ``<cache_dir>/federation-state/<id>/<site>/``.
Files are per round because the server's checkpoint can lag the sites by one round (a site may have trained
round r when the server stopped before recording it; the resume then repeats round r from round r − 1's
state). Optimizer states are large (twice the model), so only the two latest rounds are kept; BatchNorm tensors
are small and any round may be the one the federation keeps, so all of them stay. Files load with
``weights_only=True``.

The large files go once nothing can read them again: the optimizer states when the final model arrives (training
is over; a resumed run that finished training does not train again), the final model after the frozen
evaluation, the last message of a run (a resumed run ships the model again). Before, every federation left them
behind: ~0.55 GB per demo run across its sites, 53 GB on one development machine. A run stopped mid-training
keeps its folder for its resume; delete it by hand when the run is abandoned.

The optimizer state (91 MB for ResNet-18, 0.1 s to write) is written on a background thread of the ClientApp
process, so the reply leaves without waiting for the disk; every read of a site's state first waits for the
writes queued before it (:func:`flush`), and so does the interpreter's exit.
"""

from __future__ import annotations

import atexit
import json
import os
import pickle
import re
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from strnet.errors import DataError

KEPT_OPTIMIZER_ROUNDS = 2

_WRITER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kept-state")
_PENDING: list[Future[None]] = []


def flush() -> None:
    """Wait for every write this process queued, in order; the first one that failed raises here."""
    while _PENDING:
        _PENDING.pop(0).result()


atexit.register(flush)


class KeptState:
    def __init__(self, cache_dir: str | Path, federation_id: str, site: str) -> None:
        if not re.fullmatch(r"[0-9a-f]{8,64}", federation_id):
            raise ValueError(f"federation id {federation_id!r} is not a hex id")
        self.federation_id = federation_id
        self.folder = Path(cache_dir) / "federation-state" / federation_id / site

    def _write(self, name: str, payload: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{name}.tmp"
        torch.save(payload, tmp)
        os.replace(tmp, self.folder / name)

    def _read(self, name: str) -> dict | None:
        flush()
        path = self.folder / name
        if not path.is_file():
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise DataError(path, f"not a plain-data state file, refused ({str(exc).splitlines()[0]})") from exc

    def _rounds(self, prefix: str) -> list[int]:
        flush()
        return self._rounds_on_disk(prefix)

    def _rounds_on_disk(self, prefix: str) -> list[int]:
        if not self.folder.is_dir():
            return []
        found = (re.fullmatch(rf"{prefix}-round-(\d+)\.pt", p.name) for p in self.folder.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def save_optimizer(self, state: dict, server_round: int) -> None:
        """The optimizer's state dict, saved directly (0.1 s a round for ResNet-18's 91 MB of AdamW moments; it
        had been serialised to bytes and saved again inside another ``torch.save``, 0.3 s), on the background
        writer: ``state`` must not change afterwards (the site keeps it as it is and copies it to train). Read back
        as bytes (:meth:`optimizer`) for :func:`strnet.site.load_optimizer_state`, which refuses anything but
        tensors."""
        flush()  # the previous round's write, long done: its failure surfaces here at the latest
        _PENDING.append(_WRITER.submit(self._save_optimizer_now, state, server_round))

    def _save_optimizer_now(self, state: dict, server_round: int) -> None:
        self._write(f"optimizer-round-{server_round}.pt", state)
        for old in self._rounds_on_disk("optimizer")[:-KEPT_OPTIMIZER_ROUNDS]:
            (self.folder / f"optimizer-round-{old}.pt").unlink(missing_ok=True)

    def optimizer(self, server_round: int) -> bytes | None:
        """The optimizer state this site had after training ``server_round``, if it kept it."""
        flush()
        path = self.folder / f"optimizer-round-{server_round}.pt"
        return path.read_bytes() if path.is_file() else None

    def drop_optimizer_states(self) -> None:
        """Training is over: the AdamW states of every round go (after the writes still queued)."""
        flush()
        for path in self.folder.glob("optimizer-round-*.pt"):
            path.unlink(missing_ok=True)

    def drop_models(self) -> None:
        """The run is over: the final models this site kept go."""
        flush()
        for path in self.folder.glob("model-*.pt"):
            path.unlink(missing_ok=True)

    def save_model(self, digest: str, state: dict[str, torch.Tensor]) -> None:
        """The whole model the messages after training name by digest (the two latest stay): a simulation may
        serve this node's next message from another process."""
        if not re.fullmatch(r"[0-9a-f]{8,64}", digest):
            raise ValueError(f"model digest {digest!r} is not a hex digest")
        flush()
        self._write(f"model-{digest}.pt", {k: v.detach().cpu() for k, v in state.items()})
        models = sorted(self.folder.glob("model-*.pt"), key=lambda p: p.stat().st_mtime_ns)
        for old in models[:-2]:
            old.unlink(missing_ok=True)

    def model(self, digest: str) -> dict[str, torch.Tensor] | None:
        if not re.fullmatch(r"[0-9a-f]{8,64}", digest):
            raise ValueError(f"model digest {digest!r} is not a hex digest")
        return self._read(f"model-{digest}.pt")

    def save_batchnorm(self, tensors: dict[str, torch.Tensor], server_round: int) -> None:
        self._write(f"batchnorm-round-{server_round}.pt", {k: v.detach().cpu() for k, v in tensors.items()})

    def batchnorm(self, server_round: int, *, before: bool = False) -> dict[str, torch.Tensor] | None:
        """BatchNorm tensors after ``server_round`` — or, with ``before``, after the latest round before it."""
        if before:
            earlier = [r for r in self._rounds("batchnorm") if r < server_round]
            if not earlier:
                return None
            server_round = earlier[-1]
        return self._read(f"batchnorm-round-{server_round}.pt")

    def save_privacy(self, state: dict) -> None:
        """The DP accountant's history after the latest round this site trained (append-only: a round the
        server repeats after a resume is counted twice, as it was released twice)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / ".privacy-accountant.tmp"
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.folder / "privacy-accountant.json")

    def privacy(self) -> dict | None:
        path = self.folder / "privacy-accountant.json"
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(path, f"privacy accountant state is not JSON ({exc})") from exc


def _configs(cache_dir: str | Path) -> Path:
    return Path(cache_dir) / "federation-state" / "configs"


def save_run_config(cache_dir: str | Path, digest: str, config_json: str, federation_id: str) -> None:
    """The run's configuration, by digest, so a node restarted mid-run (empty ``context.state``) can rejoin: the
    server sends the configuration once, with the site-info query, and only its digest afterwards."""
    folder = _configs(cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{digest}.tmp"
    tmp.write_text(json.dumps({"config_json": config_json, "federation_id": federation_id}))
    os.replace(tmp, folder / f"{digest}.json")


def load_run_config(cache_dir: str | Path, digest: str) -> tuple[str, str] | None:
    """(configuration JSON, federation id) kept for ``digest``, if this node saw that run before."""
    if not re.fullmatch(r"[0-9a-f]{8,128}", digest):
        return None
    path = _configs(cache_dir) / f"{digest}.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return str(data["config_json"]), str(data["federation_id"])
