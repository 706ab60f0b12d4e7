"""Training engine shared by ``strnet train`` and every federated site.

Shaped like torchvision's classification reference (``train_one_epoch`` / ``evaluate`` / checkpoint dicts),
returning plain dicts so the Flower client and the MLflow tracker can both consume them without the engine
knowing either exists.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import platform
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, WeightedRandomSampler
from tqdm import tqdm

from strnet.data.augment import AugmentParams
from strnet.data.cache import PreprocessCache
from strnet.data.dataset import KneeDataset, screening_pos_weight
from strnet.data.preprocess import PreprocessParams
from strnet.errors import DataError
from strnet.losses import PARTNER_OUTPUT, LossWeights, MultiTaskLoss
from strnet.memory import retain_freed_memory
from strnet.privacy import DPParams, PrivateTraining, steps_per_epoch
from strnet.schedule import RecipeSchedule, set_learning_rate
from strnet.sufficient import histogram_ranking, score_histogram, screening_cases

# Every process that trains, evaluates or predicts imports this module: from here on its batches stop paying
# page faults for memory glibc handed back to the kernel (strnet.memory; 1.7x the CPU forward pass here).
retain_freed_memory()

EpochCallback = Callable[[int, dict[str, float]], None]


@dataclass(frozen=True)
class TrainParams:
    """The paper's recipe by default: AdamW 1e-4/1e-4, plateau(0.5, 20), clip 1.0, early stop 30, batch 32.

    Also the ``train:`` section of the YAML schema, so the engine and the configuration cannot drift apart.
    """

    epochs: int = 100
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 1e-4
    plateau_factor: float = 0.5
    plateau_patience: int = 20
    grad_clip: float = 1.0
    early_stop_patience: int = 30
    min_epochs: int = 0  # a warm-up (federated: rounds) never kept nor counted by early stopping (RecipeSchedule)
    # site_auroc: the mean of the sites' own validation AUROCs, which a model cannot raise by telling the sources
    # apart (pooled AUROC can: one source is mostly bone loss)
    monitor: Literal["auprc", "auroc", "site_auroc"] = "auprc"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    channels_last: bool = True
    max_steps_per_epoch: int | None = None
    eval_batch_size: int = 64
    # "source_label": draw training knees so every (source, normal/bone-loss) cell is equally likely, which takes
    # away the shortcut "this source is mostly bone loss" (the BCE class weight is then 1).
    balance: Literal["none", "source_label"] = "none"
    # Exponential moving average of the weights (and BatchNorm statistics) per optimizer step, validated and kept
    # in place of the raw weights; 0 is off (the paper). decay d averages over ~1/(1-d) steps.
    ema_decay: float = 0.0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    """A 32-bit seed per (run seed, global epoch); SeedSequence keeps neighbouring epochs uncorrelated."""
    return int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1)[0])


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 dot-product instructions (AVX512-BF16 or AMX), where bf16 autocast pays."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` (None = plain fp32).

    ``auto`` picks bf16 on CUDA (fp32 on GPUs without bf16) and on CPUs with native bf16 instructions,
    where we measured channels-last + bf16 training at 1.4x (EfficientNet-Lite0, 224²), 1.9x (ResNet-18) and
    2.8x (ResNet-50) the fp32 throughput on 2 AMD EPYC cores; elsewhere bf16 is emulated and slower, so fp32.
    Not a rule for every CPU: on an Intel Xeon with AMX the ``cpu`` preset's epochs (EfficientNet-Lite0, 224²)
    ran at 10-13 img/s in bf16 against 14-19 in fp32 (which is one reason that preset pins fp32).
    """
    if precision == "fp32":
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None  # fp16 would need a GradScaler
    if precision == "bf16" or cpu_has_native_bf16():
        return torch.bfloat16
    return None


