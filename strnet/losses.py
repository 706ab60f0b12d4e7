"""The STR-Net multi-task loss with missing labels.

L = BCEWithLogits(screen; pos_weight) + 0.3 * BCEWithLogits(severity) + 0.1 * SmoothL1(T-score)  (T-score term only
from epoch ``warmup_epochs`` on). Each term is the mean over the samples that carry that label: a missing label is
NaN and is masked out as in torchxrayvision (``mask = ~torch.isnan(target)``), because most radiographs have no
T-score and normal knees have no severity. The warm-up lets the classification tasks shape the routed features before
the (detached) T-score branch starts fitting them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

OUTPUT_KEYS = {"screen": "y_screen", "severity": "y_severity", "t_score": "t_score"}


@dataclass(frozen=True)
class LossWeights:
    severity: float = 0.3
    t_score: float = 0.1
    warmup_epochs: int = 5

    def __post_init__(self) -> None:
        for name in ("severity", "t_score"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ValueError(f"LossWeights.{name} must be a finite number >= 0, got {value!r}")
        if isinstance(self.warmup_epochs, bool) or not isinstance(self.warmup_epochs, int) or self.warmup_epochs < 0:
            raise ValueError(f"LossWeights.warmup_epochs must be an integer >= 0, got {self.warmup_epochs!r}")


def _masked(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mask = ~torch.isnan(target)
    return pred[mask], target[mask]


def _zero_like_graph(pred: torch.Tensor) -> torch.Tensor:
    """An exact 0 that is still attached to ``pred``'s graph (sum over an empty selection, so NaN-free)."""
    return pred[torch.zeros_like(pred, dtype=torch.bool)].sum()


class MultiTaskLoss(nn.Module):
    """forward(outputs, batch, epoch) -> (total loss tensor, {"screen", "severity", "t_score", "total"} floats).

    The reported components are the *unweighted* per-task means (0.0 where a batch has no label for the task, and
    also computed during warm-up for monitoring); ``total`` is the weighted sum that is back-propagated.
    """

    pos_weight: torch.Tensor

    def __init__(self, pos_weight: float, weights: LossWeights | None = None) -> None:
        super().__init__()
        if isinstance(pos_weight, bool) or not math.isfinite(float(pos_weight)) or float(pos_weight) <= 0:
            raise ValueError(f"pos_weight must be a finite number > 0 (n_normal / n_bone_loss), got {pos_weight!r}")
        self.weights = weights if weights is not None else LossWeights()
        self.register_buffer("pos_weight", torch.tensor(float(pos_weight)), persistent=False)

    def forward(
        self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], epoch: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        for out_key, y_key in OUTPUT_KEYS.items():
            if out_key not in outputs:
                raise KeyError(f"model outputs lack {out_key!r} (have {sorted(outputs)})")
            if y_key not in batch:
                raise KeyError(f"batch lacks target {y_key!r} (have {sorted(batch)})")
            if outputs[out_key].shape != batch[y_key].shape:
                raise ValueError(
                    f"{out_key!r} output shape {tuple(outputs[out_key].shape)} != "
                    f"{y_key!r} target shape {tuple(batch[y_key].shape)}"
                )
        terms: dict[str, torch.Tensor] = {}
        for out_key, y_key in OUTPUT_KEYS.items():
            pred = outputs[out_key].float()
            p, y = _masked(pred, batch[y_key].to(device=pred.device, dtype=torch.float32))
            if p.numel() == 0:
                terms[out_key] = _zero_like_graph(pred)
            elif out_key == "screen":
                terms[out_key] = F.binary_cross_entropy_with_logits(p, y, pos_weight=self.pos_weight)
            elif out_key == "severity":
                terms[out_key] = F.binary_cross_entropy_with_logits(p, y)
            else:
                terms[out_key] = F.smooth_l1_loss(p, y)
        total = terms["screen"] + self.weights.severity * terms["severity"]
        if epoch >= self.weights.warmup_epochs:
            total = total + self.weights.t_score * terms["t_score"]
        parts = {k: float(v.detach()) for k, v in terms.items()}
        parts["total"] = float(total.detach())
        return total, parts
