"""The README's main job on embedded synthetic sites: data -> audit -> split -> train -> evaluate -> predict.

No download, no real data: everything is generated under ``--out``. Run with ``make demo``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from simulations.scenario import build_synthetic_scenario


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--patients", type=int, default=60, help="patients per synthetic site")
    parser.add_argument("--config", default="demo")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--tracking-uri", default=None)
    args = parser.parse_args(argv)

    from configs import load_config
    from server.tracking import Tracker
    from strnet.bundle import load_bundle
    from strnet.predict import predict_files
    from strnet.training import train_centralized

    t0 = time.perf_counter()
    out = Path(args.out)
    cfg0 = load_config(args.config, args.set)
    print(f"[1/4] synthetic sites -> {out / 'sites'}")
    scenario = build_synthetic_scenario(
        out, seed=args.seed, n_patients=args.patients, image_size=cfg0.preprocess.size * 2
    )
    for site, path in scenario.site_manifests.items():
        print(f"      {site}: {path}")
    a = scenario.audit
    print(
        f"[2/4] audit: {a['n_images']} images, {a['duplicate_groups']} duplicate groups, "
        f"{a['label_conflict_groups']} label conflicts, {a['cross_split_groups']} cross-split groups"
    )
    data_overrides = [
        f"data.manifests=[{json.dumps(str(scenario.manifest))}]",
        f"output_dir={json.dumps(str(out / 'centralized'))}",
    ]
    cfg = load_config(args.config, [*args.set, *data_overrides])
    print("[3/4] centralized training (STR-Net, τ* on validation, frozen test evaluation)")
    tracker = Tracker(uri=args.tracking_uri or cfg.tracking.uri, experiment=cfg.tracking.experiment)
    result = train_centralized(cfg, tracker=tracker, extra_tags={"data": "synthetic"})
    scr = result.test_metrics.get("screening", {})
    print(
        f"      τ*={result.threshold['value']:.2f}  test AUROC={scr.get('auroc', float('nan')):.3f} "
        f"AUPRC={scr.get('auprc', float('nan')):.3f} sens={scr.get('sensitivity', float('nan')):.3f} "
        f"spec={scr.get('specificity', float('nan')):.3f}"
    )
    print("[4/4] predict with Grad-CAM on the hospital site's DICOM files")
    bundle = load_bundle(result.bundle_dir)
    pred = predict_files(
        bundle, [scenario.site_dirs["hospital"] / "dicom"], gradcam_dir=out / "predictions" / "gradcam"
    )
    pred_path = out / "predictions" / "hospital.csv"
    pred.to_csv(pred_path, index=False)
    print(f"      {len(pred)} knees -> {pred_path}")
    print(f"report: {out / 'centralized' / 'test_report' / 'report.html'}")
    print(f"done in {time.perf_counter() - t0:.0f} s; MLflow store: {tracker.uri}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
