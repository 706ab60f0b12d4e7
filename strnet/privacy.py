"""DP-SGD at a site (and in the centralized comparison) with Opacus.

(Being written: the Opacus-compatible model, the per-case loss, the accountant kept across rounds.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


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
