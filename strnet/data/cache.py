"""Content-addressed cache of preprocessed knees, so each radiograph is decoded and cropped once per size.

Key = sha256(file bytes) + side + :meth:`PreprocessParams.fingerprint` + :data:`CODE_VERSION`. Keying on
the bytes, not the path, means a renamed or re-exported file reuses its entry, a file replaced in place
gets a new one, and two sites sharing a cache folder can never read each other's stale pixels.

Entries are ``uint16`` ``.npy`` files holding ``round(x * 65535)``: half the disk of float32 and a uniform
step of 1.5e-5 on the [0, 1] scale (float16 would be coarser, 4.9e-4 near 1, and only gain near 0). Every
:meth:`PreprocessCache.get` returns the dequantised array, on a miss too, so cold and warm runs see
identical inputs. Writes go to a temporary file in the target folder and are renamed into place, which is
atomic on POSIX: several processes (DataLoader workers, federated clients) may fill the same cache.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from strnet.data import preprocess as _pre
from strnet.data.preprocess import PreprocessParams
from strnet.errors import DataError
from strnet.npy import load_npy

# Bump when preprocessing code changes what it outputs for the same params, to orphan old entries.
# 3: Otsu box on the exact OTSU_MAX_SIDE scale again (2 had integer factors); exact 8/16-bit percentiles
CODE_VERSION = "3"
_QMAX = 65535.0
_CHUNK = 1 << 20


class PreprocessCache:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._hashes: dict[tuple[str, int, int], str] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        # DataLoader workers started with spawn/forkserver pickle the dataset; a lock cannot travel.
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def file_hash(self, path: str | Path) -> str:
        """sha256 of the file bytes, remembered per (path, mtime, size) so a process reads each file once."""
        p = Path(path)
        try:
            st = p.stat()
        except FileNotFoundError as exc:
            raise DataError(p, "file not found") from exc
        except OSError as exc:
            raise DataError(p, f"cannot stat file ({exc})") from exc
        stamp = (str(p), st.st_mtime_ns, st.st_size)
        with self._lock:
            known = self._hashes.get(stamp)
        if known is not None:
            return known
        digest = hashlib.sha256()
        try:
            with p.open("rb") as fh:
                while chunk := fh.read(_CHUNK):
                    digest.update(chunk)
        except OSError as exc:
            raise DataError(p, f"cannot read file ({exc})") from exc
        value = digest.hexdigest()
        with self._lock:
            self._hashes[stamp] = value
        return value

    def key(self, path: str | Path, side: str, params: PreprocessParams) -> str:
        blob = f"{self.file_hash(path)}|{side}|{params.fingerprint()}|{CODE_VERSION}"
        return hashlib.sha256(blob.encode()).hexdigest()

    def entry_path(self, key: str) -> Path:
        return self.root / key[:2] / key[2:4] / f"{key}.npy"

    def get(self, path: str | Path, side: str, params: PreprocessParams) -> np.ndarray:
        """Float32 ``(size, size)`` in [0, 1]; decodes and preprocesses only on a miss."""
        target = self.entry_path(self.key(path, side, params))
        cached = _load_entry(target, params.size)
        if cached is not None:
            return cached
        q = quantize(_pre.load_preprocessed(path, side, params))
        _atomic_save(target, q)
        return dequantize(q)

    def warm(
        self,
        df: pd.DataFrame,
        params: PreprocessParams,
        workers: int = 1,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[str]:
        """Fill the cache for every (path, side) of a manifest; returns ``"path: problem"`` per unusable file.

        Threads, not processes: decoding and resizing release the GIL, and threads share the in-memory
        hash table, so the training process that follows never re-hashes a file.
        """
        pairs = list(dict.fromkeys(zip(df["path"].astype(str), df["side"].astype(str), strict=True)))
        problems: dict[tuple[str, str], str] = {}

        def one(pair: tuple[str, str]) -> None:
            try:
                self.get(pair[0], pair[1], params)
            except DataError as exc:
                problems[pair] = str(exc)

        done = 0
        if workers <= 1:
            for pair in pairs:
                one(pair)
                done += 1
                if progress:
                    progress(done, len(pairs))
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                for _ in pool.map(one, pairs):
                    done += 1
                    if progress:
                        progress(done, len(pairs))
        # One message per file: a broken bilateral image would otherwise be reported for R and for L.
        return list(dict.fromkeys(problems[p] for p in pairs if p in problems))


def _load_entry(target: Path, size: int) -> np.ndarray | None:
    """The cached array, or None when absent or unusable (truncated by a crash, wrong shape): then recompute."""
    try:
        q = load_npy(target)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, EOFError):
        return None
    if q.dtype != np.uint16 or q.shape != (size, size):
        return None
    return dequantize(q)


def quantize(img: np.ndarray) -> np.ndarray:
    """A preprocessed [0, 1] image as the cache stores it: what training and scoring read back."""
    return np.rint(np.clip(img, 0.0, 1.0) * _QMAX).astype(np.uint16)


def dequantize(q: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) / np.float32(_QMAX)


def _atomic_save(target: Path, arr: np.ndarray) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.stem[:16]}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, arr, allow_pickle=False)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
