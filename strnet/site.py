"""One federation member's work, framework-free (MONAI ``ClientAlgo`` style): train, validate, evaluate frozen.

The Flower ClientApp only translates Messages into these calls, so everything a hospital node computes is
testable without Flower and runs the same engine as ``strnet train``. What leaves a site is deliberately
narrow: weights, a few scalars, and additive count arrays (score histograms, confusion counts on the τ
grid, T-score sums). No per-image score, path or id is ever returned.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from configs.schema import Config
from strnet import metrics as M
from strnet.data.cache import PreprocessCache
from strnet.data.dataset import screening_pos_weight
from strnet.data.manifest import read_manifest
from strnet.engine import (
    EngineSettings,
    autocast_dtype,
    build_optimizer,
    make_loader,
    predict_loader,
    resolve_device,
    seed_everything,
    task_metrics,
    train_one_epoch,
)
from strnet.errors import DataError
from strnet.losses import MultiTaskLoss
from strnet.model import build_strnet
from strnet.training import engine_settings, warm_cache

ROLES = ("train", "external")
TSCORE_SUM_KEYS = ("t_n", "t_sum_x", "t_sum_y", "t_sum_xx", "t_sum_yy", "t_sum_xy", "t_sum_abs_err", "t_sum_sq_err")
# task_metrics() prefixes -> the names the centralized run logs (strnet.evaluation.flat_metrics), so that
# ``strnet compare`` lines the two modes up by name.
_PREFIXES = {"screen_": "screening_", "severity_": "severity_", "tscore_": "t_score_"}


def threshold_grid(cfg: Config) -> np.ndarray:
    """The τ grid every site and the server share (built exactly as the centralized run builds it)."""
    return np.asarray(engine_settings(cfg).threshold_grid, dtype=np.float64)


def site_seed(seed: int, site: str) -> int:
    """A stable per-site seed (crc32, not hash(): Python salts str hashes per process)."""
    return int(seed) + zlib.crc32(site.encode()) % 100_003


class SiteRunner:
    """A site's data and model; keeps its optimizer across rounds (AdamW moments are local state, not shared)."""

    def __init__(
        self,
        config: Config,
        site_name: str,
        manifest_path: str | Path,
        *,
        role: str = "train",
        device: torch.device | None = None,
    ) -> None:
        if role not in ROLES:
            raise ValueError(f"site {site_name}: role {role!r} is not one of {ROLES}")
        self.cfg = config
        self.site = site_name
        self.role = role
        self.manifest_path = Path(manifest_path)
        self.settings: EngineSettings = engine_settings(config)
        self.grid = threshold_grid(config)
        self.device = device or resolve_device()
        self.amp_dtype = autocast_dtype(self.settings.train.precision, self.device)
        self.seed = site_seed(config.seed, site_name)
        df = read_manifest(self.manifest_path)
        self.cache = PreprocessCache(Path(config.data.cache_dir))
        self.df, self.problems = warm_cache(df, config, self.cache)
        self.splits = {
            name: self.df[self.df["split"] == name].reset_index(drop=True) for name in ("train", "val", "test")
        }
        if role == "train" and self.splits["train"].empty:
            raise DataError(self.manifest_path, f"site {site_name}: no usable train rows (run `strnet data split`)")
        self.model = build_strnet(
            backbone=config.model.backbone,
            weights="none",  # the server's weights overwrite every parameter; never touch the disk or network here
            neck_dim=config.model.neck_dim,
            dropout=config.model.dropout,
        ).to(self.device)
        if self.settings.train.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(self.model, self.settings)
        self.loss_fn = MultiTaskLoss(pos_weight=screening_pos_weight(self.splits["train"]), weights=config.loss).to(
            self.device
        )

    # ------------------------------------------------------------------------------------------------ helpers

    def info(self) -> dict[str, Any]:
        """Counts only (the server's node -> site map and the data summary)."""
        labelled = self.df["label_cls"] != ""
        return {
            "site": self.site,
            "role": self.role,
            "n_rows": len(self.df),
            "n_labelled": int(labelled.sum()),
            "n_train": len(self.splits["train"]),
            "n_val": len(self.splits["val"]),
            "n_test": len(self.splits["test"]),
            "n_skipped_images": len(self.problems),
        }

    def evaluation_frame(self) -> pd.DataFrame:
        """Test split for a training site; the whole cohort for an external one (it never trained on it)."""
        return self.df.reset_index(drop=True) if self.role == "external" else self.splits["test"]

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state_dict)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}

    def optimizer_state(self) -> bytes:
        buf = io.BytesIO()
        torch.save(self.optimizer.state_dict(), buf)
        return buf.getvalue()

    def load_optimizer_state(self, blob: bytes) -> None:
        self.optimizer.load_state_dict(torch.load(io.BytesIO(blob), map_location=self.device, weights_only=True))

    def _predict(self, df: pd.DataFrame) -> dict[str, np.ndarray]:
        loader = make_loader(
            df,
            self.cfg.preprocess,
            self.cache,
            batch_size=self.settings.train.eval_batch_size,
            augment=None,
            shuffle=False,
            seed=self.seed,
            num_workers=self.settings.num_workers,
        )
        return predict_loader(
            self.model,
            loader,
            device=self.device,
            amp_dtype=self.amp_dtype,
            channels_last=self.settings.train.channels_last,
        )

    # ------------------------------------------------------------------------------------------------ tasks

    def train(
        self, state_dict: dict[str, torch.Tensor], epochs: int, round: int
    ) -> tuple[dict[str, torch.Tensor], dict[str, float], int]:
        """``epochs`` local epochs from the global weights; warm-up counts global epochs (round-1)*epochs + e.

        Returns the new weights, the last epoch's mean losses and the FedAvg weight (train-split size).
        """
        if self.role != "train":
            raise ValueError(f"site {self.site} is an external site: it evaluates only, it does not train")
        if epochs < 1 or round < 1:
            raise ValueError(f"site {self.site}: epochs ({epochs}) and round ({round}) must be >= 1")
        self.load_weights(state_dict)
        seed_everything(self.seed + round)
        loader = make_loader(
            self.splits["train"],
            self.cfg.preprocess,
            self.cache,
            batch_size=self.settings.train.batch_size,
            augment=self.cfg.augment,
            shuffle=True,
            seed=self.seed + round,
            num_workers=self.settings.num_workers,
        )
        stats: dict[str, float] = {}
        seconds = 0.0
        for e in range(epochs):
            global_epoch = (round - 1) * epochs + e
            stats = train_one_epoch(
                self.model,
                loader,
                self.loss_fn,
                self.optimizer,
                epoch=global_epoch,
                device=self.device,
                amp_dtype=self.amp_dtype,
                channels_last=self.settings.train.channels_last,
                grad_clip=self.settings.train.grad_clip,
                max_steps=self.settings.train.max_steps_per_epoch,
                progress=False,
                desc=f"{self.site} train",
            )
            seconds += stats["seconds"]
        metrics = {k: float(v) for k, v in stats.items() if k.startswith("loss_")}
        metrics.update(
            train_seconds=seconds,
            images_per_s=float(stats.get("images_per_s", 0.0)),
            last_global_epoch=float((round - 1) * epochs + epochs - 1),
        )
        return self.state_dict(), metrics, len(self.splits["train"])

    def validation_statistics(self, state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Additive statistics of the validation split for the pooled τ* and pooled AUROC/AUPRC.

        ``hist`` (2, histogram_bins) score counts per class and ``tp/fp/tn/fn`` at every grid threshold, plus
        this site's own AUROC/AUPRC (reported beside the pooled values, never averaged into them).
        """
        self.load_weights(state_dict)
        preds = self._predict(self.splits["val"])
        y, p = _labelled(preds)
        hist = histogram(y, p, self.cfg.threshold.histogram_bins)
        counts = confusion(y, p, self.grid)
        own: dict[str, Any] = {"auroc": float("nan"), "auprc": float("nan")}
        if len(y):
            own = M.classification_metrics(y, p, 0.5)  # nan where a class is absent
        return {
            "hist": hist,
            **{k: counts[k] for k in ("tp", "fp", "tn", "fn")},
            "n_val": len(y),
            "site_auroc": float(own["auroc"]),
            "site_auprc": float(own["auprc"]),
        }

    def evaluate_frozen(self, state_dict: dict[str, torch.Tensor], threshold: float) -> dict[str, Any]:
        """Frozen evaluation at the pooled τ*: no update, aggregate metrics plus additive counts for pooling."""
        self.load_weights(state_dict)
        df = self.evaluation_frame()
        preds = self._predict(df)
        out: dict[str, Any] = {"n_eval": len(df), "threshold": float(threshold)}
        for key, value in task_metrics(preds, threshold).items():
            for old, new in _PREFIXES.items():
                if key.startswith(old):
                    key = new + key[len(old) :]
                    break
            out[key] = float(value)
        y, p = _labelled(preds)
        bins = self.cfg.threshold.histogram_bins
        out["hist"] = histogram(y, p, bins)
        at_tau = confusion(y, p, [threshold])
        out.update({k: int(at_tau[k][0]) for k in ("tp", "fp", "tn", "fn")})
        sev = ~np.isnan(preds["y_severity"])
        out["severity_hist"] = histogram(preds["y_severity"][sev].astype(int), preds["prob_severity"][sev], bins)
        out.update(tscore_sums(preds["t_true"], preds["t_pred"]))
        return out


def _labelled(preds: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    known = ~np.isnan(preds["y_screen"])
    return preds["y_screen"][known].astype(np.int64), preds["prob_screen"][known]


def histogram(y: np.ndarray, p: np.ndarray, n_bins: int) -> np.ndarray:
    """Score histogram; all zeros for an empty split (a site may have no validation or test cases)."""
    return M.score_histogram(y, p, n_bins=n_bins) if len(y) else np.zeros((2, n_bins), np.int64)


def confusion(y: np.ndarray, p: np.ndarray, grid: Any) -> dict[str, np.ndarray]:
    """Confusion counts on the grid; all zeros for an empty split, so it still sums correctly."""
    if len(y):
        return M.confusion_at_thresholds(y, p, grid)
    zeros = np.zeros(len(np.asarray(grid)), np.int64)
    return {k: zeros.copy() for k in ("tp", "fp", "tn", "fn")}


def tscore_sums(t_true: np.ndarray, t_pred: np.ndarray) -> dict[str, float]:
    """Sufficient statistics for pooled MAE, RMSE and Pearson r (sums over cases with a reference T-score)."""
    x = np.asarray(t_true, dtype=np.float64)
    y = np.asarray(t_pred, dtype=np.float64)
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]
    d = y - x
    values = (len(x), x.sum(), y.sum(), (x * x).sum(), (y * y).sum(), (x * y).sum(), np.abs(d).sum(), (d * d).sum())
    return {k: float(v) for k, v in zip(TSCORE_SUM_KEYS, values, strict=True)}


def encode_statistics(values: dict[str, Any]) -> dict[str, Any]:
    """numpy scalars/arrays -> plain ints/floats/lists (a Flower MetricRecord's value types).

    The one wire format between sites and server: a (2, n) histogram travels as ``<name>_neg`` /
    ``<name>_pos`` lists. Framework-free so the client can encode and the server decode without either
    importing the other.
    """
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, np.ndarray) and value.ndim == 2:
            out[f"{key}_neg"] = _plain(value[0])
            out[f"{key}_pos"] = _plain(value[1])
        else:
            out[key] = _plain(value)
    return out


def decode_statistics(record: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`encode_statistics` (histograms re-stacked; lists become arrays)."""
    out: dict[str, Any] = {k: (np.asarray(v) if isinstance(v, list) else v) for k, v in record.items()}
    for key in [k[: -len("_neg")] for k in list(out) if k.endswith("_neg")]:
        if f"{key}_pos" in out:
            neg, pos = out.pop(f"{key}_neg"), out.pop(f"{key}_pos")
            out[key] = [neg, pos] if np.shape(neg) != np.shape(pos) else np.stack([neg, pos])
    return out


def _plain(value: Any) -> int | float | list[int] | list[float]:
    arr = np.asarray(value)
    if arr.ndim == 0:
        return int(arr) if np.issubdtype(arr.dtype, np.integer) else float(arr)
    if np.issubdtype(arr.dtype, np.integer):
        return [int(v) for v in arr.ravel()]
    return [float(v) for v in arr.ravel()]
