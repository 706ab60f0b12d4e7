"""The published STR-Net recipe on one GPU, centralized and federated, in minutes (issue 11, item 4).

Three subcommands, run on two machines::

    python -m simulations.paper_gpu export --config paper-gpu --out .gpu/paper-gpu.npz   # here (make paper-gpu-data)
    python -m simulations.paper_gpu run --data .gpu/paper-gpu.npz --out OUT               # on the GPU
    python -m simulations.paper_gpu report --results OUT --out runs/paper-gpu            # here

``export`` needs the whole project: it resolves the preset with the project's config loader, preprocesses every
manifest row with the project's own cache (:class:`strnet.data.cache.PreprocessCache`), quantises each knee to
uint8, JPEG-encodes it and writes ONE file: the encoded knees, per-row site/split/source/targets/T-score/tabular
encoding/row id (``path|side``) and the resolved recipe as JSON, so the GPU machine needs no YAML.

``run`` imports only torch, torchvision, numpy, the standard library and the strnet modules that import only those
(``strnet.model``, ``strnet.losses``, ``strnet.data.augment``); a test runs it with pandas, scikit-learn, SciPy,
PyYAML, OpenCV, Flower, MLflow and Opacus blocked. It decodes every knee once into one uint8 tensor on the GPU, then
trains the recipe (bf16 autocast, channels-last, batched on-device augmentation with
:func:`strnet.data.augment.augment_batch`, AdamW, clipping, warm-up, ReduceLROnPlateau and early stopping on the
validation AUPRC from the same 1000-bin histogram the project monitors) twice from the same initial weights:

* **centralized**: every training knee, up to ``train.epochs`` epochs;
* **federated**: FedAvg over the recipe's ``train`` sites in this process (no Flower, no Ray): each round every site
  trains ``federation.local_epochs`` epoch(s) from the global weights with its own AdamW (moments kept across
  rounds when ``federation.keep_optimizer_state``, as the project's sites keep them in their node state), its own
  class weight and the global epoch number (warm-up, seeds); the new global state is the training-set-size weighted
  mean of the sites' states (:func:`fedavg`); the plateau, early stopping and best round follow the pooled
  validation AUPRC of the global model, as the project's server does. With one local epoch a round sees the same
  training knees as a centralized epoch (the steps differ only by the sites' partial last batches).

Phases (``--phases``): ``smoke`` (one epoch and one round, eager), ``probe`` (``torch.compile``: eager and compiled
step time and compile time; compile is used when it pays over the planned steps), ``centralized``, ``federated``.
Each phase has a time cap and the whole run a budget; after every phase (and every 10 epochs) ``timings.json`` is
rewritten, and each mode writes its per-row predictions at its best epoch/round, so a timeout still returns results.

``report`` computes, back here, with the project's own code, what every run reports: the Platt calibration fitted on
validation, τ* by the paper's rule on the calibrated validation scores, and per-site / per-source metrics with
bootstrap intervals (:func:`strnet.scoring.evaluation_metrics`), for both modes, beside the timings.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from strnet.data.augment import N_DRAWS, AugmentParams, augment_batch
from strnet.losses import LossWeights
from strnet.model import build_strnet
from strnet.schedule import RecipeSchedule

FORMAT = "strnet-paper-gpu/1"
MODES = ("centralized", "federated")
PHASES = ("smoke", "probe", *MODES)
# What the run needs from the recipe, and what it refuses (the project's other settings have no GPU twin here).
SUPPORTED = {
    "train.balance": ("none",),
    "train.monitor": ("auprc",),
    "federation.strategy": ("fedavg",),
    "model.norm": ("batch",),
    "privacy.dp.enabled": (False,),
}


# ---------------------------------------------------------------------------------------------- the recipe's math


def epoch_seed(seed: int, epoch: int, *stream: int) -> int:
    """A 32-bit seed per (run seed, global epoch[, stream]); the first two as :func:`strnet.engine.epoch_seed`."""
    return int(np.random.SeedSequence([int(seed), int(epoch), *map(int, stream)]).generate_state(1)[0])


def average_precision(y_true: torch.Tensor, scores: torch.Tensor, n_bins: int | None = None) -> torch.Tensor:
    """scikit-learn's ``average_precision_score`` in torch, on the scores' device (a 0-dim float64 tensor).

    Σ over distinct thresholds, descending, of Δrecall × precision; tied scores form one threshold. Rows whose
    label is NaN are left out; NaN without a positive. ``n_bins``: the scores are first replaced by their bin of the
    fixed histogram on [0, 1] (:func:`strnet.metrics.score_histogram`'s bins), which gives exactly the AUPRC the
    project monitors in both modes (:func:`strnet.metrics.metrics_from_histogram`).
    """
    y = y_true.to(torch.float64).flatten()
    s = scores.to(torch.float64).flatten()
    known = ~torch.isnan(y)
    y, s = y[known], s[known]
    if y.numel() == 0:
        return torch.tensor(math.nan, dtype=torch.float64, device=y.device)
    if n_bins is not None:
        edges = torch.arange(n_bins + 1, dtype=torch.float64, device=s.device) / n_bins
        s = (torch.bucketize(s, edges, right=True) - 1).clamp(0, n_bins - 1).to(torch.float64)
    order = torch.argsort(s, descending=True, stable=True)
    s, y = s[order], y[order]
    tps = torch.cumsum(y, 0)
    fps = torch.cumsum(1.0 - y, 0)
    last = torch.ones_like(s, dtype=torch.bool)
    last[:-1] = s[1:] != s[:-1]  # the end of each run of tied scores is one threshold
    tps, fps = tps[last], fps[last]
    n_pos = tps[-1]
    precision = tps / (tps + fps)
    recall = tps / n_pos
    ap = (torch.diff(recall, prepend=recall.new_zeros(1)) * precision).sum()
    return torch.where(n_pos > 0, ap, torch.full_like(ap, math.nan))


def multitask_loss(
    outputs: dict[str, torch.Tensor],
    y_screen: torch.Tensor,
    y_severity: torch.Tensor,
    t_score: torch.Tensor,
    *,
    pos_weight: torch.Tensor,
    weights: LossWeights,
    epoch: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:class:`strnet.losses.MultiTaskLoss` without a host synchronisation (tested equal, value and gradient).

    Each term is the mean over the cases that carry its label (0 for none), written with masks instead of boolean
    indexing and without reading the parts back, so a GPU step never waits for the host. Returns the total and
    the detached parts ``[screen, severity, t_score, total]`` (unweighted terms, as MultiTaskLoss reports them).
    """
    terms = []
    for key, target in (("screen", y_screen), ("severity", y_severity), ("t_score", t_score)):
        pred = outputs[key].float()
        y = target.to(device=pred.device, dtype=torch.float32)
        known = ~torch.isnan(y)
        y0 = torch.nan_to_num(y)
        if key != "t_score" and weights.label_smoothing:
            y0 = y0 * (1.0 - weights.label_smoothing) + 0.5 * weights.label_smoothing
        if key == "screen":
            loss = F.binary_cross_entropy_with_logits(pred, y0, pos_weight=pos_weight, reduction="none")
        elif key == "severity":
            loss = F.binary_cross_entropy_with_logits(pred, y0, reduction="none")
        else:
            loss = F.smooth_l1_loss(pred, y0, reduction="none")
        terms.append(torch.where(known, loss, torch.zeros_like(loss)).sum() / known.sum().clamp(min=1))
    total = terms[0] + weights.severity * terms[1]
    if epoch >= weights.warmup_epochs:
        total = total + weights.t_score * terms[2]
    return total, torch.stack([*terms, total]).detach()


def fedavg(states: Sequence[dict[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """Σ wᵢ·stateᵢ / Σ wᵢ, key by key, on the states' device.

    Floating tensors (weights and BatchNorm's running statistics) are averaged in fp32 with Flower's arithmetic
    (``flwr.serverapp.strategy.strategy_utils.aggregate_arrayrecords``: each state times its factor wᵢ/Σw, summed
    in order; tested bitwise on CPU) and cast back to their dtype. Integer buffers (BatchNorm's
    ``num_batches_tracked``, unused with a momentum) are averaged in float64 and rounded back to their integer
    dtype, as the project's server does (``server.pooled.weighted_average``); Flower itself would leave a float.
    """
    if not states or len(states) != len(weights):
        raise ValueError("need one weight per state and at least one state")
    total = float(sum(weights))
    factors = [float(w) / total for w in weights]
    out: dict[str, torch.Tensor] = {}
    for key, ref in states[0].items():
        if ref.is_floating_point():
            acc = states[0][key].float() * factors[0]
            for state, f in zip(states[1:], factors[1:], strict=True):
                acc += state[key].float() * f
            out[key] = acc.to(ref.dtype)
        else:
            acc64 = states[0][key].double() * factors[0]
            for state, f in zip(states[1:], factors[1:], strict=True):
                acc64 += state[key].double() * f
            out[key] = torch.round(acc64).to(ref.dtype)
    return out


def pos_weight_of(y_screen: torch.Tensor) -> float:
    """n_normal / n_bone_loss of the labelled rows, 1 without both classes (as ``screening_pos_weight``)."""
    n_normal, n_loss = int((y_screen == 0).sum()), int((y_screen == 1).sum())
    return 1.0 if n_normal == 0 or n_loss == 0 else n_normal / n_loss


# ---------------------------------------------------------------------------------------------- the data file


class Data:
    """The exported knees, decoded once into one uint8 ``[N, 1, S, S]`` tensor on the device, and their rows."""

    def __init__(self, path: Path, device: torch.device, decode: str = "cpu") -> None:
        t0 = time.perf_counter()
        with np.load(path, allow_pickle=False) as z:
            blob = {k: z[k] for k in z.files}
        if str(blob.get("format")) != FORMAT:
            raise ValueError(f"{path}: not a {FORMAT} file (format {blob.get('format')!r})")
        self.meta: dict[str, Any] = json.loads(str(blob["meta"]))
        self.recipe: dict[str, Any] = json.loads(str(blob["recipe"]))
        self.rows: dict[str, list[str]] = {k[5:]: blob[k].tolist() for k in blob if k.startswith("rows_")}
        self.n = len(self.rows["row_id"])
        load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        encoded, offsets = torch.from_numpy(blob["encoded"]), blob["offsets"].tolist()
        chunks = [encoded[offsets[i] : offsets[i + 1]] for i in range(self.n)]
        self.images, self.decoded_on = _decode(chunks, self.meta["encoding"], device, decode)
        size = int(self.meta["size"])
        if tuple(self.images.shape) != (self.n, 1, size, size):
            raise ValueError(
                f"{path}: decoded images have shape {tuple(self.images.shape)}, expected {self.n}x1x{size}²"
            )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.timing = {
            "file_bytes": path.stat().st_size,
            "load_s": load_s,
            "decode_s": time.perf_counter() - t0,
            "decoded_on": self.decoded_on,
            "image_bytes_on_device": self.images.numel(),
        }
        self.y_screen = torch.from_numpy(blob["y_screen"]).to(device)
        self.y_severity = torch.from_numpy(blob["y_severity"]).to(device)
        self.t_score = torch.from_numpy(blob["t_score"]).to(device)
        self.tabular = torch.from_numpy(blob["tabular"]).to(device)
        self.device = device

    def where(self, **conditions: Sequence[str] | str) -> torch.Tensor:
        """Row indices (long, on the device) whose columns take the given value(s)."""
        keep = np.ones(self.n, bool)
        for column, allowed in conditions.items():
            values = (allowed,) if isinstance(allowed, str) else tuple(allowed)
            keep &= np.isin(np.asarray(self.rows[column], dtype=object), values)
        return torch.as_tensor(np.flatnonzero(keep), dtype=torch.long, device=self.device)


def _decode(chunks: list[torch.Tensor], encoding: str, device: torch.device, where: str) -> tuple[torch.Tensor, str]:
    from torchvision.io import ImageReadMode, decode_jpeg, decode_png

    if encoding == "jpeg" and where == "cuda" and device.type == "cuda":
        try:
            images = decode_jpeg(chunks, mode=ImageReadMode.GRAY, device=device)
            return torch.stack(images), "cuda (nvjpeg)"
        except Exception as exc:  # an nvjpeg without grayscale output, or none: decode on the CPU instead
            print(f"GPU JPEG decode failed ({type(exc).__name__}: {exc}); decoding on the CPU", flush=True)
    if encoding == "jpeg":
        images = decode_jpeg(chunks, mode=ImageReadMode.GRAY)
    elif encoding == "png":
        images = [decode_png(c, mode=ImageReadMode.GRAY) for c in chunks]
    else:
        raise ValueError(f"unknown image encoding {encoding!r}")
    return torch.stack(images).to(device), "cpu"


# ---------------------------------------------------------------------------------------------- training


def get(recipe: dict[str, Any], key: str) -> Any:
    node: Any = recipe
    for part in key.split("."):
        node = node[part]
    return node


def apply_sets(recipe: dict[str, Any], sets: Sequence[str]) -> dict[str, Any]:
    """``a.b=value`` overrides (value read as JSON, else a string) on the exported recipe, e.g. train.epochs=3."""
    for item in sets:
        key, sep, raw = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected key=value")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        *parents, leaf = key.split(".")
        node = recipe
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise SystemExit(f"--set {item!r}: {part} is not a section of the recipe")
            node = node[part]
        if leaf not in node:
            raise SystemExit(f"--set {item!r}: unknown key {leaf!r} (have {', '.join(sorted(node))})")
        node[leaf] = value
    return recipe


def check_recipe(recipe: dict[str, Any]) -> None:
    problems = [
        f"{key}={get(recipe, key)!r} (this script runs {' or '.join(map(str, allowed))})"
        for key, allowed in SUPPORTED.items()
        if get(recipe, key) not in allowed
    ]
    if problems:
        raise SystemExit("unsupported recipe settings: " + "; ".join(problems))


class Trainer:
    """One STR-Net on one device; both modes train it in place (a compiled graph stays valid across them)."""

    def __init__(self, data: Data, recipe: dict[str, Any], device: torch.device, log: Callable[[str], None]) -> None:
        self.data, self.recipe, self.device, self.log = data, recipe, device, log
        t, m = recipe["train"], recipe["model"]
        self.seed = int(recipe["seed"])
        self.batch_size = int(t["batch_size"])
        self.eval_batch_size = int(t["eval_batch_size"])
        self.max_steps = t.get("max_steps_per_epoch")
        self.channels_last = bool(t["channels_last"])
        precision = t["precision"]
        bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
        if bf16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            bf16 = False  # fp16 would need a GradScaler; fp32 instead
        self.amp_dtype = torch.bfloat16 if bf16 else None
        self.augment = AugmentParams(**recipe["augment"])
        self.loss_weights = LossWeights(**recipe["loss"])
        self.mean, self.std = float(recipe["preprocess"]["mean"]), float(recipe["preprocess"]["std"])
        self.n_bins = int(recipe["threshold"]["histogram_bins"])
        self.mirror = bool(m.get("test_time_mirror", False))
        torch.manual_seed(self.seed)
        self.model = build_strnet(
            backbone=m["backbone"], weights=m["weights"], neck_dim=int(m["neck_dim"]), dropout=float(m["dropout"])
        ).to(device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.init_state = self.snapshot()
        self.compiled: Callable[..., dict[str, torch.Tensor]] | None = None

    # ------------------------------------------------------------------ pieces

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def reset(self) -> None:
        self.model.load_state_dict(self.init_state)

    def optimizer(self) -> torch.optim.Optimizer:
        t = self.recipe["train"]
        params = [p for p in self.model.parameters() if p.requires_grad]
        fused = {"fused": True} if self.device.type == "cuda" else {}
        return torch.optim.AdamW(params, lr=float(t["lr"]), weight_decay=float(t["weight_decay"]), **fused)

    def autocast(self) -> Any:
        if self.amp_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def inputs(self, idx: torch.Tensor, draws: torch.Tensor | None) -> torch.Tensor:
        x = self.data.images.index_select(0, idx).float().div_(255.0)
        if draws is not None:
            x = augment_batch(x, draws, self.augment)
        x = (x - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def step(
        self,
        optimizer: torch.optim.Optimizer,
        idx: torch.Tensor,
        draws: torch.Tensor,
        pos_weight: torch.Tensor,
        epoch: int,
        compiled: bool | None = None,
    ) -> torch.Tensor:
        """One optimisation step on rows ``idx``; the detached loss parts (no host synchronisation)."""
        x = self.inputs(idx, draws)
        use = self.compiled is not None and (compiled if compiled is not None else len(idx) == self.batch_size)
        forward = self.compiled if use else self.model  # partial batches run eagerly: no recompilation per shape
        with self.autocast():
            out = forward(x, self.data.tabular.index_select(0, idx))  # type: ignore[misc]
        d = self.data
        loss, parts = multitask_loss(
            out,
            d.y_screen[idx],
            d.y_severity[idx],
            d.t_score[idx],
            pos_weight=pos_weight,
            weights=self.loss_weights,
            epoch=epoch,
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip = float(self.recipe["train"]["grad_clip"])
        if clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        optimizer.step()
        return parts

    def train_epoch(
        self, optimizer: torch.optim.Optimizer, rows: torch.Tensor, epoch: int, stream: int = 0
    ) -> dict[str, Any]:
        """One pass over ``rows``; every draw (order, augmentation, dropout) seeded from (seed, global epoch)."""
        self.model.train()
        es = epoch_seed(self.seed, epoch)
        torch.manual_seed(es)  # dropout, on the CPU and every GPU
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(es)).to(self.device)
        gen = torch.Generator().manual_seed(epoch_seed(self.seed, epoch, 1 + stream))
        draws = torch.rand(len(rows), N_DRAWS, generator=gen, dtype=torch.float64).to(self.device)
        pos_weight = torch.tensor(pos_weight_of(self.data.y_screen[rows]), device=self.device)
        sums = torch.zeros(4, device=self.device)
        n = steps = 0
        self.sync()
        t0 = time.perf_counter()
        for start in range(0, len(rows), self.batch_size):
            if self.max_steps is not None and steps >= int(self.max_steps):
                break
            pick = order[start : start + self.batch_size]
            parts = self.step(optimizer, rows[pick], draws[pick], pos_weight, epoch)
            sums += parts * len(pick)
            n += len(pick)
            steps += 1
        loss = (sums / max(n, 1)).tolist()  # the epoch's one host synchronisation
        seconds = time.perf_counter() - t0
        return {
            "images": n,
            "steps": steps,
            "seconds": seconds,
            "loss_screen": loss[0],
            "loss_severity": loss[1],
            "loss_t_score": loss[2],
            "loss_total": loss[3],
        }

    @torch.no_grad()
    def predict(self, rows: torch.Tensor) -> torch.Tensor:
        """``[n, 4]`` float32: screening logit, P(bone loss), P(osteoporosis | bone loss), T-score estimate."""
        self.model.eval()
        outs = []
        for start in range(0, len(rows), self.eval_batch_size):
            idx = rows[start : start + self.eval_batch_size]
            x = self.inputs(idx, None)
            tab = self.data.tabular.index_select(0, idx)
            with self.autocast():
                out = {k: v.float() for k, v in self.model(x, tab).items()}
                if self.mirror:
                    flipped = {k: v.float() for k, v in self.model(x.flip(-1), tab).items()}
                    out = {k: (v + flipped[k]) / 2 for k, v in out.items()}
            outs.append(
                torch.stack(
                    [out["screen"], torch.sigmoid(out["screen"]), torch.sigmoid(out["severity"]), out["t_score"]], 1
                )
            )
        self.model.train()
        return torch.cat(outs) if outs else torch.zeros(0, 4, device=self.device)

    def val_auprc(self, rows: torch.Tensor) -> tuple[float, float]:
        """(monitored AUPRC, seconds): the 1000-bin histogram AUPRC of the validation rows, as the project monitors."""
        self.sync()
        t0 = time.perf_counter()
        prob = self.predict(rows)[:, 1]
        score = float(average_precision(self.data.y_screen[rows], prob, self.n_bins))
        return score, time.perf_counter() - t0

    # ------------------------------------------------------------------ the two modes

    def schedule(self) -> RecipeSchedule:
        t = self.recipe["train"]
        params = SimpleNamespace(
            lr=float(t["lr"]),
            plateau_factor=float(t["plateau_factor"]),
            plateau_patience=int(t["plateau_patience"]),
            early_stop_patience=int(t["early_stop_patience"]),
            min_epochs=int(t.get("min_epochs", 0)),
        )
        return RecipeSchedule(params)

    def train_sites(self) -> list[str]:
        return [s["name"] for s in self.recipe["federation"]["sites"] if s["role"] == "train"]

    def fit(
        self,
        mode: str,
        budget_s: float,
        max_units: int | None = None,
        on_step: Callable[[], None] | None = None,
        live: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Train ``mode`` from the initial weights until early stopping, the recipe's epochs/rounds, ``max_units``
        of them or the time budget; the model ends at its best epoch/round. Returns the history and the timings.
        ``live`` gets the growing history at once, and ``on_step`` is called every 10 epochs/rounds (a partial
        ``timings.json`` when the machine's time runs out mid-run)."""
        self.reset()
        d = self.data
        schedule = self.schedule()
        fed = self.recipe["federation"]
        if mode == "centralized":  # every training knee and every validation knee, as `strnet train`
            planned = int(self.recipe["train"]["epochs"])
            site_rows = {"all": d.where(split="train")}
            val_rows = d.where(split="val")
            optimizers = {"all": self.optimizer()}
            local_epochs = 1
        else:  # the training sites' own knees; validation pooled over them, as the server pools their counts
            planned = int(fed["rounds"])
            local_epochs = int(fed["local_epochs"])
            site_rows = {s: d.where(split="train", site=s) for s in self.train_sites()}
            val_rows = d.where(split="val", site=self.train_sites())
            optimizers = {s: self.optimizer() for s in site_rows}
        if max_units is not None:
            planned = min(planned, max_units)
        sizes = {s: len(r) for s, r in site_rows.items()}
        if min(sizes.values()) == 0:
            raise SystemExit(f"{mode}: a training site has no training rows ({sizes})")
        global_state = self.snapshot() if mode == "federated" else None
        best_state = self.snapshot()
        history: list[dict[str, Any]] = []
        if live is not None:
            live["history"] = history
        stop = "max_epochs"
        self.sync()
        start = time.perf_counter()
        last = 0.0
        for step in range(planned):
            if step > 0 and time.perf_counter() - start + last > budget_s:
                stop = "budget"
                break
            t_step = time.perf_counter()
            lr = schedule.lr
            train_stats: dict[str, dict[str, Any]] = {}
            states = []
            for i, (site, rows) in enumerate(site_rows.items()):
                if global_state is not None:
                    self.model.load_state_dict(global_state)
                    if not fed["keep_optimizer_state"]:
                        optimizers[site] = self.optimizer()
                for group in optimizers[site].param_groups:
                    group["lr"] = lr
                for e in range(local_epochs):  # the last local epoch's losses; knees, steps and time summed
                    stats = self.train_epoch(optimizers[site], rows, step * local_epochs + e, stream=i)
                    if site in train_stats:
                        for key in ("images", "steps", "seconds"):
                            stats[key] += train_stats[site][key]
                    train_stats[site] = stats
                if global_state is not None:
                    states.append(self.snapshot())
            t_avg = time.perf_counter()
            if global_state is not None:
                global_state = fedavg(states, [sizes[s] for s in site_rows])
                self.model.load_state_dict(global_state)
                self.sync()
            avg_s = time.perf_counter() - t_avg
            score, val_s = self.val_auprc(val_rows)
            improved = schedule.step(score)
            if improved:
                best_state = self.snapshot()
            images = sum(s["images"] for s in train_stats.values())
            train_s = sum(s["seconds"] for s in train_stats.values())
            row = {
                "step": step + 1,
                "lr": lr,
                "val_auprc": score,
                "images": images,
                "optimizer_steps": sum(s["steps"] for s in train_stats.values()),
                "train_s": train_s,
                "val_s": val_s,
                "fedavg_s": avg_s,
                "wall_s": time.perf_counter() - t_step,
                "images_per_s": images / max(train_s, 1e-9),
            }
            for key in ("loss_total", "loss_screen", "loss_severity", "loss_t_score"):
                row[key] = sum(s[key] * s["images"] for s in train_stats.values()) / max(images, 1)
            if len(train_stats) > 1:
                row |= {f"site.{s}.loss_total": v["loss_total"] for s, v in train_stats.items()}
            history.append(row)
            last = row["wall_s"]
            unit = "epoch" if mode == "centralized" else "round"
            self.log(
                f"{mode} {unit} {step + 1}/{planned}: loss {row['loss_total']:.4f} val AUPRC {score:.4f} "
                f"lr {lr:.2g} {row['images_per_s']:.0f} img/s {row['wall_s']:.2f} s" + (" *" if improved else "")
            )
            if on_step is not None and (step + 1) % 10 == 0:
                on_step()
            if schedule.should_stop:
                stop = "early_stopping"
                break
        wall = time.perf_counter() - start
        self.model.load_state_dict(best_state)
        train_s = sum(r["train_s"] for r in history)
        images = sum(r["images"] for r in history)
        return {
            "mode": mode,
            "unit": "epoch" if mode == "centralized" else "round",
            "planned": planned,
            "run": len(history),
            "best": schedule.best_step,
            "best_val_auprc": schedule.best_score,
            "stopped_by": stop,
            "wall_s": wall,
            "train_s": train_s,
            "val_s": sum(r["val_s"] for r in history),
            "fedavg_s": sum(r["fedavg_s"] for r in history),
            "train_images": images,
            "optimizer_steps": sum(r["optimizer_steps"] for r in history),
            "train_images_per_s": images / max(train_s, 1e-9),
            "site_train_sizes": sizes,
            "compiled": self.compiled is not None,
            "history": history,
        }

    def predictions(self) -> tuple[list[dict[str, Any]], float]:
        """Every validation and test row (the hold-out site's included) under the current (best) weights."""
        self.sync()
        t0 = time.perf_counter()
        rows = self.data.where(split=("val", "test"))
        out = self.predict(rows).double().cpu().numpy()
        seconds = time.perf_counter() - t0
        r = self.data.rows
        t_true = self.data.t_score.cpu().tolist()
        table = []
        for j, i in enumerate(rows.tolist()):
            logit, prob, sev, t_pred = (float(v) for v in out[j])
            table.append(
                {k: r[k][i] for k in ("row_id", "site", "source", "split", "label_cls")}
                | {
                    "t_score": t_true[i],
                    "logit_screen": logit,
                    "prob_screen": prob,
                    "prob_severity": sev,
                    "t_pred": t_pred,
                }
            )
        return table, seconds

    # ------------------------------------------------------------------ torch.compile

    def probe_compile(self, planned_steps: int, steps: int = 10) -> dict[str, Any]:
        """Eager and compiled step time on one full batch, and the compile time; ``pays`` when the planned
        full-batch steps save more than the compilation costs. Leaves ``self.compiled`` set (the caller decides)."""
        self.reset()
        opt = self.optimizer()
        rows = self.data.where(split="train")[: self.batch_size]
        if len(rows) < self.batch_size:
            return {"status": f"skipped: fewer than {self.batch_size} training rows"}
        draws = torch.rand(len(rows), N_DRAWS, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        draws = draws.to(self.device)
        pw = torch.tensor(1.0, device=self.device)

        def timed(n: int, compiled: bool) -> float:
            self.sync()
            t0 = time.perf_counter()
            for _ in range(n):
                self.step(opt, rows, draws, pw, epoch=10, compiled=compiled)
            self.sync()
            return (time.perf_counter() - t0) / n

        timed(3, False)  # warm-up (cuDNN autotuning for this shape)
        eager = timed(steps, False)
        self.compiled = torch.compile(self.model)
        first = timed(1, True)  # compiles the forward, then (in its backward) the backward graph
        second = timed(1, True)  # a guard that fails on the second call would recompile here
        compiled = timed(steps, True)
        compile_s = first + second - 2 * compiled
        self.reset()
        saving = eager - compiled
        break_even = compile_s / saving if saving > 0 else math.inf
        return {
            "status": "measured",
            "eager_step_s": eager,
            "compiled_step_s": compiled,
            "speedup": eager / compiled if compiled > 0 else math.nan,
            "compile_s": compile_s,
            "first_compiled_steps_s": [first, second],
            "planned_full_batch_steps": planned_steps,
            "break_even_steps": break_even,
            "pays": bool(saving > 0 and planned_steps * saving > compile_s),
            "rule": "compile when (eager - compiled step time) x planned full-batch steps > compile time",
        }

    def device_checks(self) -> dict[str, float]:
        """The batched augmentation, the AUPRC and FedAvg on this device against the CPU, on the same inputs
        (the CPU versions are the ones the tests compare with the project's, scikit-learn's and Flower's)."""
        gen = torch.Generator().manual_seed(0)
        idx = self.data.where(split="train")[:8]
        x = self.data.images.index_select(0, idx).float().div_(255.0)
        draws = torch.rand(len(idx), N_DRAWS, generator=gen, dtype=torch.float64)
        on_device = augment_batch(x, draws.to(self.device), self.augment).cpu()
        on_cpu = augment_batch(x.cpu(), draws, self.augment)
        y = (torch.rand(500, generator=gen) < 0.6).double()
        scores = torch.rand(500, generator=gen).float()
        ap = [
            float(average_precision(y.to(dev), scores.to(dev), n_bins))
            for dev in (self.device, torch.device("cpu"))
            for n_bins in (None, self.n_bins)
        ]
        shifted = {k: v + 1 if v.is_floating_point() else v + 3 for k, v in self.init_state.items()}
        states = [self.init_state, shifted]
        mean_dev = fedavg(states, [228, 118])
        mean_cpu = fedavg([{k: v.cpu() for k, v in st.items()} for st in states], [228, 118])
        return {
            "augment_max_abs_vs_cpu": float((on_device - on_cpu).abs().max()),
            "auprc_abs_vs_cpu": max(abs(ap[0] - ap[2]), abs(ap[1] - ap[3])),
            "fedavg_max_abs_vs_cpu": max(float((mean_dev[k].cpu() - v).abs().max()) for k, v in mean_cpu.items()),
        }

    def planned_full_steps(self, modes: Sequence[str]) -> int:
        total = 0
        fed = self.recipe["federation"]
        for mode in modes:
            if mode == "centralized":
                sizes = [len(self.data.where(split="train"))]
                units = int(self.recipe["train"]["epochs"])
            else:
                sizes = [len(self.data.where(split="train", site=s)) for s in self.train_sites()]
                units = int(fed["rounds"]) * int(fed["local_epochs"])
            per_epoch = [n // self.batch_size for n in sizes]
            if self.max_steps is not None:
                per_epoch = [min(k, int(self.max_steps)) for k in per_epoch]
            total += units * sum(per_epoch)
        return total


# ---------------------------------------------------------------------------------------------- run


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "device": str(device),
        "card": "cpu",
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env |= {
            "card": torch.cuda.get_device_name(device),
            "capability": ".".join(map(str, torch.cuda.get_device_capability(device))),
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "bf16_supported": torch.cuda.is_bf16_supported(),
        }
    return env


def _plain(obj: Any) -> Any:
    """JSON without NaN/Infinity (null instead), so any reader parses it."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(_plain(data), indent=1))
    tmp.replace(path)


PRED_COLUMNS = (
    "row_id",
    "site",
    "source",
    "split",
    "label_cls",
    "t_score",
    "logit_screen",
    "prob_screen",
    "prob_severity",
    "t_pred",
)


def write_predictions(path: Path, table: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=PRED_COLUMNS)
        writer.writeheader()
        for row in table:
            writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
    tmp.replace(path)


def compile_phase(trainer: Trainer, args: argparse.Namespace, modes: list[str], remaining: float) -> dict[str, Any]:
    """The torch.compile probe and decision; ``modes`` are the runs still to come (none: measured only)."""
    if trainer.device.type != "cuda" and args.compile == "auto":
        return {"status": "skipped: no GPU", "used": False}
    if remaining < args.probe_s:
        return {"status": f"skipped: {remaining:.0f} s left, the probe needs {args.probe_s:.0f}", "used": False}
    try:
        probe = trainer.probe_compile(trainer.planned_full_steps(modes or list(MODES)))
    except Exception as exc:  # no compiler on the machine, an inductor bug: train eagerly
        torch._dynamo.reset()
        trainer.reset()
        trainer.compiled = None
        return {"status": f"failed: {type(exc).__name__}: {str(exc)[:1000]}", "used": False}
    use = bool(modes) and probe["status"] == "measured" and (probe["pays"] if args.compile == "auto" else True)
    if not use:
        trainer.compiled = None
    return probe | {"used": use} | ({} if modes else {"note": "probed after the runs: measured, not used"})


def run(args: argparse.Namespace) -> dict[str, Any]:
    t_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_file = (out / "progress.log").open("a")

    def log(msg: str) -> None:
        line = f"[{time.perf_counter() - t_start:7.1f}s] {msg}"
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = sorted(set(phases) - set(PHASES))
    if unknown:
        raise SystemExit(f"--phases: unknown {unknown}; valid: {', '.join(PHASES)}")
    data = Data(Path(args.data), device, args.decode)
    recipe = apply_sets(data.recipe, [*args.set, *([f"model.weights={args.weights}"] if args.weights else [])])
    check_recipe(recipe)
    weights = recipe["model"]["weights"]
    timings: dict[str, Any] = {
        "script": "simulations/paper_gpu.py",
        "env": environment(device),
        "init": "random" if weights == "none" else "imagenet",
        "weights": weights,
        "precision": None,
        "channels_last": bool(recipe["train"]["channels_last"]),
        "budget_s": args.budget_s,
        "phase_caps_s": {
            "smoke": args.smoke_s,
            "probe_needs": args.probe_s,
            "centralized": args.centralized_s,
            "federated": args.federated_s,
        },
        "phases": phases,
        "data": data.timing | {k: data.meta[k] for k in ("encoding", "quality", "size", "n_rows", "quantisation")},
        "transport": "none: the sites' states are averaged in this process at full precision (fp32)",
        "recipe": recipe,
    }
    log(
        f"{timings['env']['card']} torch {torch.__version__}: {data.n} knees decoded on {data.decoded_on} "
        f"in {data.timing['decode_s']:.2f} s ({data.timing['image_bytes_on_device'] / 2**20:.0f} MiB uint8)"
    )
    trainer = Trainer(data, recipe, device, log)
    timings["precision"] = "bf16 autocast" if trainer.amp_dtype is not None else "fp32"
    timings["model"] = {
        "backbone": recipe["model"]["backbone"],
        "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
    }
    path = out / "timings.json"

    def save() -> None:
        timings["wall_s"] = time.perf_counter() - t_start
        if device.type == "cuda":
            timings["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        write_json(path, timings)

    def remaining() -> float:
        return args.budget_s - (time.perf_counter() - t_start)

    save()
    failed: list[str] = []

    def failure(phase: str, exc: BaseException) -> None:
        """A phase that fails is recorded with its traceback; the next phase still runs."""
        failed.append(phase)
        timings.setdefault(phase, {})["error"] = "".join(traceback.format_exception(exc))[-4000:]
        log(f"{phase} FAILED: {type(exc).__name__}: {exc}")
        save()

    if args.compile == "off":
        timings["compile"] = {"status": "off (--compile off)", "used": False}
    for i, phase in enumerate(phases):  # in the order given
        if phase == "smoke":
            t0 = time.perf_counter()
            try:
                checks = trainer.device_checks()
                log(f"device checks: {json.dumps(checks)}")
                smoke = {m: trainer.fit(m, budget_s=min(args.smoke_s, remaining()), max_units=1) for m in MODES}
                _, pred_s = trainer.predictions()
                timings["smoke"] = {"wall_s": time.perf_counter() - t0, "predict_s": pred_s, "checks": checks, **smoke}
                log(f"smoke: one epoch and one round in {timings['smoke']['wall_s']:.1f} s")
                save()
            except Exception as exc:
                failure("smoke", exc)
        elif phase == "probe" and args.compile != "off":
            timings["compile"] = compile_phase(trainer, args, [m for m in phases[i + 1 :] if m in MODES], remaining())
            log(f"compile probe: {json.dumps(_plain(timings['compile']))}")
            save()
        elif phase in MODES:
            cap = args.centralized_s if phase == "centralized" else args.federated_s
            budget = min(cap, remaining() - args.reserve_s)
            if budget <= 0:
                timings[phase] = {"status": f"skipped: no time left ({remaining():.0f} s)"}
                save()
                continue
            log(f"{phase}: up to {budget:.0f} s")
            timings[phase] = {"status": "running"}
            try:
                result = trainer.fit(phase, budget_s=budget, on_step=save, live=timings[phase])
                table, pred_s = trainer.predictions()
                write_predictions(out / f"predictions_{phase}.csv", table)
            except Exception as exc:
                failure(phase, exc)
                continue
            timings[phase] = result | {"predict_s": pred_s, "n_predictions": len(table)}
            log(
                f"{phase}: {result['run']} {result['unit']}s in {result['wall_s']:.1f} s "
                f"({result['train_images_per_s']:.0f} img/s training), best {result['unit']} {result['best']} "
                f"(val AUPRC {result['best_val_auprc']:.4f}), stopped by {result['stopped_by']}"
            )
            save()
    timings["failed_phases"] = failed
    log(f"done in {time.perf_counter() - t_start:.1f} s" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    save()
    log_file.close()
    return timings


# ---------------------------------------------------------------------------------------------- export (project)


def export(
    config: str,
    out: Path,
    *,
    overrides: Sequence[str] = (),
    manifest: str | None = None,
    cache_dir: str | None = None,
    quality: int = 95,
    workers: int = 1,
) -> dict[str, Any]:
    """Resolve ``config``, preprocess its manifest rows with the project's cache, write the one data file.

    ``quality`` 1-100: JPEG at that quality; 0: lossless PNG. Rows whose file cannot be read are left out (named).
    Returns the metadata written (size, quantisation and compression error on the [0, 1] scale).
    """
    import pandas as pd
    from torchvision.io import ImageReadMode, decode_jpeg, decode_png, encode_jpeg, encode_png

    from configs import load_config
    from strnet.data.cache import CODE_VERSION, PreprocessCache
    from strnet.data.dataset import encode_tabular
    from strnet.data.manifest import read_manifest, screening_target, severity_target
    from strnet.errors import DataError

    t0 = time.perf_counter()
    cfg = load_config(config, list(overrides))
    manifests = [manifest] if manifest else list(cfg.data.manifests)
    if not manifests:
        raise SystemExit(f"{config}: no data.manifests; pass --manifest")
    df = pd.concat([read_manifest(m) for m in manifests], ignore_index=True)
    cache = PreprocessCache(Path(cache_dir or cfg.data.cache_dir))
    params = cfg.preprocess
    problems = cache.warm(df, params, workers=workers)
    prep_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    encoded, keep = [], []
    err = {"uint8_sum": 0.0, "uint8_max": 0.0, "stored_sum": 0.0, "stored_max": 0.0, "pixels": 0}
    for i, (path, side) in enumerate(zip(df["path"], df["side"], strict=True)):
        try:
            img = cache.get(path, side, params)
        except DataError:  # named in problems by warm()
            continue
        u8 = torch.from_numpy(np.rint(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8))[None]
        enc = encode_jpeg(u8, quality=quality) if quality else encode_png(u8, compression_level=9)
        dec = decode_jpeg(enc, mode=ImageReadMode.GRAY) if quality else decode_png(enc, mode=ImageReadMode.GRAY)
        for name, approx in (("uint8", u8), ("stored", dec)):
            diff = np.abs(approx[0].numpy().astype(np.float64) / 255.0 - img)
            err[f"{name}_sum"] += float(diff.sum())
            err[f"{name}_max"] = max(err[f"{name}_max"], float(diff.max()))
        err["pixels"] += img.size
        encoded.append(enc)
        keep.append(i)
    for line in problems:
        print(f"skipped: {line}", flush=True)
    df = df.iloc[keep].reset_index(drop=True)
    offsets = np.cumsum([0, *(len(e) for e in encoded)])
    quantisation = {
        "uint8_mean_abs": err["uint8_sum"] / max(err["pixels"], 1),
        "uint8_max_abs": err["uint8_max"],
        "stored_mean_abs": err["stored_sum"] / max(err["pixels"], 1),
        "stored_max_abs": err["stored_max"],
        "scale": "[0, 1] preprocessed intensity, against the cache's values",
    }
    meta = {
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "config": config,
        "overrides": list(overrides),
        "manifests": manifests,
        "n_rows": len(df),
        "size": params.size,
        "encoding": "jpeg" if quality else "png",
        "quality": quality,
        "quantisation": quantisation,
        "preprocess": params.to_dict(),
        "preprocess_fingerprint": params.fingerprint(),
        "cache_code_version": CODE_VERSION,
        "skipped": problems,
        "encoded_mib": float(offsets[-1] / 2**20),
    }
    rows = {
        "row_id": [f"{p}|{s}" for p, s in zip(df["path"], df["side"], strict=True)],
        "site": df["site"].astype(str).tolist(),
        "source": df["source"].astype(str).tolist(),
        "split": df["split"].astype(str).tolist(),
        "label_cls": df["label_cls"].astype(str).tolist(),
    }
    tab = [encode_tabular(a, s, b) for a, s, b in zip(df["age"], df["sex"], df["bmi"], strict=True)]
    # numpy's .npz (no pickle): readable by any numpy on the GPU machine, whatever its torch version
    arrays = {
        "format": np.array(FORMAT),
        "meta": np.array(json.dumps(meta)),
        "recipe": np.array(json.dumps(cfg.to_dict())),
        **{f"rows_{k}": np.array(v, dtype=str) for k, v in rows.items()},
        "encoded": np.frombuffer(b"".join(e.numpy().tobytes() for e in encoded), np.uint8),
        "offsets": offsets.astype(np.int64),
        "y_screen": np.array([screening_target(c) for c in df["label_cls"]], np.float32),
        "y_severity": np.array([severity_target(c) for c in df["label_cls"]], np.float32),
        "t_score": df["t_score"].to_numpy(np.float32),
        "tabular": np.stack(tab) if tab else np.zeros((0, 3), np.float32),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("wb") as fh:
        np.savez(fh, **arrays)
    tmp.replace(out)
    meta |= {"file": str(out), "file_mib": out.stat().st_size / 2**20, "preprocess_s": prep_s}
    meta["encode_s"] = time.perf_counter() - t1
    return meta


# ---------------------------------------------------------------------------------------------- report (project)


def _predictions(frame: Any) -> dict[str, np.ndarray]:
    """A predictions CSV as the arrays :mod:`strnet.scoring` reads (with each knee's radiograph and side)."""
    import pandas as pd

    from strnet.data.manifest import screening_target, severity_target
    from strnet.sufficient import SIDE_CODES

    label = frame["label_cls"].fillna("").astype(str)
    path = frame["row_id"].astype(str).str.rsplit("|", n=1).str[0]
    side = frame["row_id"].astype(str).str.rsplit("|", n=1).str[1]
    film, _ = pd.factorize(path.str.lower())
    return {
        "film": np.asarray(film, np.int64),
        "side": side.map(SIDE_CODES).fillna(0).to_numpy(np.int64),
        "y_screen": label.map(screening_target).to_numpy(float),
        "logit_screen": frame["logit_screen"].to_numpy(float),
        "prob_screen": frame["prob_screen"].to_numpy(float),
        "y_severity": label.map(severity_target).to_numpy(float),
        "prob_severity": frame["prob_severity"].to_numpy(float),
        "t_true": pd.to_numeric(frame["t_score"], errors="coerce").to_numpy(float),
        "t_pred": frame["t_pred"].to_numpy(float),
    }


def mode_metrics(frame: Any, recipe: dict[str, Any], n_boot: int) -> dict[str, Any]:
    """τ* and per-cohort metrics for one mode's predictions, as the project finishes a run: Platt scaling fitted on
    the validation logits, τ* by the paper's rule on the calibrated validation scores, then every cohort at τ*."""
    from strnet.calibration import Platt, calibrated, fit_platt_to_logits, labelled_logits
    from strnet.scoring import evaluation_metrics
    from strnet.sufficient import ValidationCounts

    th = recipe["threshold"]
    grid = np.round(np.arange(th["grid_start"], th["grid_stop"] + th["grid_step"] / 2, th["grid_step"]), 6)
    n_bins, seed = int(th["histogram_bins"]), int(recipe["seed"])
    val = frame[frame["split"] == "val"].reset_index(drop=True)
    val_raw = _predictions(val)
    calibration = fit_platt_to_logits(*labelled_logits(val_raw))
    platt = Platt.from_dict(calibration)
    counts = ValidationCounts.from_predictions(calibrated(val_raw, platt), grid=grid, n_bins=n_bins)
    threshold = counts.threshold(grid, float(th["min_sensitivity"]))
    tau = float(threshold["value"])
    roles = {s["name"]: s["role"] for s in recipe["federation"]["sites"]}
    train_sites = [s for s, r in roles.items() if r == "train"]
    cohorts: dict[str, Any] = {"val (pooled)": val, "test (pooled training sites)": None}
    test = frame[frame["split"] == "test"]
    cohorts["test (pooled training sites)"] = test[test["site"].isin(train_sites)]
    for site in sorted(set(frame["site"])):
        part = test[test["site"] == site]
        if len(part):
            cohorts[f"test {site} ({roles.get(site, 'external')})"] = part
    for source in sorted(set(test["source"])):
        part = test[test["source"] == source]
        if len(part):
            cohorts[f"test source {source}"] = part
    results = {}
    for name, part in cohorts.items():
        part = part.reset_index(drop=True)
        if not len(part):
            continue
        preds = calibrated(_predictions(part), platt)
        metrics, _ = evaluation_metrics(preds, tau, n_bins=n_bins, n_boot=n_boot, seed=seed)
        results[name] = metrics
    return {"calibration": calibration, "threshold": threshold, "cohorts": results}


def _ci(m: dict[str, Any], key: str) -> str:
    value, lo, hi = m.get(key), m.get(f"{key}_ci_lo"), m.get(f"{key}_ci_hi")
    if value is None or not math.isfinite(value):
        return "n/a"
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return f"{value:.3f}"
    return f"{value:.3f} ({lo:.3f}–{hi:.3f})"


def report(results: Path, out: Path, n_boot: int) -> Path:
    import pandas as pd

    timings = json.loads((results / "timings.json").read_text())
    recipe = timings["recipe"]
    env = timings["env"]
    lines = [
        "# The paper recipe on one GPU",
        "",
        f"{env.get('card')} · torch {env.get('torch')} · torchvision {env.get('torchvision')} · Python "
        f"{env.get('python')} · init **{timings['init']}** · {timings['precision']} · channels-last "
        f"{timings['channels_last']} · {timings['model']['backbone']} at {timings['data']['size']}² · total wall "
        f"{timings.get('wall_s', float('nan')):.0f} s",
        "",
    ]
    summary: dict[str, Any] = {"timings": timings, "modes": {}}
    metric_rows = []
    for mode in MODES:
        path = results / f"predictions_{mode}.csv"
        if not path.exists():
            lines.append(f"*{mode}: no predictions ({(timings.get(mode) or {}).get('status', 'not run')})*")
            continue
        frame = pd.read_csv(path, dtype={"label_cls": str, "site": str, "split": str, "source": str})
        frame["label_cls"] = frame["label_cls"].fillna("")
        m = mode_metrics(frame, recipe, n_boot)
        summary["modes"][mode] = m
        t, cal = m["threshold"], m["calibration"]
        lines.append(
            f"- **{mode}**: τ* = {t['value']:.2f} ({t['rule']}; validation sensitivity {t['sensitivity']:.3f}, "
            f"specificity {t['specificity']:.3f}) on Platt-calibrated validation scores (a = {cal['a']:.3f}, "
            f"b = {cal['b']:.3f}: {cal['status']})"
        )
        for cohort, c in m["cohorts"].items():
            metric_rows.append(
                f"| {mode} | {cohort} | {int(c['screening_n'])} ({int(c['screening_n_pos'])}+) | "
                f"{_ci(c, 'screening_auroc')} | {_ci(c, 'screening_sensitivity')} | {_ci(c, 'screening_specificity')} "
                f"| {_ci(c, 'radiograph_auroc')} | {_ci(c, 't_score_mae')} |"
            )
    lines += [
        "",
        "| mode | cohort | knees (bone loss) | AUROC (95 % CI) | sensitivity at τ* | specificity at τ* | "
        "radiograph AUROC | T-score MAE |",
        "|---|---|---|---|---|---|---|---|",
        *metric_rows,
        "",
        "## Timings",
        "",
        "| phase | epochs/rounds run (best) | stopped by | knees seen (optimizer steps) | wall s | training s | "
        "img/s (training) | validation s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode in MODES:
        r = timings.get(mode) or {}
        if "run" not in r:
            continue
        lines.append(
            f"| {mode} | {r['run']} / {r['planned']} ({r['best']}) | {r['stopped_by']} | {r['train_images']} "
            f"({r['optimizer_steps']}) | {r['wall_s']:.1f} | "
            f"{r['train_s']:.1f} | {r['train_images_per_s']:.0f} | {r['val_s']:.1f} |"
        )
    d = timings["data"]
    lines += [
        "",
        f"- data: {d['n_rows']} knees, {d['file_bytes'] / 2**20:.1f} MiB file ({d['encoding']} q{d['quality']}), "
        f"decoded on {d['decoded_on']} in {d['decode_s']:.2f} s; stored error on [0, 1]: mean "
        f"{d['quantisation']['stored_mean_abs']:.4f}, max {d['quantisation']['stored_max_abs']:.4f}",
    ]
    c = timings.get("compile") or {}
    if c.get("status") == "measured":
        lines.append(
            f"- torch.compile: eager step {c['eager_step_s'] * 1000:.1f} ms, "
            f"compiled {c['compiled_step_s'] * 1000:.1f} ms "
            f"({c['speedup']:.2f}x), compile {c['compile_s']:.1f} s, break-even after "
            f"{c['break_even_steps']:.0f} steps of {c['planned_full_batch_steps']} planned: "
            f"pays {'yes' if c['pays'] else 'no'}, **{'used' if c['used'] else 'not used'}**"
        )
    elif c:
        lines.append(f"- torch.compile: {c.get('status')} (used: {c.get('used')})")
    if "smoke" in timings:
        lines.append(f"- smoke (one epoch + one round, eager, first shapes): {timings['smoke']['wall_s']:.1f} s")
    if "peak_gpu_memory_gib" in timings:
        lines.append(f"- peak GPU memory {timings['peak_gpu_memory_gib']:.1f} GiB")
    out.mkdir(parents=True, exist_ok=True)
    md = out / "report.md"
    md.write_text("\n".join(lines) + "\n")
    write_json(out / "report.json", summary)
    return md


# ---------------------------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.paper_gpu", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="(here) preprocess the manifest's knees and write the one data file")
    ex.add_argument("--config", default="paper-gpu")
    ex.add_argument("--set", action="append", default=[], help="config override key=value (repeatable)")
    ex.add_argument("--manifest", default=None, help="instead of the config's data.manifests")
    ex.add_argument("--cache-dir", default=None, help="instead of the config's data.cache_dir")
    ex.add_argument("--quality", type=int, default=95, help="JPEG quality 1-100; 0 = lossless PNG")
    ex.add_argument("--workers", type=int, default=1)
    ex.add_argument("--out", default=".gpu/paper-gpu.npz")
    rn = sub.add_parser("run", help="(GPU) train both modes; needs only torch, torchvision and numpy")
    rn.add_argument("--data", default=".gpu/paper-gpu.npz")
    rn.add_argument("--out", required=True)
    rn.add_argument("--device", default=None, help="default: cuda when available")
    rn.add_argument("--phases", default="smoke,probe,centralized,federated")
    rn.add_argument("--compile", choices=("auto", "on", "off"), default="auto")
    rn.add_argument("--decode", choices=("cpu", "cuda"), default="cpu", help="where the JPEGs are decoded")
    rn.add_argument("--weights", default=None, help="a local torchvision ResNet-50 state dict (else the recipe's)")
    rn.add_argument("--set", action="append", default=[], help="recipe override key=value (JSON value)")
    rn.add_argument("--budget-s", type=float, default=540.0, help="the whole run's wall-time budget")
    rn.add_argument("--smoke-s", type=float, default=20.0)
    rn.add_argument("--probe-s", type=float, default=150.0, help="start the compile probe only with this much left")
    rn.add_argument("--centralized-s", type=float, default=200.0, help="cap on the centralized phase")
    rn.add_argument("--federated-s", type=float, default=300.0, help="cap on the federated phase")
    rn.add_argument("--reserve-s", type=float, default=5.0, help="kept free at the end of the budget")
    rp = sub.add_parser("report", help="(here) τ*, metrics with intervals and timings from run's outputs")
    rp.add_argument("--results", required=True)
    rp.add_argument("--out", default=None, help="default: runs/paper-gpu/<results folder name>")
    rp.add_argument("--bootstrap", type=int, default=2000)
    args = parser.parse_args(argv)
    if args.command == "export":
        meta = export(
            args.config,
            Path(args.out),
            overrides=args.set,
            manifest=args.manifest,
            cache_dir=args.cache_dir,
            quality=args.quality,
            workers=args.workers,
        )
        print(json.dumps({k: meta[k] for k in ("file", "file_mib", "n_rows", "encoding", "quality", "quantisation")}))
        print(f"preprocess {meta['preprocess_s']:.1f} s, encode {meta['encode_s']:.1f} s", flush=True)
    elif args.command == "run":
        if run(args)["failed_phases"]:
            return 1
    else:
        results = Path(args.results)
        md = report(results, Path(args.out or Path("runs/paper-gpu") / results.name), args.bootstrap)
        print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