def precision_words(precision: str, device: torch.device) -> str:
    """What ``train.precision`` trains at on ``device``, in the words a run's recipe records.

    Why it is recorded: ``auto`` is bf16 on CPUs with native bf16 and fp32 elsewhere, and bf16 and fp32 runs of
    one recipe and seed part after a few epochs (different kept epochs, a different network). A run is repeated
    to the last digit only at the same precision on the same kind of CPU (docs/real-data.md, "Why two runs differ")."""
    resolved = "bf16 autocast" if autocast_dtype(precision, device) is torch.bfloat16 else "fp32"
    if precision != "auto":
        return resolved
    if device.type == "cuda":
        return f"{resolved} (auto, on CUDA)"
    return f"{resolved} (auto: {'native' if cpu_has_native_bf16() else 'no native'} bf16 on this CPU)"


def numeric_environment() -> dict[str, Any]:
    """The hardware and software a run's numbers were computed on: the CPU model, whether it has native bf16,
    threads, torch. Runs on different kinds of CPU round differently, so two runs compare to the last digit only
    when these agree."""
    info: dict[str, Any] = {
        "cpu": "unknown",
        "native_bf16": cpu_has_native_bf16(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_loader(
    df: pd.DataFrame,
    params: PreprocessParams,
    cache: PreprocessCache | None,
    *,
    batch_size: int,
    augment: AugmentParams | None,
    shuffle: bool,
    seed: int,
    num_workers: int = 0,
    balance: str = "none",
    partners: bool = False,
) -> DataLoader:
    """A loader over ``df``; ``balance="source_label"`` replaces the shuffle by a seeded weighted draw (with
    replacement, one epoch = len(df) knees) in which every (source, screening label) cell weighs the same.
    ``partners``: each item also carries the other knee of its film (``loss.bilateral``)."""
    df = df.reset_index(drop=True)
    dataset = KneeDataset(df, params, cache, augment=augment, seed=seed, partners=partners)
    generator = torch.Generator().manual_seed(seed)
    sampler = None
    if shuffle and balance == "source_label":
        sampler = WeightedRandomSampler(balance_weights(df), len(df), replacement=True, generator=generator)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=num_workers,
        generator=generator,
        drop_last=False,
        persistent_workers=False,
    )


def balance_weights(df: pd.DataFrame) -> torch.Tensor:
    """1 / size of each knee's (source, normal-or-bone-loss) cell; unlabelled knees share one cell per source."""
    label = df["label_cls"].fillna("").astype(str)
    screen = np.where(label == "", "?", np.where(label == "normal", "normal", "bone loss"))
    source = df["source"].fillna("").astype(str) if "source" in df.columns else pd.Series("", index=df.index)
    cell = source.to_numpy() + "|" + screen
    _, inverse, counts = np.unique(cell, return_inverse=True, return_counts=True)
    return torch.as_tensor(1.0 / counts[inverse], dtype=torch.double)


def class_weight(train_df: pd.DataFrame, params: TrainParams) -> float:
    """The screening BCE's positive-class weight: n_normal / n_bone_loss, or 1 when the sampler balances."""
    return 1.0 if params.balance != "none" else screening_pos_weight(train_df)


def _to_device(batch: dict[str, torch.Tensor], device: torch.device, channels_last: bool) -> dict[str, torch.Tensor]:
    out = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    if channels_last:
        out["image"] = out["image"].contiguous(memory_format=torch.channels_last)
    return out


@dataclass
class Proximal:
    """FedProx's anchor: the global weights a site received this round, and the term's weight mu."""

    mu: float
    anchor: dict[str, torch.Tensor]

    @classmethod
    def of(cls, model: nn.Module, mu: float) -> Proximal:
        return cls(mu, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})

    def term(self, model: nn.Module) -> torch.Tensor:
        """Σ‖w − w_global‖² (squared: Li et al. 2020, eq. 2; Flower's docstring omits the square)."""
        params = dict(model.named_parameters())
        return sum(((params[n] - w0) ** 2).sum() for n, w0 in self.anchor.items())  # type: ignore[return-value]


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    loss_fn: MultiTaskLoss,
    optimizer: torch.optim.Optimizer,
    *,
    params: TrainParams,
    epoch: int,
    seed: int,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    progress: bool = True,
    desc: str = "train",
    proximal: Proximal | None = None,
    ema: AveragedModel | None = None,
    batchnorm_running: bool = False,
) -> dict[str, float]:
    """One pass over ``loader``; returns mean loss components, examples seen and throughput.

    ``proximal`` (FedProx) adds (mu/2)·Σ‖w − w_global‖² over the trainable parameters to every step's loss;
    ``ema`` is updated from the model after every optimizer step. ``batchnorm_running``: BatchNorm normalises
    with the running statistics the model carries, in training as in evaluation, and leaves them unchanged (its
    scale and shift still learn): a federated site whose batches hold one source then trains under the
    federation's pooled statistics (``federation.batchnorm: pooled``), not its own source's.

    Every random draw of the epoch (shuffle order, augmentation, dropout) is seeded from (``seed``, ``epoch``)
    alone, so a federated site running global epoch *e* draws exactly what a centralized run draws in its
    epoch *e*, and a resumed run continues exactly.
    """
    model.train()
    if batchnorm_running:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
    es = epoch_seed(seed, epoch)
    seed_everything(es)
    if loader.generator is not None:
        loader.generator.manual_seed(es)
    if hasattr(loader.dataset, "set_epoch"):
        loader.dataset.set_epoch(epoch)
    sums: dict[str, float] = {}
    n_seen = 0
    start = time.perf_counter()
    bar = tqdm(loader, desc=f"{desc} {epoch}", leave=False, disable=None if progress else True, unit="batch")
    for step, batch in enumerate(bar):
        if params.max_steps_per_epoch is not None and step >= params.max_steps_per_epoch:
            break
        batch = _to_device(batch, device, params.channels_last)
        outputs = _forward(model, batch, device, amp_dtype, channels_last=params.channels_last)
        loss, parts = loss_fn(outputs, batch, epoch)
        if proximal is not None and proximal.mu > 0:
            term = proximal.term(model)
            loss = loss + proximal.mu / 2 * term
            parts["proximal"] = float(term.detach())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if params.grad_clip and not _is_private(optimizer):  # DP-SGD clips every case's gradient instead
            nn.utils.clip_grad_norm_(model.parameters(), params.grad_clip)
        optimizer.step()
        if ema is not None:
            ema.update_parameters(model)
        bs = int(batch["image"].shape[0])
        n_seen += bs
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + float(v) * bs
        elapsed = time.perf_counter() - start
        bar.set_postfix(loss=f"{parts['total']:.3f}", img_s=f"{n_seen / max(elapsed, 1e-9):.1f}")
    elapsed = time.perf_counter() - start
    result = {f"loss_{k}": v / max(n_seen, 1) for k, v in sums.items()}
    result.update(num_examples=float(n_seen), images_per_s=n_seen / max(elapsed, 1e-9), seconds=elapsed)
    return result


