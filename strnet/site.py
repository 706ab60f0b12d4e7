"""One federation member's work, framework-free (MONAI ``ClientAlgo`` style): train, validate, evaluate frozen.

The Flower ClientApp only translates Messages into these calls, so everything a hospital node computes is
testable without Flower and runs the same engine as ``strnet train``. What leaves a site is deliberately
narrow: weights, a few scalars, and the additive counts of :mod:`strnet.sufficient`. No per-image score, path
or id is ever returned.

Nothing here outlives a call except the warmed cases (:func:`site_cases`, cached per manifest and
preprocessing): the optimizer state and the round travel in and out explicitly, so the node keeps them in
its own run state.
"""

from __future__ import annotations

import copy
import functools
import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from configs.schema import Config, build_model
from strnet import batchnorm
from strnet.calibration import Platt, calibrated, labelled_logits
from strnet.cases import warm_cache
from strnet.data.cache import PreprocessCache
from strnet.data.dataset import KneeDataset
from strnet.data.manifest import read_manifest
from strnet.data.preprocess import PreprocessParams
from strnet.engine import (
    Proximal,
    autocast_dtype,
    build_optimizer,
    class_weight,
    cpu_has_native_bf16,
    make_loader,
    predict_loader,
    resolve_device,
    set_learning_rate,
    split_frames,
    train_one_epoch,
    train_summary,
)
from strnet.errors import DataError, SiteError
from strnet.losses import MultiTaskLoss
from strnet.ood import FeatureGaussian, FeatureMoments, site_distance_histogram, site_moments
from strnet.privacy import PrivateTraining, steps_per_epoch
from strnet.sufficient import EvaluationCounts, ValidationCounts, with_films, with_subgroups

ROLES = ("train", "external")


@functools.lru_cache(maxsize=4)
def site_cases(
    manifest: str, preprocess: PreprocessParams, cache_dir: str, workers: int
) -> tuple[pd.DataFrame, tuple[str, ...]]:
    """The manifest's usable cases, preprocessed into the cache once per process (a node serves many rounds)."""
    df, problems = warm_cache(read_manifest(manifest), preprocess, PreprocessCache(Path(cache_dir)), workers=workers)
    return df, tuple(problems)


def load_optimizer_state(data: bytes, device: torch.device, site: str) -> dict[str, Any]:
    """A kept optimizer state (a ``torch.save`` payload from this site's memory or disk) as plain tensors only:
    the disk copy is written as is (:class:`client.kept.KeptState`), so this is where a tampered file is refused."""
    try:
        return torch.load(io.BytesIO(data), map_location=device, weights_only=True)
    except pickle.UnpicklingError as exc:
        problem = f"kept optimizer state is not plain tensor data, refused ({str(exc).splitlines()[0]})"
        raise SiteError(site, problem) from exc


