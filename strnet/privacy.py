"""DP-SGD at a site (and in the centralized comparison) with Opacus.

A site's model updates are what leaves it every round, so the guarantee is sample-level DP-SGD (Abadi et al.
2016): each case's gradient is clipped to ``max_grad_norm`` and Gaussian noise is added to the batch sum;
batches are Poisson samples of the training split, which the accountant's privacy amplification assumes.
ε is that of everything the site released through its weights, over the whole run.

Three things make this correct across a federation, where a site trains in many short sessions:

* the accountant is **one per site for the whole run**: its history (σ, q, steps) is carried from round to
  round (and across a resumed run, on the site's disk) and appended to, never restarted — a new
  ``PrivacyEngine`` per round would report one round's ε;
* σ is fixed once for the run: from ``noise_multiplier``, or calibrated so that the *planned* steps
  (rounds × local epochs × steps per epoch) spend exactly ``target_epsilon``; early stopping only lowers ε;
* the model is the per-case form (:func:`strnet.model.per_case_form`) on both sides, so the server's initial
  weights and every site's have the same keys.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

# Opacus's per-layer backward hooks make torch warn on every first layer (its input needs no gradient): noise.
warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
# The noise comes from torch's seeded generator (reproducible runs); Opacus's secure mode needs torchcsprng,
# which this system does not ship. Recorded in every privacy report as ``secure_rng: false``.
warnings.filterwarnings("ignore", message="Secure RNG turned off", category=UserWarning)


# the scalars of a DP site's train reply; the server logs them per site and never averages them
PRIVACY_METRICS = ("privacy_epsilon", "privacy_noise_multiplier", "privacy_sample_rate", "privacy_steps")


@dataclass(frozen=True)
class DPParams:
    """``privacy.dp``. Give ``target_epsilon`` (the noise is calibrated for the run's planned steps) or
    ``noise_multiplier``; ``max_grad_norm`` is the per-case clipping bound C."""

    enabled: bool = False
    target_epsilon: float | None = None
    noise_multiplier: float | None = None
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: Literal["rdp", "prv"] = "rdp"

    def problems(self) -> list[str]:
        """What is wrong with these settings (empty when they are usable), for the config's error."""
        if not self.enabled:
            return []
        out = []
        if (self.target_epsilon is None) == (self.noise_multiplier is None):
            out.append("give exactly one of privacy.dp.target_epsilon and privacy.dp.noise_multiplier")
        if self.target_epsilon is not None and not self.target_epsilon > 0:
            out.append(f"privacy.dp.target_epsilon={self.target_epsilon} must be > 0")
        if self.noise_multiplier is not None and not self.noise_multiplier > 0:
            out.append(f"privacy.dp.noise_multiplier={self.noise_multiplier} must be > 0")
        if not 0 < self.delta < 1:
            out.append(f"privacy.dp.delta={self.delta} must be in (0, 1)")
        if not self.max_grad_norm > 0:
            out.append(f"privacy.dp.max_grad_norm={self.max_grad_norm} must be > 0")
        return out


def sample_rate(n_train: int, batch_size: int) -> float:
    """Opacus's Poisson rate for a loader of ``n_train`` cases in batches of ``batch_size``: 1 / batches."""
    return 1.0 / math.ceil(n_train / batch_size)


def steps_per_epoch(n_train: int, batch_size: int, max_steps: int | None) -> int:
    steps = math.ceil(n_train / batch_size)  # Opacus's Poisson loader yields 1/q batches an epoch
    return min(steps, max_steps) if max_steps is not None else steps


def noise_multiplier(params: DPParams, rate: float, planned_steps: int) -> float:
    """σ: the configured one, or the smallest that keeps ``planned_steps`` at rate ``rate`` within
    ``target_epsilon`` at ``delta`` (Opacus's own search, the accountant the run uses)."""
    if params.noise_multiplier is not None:
        return float(params.noise_multiplier)
    from opacus.accountants.utils import get_noise_multiplier

    return float(
        get_noise_multiplier(
            target_epsilon=float(params.target_epsilon),  # type: ignore[arg-type]
            target_delta=params.delta,
            sample_rate=rate,
            steps=planned_steps,
            accountant=params.accountant,
        )
    )


def accountant_epsilon(params: DPParams, history: list[tuple[float, float, int]]) -> float:
    """ε at ``params.delta`` of a (σ, q, steps) history, from a fresh accountant (0 for no steps)."""
    if not history:
        return 0.0
    from opacus.accountants import create_accountant

    accountant = create_accountant(params.accountant)
    accountant.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return float(accountant.get_epsilon(delta=params.delta))


class PrivateTraining:
    """The Opacus pieces of one site (or one centralized run), and the accountant history that outlives them.

    :meth:`attach` wraps a model, optimizer and loader for a training session (a round, or a whole centralized
    fit); :meth:`detach` removes the hooks so the plain model serves validation and the next round. The
    history is plain data (:meth:`state` / :meth:`from_state`) for the node's state and its disk.
    """

    def __init__(self, params: DPParams, *, n_train: int, batch_size: int, planned_steps: int) -> None:
        if n_train < 1:
            raise ValueError("DP-SGD needs at least one training case")
        self.params = params
        self.sample_rate = sample_rate(n_train, batch_size)
        self.planned_steps = int(planned_steps)
        self.noise_multiplier = noise_multiplier(params, self.sample_rate, self.planned_steps)
        self.history: list[tuple[float, float, int]] = []
        self._engine: Any = None
        self._module: Any = None

    def attach(self, model: nn.Module, optimizer: Optimizer, loader: DataLoader) -> tuple[nn.Module, Any, Any]:
        """(wrapped model, DP optimizer, Poisson loader); the loader keeps ``loader``'s seeded generator."""
        from opacus import PrivacyEngine

        self._engine = PrivacyEngine(accountant=self.params.accountant)
        self._engine.accountant.history = list(self.history)
        module, dp_optimizer, dp_loader = self._engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.params.max_grad_norm,
            poisson_sampling=True,
        )
        self._module = module
        return module, dp_optimizer, dp_loader

    def detach(self) -> None:
        """Keep the accountant's history and take the hooks off the model."""
        if self._engine is not None:
            self.history = [(float(s), float(q), int(n)) for s, q, n in self._engine.accountant.history]
        if self._module is not None:
            self._module._close()
        self._engine = self._module = None

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self._current_history())

    def _current_history(self) -> list[tuple[float, float, int]]:
        return list(self._engine.accountant.history) if self._engine is not None else self.history

    def epsilon(self) -> float:
        return accountant_epsilon(self.params, self._current_history())

    def state(self) -> dict[str, Any]:
        """Plain data: the history and what it was computed with (a changed σ or q is refused on load)."""
        return {
            "history": [[float(s), float(q), int(n)] for s, q, n in self._current_history()],
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
        }

    def load_state(self, state: dict[str, Any] | None) -> None:
        if not state:
            return
        same = math.isclose(state["noise_multiplier"], self.noise_multiplier) and math.isclose(
            state["sample_rate"], self.sample_rate
        )
        if not same:
            raise ValueError(
                f"kept privacy accountant was for σ={state['noise_multiplier']:.4g}, q={state['sample_rate']:.4g}; "
                f"this run has σ={self.noise_multiplier:.4g}, q={self.sample_rate:.4g} (a different run?)"
            )
        self.history = [(float(s), float(q), int(n)) for s, q, n in state["history"]]

    def metrics(self) -> dict[str, float]:
        """The scalars a site's train reply carries (ε so far, and what it was computed from)."""
        return {
            "privacy_epsilon": self.epsilon(),
            "privacy_noise_multiplier": self.noise_multiplier,
            "privacy_sample_rate": self.sample_rate,
            "privacy_steps": float(self.steps),
        }

    def report(self) -> dict[str, Any]:
        """What the bundle, the summary and MLflow record of this site's (or run's) privacy."""
        return {
            "epsilon": self.epsilon(),
            "delta": self.params.delta,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "steps": self.steps,
            "planned_steps": self.planned_steps,
            "max_grad_norm": self.params.max_grad_norm,
            "accountant": self.params.accountant,
            "target_epsilon": self.params.target_epsilon,
            "secure_rng": False,
        }


