"""Can a cohort decide a target? How often a model of known true quality meets it on a cohort of that size.

Issue 8 checks "hold-out AUROC ≥ 0.85" on a hold-out with 8 normal knees, and "Spearman R/L ≥ 0.8" on 9
bilateral test films. A point estimate on so few cases is one draw from a wide spread. A model that truly has
the target's value passes about half the time, and a much weaker one sometimes passes by luck. This module draws
each statistic many times for a cohort of the given size and a stated true value, and counts how often the
draw meets the target:

* **AUROC** over ``n_normal`` and ``n_bone_loss`` knees. Scores are binormal with equal variances
  (d' = √2·Φ⁻¹(A) gives true AUROC A). The two knees of a bilateral film carry one label and correlated scores
  (``--film-correlation`` ρ: each knee's score is a shared film part and its own part, variance ρ and 1 − ρ, so
  every knee keeps the same marginal and the same true AUROC). At ρ = 0 knees are independent, the optimistic
  side; at ρ = 1 a film counts once. The cohort's own mix of lone knees and bilateral films per class is used.
* **Spearman R/L** over ``n_films`` bilateral films: the two knees' scores are bivariate normal with the
  Pearson r that gives the true Spearman ρs (r = 2·sin(π·ρs/6), the identity for Gaussian pairs).
* **Flags that differ** between a film's two knees: the number of such films is binomial (exact, no draws);
  this target is met at or below its value.

``needed`` answers the question a target's author has to settle first: how many normal knees (at the cohort's
prevalence and share of bilateral films), or bilateral films, before the central 95 % of a model's observed
values lies within ± a margin of its true value.

    python -m simulations.target_power --manifest runs/real/split.csv
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import binom, norm, rankdata

from simulations.seed_ensemble import cohorts
from strnet.data.manifest import read_manifest

TRUE_AUROC = (0.55, 0.60, 0.65, 0.70, 0.75, 0.80, 0.85, 0.90)
TRUE_SPEARMAN = (0.50, 0.60, 0.70, 0.77, 0.80, 0.85, 0.90)
TRUE_DISAGREEMENT = (0.02, 0.05, 0.088, 0.10, 0.15, 0.20)


def rowwise_auroc(normal: np.ndarray, bone_loss: np.ndarray) -> np.ndarray:
    """AUROC of each row from the Mann–Whitney rank sum: the share of (bone-loss, normal) pairs ordered correctly,
    ties half, without forming the pairs (a cohort of hundreds of knees times thousands of draws)."""
    n0, n1 = normal.shape[1], bone_loss.shape[1]
    ranks = rankdata(np.concatenate([bone_loss, normal], axis=1), axis=1)
    return (ranks[:, :n1].sum(axis=1) - n1 * (n1 + 1) / 2.0) / (n0 * n1)


def class_scores(
    shift: float, knees: int, films: int, film_correlation: float, draws: int, rng: np.random.Generator
) -> np.ndarray:
    """Scores of one class: ``knees`` knees of which ``2 * films`` are the two knees of bilateral films.

    Columns hold the lone knees first, then each film's two knees side by side. Every knee is N(shift, 1); the two
    knees of a film correlate at ``film_correlation``.
    """
    if not 0.0 <= film_correlation <= 1.0:
        raise ValueError(f"the film correlation must lie in [0, 1], got {film_correlation}")
    if films < 0 or 2 * films > knees:
        raise ValueError(f"{films} bilateral films need {2 * films} knees, the class has {knees}")
    lone = rng.normal(shift, 1.0, size=(draws, knees - 2 * films))
    shared = np.repeat(rng.normal(size=(draws, films)), 2, axis=1)
    own = rng.normal(size=(draws, 2 * films))
    paired = shift + math.sqrt(film_correlation) * shared + math.sqrt(1.0 - film_correlation) * own
    return np.concatenate([lone, paired], axis=1)


def auroc_draws(
    true_auroc: float,
    n_normal: int,
    n_bone_loss: int,
    draws: int,
    rng: np.random.Generator,
    *,
    normal_films: int = 0,
    bone_loss_films: int = 0,
    film_correlation: float = 0.0,
) -> np.ndarray:
    """Observed AUROCs of a model whose true AUROC is ``true_auroc``, on cohorts of the given size; ``*_films``
    of each class's knees come as bilateral films whose two knees correlate at ``film_correlation``."""
    if not 0.0 < true_auroc < 1.0:
        raise ValueError(f"true AUROC must lie strictly between 0 and 1, got {true_auroc}")
    if n_normal < 1 or n_bone_loss < 1:
        raise ValueError(f"an AUROC needs both classes, got {n_normal} normal and {n_bone_loss} bone-loss knees")
    d = math.sqrt(2.0) * norm.ppf(true_auroc)
    return rowwise_auroc(
        class_scores(0.0, n_normal, normal_films, film_correlation, draws, rng),
        class_scores(d, n_bone_loss, bone_loss_films, film_correlation, draws, rng),
    )


