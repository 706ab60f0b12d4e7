"""Refit the T-score branch on the kept model: its own early stopping, after the screening model is chosen.

Why: the branch reads the screening representation through a stop-gradient, so it never shapes the model the
screening monitor selects; but trained only inside that run it gets whatever epochs the screening schedule
leaves it (on the real data the kept epoch 8, three epochs after the 5 warm-up epochs, left it at Pearson r
0.08 with Mendeley's T-scores, where age, sex and BMI alone reach 0.7). Refitting it on the frozen features,
with the run's loss (SmoothL1) and its own validation early stopping, is the same model trained to
convergence; the screening outputs, τ* and calibration are untouched.

The work splits into what a site computes from its own cases (:class:`BranchData`, :func:`validate_then_train`,
:func:`branch_sums`) and the loop that keeps the best validation error, so a federation can run it as FedAvg
over the branch's weights (``server/tscore.py``) with the same pieces.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F

from strnet.data.cache import PreprocessCache
from strnet.data.dataset import KneeDataset
from strnet.data.preprocess import PreprocessParams

BRANCH = ("t_image", "t_tabular", "t_fusion")
SUM_KEYS = ("n", "sum_sq_err", "sum_abs_err")

# Under DP-SGD the refit would train on the cases outside the privacy guarantee, so it does not run.
DP_OFF = "off: under DP-SGD the refit would train on the training cases outside the privacy guarantee"


def branch_keys(model: nn.Module) -> list[str]:
    """State-dict keys of the T-score branch (what a federated refit exchanges)."""
    return [k for k in model.state_dict() if k.split(".", 1)[0] in BRANCH]


@dataclass
class BranchData:
    """The frozen inputs of the branch for the cases with a reference T-score: routed features and covariates."""

    routed: torch.Tensor  # [N, neck_dim]
    tabular: torch.Tensor  # [N, 3]
    target: torch.Tensor  # [N]

    @classmethod
    @torch.no_grad()
    def of(
        cls,
        model: nn.Module,
        df: pd.DataFrame,
        preprocess: PreprocessParams,
        cache: PreprocessCache | None,
        device: torch.device,
        batch_size: int = 64,
    ) -> BranchData:
        rows = df[pd.to_numeric(df["t_score"], errors="coerce").notna()].reset_index(drop=True)
        ds = KneeDataset(rows, preprocess, cache, augment=None)
        model.eval()
        routed, tabular, target = [], [], []
        for start in range(0, len(ds), batch_size):
            items = [ds[i] for i in range(start, min(start + batch_size, len(ds)))]
            image = torch.stack([it["image"] for it in items]).to(device)
            routed.append(model.tarr(model.neck(model.backbone(image)))["screen"].float().cpu())
            tabular.append(torch.stack([it["tabular"] for it in items]))
            target.append(torch.stack([it["t_score"] for it in items]).float())
        if not routed:
            dim = model.t_image[0].in_features
            return cls(torch.zeros(0, dim), torch.zeros(0, 3), torch.zeros(0))
        return cls(torch.cat(routed), torch.cat(tabular), torch.cat(target))

    def __len__(self) -> int:
        return len(self.target)


def predict_branch(model: nn.Module, data: BranchData) -> torch.Tensor:
    """The branch's T-score estimates for cached inputs (what the refit trains and validates)."""
    t_in = torch.cat([model.t_image(data.routed), model.t_tabular(data.tabular)], 1)
    return model.t_fusion(t_in).squeeze(-1)


