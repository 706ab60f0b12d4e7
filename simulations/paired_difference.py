"""The AUROC difference between two bundles on the same knees, with a paired bootstrap over whole radiographs.

    python -m simulations.paired_difference --a runs/real/centralized/bundle --b runs/real/federated/bundle \\
        --manifest runs/real/split.csv

For the pooled test cohort (the training sites' test splits) and every external site (its whole cohort), each
replicate draws radiographs with replacement, stratified by the film's label, and recomputes both models'
per-knee AUROC on the same draw; the interval of B − A is the 2.5th–97.5th percentile. This needs both
models' per-knee scores, so it runs where the images are (public data here), not on a federation's server.
Several bundles on a side compare their ensemble (the mean of their calibrated logits, ranked as
:mod:`strnet.ensemble` ranks them), e.g. three seeds of each mode (``make real-data-seeds``); an ensemble bundle
(``model.members``) is one bundle.
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from simulations.seed_ensemble import cohorts, mean_logit, source_pairs
from strnet.bundle import load_bundle
from strnet.data.cache import PreprocessCache
from strnet.data.manifest import read_manifest
from strnet.evaluation import predict_frame


def paired_auroc_difference(
    y: np.ndarray, p_a: np.ndarray, p_b: np.ndarray, film: np.ndarray, *, n_boot: int = 2000, seed: int = 42
) -> dict[str, float]:
    """AUROC(B) − AUROC(A) and its radiograph-level paired bootstrap interval."""
    films, member = np.unique(film, return_inverse=True)
    groups = [np.flatnonzero(member == i) for i in range(len(films))]
    label = np.array([y[g].max() for g in groups])
    strata = [np.flatnonzero(label == c) for c in (0, 1)]
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n_boot):
        chosen = np.concatenate([s[rng.integers(0, len(s), len(s))] for s in strata if len(s)])
        idx = np.concatenate([groups[g] for g in chosen])
        if len(np.unique(y[idx])) < 2:
            continue
        diffs.append(roc_auc_score(y[idx], p_b[idx]) - roc_auc_score(y[idx], p_a[idx]))
    a, b = roc_auc_score(y, p_a), roc_auc_score(y, p_b)
    lo, hi = np.percentile(diffs, [2.5, 97.5]) if diffs else (np.nan, np.nan)
    return {"auroc_a": a, "auroc_b": b, "difference": b - a, "ci_lo": float(lo), "ci_hi": float(hi), "n": len(y)}


def ensemble_score(bundles: list[str], frame: pd.DataFrame, cache: PreprocessCache) -> np.ndarray:
    """A score per knee that ranks as the bundles' ensemble does: one bundle's calibrated logit, or the mean over
    several (the ensemble's own calibration on top is monotone, and AUROC reads ranks only)."""
    return mean_logit([predict_frame(load_bundle(b), frame, cache=cache) for b in bundles])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--a", required=True, nargs="+", help="reference bundle(s) (e.g. centralized); several: their ensemble"
    )
    parser.add_argument(
        "--b", required=True, nargs="+", help="compared bundle(s) (e.g. federated); several: their ensemble"
    )
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--train-sites", nargs="+", default=["stage1", "stage2"])
    parser.add_argument("--cache", default=".cache/preprocessed")
    args = parser.parse_args(argv)
    # the reported cohorts (pooled test, each external site) as the seed study reads them; validation is for choosing
    every = cohorts(read_manifest(args.manifest), args.train_sites)
    reported = {name: part for name, part in every.items() if not name.startswith("val ")}
    cache = PreprocessCache(args.cache)
    rows, pairs = [], []
    for name, part in reported.items():
        pa, pb = (ensemble_score(paths, part, cache) for paths in (args.a, args.b))
        y = (part["label_cls"] != "normal").to_numpy(int)
        film, _ = pd.factorize(part["path"].str.lower())
        rows.append({"cohort": name} | paired_auroc_difference(y, pa, pb, film))
        if part["source"].nunique() > 1:
            source = part["source"].to_numpy()
            pairs.extend(
                {"cohort": name, "model": side}
                | source_pairs(y, p, source)
                | {f"mean score {s}": float(p[source == s].mean()) for s in sorted(set(source))}
                for side, p in (("a", pa), ("b", pb))
            )
    with pd.option_context("display.width", 160, "display.precision", 3):
        print(pd.DataFrame(rows).to_string(index=False))
        if pairs:
            print("\npooled AUROC by pair: within one source, across two (a model can order the latter by source)")
            print(pd.DataFrame(pairs).to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
