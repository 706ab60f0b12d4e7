"""The README's main job on embedded synthetic sites, no download, no real data (``make demo``).

1. three synthetic sites in the three real layouts -> manifests -> audit -> patient-level split;
2. ``flwr run .``: FedAvg over stage1 + stage2, τ* from pooled validation counts, frozen evaluation at every
   site, the hospital as an external site that never trains;
3. the centralized run on the same sites and roles (one YAML for both modes);
4. ``strnet compare`` side by side from MLflow; both bundles registered as MLflow models (``strnet-screening``:
   the federated one ``@champion``, the centralized one ``@candidate``), and ``strnet predict`` with Grad-CAM on
   the hospital's DICOMs through ``models:/strnet-screening@champion``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

from configs import Config, load_config
from simulations.federate import absolute_config, run_federated
from simulations.scenario import build_synthetic_scenario

ROLES = {"stage1": "train", "stage2": "train", "hospital": "external"}
MODEL_NAME = "strnet-screening"
ALIASES = {"federated": "champion", "centralized": "candidate"}


def scenario_config(args: argparse.Namespace, manifests: dict[str, Path], out: Path, mode: str) -> Config:
    """The demo preset with the synthetic sites and their roles; paths absolute (Flower runs elsewhere)."""
    sites = [{"name": s, "role": ROLES[s], "manifest": str(p)} for s, p in manifests.items()]
    overrides = [*args.set, f"federation.sites={json.dumps(sites)}"]
    if args.tracking_uri:
        overrides.append(f"tracking.uri={json.dumps(args.tracking_uri)}")
    return absolute_config(load_config(args.config, overrides), output_dir=out / mode)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--patients", type=int, default=150, help="patients per synthetic site")
    parser.add_argument("--config", default="demo")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--tracking-uri", default=None, help="default: sqlite ./mlflow.db")
    args = parser.parse_args(argv)

    from server.compare import compare, latest_runs
    from server.models import register_model, resolve_model_uri
    from server.tracking import Tracker, resolve_uri
    from strnet.bundle import load_bundle
    from strnet.centralized import run_centralized
    from strnet.predict import predict_files

    t0 = time.perf_counter()
    out = Path(args.out)
    size = scenario_config(args, {}, out, "x").preprocess.size
    print(f"[1/5] synthetic sites -> {out / 'sites'}", flush=True)
    scenario = build_synthetic_scenario(out, seed=args.seed, n_patients=args.patients, image_size=size * 2)
    a = scenario.audit
    print(
        f"      audit: {a['n_images']} images, {a['duplicate_groups']} duplicate groups, "
        f"{a['label_conflict_groups']} label conflicts, {a['cross_split_groups']} cross-split groups"
    )

    fed = scenario_config(args, scenario.site_manifests, out, "federated")
    print("[2/5] flwr run . (FedAvg: stage1 + stage2 train, hospital external)", flush=True)
    t_fed = time.perf_counter()
    code = run_federated(fed, out / "federated")
    if code != 0:
        print(f"flwr run failed (exit {code}); SuperLink log: {out / 'federated' / 'flower' / 'superlink.log'}")
        return code
    print(f"      federated done in {time.perf_counter() - t_fed:.0f} s")

    cen = scenario_config(args, scenario.site_manifests, out, "centralized")
    print("[3/5] centralized training on the same sites and roles", flush=True)
    tracker = Tracker(uri=cen.tracking.uri, experiment=cen.tracking.experiment)
    run_centralized(cen, tracker=tracker, tags={"data": "synthetic"}, progress=False)

    print("[4/5] comparison (from MLflow)", flush=True)
    _, _, figure = compare(cen.tracking.uri, cen.tracking.experiment, out / "compare")
    print(f"      {out / 'compare' / 'comparison.txt'}, {figure}")
    uri = resolve_uri(cen.tracking.uri)
    newest = latest_runs(uri, cen.tracking.experiment).set_index("tags.mode")["run_id"]
    for mode, alias in ALIASES.items():
        version, model_uri = register_model(str(newest[mode]), MODEL_NAME, alias, uri=uri)
        print(f"      registered the {mode} bundle: {MODEL_NAME} version {version}, {model_uri}")

    champion = f"models:/{MODEL_NAME}@{ALIASES['federated']}"
    print(f"[5/5] predict with Grad-CAM on the hospital's DICOM files ({champion}, the federated bundle)", flush=True)
    shutil.rmtree(out / "predictions" / "model", ignore_errors=True)  # a previous demo's download
    bundle = load_bundle(resolve_model_uri(champion, out / "predictions" / "model", uri=uri))
    pred = predict_files(
        bundle, [scenario.site_dirs["hospital"] / "dicom"], gradcam_dir=out / "predictions" / "gradcam"
    )
    pred_path = out / "predictions" / "hospital.csv"
    pred.to_csv(pred_path, index=False)
    counts = pred["status"].value_counts()
    print(
        f"      {len(pred)} knees -> {pred_path} ({counts.get('ok', 0)} judged, "
        f"{counts.get('out_of_distribution', 0)} out of distribution, {counts.get('error', 0)} unreadable)"
    )
    print(f"\ndone in {time.perf_counter() - t0:.0f} s\n")
    print(summary_table({"centralized": out / "centralized", "federated": out / "federated"}))
    print(f"\nreports: {out / 'centralized' / 'test_report' / 'report.html'}; figures: {out}/*/figures")
    print(f"MLflow: .venv/bin/mlflow ui --backend-store-uri {cen.tracking.uri}")
    return 0


def summary_table(runs: dict[str, Path]) -> str:
    """The demo's last word: pooled test results of each mode at its frozen τ*, and each site's AUROC."""
    rows, sites = [], {}
    for mode, folder in runs.items():
        summary = json.loads((folder / "summary.json").read_text())
        m = {k: (math.nan if v is None else v) for k, v in summary["metrics"].items()}
        lo, hi = m["test_screening_auroc_ci_lo"], m["test_screening_auroc_ci_hi"]
        rows.append(
            f"{mode:12s} {m['test_screening_auroc']:.3f} ({lo:.3f}-{hi:.3f})  {m['test_screening_sensitivity']:.3f}"
            f"  {m['test_screening_specificity']:.3f}  {m['tau_star']:.2f}  {m['wall_seconds']:5.0f} s"
        )
        for site, values in summary["sites"].items():
            auroc = values["test_screening_auroc"]
            sites.setdefault(site, []).append(f"{mode} {math.nan if auroc is None else auroc:.3f}")
    head = "pooled test   AUROC (95% CI)        sens   spec   tau*  wall"
    lines = [head, *rows, "per-site AUROC (external sites: their whole cohort):"]
    lines += [f"  {site:10s} " + ", ".join(values) for site, values in sorted(sites.items())]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
