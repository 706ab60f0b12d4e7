"""The recipe's schedule (plateau, best step, early stopping) with nothing but torch, so the one-GPU script
(``simulations/paper_gpu.py``, which may import only torch, torchvision and numpy) runs the very same class as
``strnet train`` and the federation's server."""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
from torch import nn


class ScheduleParams(Protocol):
    """What the schedule reads of the recipe (:class:`strnet.engine.TrainParams` has it)."""

    lr: float
    plateau_factor: float
    plateau_patience: int
    early_stop_patience: int
    min_epochs: int


class RecipeSchedule:
    """The recipe's decisions from the monitored validation score, shared by ``strnet train`` and the server.

    ReduceLROnPlateau (torch's own, on a stand-in parameter, so the server can run it without a model) gives
    the learning rate; the best step and early stopping (``early_stop_patience`` steps without improvement)
    follow the same score. A step is an epoch centralized and a round federated.

    The first ``min_epochs`` steps are a warm-up, as Keras' ``EarlyStopping(start_from_epoch=...)``: the first
    step after it is kept whatever its score, and only later steps can replace it or count toward the early
    stop. A chance peak of a barely trained model cannot then be the kept one (a federation on the real data
    kept its round 1 and stopped: pooled validation AUPRC 0.858 there, at the prevalence's level, and the rounds
    after it needed 9 rounds to pass it), and neither can a model whose T-score head has not trained yet (the
    loss adds that term only after ``loss.warmup_epochs``). Training that ends inside the warm-up keeps the
    warm-up's best step.
    """

    def __init__(self, params: ScheduleParams) -> None:
        self.patience = params.early_stop_patience
        self.min_steps = params.min_epochs
        self._optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=params.lr)
        self._plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self._optimizer, mode="max", factor=params.plateau_factor, patience=params.plateau_patience
        )
        self.steps = 0
        self.best_score = -math.inf
        self.best_step = -1
        self.bad_steps = 0

    @property
    def lr(self) -> float:
        return float(self._optimizer.param_groups[0]["lr"])

    def step(self, score: float) -> bool:
        """Record one step's score (NaN counts as no improvement); True when it is the best so far."""
        finite = score if math.isfinite(score) else -math.inf
        self._plateau.step(finite if math.isfinite(finite) else 0.0)
        self.steps += 1
        improved = finite > self.best_score or self.steps == self.min_steps + 1
        if improved:
            self.best_score, self.best_step, self.bad_steps = finite, self.steps, 0
        else:
            self.bad_steps += 1
        return improved

    @property
    def should_stop(self) -> bool:
        return self.steps > self.min_steps and self.bad_steps >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {
            "plateau": self._plateau.state_dict(),
            "lr": self.lr,
            "counters": [self.steps, self.best_score, self.best_step, self.bad_steps],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._plateau.load_state_dict(state["plateau"])
        set_learning_rate(self._optimizer, state["lr"])
        self.steps, self.best_score, self.best_step, self.bad_steps = state["counters"]


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = float(lr)
