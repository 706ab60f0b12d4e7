"""One configuration schema for centralized and federated runs.

The science parameters (preprocessing, augmentation, loss weights) are the dataclasses the ``strnet``
package itself defines, so a preset, a model bundle and a federated site can never disagree about what
"size: 512" means.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from configs.loader import apply_overrides, from_dict, read_yaml, to_dict
from strnet.data.augment import AugmentParams
from strnet.data.preprocess import PreprocessParams
from strnet.engine import TrainParams
from strnet.errors import ConfigError
from strnet.losses import LossWeights
from strnet.model import STRNet, build_strnet, freeze_early_stages
from strnet.privacy import DPParams
from strnet.released import StatisticsPrivacy


@dataclass(frozen=True)
class DataConfig:
    """Where the cases come from. Manifests carry their own split column (see ``strnet data split``)."""

    manifests: tuple[str, ...] = ()
    cache_dir: str = ".cache/preprocessed"
    num_workers: int = 0
    # Training re-audits its cases and records the result in the bundle; split leakage is reported loudly.
    audit_max_distance: int = 2


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "resnet50"
    weights: str = "none"
    neck_dim: int = 128
    dropout: float = 0.3
    # Serve the mean output of a knee and its left-right mirror (stored in the bundle; predict applies it).
    test_time_mirror: bool = False
    # batch | group (GroupNorm) | frozen (BatchNorm fixed at its pretrained statistics) — group and frozen are
    # the per-case forms DP-SGD needs | auto: group exactly when privacy.dp is on. Loading resolves auto, so a
    # bundle and every site record the form they built.
    norm: Literal["auto", "batch", "group", "frozen"] = "auto"
    # A centralized run trains this many networks (seeds seed, seed + 1, ...) and serves their combination
    # (strnet.ensemble). A federation trains one (its recipe says so): three federated seeds' ensemble did not
    # beat one federated run on validation (docs/real-data.md, "Three seeds").
    members: int = 1
    # Train only the backbone's last N stages (strnet.model.freeze_early_stages); null trains all of it.
    trainable_stages: int | None = None


@dataclass(frozen=True)
class ThresholdConfig:
    """The paper's τ* rule, and the score histogram every site shares (grid thresholds fall on its bin edges)."""

    min_sensitivity: float = 0.86
    grid_start: float = 0.20
    grid_stop: float = 0.80
    grid_step: float = 0.01
    histogram_bins: int = 1000

    def grid(self) -> np.ndarray:
        """The candidate thresholds, rounded so that 0.20 + k·0.01 is exactly the decimal on every machine."""
        return np.round(np.arange(self.grid_start, self.grid_stop + self.grid_step / 2, self.grid_step), 6)


@dataclass(frozen=True)
class OODConfig:
    """The bundle's out-of-distribution limit: a Gaussian of the training knees' neck features (OAS shrinkage),
    limit = ``margin`` x the ``quantile`` of validation knees' Mahalanobis distances (:mod:`strnet.ood`)."""

    enabled: bool = True
    quantile: float = 0.995
    # Validation knees come from the training sites; a new hospital's knees sit further out (on the real hold-out,
    # up to 1.25x the 99.5 % quantile), while non-knees sit beyond 1.38x: 1.2 keeps real knees, rejects those.
    margin: float = 1.2


@dataclass(frozen=True)
class TScoreConfig:
    """Refit of the stop-gradient T-score branch on the kept model (:mod:`strnet.tscore`): ``rounds`` x
    ``steps_per_round`` full-batch AdamW steps, the round with the lowest validation MSE kept (0 rounds: off).
    Federated: one round = ``steps_per_round`` local steps at every site with T-scores, then FedAvg.
    ``patience``: stop after that many rounds without a lower validation MSE (0: run all ``rounds``). Over the
    83 refits this repository had run, 20 ended 35 rounds early on average (35 exchanges fewer per federation)
    and kept a different round in 4, each a late improvement after a plateau."""

    rounds: int = 60
    steps_per_round: int = 25
    patience: int = 20
    lr: float = 1e-3
    weight_decay: float = 1e-4
    # The branch's image adapter: on (the paper), off (age, sex and BMI alone), or auto (both fitted, the lower
    # validation MSE kept; strnet.tscore.refit)
    image: Literal["on", "off", "auto"] = "on"

    def schedule(self) -> dict[str, Any]:
        """The keyword arguments of :func:`strnet.tscore.refit` (and of ``refit_centralized``, beside lr and decay)."""
        return {
            "rounds": self.rounds,
            "steps_per_round": self.steps_per_round,
            "patience": self.patience,
            "image": self.image,
        }


