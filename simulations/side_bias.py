"""What drives left-right disagreement: a systematic side effect, or knee-to-knee variation?

    python -m simulations.side_bias runs/exp/base runs/exp/balance

Reads the per-knee ``predictions.csv`` a centralized run writes (validation, test and external reports), pairs
the two knees of every bilateral film, and prints the mean P(right) − P(left) with a Wilcoxon signed-rank test,
the mean |ΔP|, and the mean |P(right) − P(left mirrored)|: if mirroring the left knee closes most of the gap,
orientation drives it; if not, the knees themselves differ in the model's eyes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
from scipy import stats

REPORTS = ("val_report", "test_report", "external_stage2-holdout")


def side_bias(run: Path) -> dict[str, float]:
    frames = [pd.read_csv(run / r / "predictions.csv") for r in REPORTS if (run / r / "predictions.csv").is_file()]
    knees = pd.concat(frames)
    knees = knees[knees["side"].isin(["R", "L"])]
    wide = knees.pivot_table(index="path", columns="side", values=["prob_bone_loss", "prob_bone_loss_mirror"])
    wide = wide.dropna()
    right, left = wide[("prob_bone_loss", "R")], wide[("prob_bone_loss", "L")]
    diff = right - left
    return {
        "films": len(wide),
        "mean P(R) - P(L)": float(diff.mean()),
        "wilcoxon p": float(stats.wilcoxon(diff).pvalue) if (diff != 0).any() else float("nan"),
        "mean |dP|": float(diff.abs().mean()),
        "mean |P(R) - P(L mirrored)|": float((right - wide[("prob_bone_loss_mirror", "L")]).abs().mean()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args(argv)
    table = pd.DataFrame({str(r): side_bias(r) for r in args.runs}).T
    with pd.option_context("display.width", 160, "display.precision", 3):
        print(table.to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
