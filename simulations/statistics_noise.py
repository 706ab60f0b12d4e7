"""What ``privacy.statistics`` noise costs τ* and the pooled AUROC (README, "Private statistics").

Simulated validation scores (binormal, a given AUROC and prevalence, calibrated-looking probabilities) at two
training sites go through the product's own path: each site's :class:`strnet.sufficient.ValidationCounts`,
:func:`strnet.released.protect` at σ, the server's :func:`strnet.released.restore_validation` (τ-grid counts
from the noised histograms), the pool, :func:`server.pooled.pooled_threshold` and the pooled histogram AUROC.
Every seed is compared with the exact answer on the concatenated scores: |Δτ*| and how often τ* is exact, the
validation sensitivity/specificity the chosen τ* really has (and how often it misses the rule's minimum), the
pooled AUROC's error, and how often no τ* can be chosen (the noise drove a class's pooled total to <= 0); τ*
columns average over the seeds that chose one. ε is that of a whole run of
``--rounds`` rounds (each round's validation counts, the calibrated ones, and the frozen evaluation's
histograms of both splits), composed by :class:`strnet.released.StatisticsLedger`.

    python -m simulations.statistics_noise --n 100 1000 --seeds 200
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from configs.schema import ThresholdConfig
from server.pooled import pool, pooled_threshold
from strnet import metrics as M
from strnet.protocol import MessageKind, decode_validation, encode, encode_splits
from strnet.released import StatisticsLedger, StatisticsPrivacy, protect, restore_validation
from strnet.sufficient import EvaluationCounts, ValidationCounts

SIGMAS = (0.0, 1.0, 2.0, 5.0, 10.0)
BINS = (100, 1000)
TAU_KEYS = ("tau", "tau_error", "tau_exact", "sensitivity", "specificity", "below_target")


def scores(rng: np.random.Generator, n: int, auroc: float, prevalence: float) -> tuple[np.ndarray, np.ndarray]:
    """Binormal scores with the given AUROC, through a logistic link (probabilities spread over [0, 1])."""
    d = math.sqrt(2.0) * norm.ppf(auroc)
    y = (rng.random(n) < prevalence).astype(np.int64)
    z = rng.normal(size=n) + d * y
    return y, 1.0 / (1.0 + np.exp(-1.5 * (z - d / 2)))


def run_epsilon(sigma: float, rounds: int, delta: float) -> float:
    """ε of one site over a whole run: ``rounds`` + 1 validation releases and a frozen evaluation of two splits."""
    ledger = StatisticsLedger(StatisticsPrivacy(enabled=True, noise_multiplier=sigma, delta=delta))
    for _ in range(rounds + 1):
        ledger.record("site", MessageKind.VAL_STATS, {"hist": None})
    empty = EvaluationCounts.empty(100)
    ledger.record("site", MessageKind.FROZEN, encode_splits({"test": empty, "val": empty}))
    return ledger.epsilon("site")


def one(
    seed: int, n: int, bins: int, sigma: float, *, auroc: float, prevalence: float, sites: int, min_sensitivity: float
) -> dict[str, float]:
    th = ThresholdConfig(histogram_bins=bins, min_sensitivity=min_sensitivity)
    grid = th.grid()
    rng = np.random.default_rng(seed)
    parts = [scores(rng, n // sites, auroc, prevalence) for _ in range(sites)]
    y = np.concatenate([p[0] for p in parts])
    p = np.concatenate([p[1] for p in parts])
    exact_tau = M.select_threshold(y, p, min_sensitivity, grid)
    policy = StatisticsPrivacy(enabled=True, min_cases=1, noise_multiplier=sigma)
    noise = np.random.default_rng(10_000 + seed)
    per_site = {}
    for i, (ys, ps) in enumerate(parts):
        release = protect(
            MessageKind.VAL_STATS, encode(ValidationCounts.from_scores(ys, ps, grid=grid, n_bins=bins)), policy, noise
        )
        arrays = restore_validation(release.arrays, grid) if policy.noised else release.arrays
        per_site[f"s{i}"] = decode_validation(f"s{i}", arrays, n_bins=bins, n_grid=len(grid), noised=policy.noised)
    pooled = pool(per_site, quorum=sites, what="simulation")
    auroc_error = abs(pooled.ranking()["auroc"] - roc_auc_score(y, p))
    try:
        tau = float(pooled_threshold(pooled, th, sites=list(per_site), excluded=[])["value"])
    except ValueError:  # the noise swamped a class: its pooled total is <= 0, no τ* can be chosen
        return {"failed": 1.0, "auroc_error": auroc_error}
    flag = p >= tau
    return {
        "failed": 0.0,
        "tau": tau,
        "tau_error": abs(tau - exact_tau),
        "tau_exact": float(tau == exact_tau),
        "sensitivity": float(flag[y == 1].mean()),
        "specificity": float((~flag[y == 0]).mean()),
        "below_target": float(flag[y == 1].mean() < min_sensitivity),
        "auroc_error": auroc_error,
    }


def table(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for n in args.n:
        for bins in BINS:
            for sigma in SIGMAS:
                runs = [
                    one(
                        s,
                        n,
                        bins,
                        sigma,
                        auroc=args.auroc,
                        prevalence=args.prevalence,
                        sites=args.sites,
                        min_sensitivity=args.min_sensitivity,
                    )
                    for s in range(args.seeds)
                ]
                row: dict[str, Any] = {"n": n, "bins": bins, "sigma": sigma}
                chosen = [r for r in runs if not r["failed"]] or [dict.fromkeys(TAU_KEYS, math.nan)]
                row |= {k: float(np.mean([r[k] for r in chosen])) for k in TAU_KEYS}
                row |= {k: float(np.mean([r[k] for r in runs])) for k in ("failed", "auroc_error")}
                row["tau_sd"] = float(np.std([r["tau"] for r in chosen]))
                row["epsilon"] = run_epsilon(sigma, args.rounds, args.delta) if sigma > 0 else math.inf
                rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    out = [
        f"| n | bins | σ | ε ({args.rounds} rounds) | τ* mean ± sd | \\|Δτ*\\| | τ* exact | val sensitivity | "
        f"sens < {args.min_sensitivity:g} | val specificity | \\|ΔAUROC\\| | no τ* |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        eps = "∞ (exact)" if math.isinf(r["epsilon"]) else f"{r['epsilon']:.1f}"
        out.append(
            f"| {r['n']} | {r['bins']} | {r['sigma']:g} | {eps} | {r['tau']:.2f} ± {r['tau_sd']:.2f} | "
            f"{r['tau_error']:.3f} | {r['tau_exact']:.0%} | {r['sensitivity']:.3f} | {r['below_target']:.0%} | "
            f"{r['specificity']:.3f} | {r['auroc_error']:.3f} | {r['failed']:.0%} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[100, 1000], help="validation cases over all sites")
    ap.add_argument("--sites", type=int, default=2)
    ap.add_argument("--auroc", type=float, default=0.85)
    ap.add_argument("--prevalence", type=float, default=0.5)
    ap.add_argument("--min-sensitivity", type=float, default=0.86)
    ap.add_argument("--seeds", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=6, help="federation rounds behind the ε column (demo: 6)")
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    rows = table(args)
    print(markdown(rows, args))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "out"}, "rows": rows}))


if __name__ == "__main__":
    main()
