"""Would a screening head refitted on both training sites' features together close the federated gap?

The federated model orders knees within each source about as well as the centralized one, and worse across the
two (docs/real-data.md, "One network against one network"). A site's local training only ever compares knees of its own
source, so nothing in FedAvg sets the two sources' logit levels against each other. A logistic regression on the
neck features of both sites' training knees together would, and the server could fit it exactly from pooled
sums, as it fits Platt scaling (Newton steps on summed gradients and Hessians: 129 numbers and a 129 × 129 matrix
per site per step). Before building that exchange this asks whether such a head helps: it fits the regression on
the concatenated training features (what the pooled Newton fit converges to), with and without the preset's
source × label balance, at a few L2 strengths, and scores the validation split (to choose) and the test split
(reported only), pooled, per site and by pairs within one source and across the two.

    python -m simulations.head_refit --bundle runs/real/federated/bundle --manifest runs/real/split.csv
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy.special import logit
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from simulations.seed_ensemble import source_pairs
from strnet.bundle import Bundle, load_bundle
from strnet.data.cache import PreprocessCache
from strnet.data.manifest import read_manifest
from strnet.engine import balance_weights
from strnet.evaluation import predict_frame


def scored(bundle: Bundle, frame: pd.DataFrame, cache: PreprocessCache | None) -> pd.DataFrame:
    """The bundle's calibrated logit and neck features for every labelled knee of ``frame``."""
    frame = frame[frame["label_cls"].fillna("") != ""].reset_index(drop=True)
    out = predict_frame(bundle, frame, cache=cache, with_features=True, progress=False, precision="fp32")
    out["y"] = (out["label_cls"] != "normal").astype(int)
    out["logit"] = logit(out["prob_bone_loss"].clip(1e-7, 1 - 1e-7))
    return out


def ranking(y: np.ndarray, score: np.ndarray, site: np.ndarray) -> dict[str, float]:
    """Pooled AUROC, each site's own, and the pooled pairs split into within one site and across sites."""
    row = {"pooled": float(roc_auc_score(y, score))}
    for s in sorted(set(site)):
        m = site == s
        row[str(s)] = float(roc_auc_score(y[m], score[m])) if len(set(y[m])) == 2 else float("nan")
    pairs = source_pairs(y, score, site)
    return row | {"within": pairs["within_source"], "across": pairs["across_sources"]}


def refit_table(
    bundle: Bundle,
    df: pd.DataFrame,
    train_sites: Sequence[str],
    cache: PreprocessCache | None,
    strengths: Sequence[float],
) -> pd.DataFrame:
    """One row per (split, head): the bundle's own head, then each refitted one."""
    df = df[df["site"].isin(train_sites)]
    parts = {split: scored(bundle, df[df["split"] == split], cache) for split in ("train", "val", "test")}
    train = parts["train"]
    x_train = np.stack(train["neck_features"].to_numpy())
    heads: dict[str, LogisticRegression] = {}
    for c in strengths:
        for balance in ("none", "source_label"):
            weight = balance_weights(train).numpy() if balance == "source_label" else None
            weight = None if weight is None else weight / weight.mean()
            model = LogisticRegression(C=c, max_iter=5000)
            heads[f"refit C={c:g}, balance {balance}"] = model.fit(x_train, train["y"], sample_weight=weight)
    rows = []
    for split in ("val", "test"):
        part = parts[split]
        y, site = part["y"].to_numpy(), part["site"].astype(str).to_numpy()
        x = np.stack(part["neck_features"].to_numpy())
        rows.append({"split": split, "head": "the bundle's"} | ranking(y, part["logit"].to_numpy(), site))
        for name, model in heads.items():
            rows.append({"split": split, "head": name} | ranking(y, model.decision_function(x), site))
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--train-sites", nargs="+", default=["stage1", "stage2"])
    parser.add_argument("--strength", nargs="+", type=float, default=[0.01, 0.1, 1.0], help="the L2 C values")
    parser.add_argument("--cache", default=".cache/preprocessed")
    args = parser.parse_args(argv)
    table = refit_table(
        load_bundle(args.bundle),
        read_manifest(args.manifest),
        args.train_sites,
        PreprocessCache(args.cache),
        args.strength,
    )
    with pd.option_context("display.width", 160, "display.precision", 3):
        print(table.to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