def rowwise_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman's ρ of each row pair: Pearson's r of the rows' ranks (average ranks for ties)."""
    ra, rb = rankdata(a, axis=1), rankdata(b, axis=1)
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    return (ra * rb).sum(axis=1) / np.sqrt((ra**2).sum(axis=1) * (rb**2).sum(axis=1))


def spearman_draws(true_spearman: float, n_films: int, draws: int, rng: np.random.Generator) -> np.ndarray:
    """Observed Spearman R/L over ``n_films`` films, for knees whose scores truly correlate at ``true_spearman``."""
    if not -1.0 < true_spearman < 1.0:
        raise ValueError(f"true Spearman must lie strictly between -1 and 1, got {true_spearman}")
    if n_films < 3:
        raise ValueError(f"a Spearman over films needs 3 or more films, got {n_films}")
    r = 2.0 * math.sin(math.pi * true_spearman / 6.0)
    right = rng.normal(size=(draws, n_films))
    left = r * right + math.sqrt(1.0 - r * r) * rng.normal(size=(draws, n_films))
    return rowwise_spearman(right, left)


def disagreement_summary(true_rate: float, n_films: int, target: float) -> dict[str, float]:
    """The share of films whose two knees get different flags, for a true rate: exact binomial, no draws.

    ``meets`` is the chance of an observed share at or *below* ``target`` (fewer disagreeing films is better).
    """
    if not 0.0 <= true_rate <= 1.0 or n_films < 1:
        raise ValueError(f"need a rate in [0, 1] and one or more films, got {true_rate} and {n_films}")
    dist = binom(n_films, true_rate)
    return {
        "median": float(dist.median() / n_films),
        "low": float(dist.ppf(0.025) / n_films),
        "high": float(dist.ppf(0.975) / n_films),
        "meets": float(dist.cdf(math.floor(target * n_films + 1e-9))),
    }


def summary(values: np.ndarray, target: float) -> dict[str, float]:
    """Median and central 95 % of the observed values, and the share that meets ``target``."""
    low, median, high = np.percentile(values, [2.5, 50.0, 97.5])
    return {"median": float(median), "low": float(low), "high": float(high), "meets": float(np.mean(values >= target))}


def needed(draw: Callable[[int], np.ndarray], margin: float, *, start: int, limit: int = 10_000) -> int:
    """The smallest size ``n`` ≥ ``start`` whose central 95 % of ``draw(n)`` lies within ± ``margin`` of its median.

    ``start`` is the cohort's own size: a cohort that already fits needs no more than it has. ``draw(n)`` returns
    observed values for a cohort of size ``n``; the spread shrinks as n grows, so the search doubles ``n`` until
    the spread fits, then bisects.
    """

    def fits(n: int) -> bool:
        s = summary(draw(n), 0.0)
        return s["high"] - s["median"] <= margin and s["median"] - s["low"] <= margin

    low, high = start - 1, start
    while not fits(high):
        low, high = high, high * 2
        if high > limit:
            raise ValueError(f"more than {limit} would be needed for ± {margin}")
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if fits(mid) else (mid, high)
    return high


def cohort_counts(frame: pd.DataFrame) -> dict[str, int]:
    """Labelled normal and bone-loss knees, the films with both knees in the cohort (the bilateral films), and
    how many of those are normal and bone-loss films (both knees of one screening class)."""
    labelled = frame[frame["label_cls"] != ""]
    sides = frame[frame["side"].isin(("R", "L"))].groupby("path")["side"].nunique()
    bilateral = labelled[labelled["path"].isin(sides.index[sides == 2])]
    normal = (bilateral["label_cls"] == "normal").groupby(bilateral["path"]).agg(["size", "sum"])
    return {
        "normal": int((labelled["label_cls"] == "normal").sum()),
        "bone_loss": int((labelled["label_cls"] != "normal").sum()),
        "bilateral_films": int((sides == 2).sum()),
        "normal_films": int(((normal["size"] == 2) & (normal["sum"] == 2)).sum()),
        "bone_loss_films": int(((normal["size"] == 2) & (normal["sum"] == 0)).sum()),
    }


