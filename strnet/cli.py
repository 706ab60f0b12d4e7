"""The ``strnet`` command line: one subcommand per step of the data -> model -> report flow.

Each handler only parses arguments and calls one library function, so everything the CLI does is also
importable and testable without a subprocess. Heavy imports (torch, pandas) happen inside handlers so
``strnet --help`` stays instant.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from strnet.errors import ConfigError, StrnetError


def _print_problems(problems: Sequence[str], limit: int = 30) -> None:
    if not problems:
        return
    print(f"{len(problems)} problem(s):", file=sys.stderr)
    for line in problems[:limit]:
        print(f"  - {line}", file=sys.stderr)
    if len(problems) > limit:
        print(f"  ... and {len(problems) - limit} more", file=sys.stderr)


def _label_summary(df) -> str:  # type: ignore[no-untyped-def]
    counts = df["label_cls"].replace("", "unlabelled").value_counts().to_dict()
    return ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from strnet.data.adapters import prepare
    from strnet.data.manifest import write_manifest

    df, problems = prepare(args.layout, Path(args.src), site=args.site, source=args.source)
    _print_problems(problems)
    write_manifest(df, args.out)
    print(f"wrote {args.out}: {len(df)} rows from {df['path'].nunique()} images ({_label_summary(df)})")
    return 0


def cmd_data_split(args: argparse.Namespace) -> int:
    from strnet.data.manifest import merge_manifests, read_manifest, write_manifest
    from strnet.data.split import assign_splits, hold_out_site

    df = merge_manifests(read_manifest(m) for m in args.manifests)
    groups = None
    if args.max_distance >= 0:
        from strnet.data.audit import group_ids

        groups = group_ids(df, max_distance=args.max_distance)
    out = assign_splits(df, fractions=tuple(args.fractions), seed=args.seed, groups=groups)
    for spec in args.holdout or []:
        site, _, fraction = spec.partition("=")
        out = hold_out_site(out, site, float(fraction or 0.25), seed=args.seed, groups=groups)
    write_manifest(out, args.out)
    if args.per_site_dir:
        for site, part in out.groupby("site"):
            write_manifest(part.reset_index(drop=True), Path(args.per_site_dir) / f"{site}.csv")
    summary = out.groupby("split")["label_cls"].value_counts().unstack(fill_value=0)
    print(f"wrote {args.out}: {len(out)} rows\n{summary.to_string()}")
    return 0


def _knee_correlation(text: str) -> float:
    """``--knee-correlation``: a correlation in (0, 1], or -1 to skip the knee pass."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value != -1 and not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not a correlation in (0, 1], nor -1 (skip the knee pass)")
    return value


def cmd_data_audit(args: argparse.Namespace) -> int:
    from strnet.data.audit import run_audit, summarize

    report = run_audit(
        [Path(m) for m in args.manifests],
        json_out=Path(args.json) if args.json else None,
        clean_out=Path(args.clean) if args.clean else None,
        max_distance=args.max_distance,
        knee_correlation=args.knee_correlation if args.knee_correlation > 0 else None,
    )
    print(summarize(report))
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    from simulations.sites import write_sites

    sites = write_sites(Path(args.out), seed=args.seed, n_patients=args.patients, image_size=args.size)
    for name, path in sites.items():
        print(f"{name}: {path}")
    return 0


def cmd_model_info(args: argparse.Namespace) -> int:
    from strnet.model import model_info

    print(json.dumps(model_info(args.backbone, weights=args.weights), indent=2))
    return 0


def _tracker(cfg, uri: str | None, enabled: bool = True):  # type: ignore[no-untyped-def]
    """MLflow lives in server.tracking; imported here, at the composition root, only when tracking is on."""
    if not (enabled and cfg.tracking.enabled):
        return None
    from server.tracking import Tracker

    return Tracker(uri=uri or cfg.tracking.uri, experiment=cfg.tracking.experiment)


