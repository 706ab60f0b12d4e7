"""Preprocessing throughput on synthetic 16-bit films, decoding excluded: the number ``strnet bench`` reports.

It runs :func:`strnet.data.preprocess.preprocess` the way :meth:`PreprocessCache.warm` fills the cache: a
thread pool of ``workers`` threads (cv2 and numpy release the GIL), over a few distinct films in turn so the
input is not sitting in the CPU cache. The paper-scale target is 300 radiographs/s for 2000x1500 -> 512x512
on 2 cores.

OpenCV's own thread pool is set to ``cv2_threads`` (default 1) for the run and restored afterwards, via
:func:`strnet.data.preprocess.opencv_threads`: with every core busy on its own image, OpenCV splitting each
resize across the same cores only adds waits. That is the setting a multi-worker cache fill should use too
(``with opencv_threads(1):`` around the pool in ``PreprocessCache.warm``); ``cv2_threads=None`` measures the
process's current setting instead.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np

from strnet.data.preprocess import PreprocessParams, opencv_threads, preprocess


def synthetic_film(shape: tuple[int, int] = (2000, 1500), seed: int = 0, dtype: type = np.uint16) -> np.ndarray:
    """A 16-bit knee-film-like image (dark collimated border, soft-tissue column, blurred bone block, noise),
    converted to ``dtype`` afterwards, so ``np.float32`` gives the integer-valued copy a decoder returns."""
    rng = np.random.default_rng(seed)
    h, w = shape
    x = np.arange(w, dtype=np.float32)
    centre = w * (0.5 + 0.05 * rng.standard_normal())
    img = np.broadcast_to(2000.0 + 30000.0 * np.exp(-(((x - centre) / (w * 0.22)) ** 2)), (h, w)).astype(np.float32)
    bone = np.zeros((h, w), np.float32)
    bone[int(h * 0.38) : int(h * 0.62), int(w * 0.32) : int(w * 0.68)] = 12000.0
    img += cv2.GaussianBlur(bone, (0, 0), 15)
    img += rng.normal(0.0, 600.0, (h, w)).astype(np.float32)
    edge = int(rng.integers(h // 40, h // 10))
    img[:edge] = 800.0
    img[:, : edge // 2] = 800.0
    film = np.ascontiguousarray(np.clip(img, 0, 65535), dtype=np.uint16)  # row-major, like a decoder's output
    return film if np.dtype(dtype) == np.uint16 else film.astype(dtype)  # float32: what the decoder returns


def preprocess_throughput(
    n_images: int = 200,
    workers: int = 2,
    shape: tuple[int, int] = (2000, 1500),
    size: int = 512,
    dtype: type = np.uint16,
    n_distinct: int = 4,
    cv2_threads: int | None = 1,
) -> float:
    """Radiographs per second through :func:`preprocess` with ``workers`` threads (wall clock, one run).

    ``dtype=np.float32`` measures what the decoder hands over today (``read_radiograph`` returns float32);
    integer-valued float films are turned back into uint16 first, which costs a little. The films are made
    before the clock starts; one warm-up call per film is not timed.
    """
    if n_images < 1 or workers < 1:
        raise ValueError("n_images and workers must be >= 1")
    films = [synthetic_film(shape, seed, dtype) for seed in range(max(1, n_distinct))]
    params = PreprocessParams(size=size)
    with opencv_threads(cv2.getNumThreads() if cv2_threads is None else cv2_threads):
        for film in films:
            preprocess(film, params)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            start = time.perf_counter()
            for _ in pool.map(lambda i: preprocess(films[i % len(films)], params), range(n_images)):
                pass
            elapsed = time.perf_counter() - start
    return n_images / elapsed