def cohort_power(
    counts: dict[str, int],
    *,
    auroc_target: float,
    spearman_target: float,
    disagreement_target: float,
    draws: int,
    seed: int,
    margin: float,
    film_correlation: float = 0.0,
) -> dict[str, object]:
    """Each target's chance on one cohort for a range of true values, and the size a ± ``margin`` spread needs."""
    rng = np.random.default_rng(seed)
    out: dict[str, object] = {"counts": counts}
    n0, n1 = counts["normal"], counts["bone_loss"]
    if n0 and n1:
        f0, f1 = counts["normal_films"], counts["bone_loss_films"]

        def draw(a: float, n: int) -> np.ndarray:
            """``n`` normal knees, the bone-loss knees and both classes' films at the cohort's own proportions."""
            m = max(1, round(n * n1 / n0))
            films = {
                "normal_films": min(n // 2, round(n * f0 / n0)),
                "bone_loss_films": min(m // 2, round(m * f1 / n1)),
            }
            return auroc_draws(a, n, m, draws, rng, film_correlation=film_correlation, **films)

        out["auroc"] = {f"{a:.2f}": summary(draw(a, n0), auroc_target) for a in TRUE_AUROC}
        out["normal_knees_needed"] = needed(lambda n: draw(auroc_target, n), margin, start=max(n0, 2))
    films = counts["bilateral_films"]
    if films >= 3:
        out["spearman"] = {
            f"{s:.2f}": summary(spearman_draws(s, films, draws, rng), spearman_target) for s in TRUE_SPEARMAN
        }
        out["films_needed"] = needed(
            lambda n: spearman_draws(spearman_target, n, draws, rng), margin, start=max(films, 3)
        )
    if films:
        out["disagreement"] = {
            f"{r:.3f}": disagreement_summary(r, films, disagreement_target) for r in TRUE_DISAGREEMENT
        }
        out["films_needed_for_disagreement"] = needed(
            lambda n: rng.binomial(n, disagreement_target, size=draws) / n, margin, start=films
        )
    return out


def table(rows: dict[str, dict[str, float]], what: str, target: float, *, at_most: bool = False) -> str:
    sign = "≤" if at_most else "≥"
    lines = [f"| true {what} | median observed | 95 % of draws | meets {sign} {target:g} |", "|---|---|---|---|"]
    for true, s in rows.items():
        lines.append(f"| {true} | {s['median']:.3f} | {s['low']:.3f}–{s['high']:.3f} | {100 * s['meets']:.1f} % |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--manifest", type=Path, required=True, help="a split manifest (strnet data split)")
    p.add_argument("--auroc-target", type=float, default=0.85)
    p.add_argument("--spearman-target", type=float, default=0.80)
    p.add_argument("--disagreement-target", type=float, default=0.10, help="films whose flags differ, at most")
    p.add_argument(
        "--film-correlation",
        type=float,
        default=0.0,
        help="correlation of the two knees' scores within a bilateral film for the AUROC (default 0: independent)",
    )
    p.add_argument("--margin", type=float, default=0.05, help="± spread the needed sizes are for (default 0.05)")
    p.add_argument("--draws", type=int, default=20_000, help="draws per true value (default 20000, about 1 min)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the numbers here")
    args = p.parse_args(argv)
    if args.draws < 100:
        p.error(f"--draws {args.draws}: need 100 or more to read a 95 % range")
    if not 0.0 < args.margin < 1.0:
        p.error(f"--margin {args.margin}: must lie strictly between 0 and 1")
    if not 0.0 <= args.film_correlation <= 1.0:
        p.error(f"--film-correlation {args.film_correlation}: must lie in [0, 1]")
    for name in ("auroc_target", "spearman_target", "disagreement_target"):
        if not 0.0 < getattr(args, name) <= 1.0:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must lie in (0, 1]")
    df = read_manifest(args.manifest)
    train_sites = sorted(set(df.loc[df["split"] == "train", "site"]))
    if not train_sites:
        raise SystemExit(f"{args.manifest}: no rows with split 'train'; give a split manifest (strnet data split)")
    parts = {k: v for k, v in cohorts(df, train_sites).items() if not k.startswith("val ")}
    result = {}
    for name, frame in parts.items():
        res = cohort_power(
            cohort_counts(frame),
            auroc_target=args.auroc_target,
            spearman_target=args.spearman_target,
            disagreement_target=args.disagreement_target,
            draws=args.draws,
            seed=args.seed,
            margin=args.margin,
            film_correlation=args.film_correlation,
        )
        result[name] = res
        c = res["counts"]
        print(
            f"\n## {name}: {c['normal']} normal, {c['bone_loss']} bone-loss knees, "
            f"{c['bilateral_films']} bilateral films ({c['normal_films']} normal, {c['bone_loss_films']} bone loss); "
            f"film correlation {args.film_correlation:g}"
        )
        if "auroc" in res:
            print(table(res["auroc"], "AUROC", args.auroc_target))
            print(f"normal knees for ± {args.margin:g} at AUROC {args.auroc_target:g}: {res['normal_knees_needed']}")
        if "spearman" in res:
            print(table(res["spearman"], "Spearman R/L", args.spearman_target))
            print(f"bilateral films for ± {args.margin:g} at Spearman {args.spearman_target:g}: {res['films_needed']}")
        if "disagreement" in res:
            print(
                table(res["disagreement"], "share of films whose flags differ", args.disagreement_target, at_most=True)
            )
            need = res["films_needed_for_disagreement"]
            print(f"bilateral films for ± {args.margin:g} at a share of {args.disagreement_target:g}: {need}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
