"""A real deployment on loopback: TLS, node authentication, SuperNodes as separate processes, `flwr run`.

One SuperLink serves every scenario (a module fixture): an unregistered node; the end-to-end run, in which a
node is lost mid-round with the quorum holding and comes back; a node lost below the quorum; a SuperLink stopped
and resumed. Every message starts a ClientApp process at its site (~9 s of imports on two slow cores), so the
scenarios share runs where they can. Certificates and keys are
made on the fly with the `strnet deploy` functions; every site sees only its own manifest through its
`site.yaml`; every process is stopped by its PID.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import pytest
import torch
import yaml

from client.node import keygen, start_supernode
from configs.schema import Config, load_config
from server.deploy import (
    BIN,
    CONNECTION,
    Certificates,
    SuperLink,
    make_certificates,
    node_public_keys,
    register_keys,
    start_superlink,
    stop_process_group,
    write_handout,
)
from simulations.flower_sim import REPO
from simulations.scenario import TINY_RUN, build_synthetic_scenario
from strnet.deployment import Handout, load_site_file

pytestmark = pytest.mark.slow

REFUSED_EXIT = 305  # the exit code flower-supernode logs when the SuperLink does not know its key (flwr 1.42;
# the process itself exits 1)
SITES = {"stage1": "train", "hospital": "train", "stage2": "external"}
ROUND_TIMEOUT = 20
# The first run installs the app at every site before its first reply, and its restarted node installs it again:
# on a slower AVX2 machine, with five Flower processes on two cores, a reply came after 20 s there. The later runs
# keep 20 s.
FIRST_RUN_TIMEOUT = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def live_group_members(pgid: int) -> list[int]:
    """PIDs in process group ``pgid`` that are not zombies (a container without an init may never reap those)."""
    live = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            live.append(int(stat.parent.name))
    return live


@dataclass
class Federation:
    root: Path
    link: SuperLink
    site_files: dict[str, Path]
    manifests: dict[str, Path]
    nodes: dict[str, subprocess.Popen] = field(default_factory=dict)
    started: list[subprocess.Popen] = field(default_factory=list)

    def start_node(self, site: str) -> subprocess.Popen:
        proc = start_supernode(
            load_site_file(self.site_files[site]), workdir=self.root / "sites" / site / "run", port=free_port()
        )
        self.nodes[site] = proc
        self.started.append(proc)
        return proc

    def log(self, site: str) -> Path:
        return self.root / "sites" / site / "run" / "supernode.log"

    def config(self, name: str, *overrides: str) -> tuple[Config, Path]:
        federation = [{"name": s, "role": r, "manifest": str(self.manifests[s])} for s, r in SITES.items()]
        cfg = load_config(
            "demo",
            [
                *TINY_RUN,
                "federation.rounds=2",
                "federation.quorum=2",
                f"federation.round_timeout={ROUND_TIMEOUT}",
                "tscore.rounds=1",  # each message starts a ClientApp process (~4 s) in deployment: keep them few
                "ood.enabled=false",  # (the simulation e2e covers the OOD messages)
                "evaluate.bootstrap=50",
                f"federation.sites={json.dumps(federation)}",
                f"output_dir={json.dumps(str(self.root / name))}",
                f"tracking.uri={json.dumps('sqlite:///' + str(self.root / 'mlflow.db'))}",
                f"tracking.experiment={name}",
                *overrides,
            ],
        )
        path = self.root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg.to_dict()))
        return cfg, path

    def run(self, config_path: Path, *, resume: bool = False) -> subprocess.Popen:
        run_config = f'config="{config_path}"' + (" resume=true" if resume else "")
        return subprocess.Popen(
            [str(BIN / "flwr"), "run", str(REPO), CONNECTION, "--run-config", run_config, "--stream"],
            env=self.link.env(),
            cwd=self.link.state,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )


def site_file(folder: Path, site: str, manifest: Path, port: int, ca_cert: Path, key: Path) -> Path:
    path = folder / "site.yaml"
    values = {
        "site_id": site,
        "manifest": str(manifest),
        "superlink": f"127.0.0.1:{port}",
        "ca_cert": str(ca_cert),
        "private_key": str(key),
        "handout": str(folder / "handout.json"),
        "cache_dir": str(folder / "cache"),
        "device": "cpu",
        "threads": 1,
    }
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    root = tmp_path_factory.mktemp("deployment")
    manifests = build_synthetic_scenario(root / "data", seed=42, n_patients=20, image_size=48).site_manifests
    certs = make_certificates(root / "certs", ["localhost"])
    assert certs.ca_key.stat().st_mode & 0o777 == 0o600 and certs.server_key.stat().st_mode & 0o777 == 0o600
    keys_dir = root / "node-keys"
    keys_dir.mkdir()
    private_keys = {}
    for site in [*SITES, "intruder"]:
        private, public, _ = keygen(site, root / "sites" / site)
        assert private.stat().st_mode & 0o777 == 0o600
        if site != "intruder":  # only public keys travel to the coordinator
            (keys_dir / public.name).write_bytes(public.read_bytes())
        private_keys[site] = private
    port = free_port()
    link = start_superlink(root / "superlink", port=port, certs=certs, host="127.0.0.1")
    fed = Federation(root, link, {}, {**manifests, "intruder": manifests["stage1"]})
    try:
        fingerprints = register_keys(link, node_public_keys(keys_dir))
        write_handout(root / "handout.json", address=link.address, ca_cert=certs.ca_cert, fingerprints=fingerprints)
        assert set(Handout.read(root / "handout.json").fingerprints) == set(SITES)
        for site in [*SITES, "intruder"]:
            folder = root / "sites" / site
            (folder / "handout.json").write_bytes((root / "handout.json").read_bytes())
            # the intruder claims to be stage1, with a key the coordinator never registered
            fed.site_files[site] = site_file(
                folder,
                "stage1" if site == "intruder" else site,
                fed.manifests[site],
                port,
                certs.ca_cert,
                private_keys[site],
            )
        for site in SITES:
            fed.start_node(site)
        yield fed
    finally:
        for proc in fed.started:
            stop_process_group(proc)
        link.stop()
        fed.link.stop()  # a scenario may have started the SuperLink again
    for proc in [*fed.started, link.proc, fed.link.proc]:
        assert live_group_members(proc.pid) == [], proc.args[0]


def wait_for(path: Path, text: str, count: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and path.read_text().count(text) >= count:
            return
        time.sleep(0.2)
    raise TimeoutError(f"{path}: {text!r} not seen {count} time(s) in {timeout:.0f} s")


def test_an_unregistered_node_is_refused(federation: Federation) -> None:
    intruder = federation.start_node("intruder")
    assert intruder.wait(timeout=90) != 0
    refusal = federation.log("intruder").read_text()
    assert f"Exit Code: {REFUSED_EXIT}" in refusal and "Failed to activate SuperNode" in refusal


def test_tls_authenticated_deployment_end_to_end_with_a_node_lost_and_back(federation: Federation) -> None:
    """The whole run over TLS with authenticated nodes, while a training node is stopped in round 1 and started
    again: the quorum of one holds, the lost round names the site, and the node is back for the last round and
    everything after it (calibration, τ*, frozen evaluation)."""
    t0 = time.perf_counter()
    cfg, path = federation.config(
        "e2e", "federation.rounds=3", "federation.quorum=1", f"federation.round_timeout={FIRST_RUN_TIMEOUT}"
    )
    seen = federation.log("hospital").read_text().count("Receiving: train")
    run = federation.run(path)
    wait_for(federation.log("hospital"), "Receiving: train", seen + 1)
    stop_process_group(federation.nodes["hospital"])  # stopped while it trains round 1
    federation.start_node("hospital")  # and back: the same key, so the same node
    log, _ = run.communicate(timeout=420)
    # flwr 1.42's `flwr run --stream` exits 0 even when the ServerApp raised: read its log too
    assert run.returncode == 0 and "ServerApp raised an exception" not in log, log[-4000:]
    bundle = Path(cfg.output_dir) / "bundle"
    assert (bundle / "metadata.json").is_file(), log[-4000:]
    meta = json.loads((bundle / "metadata.json").read_text())
    assert meta["training"]["mode"] == "federated"
    assert meta["threshold"]["sites"] == ["hospital", "stage1"]
    problems = json.loads((Path(cfg.output_dir) / "summary.json").read_text())["problems"]
    # the loss is named as the site, never as an error from the SuperLink's own node id (it answers for lost nodes)
    assert "round 1 train: site 'hospital': no reply (node lost or round timed out)" in problems, problems
    assert all("site 'hospital'" in p for p in problems), problems
    # round 2 may still miss it (it can be sent before the node is back); the last round has it
    assert not [p for p in problems if p.startswith("round 3") or not p.startswith("round ")], problems
    for site in SITES:  # each site preprocessed into the cache its site.yaml names, not the run config's
        assert any((federation.root / "sites" / site / "cache").rglob("*.npy")), site
    mlflow.set_tracking_uri(f"sqlite:///{federation.root / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["e2e"])
    assert len(runs) == 1 and runs.iloc[0]["status"] == "FINISHED"
    print(f"deployment end to end: {time.perf_counter() - t0:.1f} s")


def test_a_node_lost_below_the_quorum_fails_the_run_naming_it(federation: Federation) -> None:
    _, path = federation.config("below-quorum", "tscore.rounds=0")
    seen = federation.log("hospital").read_text().count("Receiving: train")
    run = federation.run(path)
    wait_for(federation.log("hospital"), "Receiving: train", seen + 1)
    # SIGTERM, as an operator's stop does: a SIGKILLed node stays "active" at the SuperLink until its heartbeat
    # expires (~60 s), and a restart before that is refused (Flower exit code 305) — see docs/deploy.md
    stop_process_group(federation.nodes["hospital"])
    try:
        log, _ = run.communicate(timeout=300)
    finally:
        federation.start_node("hospital")
    assert "ServerApp raised an exception" in log and "QuorumError" in log, log[-4000:]
    assert "quorum is 2" in log and "site 'hospital': no reply" in log, log[-4000:]


def test_a_stopped_superlink_resumes_the_run_from_its_last_round(federation: Federation) -> None:
    """The SuperLink (and its ServerApp) killed after round 1, started again on its database: the nodes
    reconnect by themselves and `resume=true` continues from the round checkpoint and trains the last round.
    What follows training (calibration, τ*, the frozen evaluation) is the end-to-end test's: this run is stopped
    once its last round is checkpointed. That a resumed run reaches the same final weights and bundle is
    ``tests/test_federation.py``'s (in one process)."""
    # After the restart, nodes come back with a retry backoff of up to 20 s (flwr's MAX_RETRY_DELAY) and may still
    # be finishing the stopped run's message first: a round timeout that leaves room for both.
    cfg, path = federation.config("resumed", "tscore.rounds=0", "federation.round_timeout=180")
    checkpoint = Path(cfg.output_dir) / "federation-checkpoint.pt"

    def checkpointed_round(run: subprocess.Popen, at_least: int) -> int:
        deadline = time.monotonic() + 240
        while True:
            done = int(torch.load(checkpoint, weights_only=True)["server_round"]) if checkpoint.is_file() else 0
            if done >= at_least:
                return done
            assert time.monotonic() < deadline and run.poll() is None, f"round {at_least} was not checkpointed"
            time.sleep(0.5)

    run = federation.run(path)
    checkpointed_round(run, 1)
    link = federation.link
    link.stop()  # SuperLink and ServerApp, mid-run
    run.communicate(timeout=60)
    stopped_at = int(torch.load(checkpoint, weights_only=True)["server_round"])
    assert stopped_at == 1
    federation.link = start_superlink(
        link.state, port=link.port, certs=Certificates.in_dir(federation.root / "certs"), host="127.0.0.1"
    )
    resumed = federation.run(path, resume=True)
    try:
        assert checkpointed_round(resumed, 2) == 2
    finally:
        federation.link.stop()  # the resumed run, once its last round is in
        resumed.communicate(timeout=60)
    mlflow.set_tracking_uri(f"sqlite:///{federation.root / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["resumed"])
    assert sorted(runs["tags.resumed_from_round"].fillna("")) == ["", str(stopped_at)]
    # the same federation: the resumed run carries on the stopped run's identity
    assert runs["tags.federation_id"].nunique() == 1
