"""What a site releases besides model weights, in one place, and how the configuration protects it.

(Filled in by the private-statistics work: the registry of every statistic a site returns, the k-threshold and
the noised per-class histograms with their composed ε.)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StatisticsPrivacy:
    """``privacy.statistics``: off by default (the existing exact pooled τ*).

    ``min_cases`` (k): a statistic computed over fewer cases is withheld. ``noise_multiplier``: σ of the Gaussian
    noise added to every per-class score histogram (count units; one case moves one count, sensitivity 1), 0 = none;
    ε is composed over every noised release of the run at ``delta``.
    """

    enabled: bool = False
    min_cases: int = 10
    noise_multiplier: float = 0.0
    delta: float = 1e-5
