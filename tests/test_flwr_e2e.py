"""`flwr run .` end to end on a tiny synthetic scenario: local SuperLink, Ray simulation, 3 SuperNodes.

We start the SuperLink ourselves (the same command ``flwr run`` would use) in its own process group on free
ports, so ``flwr run`` reuses it and the test can stop it — and everything it spawned — by that PID. Flower
must never install runtime dependencies (it would fetch a multi-GB torch), hence the environment below.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
import yaml

from configs.schema import load_config
from simulations.scenario import build_synthetic_scenario

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=0.5) as r:
            return r.status == 200
    except OSError:
        return False


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL, to the process group we created (the SuperLink and its serverapp/simulation/Ray)."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        # the group leader is gone; give the rest of its group the same signal
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return


@pytest.mark.slow
def test_flwr_run_end_to_end(tmp_path: Path) -> None:
    scenario = build_synthetic_scenario(tmp_path / "data", seed=42, n_patients=20, image_size=64)
    m = scenario.site_manifests
    sites = [
        {"name": "stage1", "role": "train", "manifest": str(m["stage1"])},
        {"name": "hospital", "role": "train", "manifest": str(m["hospital"])},
        {"name": "stage2", "role": "external", "manifest": str(m["stage2"])},
    ]
    db = tmp_path / "mlflow.db"
    cfg = load_config(
        "demo",
        [
            "model.backbone=tiny",
            "preprocess.size=32",
            "train.batch_size=8",
            "train.precision=fp32",
            "federation.rounds=2",
            "federation.quorum=2",
            f"federation.sites={json.dumps(sites)}",
            f"output_dir={json.dumps(str(tmp_path / 'run'))}",
            f"data.cache_dir={json.dumps(str(tmp_path / 'cache'))}",
            f"tracking.uri={json.dumps(f'sqlite:///{db}')}",
            "tracking.experiment=e2e",
        ],
    )
    config_path = tmp_path / "federated.yaml"
    config_path.write_text(yaml.safe_dump(cfg.to_dict()))

    http_port, control_port = _free_port(), _free_port()
    env = {
        **os.environ,
        "FLWR_HOME": str(tmp_path / "flwr-home"),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port),
        "FLWR_LOCAL_CONTROL_API_PORT": str(control_port),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    (tmp_path / "flwr-home").mkdir()
    superlink = subprocess.Popen(
        [
            str(BIN / "flower-superlink"),
            "--insecure",
            "--simulation",
            "--isolation",
            "subprocess",
            "--disable-runtime-dependency-installation",
            "--control-api-address",
            f"127.0.0.1:{control_port}",
            "--host",
            "127.0.0.1",
            "--port",
            str(http_port),
            "--fleet-api-address",
            f"127.0.0.1:{_free_port()}",
            "--database",
            str(tmp_path / "state.db"),
            "--log-file",
            str(tmp_path / "superlink.log"),
        ],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    t0 = time.perf_counter()
    try:
        deadline = time.monotonic() + 30
        while not _healthy(http_port):
            assert superlink.poll() is None, f"flower-superlink exited early, see {tmp_path / 'superlink.log'}"
            assert time.monotonic() < deadline, "flower-superlink did not become healthy in 30 s"
            time.sleep(0.3)
        run = subprocess.run(
            [
                str(BIN / "flwr"),
                "run",
                str(REPO),
                "--run-config",
                f'config="{config_path}"',
                "--federation-config",
                "num-supernodes=3 client-resources-num-cpus=1",
                "--stream",
            ],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=420,
        )
    finally:
        _stop_group(superlink)
    seconds = time.perf_counter() - t0
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    bundle = Path(cfg.output_dir) / "bundle"
    assert (bundle / "metadata.json").is_file() and (bundle / "model.pt").is_file(), log[-4000:]
    meta = json.loads((bundle / "metadata.json").read_text())
    assert meta["training"]["mode"] == "federated"
    assert meta["threshold"]["sites"] == ["hospital", "stage1"]

    mlflow.set_tracking_uri(f"sqlite:///{db}")
    runs = mlflow.search_runs(experiment_names=["e2e"])
    assert len(runs) == 1
    row = runs.iloc[0]
    assert row["tags.mode"] == "federated" and row["status"] == "FINISHED"
    assert row["metrics.tau_star"] == pytest.approx(meta["threshold"]["value"])
    for key in (
        "metrics.test_screening_auroc",
        "metrics.val_screen_auprc",
        "metrics.site.stage2.screening_sensitivity",
    ):
        assert key in runs.columns, key
    print(f"flwr run end to end: {seconds:.1f} s")
