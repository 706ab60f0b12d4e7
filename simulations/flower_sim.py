"""Run ``flwr run .`` as a local simulation and stop everything it started, by PID.

We start the SuperLink ourselves (the command ``flwr run`` would otherwise start detached and leave running)
in its own process group on free loopback ports, so ``flwr run`` reuses it and we can stop it — with its
ServerApp, simulation and Ray children — by that one PID. Flower must never install runtime dependencies (it
would fetch a multi-GB CUDA torch), hence the environment below.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from server.deploy import stop_process_group
from strnet.deployment import flower_env

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


@dataclass
class LocalSuperLink:
    env: dict[str, str]
    workdir: Path
    proc: subprocess.Popen

    def run(self, app: Path, run_config: str, num_supernodes: int, *, timeout: float = 1800, stream: bool = False):
        """``flwr run APP --run-config ... --federation-config num-supernodes=N`` against this SuperLink."""
        cmd = [
            str(BIN / "flwr"),
            "run",
            str(app),
            "--run-config",
            run_config,
            "--federation-config",
            f"num-supernodes={num_supernodes} client-resources-num-cpus=1",
            "--stream",
        ]
        if stream:
            return subprocess.run(cmd, env=self.env, cwd=self.workdir, timeout=timeout, text=True)
        return subprocess.run(cmd, env=self.env, cwd=self.workdir, timeout=timeout, capture_output=True, text=True)


@contextlib.contextmanager
def local_superlink(workdir: str | Path, *, ready_timeout: float = 60) -> Iterator[LocalSuperLink]:
    """A simulation SuperLink on free loopback ports, FLWR_HOME inside ``workdir``; stopped by PID on exit."""
    work = Path(workdir).resolve()
    home = work / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    http_port, control_port = _free_port(), _free_port()
    env = flower_env(
        home,
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(http_port),
        FLWR_LOCAL_CONTROL_API_PORT=str(control_port),
        RAY_USAGE_STATS_ENABLED="0",
    )
    proc = subprocess.Popen(
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
            # no --database: the simulation's state lives in memory. In an SQLite file every message, weights
            # included, was written and read back through the disk (bench: the demo's after-training exchanges)
            "--log-file",
            str(work / "superlink.log"),
        ],
        env=env,
        cwd=work,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + ready_timeout
        while not _healthy(http_port):
            if proc.poll() is not None:
                raise RuntimeError(f"flower-superlink exited early, see {work / 'superlink.log'}")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"flower-superlink not healthy after {ready_timeout:.0f} s, see {work / 'superlink.log'}"
                )
            time.sleep(0.3)
        yield LocalSuperLink(env=env, workdir=work, proc=proc)
    finally:
        stop_process_group(proc)
