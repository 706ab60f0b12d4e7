"""Does a bundle's BatchNorm statistics explain its per-source results? Re-estimate them and see, on validation.

The federated (FedBN) bundle scored the Mendeley validation knees at AUROC 0.38 where the centralized bundle
scored 0.68, while an IID split of the same cases over two sites matched the centralized run. This probe keeps
every learned weight and replaces only BatchNorm's running statistics with those :mod:`strnet.batchnorm`
re-estimates on each training source's own training images and pools by their moments (what FedBN's bundle now
does, through the sites). It prints AUROC per split and source for the bundle as it is and with the
re-estimated statistics, and with each site's own statistics (a training source's from its training images, an
external site's from its own unlabelled images); choose on the validation rows only.

    python -m simulations.bn_probe --bundle runs/real/federated/bundle --manifest runs/real/split.csv
"""

from __future__ import annotations

import argparse
import copy

import pandas as pd
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from strnet import batchnorm
from strnet.bundle import Bundle, load_bundle
from strnet.data.cache import PreprocessCache
from strnet.data.dataset import KneeDataset
from strnet.evaluation import predict_frame


def with_statistics(model: nn.Module, frames: list[pd.DataFrame], bundle: Bundle, cache: PreprocessCache) -> nn.Module:
    """A copy of ``model`` with BatchNorm statistics re-estimated on each frame's images and pooled."""
    per_source = [batchnorm.reestimate(model, KneeDataset(f, bundle.preprocess, cache)) for f in frames]
    out = copy.deepcopy(model)
    out.load_state_dict({k: torch.from_numpy(v) for k, v in batchnorm.pool(per_source).items()}, strict=False)
    return out.eval()


def _scores(bundle: Bundle, scored: list[tuple[nn.Module, pd.DataFrame]], cache: PreprocessCache) -> float:
    """AUROC over the parts together, each part predicted by its own model (one model: the usual AUROC)."""
    preds = pd.concat(
        [predict_frame(Bundle(m, bundle.metadata, bundle.path), f, cache=cache, progress=False) for m, f in scored]
    )
    y = (preds["label_cls"].astype(str).str.lower() != "normal").astype(int)
    return float(roc_auc_score(y, preds["prob_bone_loss"])) if y.nunique() == 2 else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--manifest", required=True, help="split manifest (site, split, label_cls, path, side)")
    parser.add_argument("--cache", default=".cache/preprocessed")
    args = parser.parse_args(argv)
    bundle = load_bundle(args.bundle)
    frame = pd.read_csv(args.manifest, keep_default_na=False)
    cache = PreprocessCache(args.cache)
    train = frame[frame["split"] == "train"]
    sources = {site: rows for site, rows in train.groupby("site")}
    pooled = with_statistics(bundle.model, list(sources.values()), bundle, cache)
    # each site's own statistics: a training site's from its training images, an external site's from its own
    # (unlabelled) images — what a hospital can do for itself before it reads any result (AdaBN)
    own = {
        site: with_statistics(bundle.model, [sources.get(site, frame[frame["site"] == site])], bundle, cache)
        for site in sorted(frame["site"].unique())
    }
    variants = ["as bundled", "re-estimated per source, pooled", "each site's own statistics"]
    print("| split | cohort | knees | " + " | ".join(variants) + " |")
    print("|---|---|---|" + "---|" * len(variants))
    for split in ("val", "test"):
        rows = frame[frame["split"] == split]
        cohorts = [("pooled", rows[rows["site"].isin(list(sources))])]
        cohorts += [(site, rows[rows["site"] == site]) for site in sorted(rows["site"].unique())]
        for name, part in cohorts:
            by_site = [(own[site], p) for site, p in part.groupby("site")]
            scores = [
                _scores(bundle, [(bundle.model, part)], cache),
                _scores(bundle, [(pooled, part)], cache),
                _scores(bundle, by_site, cache),
            ]
            print(f"| {split} | {name} | {len(part)} | " + " | ".join(f"{s:.3f}" for s in scores) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