def run_privacy(params: DPParams, per_site: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A run's privacy record: each site's (or the centralized run's) :meth:`PrivateTraining.report`, and the
    largest ε among them, which is the run's guarantee for a case at the least protected site."""
    return {
        "mechanism": "DP-SGD (Opacus), sample-level, per-case clipping, Poisson sampling",
        "epsilon": max((float(r["epsilon"]) for r in per_site.values()), default=0.0),
        "delta": params.delta,
        "max_grad_norm": params.max_grad_norm,
        "accountant": params.accountant,
        "target_epsilon": params.target_epsilon,
        "sites": per_site,
    }


def site_reports_from_history(params: DPParams, history: list[dict[str, float]]) -> dict[str, dict[str, Any]]:
    """Each site's latest ``site.<name>.privacy_*`` values of a federated learning curve, as reports: a site's
    ε only grows, so its last reply states what it spent over the whole run."""
    found: dict[str, dict[str, Any]] = {}
    for row in history:
        for key, value in row.items():
            if key.startswith("site.") and ".privacy_" in key:
                site, _, name = key[len("site.") :].partition(".privacy_")
                found.setdefault(site, {})[name] = float(value)
    return {
        site: {
            "epsilon": v.get("epsilon", math.nan),
            "delta": params.delta,
            "noise_multiplier": v.get("noise_multiplier", math.nan),
            "sample_rate": v.get("sample_rate", math.nan),
            "steps": int(v.get("steps", 0)),
            "max_grad_norm": params.max_grad_norm,
            "accountant": params.accountant,
            "target_epsilon": params.target_epsilon,
            "secure_rng": False,
        }
        for site, v in sorted(found.items())
    }