def cmd_train(args: argparse.Namespace) -> int:
    from configs import load_config
    from strnet.centralized import run_centralized

    overrides = list(args.set or [])
    if args.manifest:
        overrides.append("data.manifests=[" + ",".join(json.dumps(m) for m in args.manifest) + "]")
    if args.output_dir:
        overrides.append(f"output_dir={json.dumps(args.output_dir)}")
    cfg = load_config(args.config, overrides)
    result = run_centralized(cfg, tracker=_tracker(cfg, args.tracking_uri, not args.no_tracking), resume=args.resume)
    print(result.describe())
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from strnet.bundle import load_bundle
    from strnet.data.cache import PreprocessCache
    from strnet.data.manifest import read_manifest
    from strnet.evaluation import evaluate_bundle

    bundle = load_bundle(args.model)
    df = read_manifest(args.manifest)
    if args.split != "all":
        df = df[df["split"] == args.split].reset_index(drop=True)
        if df.empty:
            raise StrnetError(f"{args.manifest}: no rows with split={args.split!r} (use --split all)")
    out = Path(args.out or Path(args.model).parent / f"eval_{Path(args.manifest).stem}_{args.split}")
    cache = PreprocessCache(Path(args.cache_dir)) if args.cache_dir else None
    result = evaluate_bundle(
        bundle, df, out, cache=cache, n_boot=args.bootstrap, seed=args.seed, n_bins=bundle.histogram_bins
    )
    m = result.metrics
    if result.n_labelled == 0:
        print("no labels in the manifest: predictions only")
    else:
        for k in ("auroc", "auprc", "sensitivity", "specificity"):
            lo, hi = m[f"screening_{k}_ci_lo"], m[f"screening_{k}_ci_hi"]
            print(f"{k:12s} {m[f'screening_{k}']:.3f}  (95% CI {lo:.3f}-{hi:.3f})")
    print(f"report: {result.report}")
    return 0


def _load_model(model: str, tracking_uri: str | None):  # type: ignore[no-untyped-def]
    """A bundle folder, or a registered model ``models:/NAME@ALIAS`` (``models:/NAME/VERSION``) fetched through
    MLflow (server.models, imported only for such a URI) and loaded with the same SHA-256 check."""
    from strnet.bundle import load_bundle

    if not model.startswith("models:/"):
        return load_bundle(model)
    import tempfile

    from server.models import resolve_model_uri
    from server.tracking import resolve_uri

    with tempfile.TemporaryDirectory(prefix="strnet-model-") as tmp:
        return load_bundle(resolve_model_uri(model, Path(tmp), uri=resolve_uri(tracking_uri)))


