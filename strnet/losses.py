"""The STR-Net multi-task loss with missing labels.

L = BCEWithLogits(screen; pos_weight) + 0.3 * BCEWithLogits(severity) + 0.1 * SmoothL1(T-score)  (T-score term only
from epoch ``warmup_epochs`` on). Each term is the mean over the samples that carry that label: a missing label is
NaN and is masked out as in torchxrayvision (``mask = ~torch.isnan(target)``), because most radiographs have no
T-score and normal knees have no severity. The warm-up lets the classification tasks shape the routed features before
the (detached) T-score branch starts fitting them.

Under DP-SGD (``per_case=True``) every case's loss must be its own: a mean over the cases that carry a label
divides by a count that depends on the other cases of the batch. There the loss is the batch mean of each
case's weighted sum of its own terms (a missing label contributes an exact 0, still in the graph, so every
parameter gets a per-case gradient), i.e. the severity and T-score terms are averaged over the whole batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

OUTPUT_KEYS = {"screen": "y_screen", "severity": "y_severity", "t_score": "t_score"}
IMAGE_T_OUTPUT = "t_score_image"  # the optional image-only T-score output (LossWeights.t_score_image)
# the screening logits of the knees' film partners, one per knee with ``has_partner`` (LossWeights.bilateral)
PARTNER_OUTPUT = "screen_partner"


@dataclass(frozen=True)
class LossWeights:
    severity: float = 0.3
    t_score: float = 0.1
    warmup_epochs: int = 5
    # ε: the two BCE targets become ε/2 and 1 − ε/2 (0 = the paper's hard labels). A candidate against
    # overconfident fits of ~300 knees (docs/real-data.md); Platt calibration maps the scores back.
    label_smoothing: float = 0.0
    # Weight of an image-only T-score regression on the *screening* route, not detached, from the first epoch
    # (0 = the paper: no such head). Why: a site's T-scores order all its knees, where the screening label of a
    # mostly bone-loss source gives a handful of normal ones; this lets that ordering reach the backbone, which
    # the paper's detached branch never does (docs/real-data.md, "An image-only T-score target"). Training only: the
    # head is not served and not written to a bundle (strnet.model.TRAINING_ONLY).
    t_score_image: float = 0.0
    # Weight of a left–right consistency term: the mean squared difference between the screening logits of a
    # training knee and the other knee of its film, drawn into the same step (0 = the paper: no such term). Why:
    # bone loss is systemic, the two knees of a film share their label, and the served model's flags differed
    # between the knees of one film in up to a third of bilateral films (issue 8); a network pushed to score
    # both knees alike has less use for what differs between them (side markers, position, exposure).
    bilateral: float = 0.0

    def __post_init__(self) -> None:
        for name in ("severity", "t_score", "t_score_image", "bilateral"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ValueError(f"LossWeights.{name} must be a finite number >= 0, got {value!r}")
        ls = self.label_smoothing
        if isinstance(ls, bool) or not isinstance(ls, int | float) or not 0 <= ls < 1:
            raise ValueError(f"LossWeights.label_smoothing must be a number in [0, 1), got {ls!r}")
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

    def __init__(self, pos_weight: float, weights: LossWeights | None = None, *, per_case: bool = False) -> None:
        super().__init__()
        if isinstance(pos_weight, bool) or not math.isfinite(float(pos_weight)) or float(pos_weight) <= 0:
            raise ValueError(f"pos_weight must be a finite number > 0 (n_normal / n_bone_loss), got {pos_weight!r}")
        self.weights = weights if weights is not None else LossWeights()
        self.per_case = per_case
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
        if self.weights.t_score_image and IMAGE_T_OUTPUT not in outputs:
            have = sorted(outputs)
            raise KeyError(f"loss.t_score_image > 0 needs the model's {IMAGE_T_OUTPUT!r} output (have {have})")
        if self.per_case:
            return self._per_case(outputs, batch, epoch)
        terms: dict[str, torch.Tensor] = {}
        for out_key, y_key in OUTPUT_KEYS.items():
            pred = outputs[out_key].float()
            p, y = _masked(pred, batch[y_key].to(device=pred.device, dtype=torch.float32))
            if p.numel() == 0:
                terms[out_key] = _zero_like_graph(pred)
            elif out_key == "screen":
                terms[out_key] = F.binary_cross_entropy_with_logits(p, self._smooth(y), pos_weight=self.pos_weight)
            elif out_key == "severity":
                terms[out_key] = F.binary_cross_entropy_with_logits(p, self._smooth(y))
            else:
                terms[out_key] = F.smooth_l1_loss(p, y)
        total = terms["screen"] + self.weights.severity * terms["severity"]
        if self.weights.t_score_image:
            p, y = _masked(outputs[IMAGE_T_OUTPUT].float(), batch["t_score"].to(outputs[IMAGE_T_OUTPUT].device).float())
            terms[IMAGE_T_OUTPUT] = F.smooth_l1_loss(p, y) if p.numel() else _zero_like_graph(outputs[IMAGE_T_OUTPUT])
            total = total + self.weights.t_score_image * terms[IMAGE_T_OUTPUT]
        if self.weights.bilateral:
            terms[PARTNER_OUTPUT] = self._bilateral(outputs, batch)
            total = total + self.weights.bilateral * terms[PARTNER_OUTPUT]
        if epoch >= self.weights.warmup_epochs:
            total = total + self.weights.t_score * terms["t_score"]
        parts = {k: float(v.detach()) for k, v in terms.items()}
        parts["total"] = float(total.detach())
        return total, parts

    @staticmethod
    def _bilateral(outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """mean over the batch's knees whose film partner was drawn with them of (z_knee − z_partner)²."""
        if PARTNER_OUTPUT not in outputs or "has_partner" not in batch:
            have = sorted(outputs)
            raise KeyError(f"loss.bilateral > 0 needs each knee's partner scored ({PARTNER_OUTPUT!r}; have {have})")
        screen = outputs["screen"].float()
        has = batch["has_partner"].to(screen.device).bool()
        if not has.any():
            return _zero_like_graph(screen)
        return ((screen[has] - outputs[PARTNER_OUTPUT].float()) ** 2).mean()

    def _smooth(self, y: torch.Tensor) -> torch.Tensor:
        eps = self.weights.label_smoothing
        return y if eps == 0 else y * (1.0 - eps) + 0.5 * eps

    def _per_case(
        self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], epoch: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Σ_i (w_i·bce_i + 0.3·bce_sev_i + 0.1·sl1_i) / n, each term 0 where case i lacks that label."""
        per_case: dict[str, torch.Tensor] = {}
        for out_key, y_key in OUTPUT_KEYS.items():
            pred = outputs[out_key].float()
            target = batch[y_key].to(device=pred.device, dtype=torch.float32)
            known = ~torch.isnan(target)
            y = torch.nan_to_num(target)  # a NaN target would make 0·(NaN gradient) = NaN
            if out_key == "screen":
                loss = F.binary_cross_entropy_with_logits(
                    pred, self._smooth(y), pos_weight=self.pos_weight, reduction="none"
                )
            elif out_key == "severity":
                loss = F.binary_cross_entropy_with_logits(pred, self._smooth(y), reduction="none")
            else:
                loss = F.smooth_l1_loss(pred, y, reduction="none")
            per_case[out_key] = torch.where(known, loss, torch.zeros_like(loss))
        image_t = torch.zeros_like(per_case["screen"])
        if self.weights.t_score_image:
            target = batch["t_score"].to(device=image_t.device, dtype=torch.float32)
            loss = F.smooth_l1_loss(outputs[IMAGE_T_OUTPUT].float(), torch.nan_to_num(target), reduction="none")
            per_case[IMAGE_T_OUTPUT] = torch.where(~torch.isnan(target), loss, torch.zeros_like(loss))
            image_t = self.weights.t_score_image * per_case[IMAGE_T_OUTPUT]
        t_weight = self.weights.t_score if epoch >= self.weights.warmup_epochs else 0.0
        case = per_case["screen"] + self.weights.severity * per_case["severity"] + t_weight * per_case["t_score"]
        case = case + image_t
        n = max(int(case.shape[0]), 1)  # an empty Poisson batch: loss 0, and Opacus adds the noise alone
        total = case.sum() / n
        parts = {k: float(v.detach().sum()) / n for k, v in per_case.items()}
        parts["total"] = float(total.detach())
        return total, parts