def _forward(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    device: torch.device,
    amp_dtype: torch.dtype | None,
    *,
    channels_last: bool,
) -> dict[str, torch.Tensor]:
    """The model's outputs for the batch; with film partners (``loss.bilateral``) the partners of the knees that
    have one run in the same forward pass (one set of BatchNorm batch statistics) and come back as
    :data:`strnet.losses.PARTNER_OUTPUT`, the screening logits the consistency term compares."""
    image, tabular = batch["image"], batch["tabular"]
    has = batch.get("has_partner")
    n = int(image.shape[0])
    if has is not None and bool(has.any()):
        image = torch.cat([image, batch["partner_image"][has].to(image.device)])
        if channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        tabular = torch.cat([tabular, tabular[has]])  # the same patient: the same age, sex and BMI
    with _autocast(device, amp_dtype):
        outputs = model(image, tabular)
    outputs = {k: v.float() for k, v in outputs.items()}
    if int(image.shape[0]) == n:
        if has is not None:
            outputs[PARTNER_OUTPUT] = outputs["screen"][:0]
        return outputs
    partner = outputs["screen"][n:]
    return {k: v[:n] for k, v in outputs.items()} | {PARTNER_OUTPUT: partner}


def _is_private(optimizer: torch.optim.Optimizer) -> bool:
    from opacus.optimizers import DPOptimizer

    return isinstance(optimizer, DPOptimizer)