def cmd_predict(args: argparse.Namespace) -> int:
    from strnet.predict import predict_files

    bundle = _load_model(args.model, args.tracking_uri)
    out = predict_files(bundle, args.inputs, clinical_csv=args.clinical, gradcam_dir=args.gradcam)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    out.to_csv(args.out, index=False)
    n_err = int((out["status"] == "error").sum())
    n_ood = int((out["status"] == "out_of_distribution").sum())
    print(
        f"wrote {args.out}: {len(out) - n_err - n_ood} knee(s) predicted, {n_ood} input(s) out of distribution "
        f"(no flag), {n_err} file(s) failed"
    )
    for _, r in out[out["status"].isin(["error", "out_of_distribution"])].iterrows():
        print(f"  - {r['file']}: {r['error']}", file=sys.stderr)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from server.compare import compare

    _, _, figure = compare(args.tracking_uri, args.experiment, Path(args.out), run_ids=args.run_id)
    print((Path(args.out) / "comparison.txt").read_text(), end="")
    print(f"figure: {figure}")
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    from server.compare import latest_runs
    from server.models import register_model
    from server.tracking import resolve_uri

    uri = resolve_uri(args.tracking_uri)
    run_id = args.run_id
    if run_id is None:
        runs = latest_runs(uri, args.experiment)
        picked = runs[runs["tags.mode"] == args.mode]
        if picked.empty:
            raise StrnetError(f"no finished {args.mode} run in MLflow experiment {args.experiment!r}")
        run_id = str(picked.iloc[0]["run_id"])
    version, model_uri = register_model(run_id, args.name, args.alias, uri=uri)
    print(f"registered run {run_id} as {args.name} version {version}: {model_uri}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from simulations.bench import run

    return run(args, args.parser_error)


INSECURE_WARNING = (
    "WARNING: --insecure-local-test: no TLS and no node authentication. Anyone who can reach this port can join "
    "or read the federation. Use it only on a loopback test host, never with patient data."
)


def cmd_deploy_certs(args: argparse.Namespace) -> int:
    from server.deploy import make_certificates

    certs = make_certificates(args.out, args.host, days=args.days)
    print(
        f"CA {certs.ca_cert} (give to every site), server certificate {certs.server_cert} for {args.host} and "
        f"127.0.0.1; keys {certs.ca_key}, {certs.server_key} (0600, stay with the coordinator)"
    )
    return 0


def cmd_deploy_keygen(args: argparse.Namespace) -> int:
    from client.node import keygen

    private, public, fingerprint = keygen(args.site, args.out)
    print(
        f"private key {private} (0600: never leaves this site)\npublic key {public} -> send to the coordinator\n"
        f"fingerprint {fingerprint}\nsite file template {Path(args.out) / 'site.yaml.example'}"
    )
    return 0


def cmd_deploy_superlink(args: argparse.Namespace) -> int:
    from server.deploy import Certificates, node_public_keys, register_keys, start_superlink, write_handout

    if args.insecure_local_test:
        print(INSECURE_WARNING, file=sys.stderr)
        certs = None
    elif args.certs is None or args.node_keys is None:
        raise ConfigError("--certs and --node-keys are required (or --insecure-local-test on a loopback test host)")
    else:
        certs = Certificates.in_dir(args.certs)
        certs.check()
    keys = node_public_keys(args.node_keys) if certs is not None else {}
    link = start_superlink(args.state, port=args.port, certs=certs, host=args.host)
    try:
        fingerprints = register_keys(link, keys) if certs is not None else {}
        if certs is not None:
            handout = Path(args.handout or Path(args.state) / "handout.json")
            write_handout(
                handout,
                address=args.address or f"{args.host}:{args.port}",
                ca_cert=certs.ca_cert,
                fingerprints=fingerprints,
            )
            print(f"registered {len(fingerprints)} node key(s): {', '.join(fingerprints)}; hand-out {handout}")
        print(
            f"SuperLink pid {link.proc.pid} on {args.host}:{args.port}; log {Path(args.state) / 'superlink.log'}; "
            f"FLWR_HOME for `flwr run . strnet`: {link.home}. Ctrl-C stops it."
        )
        return link.proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        link.stop()


def cmd_deploy_node(args: argparse.Namespace) -> int:
    from client.node import node_env, run_with_retries, supernode_command
    from strnet.deployment import load_site_file

    site = load_site_file(args.site_config)
    if args.insecure_local_test:
        print(INSECURE_WARNING, file=sys.stderr)
    work = Path(args.workdir or site.cache_dir / "supernode")
    work.mkdir(parents=True, exist_ok=True)
    cmd = supernode_command(site, port=args.port, insecure=args.insecure_local_test)
    try:
        return run_with_retries(
            cmd,
            env=node_env(site, work / "flwr-home"),
            cwd=work,
            retries=args.retries,
            wait_s=args.retry_wait,
            say=lambda text: print(text, file=sys.stderr),
        )
    except KeyboardInterrupt:
        return 0


def cmd_site_check(args: argparse.Namespace) -> int:
    from client.preflight import FAIL, render, site_check

    checks = site_check(args.site_config, timeout=args.timeout)
    print(render(checks))
    failed = [c.name for c in checks if c.status == FAIL]
    print(f"{len(failed)} check(s) failed: {', '.join(failed)}" if failed else "ready to join")
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="strnet", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, help="step of the data -> model -> report flow")

    data = sub.add_parser("data", help="prepare, audit, split and synthesize manifests").add_subparsers(
        dest="data_command", required=True, help="data step to run"
    )
    p = data.add_parser("prepare", help="turn a distributed layout into a canonical manifest")
    p.add_argument(
        "--layout",
        required=True,
        choices=["kaggle-folders", "mendeley", "dicom-csv"],
        help="how the source data set is organised on disk",
    )
    p.add_argument("--src", required=True, help="the layout's root folder")
    p.add_argument("--site", required=True, help="site name written into the manifest")
    p.add_argument("--source", default=None, help="data-source name (default: the folder name)")
    p.add_argument("--out", required=True, help="manifest CSV to write")
    p.set_defaults(func=cmd_data_prepare)

    p = data.add_parser("split", help="assign train/val/test, stratified, patient- and duplicate-group-level")
    p.add_argument("manifests", nargs="+", help="manifest CSV(s) to merge and split")
    p.add_argument("--out", required=True, help="manifest CSV to write, with the split column filled")
    p.add_argument(
        "--fractions",
        nargs=3,
        type=float,
        default=[0.7, 0.15, 0.15],
        metavar=("TRAIN", "VAL", "TEST"),
        help="train/val/test fractions (default 0.7 0.15 0.15)",
    )
    p.add_argument("--seed", type=int, default=42, help="random seed for the split (default 42)")
    p.add_argument(
        "--max-distance",
        type=int,
        default=4,
        help="perceptual-hash distance that ties near-duplicates to one split (-1: do not group duplicates)",
    )
    p.add_argument(
        "--holdout",
        action="append",
        metavar="SITE=FRACTION",
        help="move a patient-level fraction of SITE to an external site SITE-holdout (split=test)",
    )
    p.add_argument("--per-site-dir", default=None, help="also write one manifest per site into this folder")
    p.set_defaults(func=cmd_data_split)

    p = data.add_parser("audit", help="exact/near duplicates, label conflicts, leakage, cross-source copies")
    p.add_argument("manifests", nargs="+", help="manifest CSV(s) to audit together")
    p.add_argument("--json", default=None, help="write the full report as JSON")
    p.add_argument("--clean", default=None, help="write a manifest with conflicts dropped, one image per group")
    p.add_argument("--max-distance", type=int, default=4, help="perceptual-hash Hamming distance (default 4)")
    p.add_argument(
        "--knee-correlation",
        type=_knee_correlation,
        default=0.985,
        help="also find one knee in several files: correlation of the knee crops, direct or mirrored, at or above "
        "which two rows are copies (default 0.985; -1 skips this pass)",
    )
    p.set_defaults(func=cmd_data_audit)

    p = data.add_parser("synth", help="write three synthetic sites in the three real layouts")
    p.add_argument("--out", required=True, help="folder to write the three synthetic sites into")
    p.add_argument("--seed", type=int, default=42, help="random seed for the synthetic data (default 42)")
    p.add_argument("--patients", type=int, default=60, help="patients per site")
    p.add_argument("--size", type=int, default=256, help="image size in pixels")
    p.set_defaults(func=cmd_data_synth)

    p = sub.add_parser("model-info", help="parameter counts of an STR-Net configuration (JSON)")
    p.add_argument("--backbone", default="resnet50", help="backbone name, e.g. resnet50, resnet18 (default resnet50)")
    p.add_argument("--weights", default="none", help="backbone weights: none, imagenet or a state-dict file")
    p.set_defaults(func=cmd_model_info)

    p = sub.add_parser("train", help="centralized training: fit, choose tau* on val, bundle, frozen test report")
    p.add_argument("--config", default="demo", help="YAML file or preset name (demo, cpu, paper)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. --set train.epochs=3")
    p.add_argument("--manifest", action="append", help="manifest(s) to train on (overrides data.manifests)")
    p.add_argument("--output-dir", default=None, help="folder for checkpoints and the bundle (overrides output_dir)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite ./mlflow.db)")
    p.add_argument("--no-tracking", action="store_true", help="do not log the run to MLflow")
    p.add_argument("--resume", action="store_true", help="continue from output_dir/checkpoint.pt")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="frozen evaluation of a bundle at its tau*")
    p.add_argument("--model", required=True, help="bundle folder")
    p.add_argument("--manifest", required=True, help="manifest CSV with the images to evaluate")
    p.add_argument(
        "--split", default="test", choices=["train", "val", "test", "all"], help="manifest rows to use (default test)"
    )
    p.add_argument("--out", default=None, help="report folder (default: eval_<manifest>_<split> next to the bundle)")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for 95%% CIs (default 2000)")
    p.add_argument("--seed", type=int, default=42, help="seed of the bootstrap resampling (default 42)")
    p.add_argument("--cache-dir", default=None, help="folder to cache preprocessed images in (default: no cache)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="screen PNG/JPEG/DICOM files or folders with a bundle")
    p.add_argument("--model", required=True, help="bundle folder, or a registered model models:/NAME@ALIAS")
    p.add_argument("inputs", nargs="+", help="image files or folders to screen")
    p.add_argument(
        "--tracking-uri", default=None, help="MLflow tracking URI for models:/ (default: sqlite ./mlflow.db)"
    )
    p.add_argument("--out", required=True, help="results CSV")
    p.add_argument("--gradcam", default=None, help="folder for Grad-CAM overlays")
    p.add_argument("--clinical", default=None, help="CSV with file, age, sex, bmi for the T-score branch")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("compare", help="centralized vs federated runs side by side, from MLflow")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite ./mlflow.db)")
    p.add_argument("--experiment", default="strnet", help="MLflow experiment name (default strnet)")
    p.add_argument("--run-id", action="append", help="compare these runs instead of the newest of each mode")
    p.add_argument("--out", default="runs/compare", help="folder for the comparison table and figure")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("register", help="register a finished run's model in MLflow under a name, with an alias")
    p.add_argument("--name", required=True, help="registered model name, e.g. strnet-screening")
    p.add_argument("--alias", required=True, help="alias to point at it: champion or candidate")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--run-id", help="the MLflow run whose model to register")
    which.add_argument("--mode", choices=["centralized", "federated"], help="the newest finished run of this mode")
    p.add_argument("--experiment", default="strnet", help="MLflow experiment for --mode (default strnet)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite ./mlflow.db)")
    p.set_defaults(func=cmd_register)

    from simulations.bench import add_arguments as bench_arguments

    p = sub.add_parser("bench", help="speed of each part against what the hardware allows (bench.json, bench.md)")
    bench_arguments(p)
    p.set_defaults(func=cmd_bench, parser_error=p.error)

    deploy = sub.add_parser("deploy", help="certificates, node keys, SuperLink and SuperNode for a real federation")
    dep = deploy.add_subparsers(dest="deploy_command", required=True, help="deployment step")
    p = dep.add_parser("certs", help="(coordinator) a CA and a server certificate for the SuperLink")
    p.add_argument("--out", required=True, help="folder for ca.crt, ca.key, server.pem, server.key")
    p.add_argument("--host", nargs="+", required=True, help="names/IPs nodes dial (127.0.0.1 is always added)")
    p.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    p.set_defaults(func=cmd_deploy_certs)
    p = dep.add_parser("keygen", help="(site) an OpenSSH ECDSA key pair; only the .pub goes to the coordinator")
    p.add_argument("--site", required=True, help="the site's name in the federation")
    p.add_argument("--out", required=True, help="folder for <site>.key (0600) and <site>.pub")
    p.set_defaults(func=cmd_deploy_keygen)
    p = dep.add_parser("superlink", help="(coordinator) flower-superlink with TLS and node authentication")
    p.add_argument("--certs", help="folder from `strnet deploy certs`")
    p.add_argument("--state", required=True, help="folder for the SuperLink database, logs and FLWR_HOME")
    p.add_argument("--node-keys", help="folder of the sites' <site>.pub keys to register")
    p.add_argument("--port", type=int, default=9092, help="the one HTTPS port (default 9092)")
    p.add_argument("--host", default="0.0.0.0", help="interface to listen on (default all)")
    p.add_argument("--address", help="host:port the sites dial, for the hand-out (default host:port)")
    p.add_argument("--handout", help="hand-out file to write (default STATE/handout.json)")
    p.add_argument("--insecure-local-test", action="store_true", help="no TLS, no node auth: loopback tests only")
    p.set_defaults(func=cmd_deploy_superlink)
    p = dep.add_parser("node", help="(site) flower-supernode from the hospital's site.yaml")
    p.add_argument("--site-config", required=True, help="the site file (site_id, manifest, superlink, ...)")
    p.add_argument("--port", type=int, default=9094, help="local port of the node's runtime API (default 9094)")
    p.add_argument("--workdir", help="folder for the node's logs and FLWR_HOME (default CACHE_DIR/supernode)")
    p.add_argument(
        "--retries",
        type=int,
        default=6,
        help="restarts after a quick failure, e.g. a refused activation after a crash (default 6)",
    )
    p.add_argument("--retry-wait", type=float, default=15.0, help="seconds between restarts (default 15)")
    p.add_argument("--insecure-local-test", action="store_true", help="no TLS, no node auth: loopback tests only")
    p.set_defaults(func=cmd_deploy_node)

    site = sub.add_parser("site", help="a hospital's checks before and while joining").add_subparsers(
        dest="site_command", required=True, help="site step"
    )
    p = site.add_parser("check", help="pre-flight: manifest, images, cache, CA, key, SuperLink, versions")
    p.add_argument("--site-config", required=True, help="the site file (site.yaml)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the SuperLink (default 5)")
    p.set_defaults(func=cmd_site_check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (StrnetError, LookupError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