class SiteRunner:
    """A site's cases and a model to load the global weights into."""

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
        self.device = device or resolve_device()
        self.amp_dtype = autocast_dtype(config.train.precision, self.device)
        self.cache = PreprocessCache(Path(config.data.cache_dir))
        self.df, self.problems = site_cases(
            str(self.manifest_path), config.preprocess, config.data.cache_dir, max(1, config.data.num_workers)
        )
        self.splits = split_frames(self.df)
        if role == "train" and self.splits["train"].empty:
            raise DataError(self.manifest_path, f"site {site_name}: no usable train rows (run `strnet data split`)")
        self._model: torch.nn.Module | None = None
        # (federation id, server round) -> AdamW state dict after that training round, for the two latest rounds:
        # kept between messages by a ClientApp process that keeps its sites (client.app); the one before the
        # latest is the state a round the server sends again (at a new learning rate) starts from
        self.kept_optimizer: dict[tuple[str, int], dict[str, Any]] = {}
        # digest -> the whole model the messages after training are about (client.app; also on the site's disk)
        self.held_models: dict[str, dict[str, torch.Tensor]] = {}

    # ------------------------------------------------------------------------------------------------ helpers

    @property
    def model(self) -> torch.nn.Module:
        if self._model is None:
            # the server's weights overwrite every parameter: never touch the disk or network for weights here
            model = build_model(self.cfg, weights="none")
            model.to(self.device)
            if self.cfg.train.channels_last:
                model.to(memory_format=torch.channels_last)
            self._model = model
        return self._model

    def info(self) -> dict[str, int]:
        """Counts (the server's node -> site map and the data summary) and the arithmetic this site trains at:
        ``train.precision: auto`` resolves on the site's own CPU, and bf16 and fp32 training of one recipe part
        from the first epochs, so the run's recipe names what each site did
        (:func:`strnet.run.sites_precision_words`)."""
        return {
            "n_rows": len(self.df),
            "n_labelled": int((self.df["label_cls"] != "").sum()),
            "n_train": len(self.splits["train"]),
            "n_val": len(self.splits["val"]),
            "n_test": len(self.splits["test"]),
            "n_skipped_images": len(self.problems),
            "bf16_autocast": int(self.amp_dtype is torch.bfloat16),
            "native_bf16": int(cpu_has_native_bf16()),
        }

    def evaluation_frame(self) -> pd.DataFrame:
        """Test split for a training site; the whole cohort for an external one (it never trained on it)."""
        return self.df.reset_index(drop=True) if self.role == "external" else self.splits["test"]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}

    def _predict(self, df: pd.DataFrame, *, with_mirror: bool = False) -> dict[str, Any]:
        t = self.cfg.train
        loader = make_loader(
            df,
            self.cfg.preprocess,
            self.cache,
            batch_size=t.eval_batch_size,
            augment=None,
            shuffle=False,
            seed=self.cfg.seed,
            num_workers=self.cfg.data.num_workers,
        )
        preds = predict_loader(
            self.model,
            loader,
            device=self.device,
            amp_dtype=self.amp_dtype,
            channels_last=t.channels_last,
            test_time_mirror=self.cfg.model.test_time_mirror,
            with_mirror=with_mirror,
        )
        return with_subgroups(with_films(preds, df), df)

    # ------------------------------------------------------------------------------------------------ tasks

    def train(
        self,
        state_dict: dict[str, torch.Tensor],
        *,
        lr: float,
        server_round: int,
        optimizer_state: dict[str, Any] | None,
        proximal_mu: float = 0.0,
        privacy_state: dict[str, Any] | None = None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, float], int, bytes, dict[str, Any] | None]:
        """``federation.local_epochs`` epochs (or ``local_steps`` steps) from the global weights at the server's
        learning rate.

        Global epoch numbers ((round − 1) · local_epochs + e) drive the warm-up and seed every draw, exactly as
        the centralized run's epochs do. Returns the new weights, the last epoch's training numbers, the FedAvg
        weight (train-split size), the optimizer state to keep for the next round and, under DP-SGD, the
        privacy accountant's state to keep (``privacy_state`` is the one kept after the previous round: the
        site's ε accumulates over the run; the metrics carry it as ``privacy_epsilon``).
        """
        if self.role != "train":
            raise ValueError(f"site {self.site} is an external site: it evaluates only, it does not train")
        epochs = self.cfg.federation.local_epochs
        if server_round < 1:
            raise ValueError(f"site {self.site}: server round {server_round} must be >= 1")
        self.model.load_state_dict(state_dict)
        self.model.train()  # a kept site's model comes from an evaluation; Opacus checks the mode when attaching
        t = self.cfg.federated_train()
        optimizer = build_optimizer(self.model, t)
        if optimizer_state is not None:
            # a copy: load_state_dict aliases the tensors, and a round that fails half-way must leave the kept
            # state as it was for its retry (91 MB for ResNet-18: ~20 ms; serialising it cost 0.1 s a round)
            optimizer.load_state_dict(copy.deepcopy(optimizer_state))
        set_learning_rate(optimizer, lr)
        train = self.splits["train"]
        private = self.private_training()
        loss_fn = MultiTaskLoss(
            pos_weight=class_weight(train, t), weights=self.cfg.loss, per_case=private is not None
        ).to(self.device)
        loader = make_loader(
            train,
            self.cfg.preprocess,
            self.cache,
            batch_size=t.batch_size,
            augment=self.cfg.augment,
            shuffle=True,
            seed=self.cfg.seed,
            num_workers=self.cfg.data.num_workers,
            balance=t.balance,
            partners=self.cfg.loss.bilateral > 0,
        )
        stats: dict[str, float] = {}
        proximal = Proximal.of(self.model, proximal_mu) if proximal_mu > 0 else None
        model, step_optimizer = self.model, optimizer
        if private is not None:
            private.load_state(privacy_state)
            model, step_optimizer, loader = private.attach(self.model, optimizer, loader)
        for e in range(epochs):
            stats = train_one_epoch(
                model,
                loader,
                loss_fn,
                step_optimizer,
                params=t,
                epoch=(server_round - 1) * epochs + e,
                seed=self.cfg.seed,
                device=self.device,
                amp_dtype=self.amp_dtype,
                progress=False,
                desc=f"{self.site} train",
                proximal=proximal,
                batchnorm_running=self.cfg.federation.batchnorm == "pooled",
            )
        summary = train_summary(stats)
        if private is not None:
            private.detach()
            summary |= private.metrics()
        kept_privacy = private.state() if private is not None else None
        return self.state_dict(), summary, len(train), optimizer.state_dict(), kept_privacy

    def private_training(self) -> PrivateTraining | None:
        """This site's DP-SGD for the run (None without ``privacy.dp``): σ from the site's own sampling rate and
        the run's planned steps (rounds × a round's steps), the same every round."""
        dp, t, fed = self.cfg.privacy.dp, self.cfg.federated_train(), self.cfg.federation
        if not dp.enabled:
            return None
        n = len(self.splits["train"])
        per_epoch = steps_per_epoch(n, t.batch_size, t.max_steps_per_epoch)
        return PrivateTraining(
            dp, n_train=n, batch_size=t.batch_size, planned_steps=fed.rounds * fed.local_epochs * per_epoch
        )

    def validation_logits(self, state_dict: dict[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
        """The kept model's labelled validation logits: the site's part of the pooled calibration fit (they stay
        here; only :class:`strnet.calibration.PlattStats` of them leave)."""
        self.model.load_state_dict(state_dict)
        return labelled_logits(self._predict(self.splits["val"]))

    def batchnorm_statistics(self, state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, np.ndarray], int]:
        """The final model's BatchNorm input statistics over this site's un-augmented training images, and their
        count (FedBN's bundle pools them: :mod:`strnet.batchnorm`)."""
        self.model.load_state_dict(state_dict)
        ds = self._dataset(self.splits["train"])
        return batchnorm.reestimate(
            self.model, ds, batch_size=self.cfg.train.batch_size, device=self.device, amp_dtype=self.amp_dtype
        )

    def ood_moments(self, state_dict: dict[str, torch.Tensor]) -> FeatureMoments:
        """Additive moments of the kept model's neck features over the training split (the pooled Gaussian)."""
        self.model.load_state_dict(state_dict)
        # at the precision predict serves the features at
        ds = self._dataset(self.splits["train"])
        return site_moments(self.model, ds, device=self.device, amp_dtype=self.amp_dtype)

    def ood_histogram(self, state_dict: dict[str, torch.Tensor], gaussian: FeatureGaussian) -> np.ndarray:
        """Histogram of the validation split's distances under the pooled Gaussian (the pooled limit)."""
        self.model.load_state_dict(state_dict)
        ds = self._dataset(self.splits["val"])
        return site_distance_histogram(self.model, ds, gaussian, device=self.device, amp_dtype=self.amp_dtype)

    def _dataset(self, df: pd.DataFrame) -> KneeDataset:
        return KneeDataset(df, self.cfg.preprocess, self.cache, augment=None)

    def validation_counts(
        self, state_dict: dict[str, torch.Tensor], calibration: Platt | None = None
    ) -> ValidationCounts:
        """Additive statistics of the validation split: the monitored pooled AUPRC every round (uncalibrated)
        and, with the fitted ``calibration``, the pooled τ*."""
        self.model.load_state_dict(state_dict)
        th = self.cfg.threshold
        preds = calibrated(self._predict(self.splits["val"]), calibration or Platt())
        return ValidationCounts.from_predictions(preds, grid=th.grid(), n_bins=th.histogram_bins)

    def evaluate_frozen(
        self, state_dict: dict[str, torch.Tensor], threshold: float, calibration: Platt
    ) -> dict[str, EvaluationCounts]:
        """Frozen evaluation at the pooled τ* on the calibrated scale: counts of the evaluation cohort (``test``)
        and, for a training site, of its validation split (``val``), so the server reports pooled validation
        metrics at τ* too, and of its training split (``train``, un-augmented: how far the model fits what it
        was taught, :func:`strnet.scoring.fit_of`). Mirror stability is measured on test and val (one more
        forward pass per knee)."""
        self.model.load_state_dict(state_dict)
        n_bins = self.cfg.threshold.histogram_bins
        frames = {"test": self.evaluation_frame()}
        if self.role == "train":
            frames["val"] = self.splits["val"]
            if not self.cfg.privacy.statistics.enabled:  # a diagnostic is not worth privacy budget on training cases
                frames["train"] = self.splits["train"]
        return {
            split: EvaluationCounts.from_predictions(
                calibrated(self._predict(df, with_mirror=split != "train"), calibration),
                threshold=threshold,
                n_bins=n_bins,
            )
            if len(df)
            else EvaluationCounts.empty(n_bins)
            for split, df in frames.items()
        }
