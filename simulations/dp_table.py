"""What DP-SGD costs on the demo's synthetic sites: screening AUROC and T-score MAE at ε ≈ 1, 3, 8 (δ = 1e-5)
beside the non-private runs, centralized and federated (``make dp-table``; README, "Privacy").

Every row is a whole run of the product's own pipelines on one synthetic scenario (the demo's: 150 patients a
site, stage1 + stage2 train, the hospital external): ``strnet train`` and the federation's ServerApp and
ClientApp code, the latter driven in this process (:class:`simulations.inprocess.InProcessGrid`, the same
messages without Ray, which would add its start-up to each of the ten runs). Rows:

* ``no DP``: the product as it is (BatchNorm, T-score refit);
* ``no DP, per-case model``: the DP model form without noise or clipping and without the refit, which DP-SGD
  turns off — the model's own cost, separated from the noise's;
* ``ε = 8, 3, 1``: DP-SGD with the noise calibrated for the run's planned steps at every site.

    python -m simulations.dp_table --out runs/dp
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

from configs import load_config
from configs.schema import Config
from server.federation import run_federated
from server.tracking import Tracker
from simulations.inprocess import InProcessGrid
from simulations.scenario import build_synthetic_scenario
from strnet.centralized import run_centralized

ROLES = {"stage1": "train", "stage2": "train", "hospital": "external"}
SETTINGS: dict[str, list[str]] = {
    "no DP": [],
    "no DP, per-case model": ["model.norm=group", "tscore.rounds=0"],
    **{
        f"ε = {eps:g}": ["privacy.dp.enabled=true", f"privacy.dp.target_epsilon={eps}", "privacy.dp.delta=1e-5"]
        for eps in (8, 3, 1)
    },
}


def setting_config(base: list[str], manifests: dict[str, Path], out: Path, overrides: list[str]) -> Config:
    sites = [{"name": s, "role": ROLES[s], "manifest": str(p.resolve())} for s, p in manifests.items()]
    return load_config(
        "demo",
        [
            *base,
            *overrides,
            f"federation.sites={json.dumps(sites)}",
            f"output_dir={json.dumps(str(out.resolve()))}",
            "tracking.experiment=strnet-dp",
        ],
    )


def row(setting: str, mode: str, folder: Path) -> dict[str, Any]:
    summary = json.loads((folder / "summary.json").read_text())
    m = {k: (math.nan if v is None else v) for k, v in summary["metrics"].items()}
    privacy = summary.get("privacy") or {}
    return {
        "setting": setting,
        "mode": mode,
        "epsilon": privacy.get("epsilon", math.inf),
        "epsilon_by_site": {s: r["epsilon"] for s, r in privacy.get("sites", {}).items()},
        "auroc": m["test_screening_auroc"],
        "auroc_lo": m["test_screening_auroc_ci_lo"],
        "auroc_hi": m["test_screening_auroc_ci_hi"],
        "sensitivity": m["test_screening_sensitivity"],
        "specificity": m["test_screening_specificity"],
        "tau_star": m["tau_star"],
        "t_score_mae": m.get("test_t_score_mae", math.nan),
        "hospital_auroc": summary["sites"].get("hospital", {}).get("test_screening_auroc", math.nan),
        "wall_seconds": m["wall_seconds"],
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| setting | mode | ε (largest site) | pooled test AUROC (95 % CI) | sens / spec at τ* | τ* | T-score MAE "
        "| hospital (external) AUROC | wall |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        eps = "—" if math.isinf(r["epsilon"]) else f"{r['epsilon']:.2f}"
        lines.append(
            f"| {r['setting']} | {r['mode']} | {eps} | {r['auroc']:.3f} ({r['auroc_lo']:.3f}–{r['auroc_hi']:.3f}) "
            f"| {r['sensitivity']:.3f} / {r['specificity']:.3f} | {r['tau_star']:.2f} | {r['t_score_mae']:.2f} "
            f"| {r['hospital_auroc']:.3f} | {r['wall_seconds']:.0f} s |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/dp")
    parser.add_argument("--patients", type=int, default=150)
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS), help="a subset of the rows")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    args = parser.parse_args(argv)
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # what a SuperLink would stamp
    out = Path(args.out)
    base = [*args.set, f"tracking.uri={json.dumps('sqlite:///' + str((out / 'mlflow.db').resolve()))}"]
    size = load_config("demo", base).preprocess.size
    scenario = build_synthetic_scenario(out, seed=42, n_patients=args.patients, image_size=size * 2)
    done = out / "table.json"  # rows of earlier invocations are kept; a row run again replaces its old one
    rows = [r for r in (json.loads(done.read_text()) if done.is_file() else []) if r["setting"] not in args.settings]
    for setting in args.settings:
        slug = setting.replace(" ", "").replace(",", "-").replace("=", "").replace("ε", "eps")
        for mode in ("centralized", "federated"):
            folder = out / slug / mode
            cfg = setting_config(base, scenario.site_manifests, folder, SETTINGS[setting])
            tracker = Tracker(uri=cfg.tracking.uri, experiment=cfg.tracking.experiment)
            t0 = time.perf_counter()
            if mode == "centralized":
                run_centralized(cfg, tracker=tracker, tags={"setting": setting}, progress=False)
            else:
                run_federated(InProcessGrid(len(ROLES)), cfg, tracker=tracker, tags={"setting": setting})  # type: ignore[arg-type]
            rows.append(row(setting, mode, folder))
            rows.sort(key=lambda r: (list(SETTINGS).index(r["setting"]), r["mode"]))
            print(f"{setting:24s} {mode:12s} {time.perf_counter() - t0:5.0f} s", flush=True)
            (out / "table.json").write_text(json.dumps(rows, indent=2))
            (out / "table.md").write_text(markdown(rows) + "\n")
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
