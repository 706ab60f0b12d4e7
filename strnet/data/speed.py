"""Preprocessing throughput on synthetic 16-bit films, decoding excluded: the number ``strnet bench`` reports.

It runs :func:`strnet.data.preprocess.preprocess` the way :meth:`PreprocessCache.warm` fills the cache: a
thread pool of ``workers`` threads (cv2 and numpy release the GIL), over a few distinct films in turn so the
input is not sitting in the CPU cache. The paper-scale target is 300 radiographs/s for 2000x1500 -> 512x512
on 2 cores.

OpenCV's own thread pool is left as the process has it (``cv2.getNumThreads()``), since that is what the
cache fill runs with: concurrent OpenCV calls from several Python threads do not stack pools (a call made
while the pool is busy runs in its caller's thread), and the preprocessing calls are small enough that
``cv2.setNumThreads(1)`` changes the 2-thread throughput only within measurement noise. Pass
``cv2_threads`` to measure another setting; it is restored afterwards.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np

from strnet.data.preprocess import PreprocessParams, preprocess


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
    film = np.clip(img, 0, 65535).astype(np.uint16)
    return film if np.dtype(dtype) == np.uint16 else film.astype(dtype)  # float32: what the decoder returns


def preprocess_throughput(
    n_images: int = 200,
    workers: int = 2,
    shape: tuple[int, int] = (2000, 1500),
    size: int = 512,
    dtype: type = np.uint16,
    n_distinct: int = 4,
    cv2_threads: int | None = None,
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
    previous = cv2.getNumThreads()
    if cv2_threads is not None:
        cv2.setNumThreads(cv2_threads)
    try:
        for film in films:
            preprocess(film, params)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            start = time.perf_counter()
            for _ in pool.map(lambda i: preprocess(films[i % len(films)], params), range(n_images)):
                pass
            elapsed = time.perf_counter() - start
    finally:
        if cv2_threads is not None:
            cv2.setNumThreads(previous)
    return n_images / elapsed