@dataclass(frozen=True)
class EvalConfig:
    """``figures: false`` skips the PNG figures of a run and of its frozen evaluations; the numbers, the reports
    and what MLflow records are the same. For runs nobody looks at figure by figure (the test suite, or
    ``--set evaluate.figures=false`` on cross-validation folds): a centralized run draws 15 figures at ~0.2 s each
    on 2 cores, about as long as a tiny run trains."""

    bootstrap: int = 2000
    figures: bool = True


@dataclass(frozen=True)
class TrackingConfig:
    """``uri`` null means a local SQLite store ``mlflow.db`` in the working directory."""

    enabled: bool = True
    uri: str | None = None
    experiment: str = "strnet"


@dataclass(frozen=True)
class SiteConfig:
    """A federation member. ``train`` sites train and validate; ``external`` sites only evaluate the frozen model.

    In simulation the i-th site is played by the node with ``partition-id`` i; a deployed SuperNode names its
    site and manifest in its node config instead (``site-id``, ``manifest``).
    """

    name: str
    role: Literal["train", "external"] = "train"
    manifest: str = ""


@dataclass(frozen=True)
class FederationConfig:
    """FedAvg rounds. The server drives the training recipe's learning-rate plateau and early stopping per round
    (``train.plateau_*``, ``train.early_stop_patience`` and ``train.min_epochs`` count rounds here)."""

    # fedbn: FedAvg without the BatchNorm layers, which stay at each site during training and are averaged once,
    # for the bundle, after it (one message per site)
    strategy: Literal["fedavg", "fedprox", "fedavgm", "fedadam", "fedbn"] = "fedavg"
    # FedProx: each site adds (mu/2)·Σ‖w − w_global‖² to its loss
    proximal_mu: float = 0.01
    # FedAvgM / FedAdam: the server's step on the averaged update (FedAvgM: 1.0 = plain FedAvg plus momentum)
    server_lr: float = 1.0
    server_momentum: float = 0.9
    rounds: int = 5
    local_epochs: int = 1
    # A round's local work as a number of optimizer steps per site instead of local_epochs whole epochs (0: epochs).
    # Equal steps at every site keep FedAvg's objective the case-weighted one (FedNova's point: a site taking more
    # steps per round pulls the average further), and fewer steps between averages let less drift apart on sites
    # that each hold one source. Each round then counts as one epoch of the warm-up and the draws' seeds.
    local_steps: int = 0
    # The server's schedule in rounds when a round is not an epoch's worth of steps (None: train.plateau_patience
    # and train.early_stop_patience, counted in rounds)
    plateau_patience: int | None = None
    early_stop_patience: int | None = None
    quorum: int = 2
    round_timeout: float = 3600.0
    # A site's AdamW moments survive between rounds (in its node state) or restart from zero every round.
    keep_optimizer_state: bool = True
    # Precision of the model's weight matrices on the wire in every round, both ways (strnet.protocol.to_wire):
    # fp16 halves the bytes (vectors such as BatchNorm scales stay fp32); the server averages in fp32 and keeps,
    # checkpoints and bundles fp32 weights.
    transport: Literal["fp16", "fp32"] = "fp16"
    # How the average weighs the training sites: by their training cases (FedAvg), or equally — what source x label
    # balanced draws (train.balance) do centrally when every site is one source holding both labels
    site_weights: Literal["cases", "equal"] = "cases"
    # How BatchNorm normalises during a site's training. batch: by the batch, as centralized training does; but a
    # site's batches hold one source, so each site learns under its own source's statistics while the global
    # model is evaluated under the average. pooled: before every round the sites re-estimate each layer's input
    # statistics under the global weights on their training images, the server pools them by their moments
    # (strnet.batchnorm) into the global model, and every site trains and validates under those (BatchNorm's
    # scale and shift still learn): training normalises as evaluation and the bundle do. One more exchange and
    # one forward pass over the training images per round.
    batchnorm: Literal["batch", "pooled"] = "batch"
    # Every round's global weights kept beside the checkpoint (<output_dir>/federation-rounds/round-<r>.pt, the
    # model's fp32 size a round), for analyses that read a run's rounds afterwards (simulations.round_soup)
    keep_rounds: bool = False
    sites: tuple[SiteConfig, ...] = ()