def local_steps(model: nn.Module, data: BranchData, steps: int, lr: float, weight_decay: float) -> None:
    """Full-batch AdamW steps on the branch with the run's T-score loss (SmoothL1); the rest stays frozen."""
    if not len(data):
        return
    params = [p for name in BRANCH for p in getattr(model, name).parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    model.eval()  # the branch has no dropout or BatchNorm; eval keeps everything else deterministic
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        F.smooth_l1_loss(predict_branch(model, data), data.target).backward()
        optimizer.step()


@torch.no_grad()
def branch_sums(model: nn.Module, data: BranchData) -> np.ndarray:
    """(n, Σ err², Σ |err|): additive, so a federation pools its validation error without any estimate."""
    if not len(data):
        return np.zeros(len(SUM_KEYS))
    err = (predict_branch(model, data) - data.target).double()
    return np.array([len(data), float((err**2).sum()), float(err.abs().sum())])


IMAGE_PATHS = ("on", "off", "auto")


def image_path_off(model: nn.Module) -> None:
    """Zero the image adapter, so the fusion reads the covariates alone.

    Its ReLU then outputs 0 for every image, and training keeps it there: ReLU passes no gradient at 0, so
    AdamW's moments stay 0 and decoupled weight decay shrinks nothing. The tensors keep their shapes, so the
    branch, its messages and the bundle look the same with the path off.
    """
    with torch.no_grad():
        for p in model.t_image.parameters():
            p.zero_()


def image_path_note(training: dict[str, Any]) -> str:
    """A report line when the T-score estimate does not read the image, in all networks or some ('' otherwise).

    ``training`` is a bundle's training record: its ``tscore_refit``, or each member's in ``members``.
    """
    fits = [m.get("tscore_refit", {}) for m in training.get("members", [])] or [training.get("tscore_refit", {})]
    off = sum(f.get("image_path") == "off" for f in fits)
    if not off:
        return ""
    why = "with its image adapter the branch had the higher validation error (tscore.image)"
    if off == len(fits):
        return f"The T-score estimate reads age, sex and BMI only: {why}."
    return (
        f"The T-score estimate is the mean of {len(fits)} networks' estimates; {off} of them read age, sex and BMI "
        f"only: {why}."
    )


def refit(
    model: nn.Module,
    step: Callable[[nn.Module, int], np.ndarray],
    validation: Callable[[nn.Module], np.ndarray],
    *,
    rounds: int,
    steps_per_round: int,
    patience: int = 0,
    image: str = "on",
) -> dict[str, Any]:
    """Refit the branch (:func:`refit_rounds`) with its image path ``on``, ``off``, or both (``auto``), keeping
    the fit with the lower pooled validation MSE (a tie keeps the paper's branch, image on).

    Why ``auto``: the image adapter reads the screening representation of the *training* knees, which the
    backbone has fitted almost perfectly, so the branch learns to trust it more than it deserves on new knees.
    Cross-validated over the real training and validation knees, the branch as trained estimates out-of-fold
    T-scores at r 0.74; refitted with ``auto`` at 0.81 (it dropped the adapter in 4 of 5 folds); a least-squares
    line on age, sex and BMI reaches 0.85 (docs/real-data.md, "The T-score's image path"). Both fits run on the same
    sites with the same validation, so the choice is made like every other: on validation error, pooled in a
    federation.
    """
    if image not in IMAGE_PATHS:
        raise ValueError(f"image={image!r} must be one of {IMAGE_PATHS}")
    keys = branch_keys(model)
    start = {k: v.detach().clone() for k, v in model.state_dict().items() if k in keys}
    fits: list[tuple[float, str, dict[str, torch.Tensor], dict[str, Any]]] = []
    for path in ("on", "off") if image == "auto" else (image,):
        model.load_state_dict(start, strict=False)
        if path == "off":
            image_path_off(model)
        info = refit_rounds(model, step, validation, rounds=rounds, steps_per_round=steps_per_round, patience=patience)
        if info["status"] != "refitted":
            model.load_state_dict(start, strict=False)
            return info
        kept = {k: v.detach().clone() for k, v in model.state_dict().items() if k in keys}
        fits.append((info["val_mse"], path, kept, info))
    _, path, state, info = min(fits, key=lambda f: f[0])
    model.load_state_dict(state, strict=False)
    chosen = {"image_path": path}
    if image == "auto":
        chosen |= {"image_path_chosen_by": "validation MSE"} | {f"val_mse_image_{f[1]}": f[0] for f in fits}
    return info | chosen


def refit_rounds(
    model: nn.Module,
    step: Callable[[nn.Module, int], np.ndarray],
    validation: Callable[[nn.Module], np.ndarray],
    *,
    rounds: int,
    steps_per_round: int,
    patience: int = 0,
) -> dict[str, Any]:
    """``rounds`` rounds of ``steps_per_round`` steps; keep the round with the lowest pooled validation error,
    stopping after ``patience`` rounds without a lower one (0: never).

    ``step(model, steps)`` returns the validation sums (:data:`SUM_KEYS`) of the branch *as it received it*,
    then trains it: one exchange per round in a federation, where validating the previous round's branch rides
    in the same message as training it (60 T-score exchanges fewer per run than a separate validation message
    per round; the numbers are the same). ``validation(model)`` is called once, for the last round's branch.
    Round 0 is the branch as trained with the model, so a refit can only keep or lower validation error.
    """
    keys = branch_keys(model)

    def snapshot() -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in model.state_dict().items() if k in keys}

    sent = snapshot()
    first = step(model, steps_per_round)
    if first[0] < 2:
        model.load_state_dict(sent, strict=False)
        return {"status": "skipped: fewer than 2 validation cases with a T-score", "n_val": int(first[0])}
    best = (first[1] / first[0], 0, sent)
    history = [float(best[0])]
    for r in range(1, rounds + 1):
        sent = snapshot()
        sums = step(model, steps_per_round) if r < rounds else validation(model)
        mse = sums[1] / sums[0]
        history.append(float(mse))
        if mse < best[0]:
            best = (mse, r, sent)
        elif patience and r - best[1] >= patience:
            break  # the round just trained is discarded: the best snapshot is restored below
    model.load_state_dict(best[2], strict=False)
    return {
        "status": "refitted",
        "kept_round": best[1],
        "steps_per_round": steps_per_round,
        "rounds_run": len(history) - 1,
        "patience": patience,
        "val_mse_before": history[0],
        "val_mse": float(best[0]),
        "n_val": int(first[0]),
        "val_mse_history": history,
    }


def validate_then_train(
    model: nn.Module, train: BranchData, val: BranchData, steps: int, lr: float, weight_decay: float
) -> np.ndarray:
    """One round at one site: the sent branch's validation sums, then ``steps`` local steps (the refit's ``step``)."""
    sums = branch_sums(model, val)
    local_steps(model, train, steps, lr, weight_decay)
    return sums


def refit_centralized(
    model: nn.Module,
    train_df: pd.DataFrame,
    val_df: pd.DataFrame,
    preprocess: PreprocessParams,
    cache: PreprocessCache | None,
    device: torch.device,
    *,
    rounds: int = 60,
    steps_per_round: int = 25,
    patience: int = 0,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    image: str = "on",
) -> dict[str, Any]:
    train = BranchData.of(model, train_df, preprocess, cache, device)
    val = BranchData.of(model, val_df, preprocess, cache, device)
    if len(train) < 2:
        return {"status": "skipped: fewer than 2 training cases with a T-score", "n_train": len(train)}
    model.cpu()  # the cached features are on the CPU, and the branch is small
    info = refit(
        model,
        lambda m, steps: validate_then_train(m, train, val, steps, lr, weight_decay),
        lambda m: branch_sums(m, val),
        rounds=rounds,
        steps_per_round=steps_per_round,
        patience=patience,
        image=image,
    )
    model.to(device)
    return info | {"n_train": len(train)}
