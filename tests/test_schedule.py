"""The recipe's best step and early stop, with a warm-up (``train.min_epochs``), against a plain oracle."""

from __future__ import annotations

import math

import numpy as np
import pytest

from strnet.engine import TrainParams
from strnet.schedule import RecipeSchedule


def run(scores: list[float], *, warmup: int, patience: int) -> tuple[int, int | None]:
    """(kept step, step after which it stopped or None), both 1-based, from RecipeSchedule."""
    schedule = RecipeSchedule(TrainParams(min_epochs=warmup, early_stop_patience=patience))
    for step, score in enumerate(scores, start=1):
        schedule.step(score)
        if schedule.should_stop:
            return schedule.best_step, step
    return schedule.best_step, None


def oracle(scores: list[float], *, warmup: int, patience: int) -> tuple[int, int | None]:
    """Keras' start_from_epoch read literally: the steps after the warm-up are monitored from scratch; a run that
    ends inside the warm-up keeps its best step. NaN never improves: a warm-up of NaN alone keeps no step (-1)."""
    clean = [s if math.isfinite(s) else -math.inf for s in scores]
    for stop in range(warmup + 1, len(clean) + 1):
        seen = clean[warmup:stop]
        best = warmup + 1 + int(np.argmax(seen))  # first of equal maxima
        if stop - best >= patience:
            return best, stop
    if len(clean) <= warmup:
        return (1 + int(np.argmax(clean)) if max(clean) > -math.inf else -1), None
    return warmup + 1 + int(np.argmax(clean[warmup:])), None


def test_a_warm_up_peak_is_never_kept() -> None:
    """A run whose first round scores highest: without a warm-up it keeps round 1 and stops; with one it keeps
    training and keeps the best round after it, even where that is below the warm-up's peak."""
    scores = [0.86, 0.80, 0.81, 0.80, 0.79, 0.82, 0.84, 0.85, 0.83]
    assert run(scores, warmup=0, patience=3) == (1, 4)
    assert run(scores, warmup=2, patience=3) == (8, None)
    assert run(scores, warmup=4, patience=3) == (8, None)


def test_training_that_ends_in_the_warm_up_keeps_its_best() -> None:
    assert run([0.5, 0.7, 0.6], warmup=5, patience=1) == (2, None)


def test_the_first_step_after_the_warm_up_is_kept_whatever_its_score() -> None:
    assert run([0.9, 0.9, 0.1, 0.05, 0.04], warmup=2, patience=2) == (3, 5)


@pytest.mark.parametrize("seed", range(40))
def test_against_the_oracle(seed: int) -> None:
    rng = np.random.default_rng(seed)
    scores = list(rng.random(int(rng.integers(1, 25))))
    if seed % 3 == 0:
        scores[int(rng.integers(len(scores)))] = math.nan
    warmup, patience = int(rng.integers(0, 6)), int(rng.integers(1, 6))
    assert run(scores, warmup=warmup, patience=patience) == oracle(scores, warmup=warmup, patience=patience)