@dataclass(frozen=True)
class PrivacyConfig:
    """DP-SGD at the sites (``dp``) and protection of the statistics they return (``statistics``)."""

    dp: DPParams = field(default_factory=DPParams)
    statistics: StatisticsPrivacy = field(default_factory=StatisticsPrivacy)


@dataclass(frozen=True)
class Config:
    name: str = "strnet"
    seed: int = 42
    output_dir: str = "runs/strnet"
    data: DataConfig = field(default_factory=DataConfig)
    preprocess: PreprocessParams = field(default_factory=PreprocessParams)
    augment: AugmentParams = field(default_factory=AugmentParams)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossWeights = field(default_factory=LossWeights)
    train: TrainParams = field(default_factory=TrainParams)
    threshold: ThresholdConfig = field(default_factory=ThresholdConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    ood: OODConfig = field(default_factory=OODConfig)
    tscore: TScoreConfig = field(default_factory=TScoreConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def federated_train(self) -> TrainParams:
        """``train`` as a federated round runs it: ``federation.local_steps`` caps a site's round, and the server's
        plateau and early stopping count rounds with the federation's own patience where it sets one."""
        t, fed = self.train, self.federation
        return replace(
            t,
            max_steps_per_epoch=fed.local_steps or t.max_steps_per_epoch,
            plateau_patience=t.plateau_patience if fed.plateau_patience is None else fed.plateau_patience,
            early_stop_patience=t.early_stop_patience if fed.early_stop_patience is None else fed.early_stop_patience,
        )


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML preset (path or bare preset name), apply ``key=value`` overrides, validate."""
    data: dict[str, Any] = read_yaml(path) if path is not None else {}
    apply_overrides(data, list(overrides))
    return _resolved(from_dict(Config, data))


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from ``Config.to_dict()`` (bundles and federated sites carry it as JSON)."""
    return _resolved(from_dict(Config, data))


def _resolved(cfg: Config) -> Config:
    _check(cfg)
    if cfg.model.norm == "auto":
        norm = "group" if cfg.privacy.dp.enabled else "batch"
        cfg = replace(cfg, model=replace(cfg.model, norm=norm))
    return cfg


def build_model(cfg: Config, *, weights: str | None = None) -> STRNet:
    """One STR-Net as the configuration describes it (``weights`` None: the configured initialisation).

    A centralized run with ``model.members`` > 1 builds one per member (:mod:`strnet.ensemble`)."""
    m = cfg.model
    norm = m.norm if m.norm != "auto" else ("group" if cfg.privacy.dp.enabled else "batch")
    model = build_strnet(
        backbone=m.backbone,
        weights=m.weights if weights is None else weights,
        neck_dim=m.neck_dim,
        dropout=m.dropout,
        norm=norm,
        image_tscore=cfg.loss.t_score_image > 0,
    )
    try:
        return freeze_early_stages(model, m.trainable_stages)
    except ValueError as exc:
        raise ConfigError(f"model.{exc}") from exc


def _check(cfg: Config) -> None:
    t = cfg.train
    if t.epochs < 1 or t.batch_size < 1:
        raise ConfigError("train.epochs and train.batch_size must be >= 1")
    if not 0.0 < cfg.threshold.min_sensitivity <= 1.0:
        raise ConfigError(f"threshold.min_sensitivity={cfg.threshold.min_sensitivity} must be in (0, 1]")
    th = cfg.threshold
    if not 0.0 <= th.grid_start < th.grid_stop <= 1.0:
        raise ConfigError("threshold grid must satisfy 0 <= grid_start < grid_stop <= 1")
    edges = th.grid() * th.histogram_bins
    if th.histogram_bins < 2 or not np.allclose(edges, np.round(edges), atol=1e-6):
        raise ConfigError(
            f"threshold.histogram_bins={th.histogram_bins}: every grid threshold must fall on a bin edge "
            "(pooled counts at τ* and the pooled bootstrap read the histogram), e.g. 100 or 1000 bins for step 0.01"
        )
    if cfg.train.min_epochs < 0:
        raise ConfigError(f"train.min_epochs={cfg.train.min_epochs} must be >= 0")
    if not (cfg.train.ema_decay == 0 or 0 < cfg.train.ema_decay < 1):
        raise ConfigError(f"train.ema_decay={cfg.train.ema_decay} must be 0 (off) or in (0, 1)")
    members = cfg.model.members
    if isinstance(members, bool) or not isinstance(members, int) or members < 1:
        raise ConfigError(f"model.members={members!r} must be a positive integer")
    if members > 1 and cfg.privacy.dp.enabled:
        raise ConfigError(
            f"model.members={members} with privacy.dp: every member would spend the privacy budget again; set 1"
        )
    if cfg.loss.bilateral and cfg.privacy.dp.enabled:
        raise ConfigError(
            f"loss.bilateral={cfg.loss.bilateral} with privacy.dp: the consistency term ties two cases in one loss, "
            "where DP-SGD bounds each case's own gradient; set 0"
        )
    fed = cfg.federation
    names = [site.name for site in fed.sites]
    if len(set(names)) != len(names):
        raise ConfigError(f"federation.sites: duplicate site names {names}")
    n_train = sum(site.role == "train" for site in fed.sites)
    if fed.sites and not 1 <= fed.quorum <= n_train:
        raise ConfigError(f"federation.quorum={fed.quorum} must be between 1 and the {n_train} training site(s)")
    if fed.proximal_mu < 0 or fed.server_lr <= 0 or not 0 <= fed.server_momentum < 1:
        raise ConfigError("federation: proximal_mu >= 0, server_lr > 0 and 0 <= server_momentum < 1 required")
    if fed.local_steps < 0 or fed.local_epochs < 1:
        raise ConfigError(
            f"federation: local_epochs >= 1 and local_steps >= 0 required, got {fed.local_epochs} and {fed.local_steps}"
        )
    if fed.local_steps and fed.local_epochs != 1:
        raise ConfigError(
            f"federation.local_steps={fed.local_steps} with local_epochs={fed.local_epochs}: a round is either a "
            "number of steps or of epochs; set local_epochs 1"
        )
    if fed.batchnorm == "pooled":
        if fed.strategy == "fedbn":
            raise ConfigError(
                "federation.batchnorm=pooled with strategy=fedbn: FedBN keeps each site's BatchNorm; pooled "
                "statistics give every site the same one (use fedavg, fedprox, fedavgm or fedadam)"
            )
        if cfg.model.norm in ("group", "frozen") or cfg.privacy.dp.enabled:
            raise ConfigError(
                "federation.batchnorm=pooled needs BatchNorm layers to pool, and model.norm="
                f"{cfg.model.norm}{' with privacy.dp' if cfg.privacy.dp.enabled else ''} has none; set batch"
            )
    patience = {"plateau_patience": fed.plateau_patience, "early_stop_patience": fed.early_stop_patience}
    if any(v is not None and v < 0 for v in patience.values()):
        raise ConfigError(f"federation: patience in rounds must be >= 0, got {patience}")
    ts = cfg.tscore
    if ts.rounds < 0 or ts.steps_per_round < 1 or not ts.lr > 0 or ts.weight_decay < 0 or ts.patience < 0:
        raise ConfigError(
            f"tscore: rounds >= 0, steps_per_round >= 1, lr > 0, weight_decay >= 0, patience >= 0 required, got {ts}"
        )
    if not 0 < cfg.ood.quantile <= 1 or not cfg.ood.margin > 0:
        raise ConfigError(f"ood: quantile in (0, 1] and margin > 0 required, got {cfg.ood}")
    if cfg.preprocess.size < 16:
        raise ConfigError(f"preprocess.size={cfg.preprocess.size} is too small (>= 16)")
    _check_dp(cfg)
    if problems := cfg.privacy.statistics.problems():
        raise ConfigError("; ".join(problems))


def _check_dp(cfg: Config) -> None:
    """DP-SGD's preconditions, each refused with the setting to change."""
    dp = cfg.privacy.dp
    problems = dp.problems()
    if dp.enabled:
        if cfg.model.norm == "batch":
            problems.append("model.norm=batch: DP-SGD cannot clip one case's gradient through BatchNorm (use auto)")
        if cfg.train.balance != "none":
            problems.append(
                f"train.balance={cfg.train.balance}: DP-SGD's accounting assumes uniform Poisson sampling; set "
                "train.balance=none (the class weight then balances the classes)"
            )
        if cfg.federation.strategy in ("fedprox", "fedbn"):
            problems.append(
                f"federation.strategy={cfg.federation.strategy}: "
                + (
                    "FedProx's proximal gradient bypasses the per-case clipping"
                    if cfg.federation.strategy == "fedprox"
                    else "FedBN keeps BatchNorm layers, and the DP model has none"
                )
                + "; use fedavg, fedavgm or fedadam"
            )
    if problems:
        raise ConfigError("; ".join(problems))