@torch.no_grad()
def predict_loader(
    model: nn.Module,
    loader: DataLoader,
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    test_time_mirror: bool = False,
    with_mirror: bool = False,
    with_features: bool = False,
    progress: bool = False,
    desc: str = "predict",
) -> dict[str, np.ndarray]:
    """Outputs and targets for every case in ``loader``, in loader order.

    ``prob_screen`` is uncalibrated (:func:`strnet.calibration.calibrated` maps ``logit_screen`` to a bundle's
    calibrated scale). ``test_time_mirror`` serves the mean of the outputs for the image and its left–right
    mirror, which makes a knee's output independent of which side of the film it came from. ``with_mirror``
    adds ``logit_screen_mirror``: the served logit of the mirrored image (the mirror-stability check).
    ``with_features`` adds ``neck_features`` [N, neck_dim] of the image as given (not mirrored), from the same pass.
    """
    model.eval()
    keys = ["logit_screen", "prob_screen", "prob_severity", "t_pred", "y_screen", "y_severity", "t_true", "index"]
    if with_mirror:
        keys += ["logit_screen_mirror", "prob_screen_mirror"]
    if with_features:
        keys.append("neck_features")
    chunks: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    for batch in tqdm(loader, desc=desc, leave=False, disable=None if progress else True, unit="batch"):
        batch = _to_device(batch, device, channels_last)
        with _autocast(device, amp_dtype):
            extra = {"with_features": True} if with_features else {}
            out = {k: v.float() for k, v in model(batch["image"], batch["tabular"], **extra).items()}
            if with_features:
                chunks["neck_features"].append(out.pop("neck").cpu().numpy())
            if test_time_mirror or with_mirror:
                mirrored = {k: v.float() for k, v in model(batch["image"].flip(-1), batch["tabular"]).items()}
        if test_time_mirror:
            out = {k: (v + mirrored[k]) / 2 for k, v in out.items()}
        if with_mirror:
            served = out if test_time_mirror else mirrored  # averaged outputs are already mirror-invariant
            chunks["logit_screen_mirror"].append(served["screen"].cpu().numpy())
            chunks["prob_screen_mirror"].append(torch.sigmoid(served["screen"]).cpu().numpy())
        chunks["logit_screen"].append(out["screen"].cpu().numpy())
        chunks["prob_screen"].append(torch.sigmoid(out["screen"]).cpu().numpy())
        chunks["prob_severity"].append(torch.sigmoid(out["severity"]).cpu().numpy())
        chunks["t_pred"].append(out["t_score"].cpu().numpy())
        chunks["y_screen"].append(batch["y_screen"].cpu().numpy())
        chunks["y_severity"].append(batch["y_severity"].cpu().numpy())
        chunks["t_true"].append(batch["t_score"].cpu().numpy())
        chunks["index"].append(batch["index"].cpu().numpy())
    return {
        k: (np.concatenate(v) if v else np.zeros(0)).astype(np.int64 if k == "index" else np.float64)
        for k, v in chunks.items()
    }


def split_frames(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The manifest's train / val / test rows, each re-indexed from 0."""
    return {name: df[df["split"] == name].reset_index(drop=True) for name in ("train", "val", "test")}


def train_summary(stats: dict[str, float]) -> dict[str, float]:
    """An epoch's (or a site's round's) training numbers under the names both modes log."""
    out = {f"train_{k}": float(v) for k, v in stats.items() if k.startswith("loss_")}
    out["train_images_per_s"] = float(stats.get("images_per_s", 0.0))
    return out


def history_row(lr: float, train: dict[str, float], ranking: dict[str, float]) -> dict[str, float]:
    """One epoch (centralized) or round (federated) of the learning curve, with the same names in both modes."""
    return {"lr": float(lr), **train, **{f"val_screening_{k}": float(v) for k, v in ranking.items()}}


def site_rankings(preds: dict[str, np.ndarray], frame: pd.DataFrame, n_bins: int) -> dict[str, dict[str, float]]:
    """Each site's own validation AUROC/AUPRC: a pooled score can rise while one source gets worse, and the
    learning curve must show it (logged as ``site.<name>.val_…``, the names a federation uses)."""
    if "site" not in frame.columns:
        return {}
    sites = frame["site"].astype(str).to_numpy()[preds["index"]]
    return {
        site: validation_ranking({k: v[sites == site] for k, v in preds.items()}, n_bins) for site in sorted(set(sites))
    }


def with_site_auroc(pooled: dict[str, float], per_site: dict[str, dict[str, float]]) -> dict[str, float]:
    """The pooled ranking plus ``site_auroc``: the mean over sites (with both classes) of their own AUROC."""
    values = [r["auroc"] for r in per_site.values() if np.isfinite(r["auroc"])]
    return pooled | {"site_auroc": float(np.mean(values)) if values else pooled["auroc"]}


def site_rows(per_site: dict[str, dict[str, float]]) -> dict[str, float]:
    return {f"site.{site}.val_screening_{k}": v for site, r in per_site.items() for k, v in r.items()}


def validation_ranking(preds: dict[str, np.ndarray], n_bins: int) -> dict[str, float]:
    """The monitored score, from the score histogram in both modes (a federation knows nothing finer)."""
    return histogram_ranking(score_histogram(*screening_cases(preds), n_bins))


@dataclass
class FitResult:
    best_state: dict[str, torch.Tensor]
    best_epoch: int
    best_score: float
    epochs_run: int
    history: list[dict[str, float]]
    stopped_early: bool
    seconds: float
    privacy: dict[str, Any] | None = None  # DP-SGD: ε, δ, σ, q, steps (strnet.privacy.PrivateTraining.report)


def build_optimizer(model: nn.Module, params: TrainParams) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=params.lr, weight_decay=params.weight_decay
    )


