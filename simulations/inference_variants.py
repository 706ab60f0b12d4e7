"""Compare inference-time variants of one trained bundle on a split, per site: the served model as bundled, and
with test-time mirror averaging. Only for choosing on validation data (never pass ``--split test`` to choose).

    python -m simulations.inference_variants --bundle runs/real/centralized/bundle --manifest runs/real/split.csv

Prints per site (and pooled) AUROC, per-radiograph AUROC, left-right flag disagreement, Spearman R/L and mirror
stability at the bundle's τ* after re-fitting calibration and τ* on the same split for each variant (so the
numbers are comparable across variants; they are optimistic for the absolute level).
"""

from __future__ import annotations

import argparse
import copy

import pandas as pd
from scipy.special import logit

from configs.schema import ThresholdConfig
from strnet.bundle import load_bundle
from strnet.calibration import Platt, fit_platt_to_logits
from strnet.data.cache import PreprocessCache
from strnet.data.manifest import read_manifest
from strnet.evaluation import frame_metrics, predict_frame
from strnet.sufficient import ValidationCounts

COLUMNS = (
    "screening_n",
    "screening_auroc",
    "radiograph_auroc",
    "screening_sensitivity",
    "screening_specificity",
    "bilateral_n_pairs",
    "bilateral_flag_disagreement",
    "bilateral_spearman",
    "mirror_mean_abs_dp",
    "screening_ece_raw",
    "screening_ece",
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--split", default="val")
    parser.add_argument("--cache", default=".cache/preprocessed")
    args = parser.parse_args(argv)
    df = read_manifest(args.manifest)
    df = df[(df["split"] == args.split) & (df["label_cls"] != "")].reset_index(drop=True)
    th = ThresholdConfig()
    rows = []
    for mirror in (False, True):
        bundle = load_bundle(args.bundle)
        bundle.metadata = copy.deepcopy(bundle.metadata)
        bundle.metadata.setdefault("model", {})["test_time_mirror"] = mirror
        bundle.metadata["calibration"] = None
        pred = predict_frame(bundle, df, cache=PreprocessCache(args.cache), with_mirror=True)
        clip = (1e-12, 1 - 1e-12)
        logits = logit(pred["prob_bone_loss_uncalibrated"].clip(*clip).to_numpy())
        y = (pred["label_cls"] != "normal").to_numpy(int)
        platt = Platt.from_dict(fit_platt_to_logits(logits, y))
        pred["prob_bone_loss"] = platt.probabilities(logits)
        pred["prob_bone_loss_mirror"] = platt.probabilities(logit(pred["prob_bone_loss_mirror"].clip(*clip).to_numpy()))
        counts = ValidationCounts.from_scores(
            y, pred["prob_bone_loss"].to_numpy(), grid=th.grid(), n_bins=th.histogram_bins
        )
        tau = counts.threshold(th.grid(), th.min_sensitivity)["value"]
        for site, part in [("pooled", pred), *pred.groupby("site")]:
            metrics, _ = frame_metrics(part, tau, n_bins=th.histogram_bins, n_boot=0, seed=0)
            rows.append(
                {"variant": "mirror-averaged" if mirror else "as trained", "site": site, "tau": tau}
                | {k: metrics[k] for k in COLUMNS}
            )
    table = pd.DataFrame(rows)
    with pd.option_context("display.width", 200, "display.max_columns", 30, "display.precision", 3):
        print(table.to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
