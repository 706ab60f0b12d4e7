"""The experiment table of docs/real-data.md from finished runs' ``summary.json``: per run, per source, per knee and per
radiograph, at each run's own frozen τ*.

    python -m simulations.experiment_table runs/exp/base runs/exp/fed-fedavg ...

Frozen test and external evaluations only (choices are made on validation, see ``simulations.inference_variants``
and each run's per-site validation curves in MLflow). Centralized knee-level intervals resample whole
radiographs; federated intervals come from the pooled histogram bootstrap.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any


def _fmt(m: dict[str, Any], key: str, ci: bool = True) -> str:
    v = m.get(key)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    lo, hi = m.get(f"{key}_ci_lo"), m.get(f"{key}_ci_hi")
    if ci and lo is not None and hi is not None:
        return f"{v:.3f} ({lo:.2f}–{hi:.2f})"
    return f"{v:.3f}"


def _pct(m: dict[str, Any], key: str) -> str:
    v = m.get(key)
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.0f} %"


def rows_of(run: Path) -> list[list[str]]:
    summary = json.loads((run / "summary.json").read_text())
    name = run.name if run.name not in ("centralized", "federated") else f"{run.parent.name}/{run.name}"
    val = summary["metrics"]
    choice = f"{val['val_screening_auroc']:.3f} / {val['val_screening_auprc']:.3f}"
    tau = summary["threshold"]["value"]
    fell_back = "" if summary["threshold"]["rule"] == "sensitivity-constrained" else " (fallback)"
    cohorts: list[tuple[str, dict[str, Any]]] = [("pooled test", _strip(summary["metrics"], "test_"))]
    for site, values in summary["sites"].items():
        cohorts.append((f"{site} ({values['role']})", _strip(values, "test_")))
    out = []
    for cohort, m in cohorts:
        out.append(
            [
                name,
                choice if cohort == "pooled test" else "",
                f"{tau:.2f}{fell_back}",
                cohort,
                f"{m.get('screening_n', 0):.0f} / {m.get('radiograph_n', 0):.0f}",
                _fmt(m, "screening_auroc"),
                _fmt(m, "radiograph_auroc"),
                f"{_fmt(m, 'screening_sensitivity', False)} / {_fmt(m, 'screening_specificity', False)}",
                f"{_pct(m, 'bilateral_flag_disagreement')}, ρ {_fmt(m, 'bilateral_spearman', False)}"
                f" (n={m.get('bilateral_n_pairs', 0):.0f})",
                _fmt(m, "t_score_pearson_r", False),
                _fmt(m, "t_score_who_auroc", False),
            ]
        )
    return out


def _strip(metrics: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix) :]: v for k, v in metrics.items() if k.startswith(prefix)}


HEADER = [
    "run",
    "val AUROC / AUPRC (pooled, the choice)",
    "τ*",
    "cohort",
    "knees / films",
    "AUROC per knee (95 % CI)",
    "AUROC per radiograph (95 % CI)",
    "sens / spec at τ*",
    "L–R flags differ, Spearman",
    "T-score r",
    "T-score estimate AUROC",
]


def markdown(runs: list[Path]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for run in runs:
        lines += ["| " + " | ".join(row) + " |" for row in rows_of(run)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders holding summary.json")
    args = parser.parse_args(argv)
    print(markdown([r for r in args.runs if (r / "summary.json").is_file()]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