def weight_average(model: nn.Module, decay: float) -> AveragedModel | None:
    """The EMA copy of ``model`` that :func:`train_one_epoch` updates each step, or None when ``decay`` is 0.

    BatchNorm statistics are averaged with the weights (``use_buffers``), so the copy is evaluated as it is.
    """
    if decay == 0:
        return None
    if not 0 < decay < 1:
        raise ValueError(f"train.ema_decay={decay} must be 0 (off) or in (0, 1)")
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def fit(
    model: nn.Module,
    train_df: pd.DataFrame,
    val_df: pd.DataFrame,
    *,
    params: TrainParams,
    seed: int,
    preprocess: PreprocessParams,
    augment: AugmentParams | None,
    loss_weights: LossWeights,
    cache: PreprocessCache | None,
    n_bins: int,
    num_workers: int = 0,
    device: torch.device | None = None,
    checkpoint_path: Path | None = None,
    resume: bool = False,
    config_dict: dict[str, Any] | None = None,
    on_epoch_end: EpochCallback | None = None,
    progress: bool = True,
    test_time_mirror: bool = False,
    dp: DPParams | None = None,
) -> FitResult:
    """The paper's recipe: AdamW, plateau and early stopping on validation AUPRC (:class:`RecipeSchedule`),
    clipping, warm-up.

    Writes a resumable checkpoint (model, optimizer, schedule, epoch, config, best state, history, privacy
    accountant) after every epoch when ``checkpoint_path`` is given; epochs are seeded by (seed, epoch), so no
    RNG state is needed. With ``dp`` enabled the training steps are DP-SGD (:mod:`strnet.privacy`) and every
    epoch's row records the ε spent so far (``privacy_epsilon``).
    """
    t = params
    device = device or resolve_device()
    seed_everything(seed)
    model.to(device)
    if t.channels_last:
        model.to(memory_format=torch.channels_last)
    amp_dtype = autocast_dtype(t.precision, device)
    private = (
        PrivateTraining(
            dp,
            n_train=len(train_df),
            batch_size=t.batch_size,
            planned_steps=t.epochs * steps_per_epoch(len(train_df), t.batch_size, t.max_steps_per_epoch),
        )
        if dp is not None and dp.enabled
        else None
    )
    loss_fn = MultiTaskLoss(
        pos_weight=class_weight(train_df, t), weights=loss_weights, per_case=private is not None
    ).to(device)
    optimizer = build_optimizer(model, t)
    ema = weight_average(model, t.ema_decay)
    kept = ema.module if ema is not None else model  # what is validated and kept
    schedule = RecipeSchedule(t)
    loader_args = {"num_workers": num_workers, "seed": seed}
    train_loader = make_loader(
        train_df,
        preprocess,
        cache,
        batch_size=t.batch_size,
        augment=augment,
        shuffle=True,
        balance=t.balance,
        partners=loss_weights.bilateral > 0,
        **loader_args,
    )
    val_loader = make_loader(
        val_df, preprocess, cache, batch_size=t.eval_batch_size, augment=None, shuffle=False, **loader_args
    )
    start_epoch = 0
    best_state = {k: v.detach().clone() for k, v in kept.state_dict().items()}
    history: list[dict[str, float]] = []
    if resume and checkpoint_path is not None and checkpoint_path.exists():
        # weights_only: a checkpoint is data, never code — a tampered file fails to load instead of running
        try:
            ckpt = torch.load(checkpoint_path, map_location=device, weights_only=True)
        except pickle.UnpicklingError as exc:
            raise DataError(
                checkpoint_path, f"not a plain-data checkpoint, refused ({str(exc).splitlines()[0]})"
            ) from exc
        model.load_state_dict(ckpt["model"])
        if ema is not None:
            ema.load_state_dict(ckpt["ema"])
        optimizer.load_state_dict(ckpt["optimizer"])
        schedule.load_state_dict(ckpt["schedule"])
        if private is not None:
            private.load_state(ckpt.get("privacy"))
        start_epoch = ckpt["epoch"] + 1
        best_state, history = ckpt["best_state"], ckpt["history"]
        for i, row in enumerate(history):  # the resumed run's record holds the whole curve
            if on_epoch_end is not None:
                on_epoch_end(i + 1, row)
    t0 = time.perf_counter()
    epoch = start_epoch - 1
    step_model, step_optimizer, step_loader = (
        private.attach(model, optimizer, train_loader) if private else (model, optimizer, train_loader)
    )
    # a resumed fit that had already stopped early is finished (an ensemble's earlier members, on resume)
    last_epoch = start_epoch if schedule.should_stop else t.epochs
    for epoch in range(start_epoch, last_epoch):
        lr = schedule.lr
        set_learning_rate(step_optimizer, lr)
        train_stats = train_one_epoch(
            step_model,
            step_loader,
            loss_fn,
            step_optimizer,
            params=t,
            epoch=epoch,
            seed=seed,
            device=device,
            amp_dtype=amp_dtype,
            progress=progress,
            ema=ema,
        )
        preds = predict_loader(
            kept,
            val_loader,
            device=device,
            amp_dtype=amp_dtype,
            channels_last=t.channels_last,
            test_time_mirror=test_time_mirror,
        )
        per_site = site_rankings(preds, val_df, n_bins)
        ranking = with_site_auroc(validation_ranking(preds, n_bins), per_site)
        improved = schedule.step(ranking[t.monitor])
        if improved:
            best_state = {k: v.detach().cpu().clone() for k, v in kept.state_dict().items()}
        row = history_row(lr, train_summary(train_stats), ranking) | site_rows(per_site)
        if private is not None:
            row["privacy_epsilon"] = private.epsilon()
        history.append(row)
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, row)
        if progress:
            tqdm.write(
                f"epoch {epoch + 1}/{t.epochs}: loss {row.get('train_loss_total', float('nan')):.4f} "
                f"val {t.monitor} {ranking[t.monitor]:.4f} lr {lr:.2g} ({row['train_images_per_s']:.1f} img/s)"
                + (" *" if improved else "")
            )
        if checkpoint_path is not None:
            checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = checkpoint_path.with_suffix(".tmp")
            torch.save(
                {
                    "model": model.state_dict(),
                    "ema": ema.state_dict() if ema is not None else None,
                    "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(),
                    "epoch": epoch,
                    "config": config_dict or {},
                    "best_state": best_state,
                    "history": history,
                    "privacy": private.state() if private is not None else None,
                },
                tmp,
            )
            tmp.replace(checkpoint_path)
        if schedule.should_stop:
            break
    if private is not None:
        private.detach()
    return FitResult(
        best_state=best_state,
        best_epoch=schedule.best_step,
        best_score=schedule.best_score,
        epochs_run=epoch + 1,
        history=history,
        stopped_early=epoch + 1 < t.epochs,
        seconds=time.perf_counter() - t0,
        privacy=private.report() if private is not None else None,
    )
