"""A real deployment on loopback: TLS, node authentication, three SuperNodes as separate processes, `flwr run`.

Certificates and keys are made on the fly with the `strnet deploy` functions; every site sees only its own
manifest through its `site.yaml`; an unregistered node is refused; every process is stopped by its PID.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path

import mlflow
import pytest
import yaml

from client.node import keygen, start_supernode
from configs.schema import load_config
from server.deploy import (
    BIN,
    CONNECTION,
    Certificates,
    make_certificates,
    node_public_keys,
    register_keys,
    start_superlink,
    stop_process_group,
    write_handout,
)
from simulations.flower_sim import REPO
from simulations.scenario import build_synthetic_scenario
from strnet.deployment import Handout, load_site_file

REFUSED_EXIT = 305  # the exit code flower-supernode logs when the SuperLink does not know its key (flwr 1.42;
# the process itself exits 1)


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


def site_file(folder: Path, site: str, manifest: Path, link_port: int, certs: Certificates, key: Path) -> Path:
    path = folder / f"{site}.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "site_id": site,
                "manifest": str(manifest),
                "superlink": f"127.0.0.1:{link_port}",
                "ca_cert": str(certs.ca_cert),
                "private_key": str(key),
                "handout": str(folder / "handout.json"),
                "cache_dir": str(folder / f"cache-{site}"),
                "device": "cpu",
                "threads": 1,
            }
        )
    )
    return path


@pytest.mark.slow
def test_tls_authenticated_deployment_end_to_end(tmp_path: Path) -> None:
    t0 = time.perf_counter()
    scenario = build_synthetic_scenario(tmp_path / "data", seed=42, n_patients=20, image_size=64)
    m = scenario.site_manifests
    sites = {"stage1": "train", "hospital": "train", "stage2": "external"}
    certs = make_certificates(tmp_path / "certs", ["localhost"])
    assert certs.ca_key.stat().st_mode & 0o777 == 0o600 and certs.server_key.stat().st_mode & 0o777 == 0o600

    keys_dir, site_dir = tmp_path / "node-keys", tmp_path / "sites"
    keys_dir.mkdir()
    private_keys = {}
    for site in [*sites, "intruder"]:
        private, public, _ = keygen(site, site_dir / site)
        assert private.stat().st_mode & 0o777 == 0o600
        if site != "intruder":  # only public keys travel to the coordinator
            (keys_dir / public.name).write_bytes(public.read_bytes())
        private_keys[site] = private

    db = tmp_path / "mlflow.db"
    federation = [{"name": s, "role": r, "manifest": str(m[s])} for s, r in sites.items()]
    cfg = load_config(
        "demo",
        [
            "model.backbone=tiny",
            "preprocess.size=32",
            "train.batch_size=8",
            "train.precision=fp32",
            "federation.rounds=2",
            "federation.quorum=2",
            "tscore.rounds=1",  # each message starts a ClientApp process (~4 s) in deployment: keep them few
            f"federation.sites={json.dumps(federation)}",
            f"output_dir={json.dumps(str(tmp_path / 'run'))}",
            f"tracking.uri={json.dumps(f'sqlite:///{db}')}",
            "tracking.experiment=deploy-e2e",
        ],
    )
    config_path = tmp_path / "federated.yaml"
    config_path.write_text(yaml.safe_dump(cfg.to_dict()))

    port = free_port()
    link = start_superlink(tmp_path / "superlink", port=port, certs=certs, host="127.0.0.1")
    nodes: dict[str, subprocess.Popen] = {}
    try:
        fingerprints = register_keys(link, node_public_keys(keys_dir))
        handout = write_handout(
            site_dir / "handout.json", address=link.address, ca_cert=certs.ca_cert, fingerprints=fingerprints
        )
        assert set(Handout.read(site_dir / "handout.json").fingerprints) == set(sites) == set(handout.fingerprints)

        for site in [*sites, "intruder"]:
            manifest = m[site] if site in m else m["stage1"]
            path = site_file(
                site_dir / site, site if site != "intruder" else "stage1", manifest, port, certs, private_keys[site]
            )
            (site_dir / site / "handout.json").write_bytes((site_dir / "handout.json").read_bytes())
            nodes[site] = start_supernode(load_site_file(path), workdir=site_dir / site / "run", port=free_port())

        # the intruder's key was never registered: the SuperLink refuses it and its node exits
        assert nodes["intruder"].wait(timeout=90) != 0
        refusal = (site_dir / "intruder" / "run" / "supernode.log").read_text()
        assert f"Exit Code: {REFUSED_EXIT}" in refusal and "Failed to activate SuperNode" in refusal

        run = subprocess.run(
            [str(BIN / "flwr"), "run", str(REPO), CONNECTION, "--run-config", f'config="{config_path}"', "--stream"],
            env=link.env(),
            cwd=link.state,
            capture_output=True,
            text=True,
            timeout=420,
        )
        log = run.stdout + run.stderr
        assert run.returncode == 0, log[-4000:]
    finally:
        for proc in nodes.values():
            stop_process_group(proc)
        link.stop()

    bundle = Path(cfg.output_dir) / "bundle"
    assert (bundle / "metadata.json").is_file(), (
        log[-4000:] + (tmp_path / "superlink" / "superlink.log").read_text()[-4000:]
    )
    meta = json.loads((bundle / "metadata.json").read_text())
    assert meta["training"]["mode"] == "federated"
    assert meta["threshold"]["sites"] == ["hospital", "stage1"]
    # each site preprocessed into the cache its site.yaml names, not the run config's
    for site in sites:
        assert any((site_dir / site / f"cache-{site}").rglob("*")), site
    mlflow.set_tracking_uri(f"sqlite:///{db}")
    runs = mlflow.search_runs(experiment_names=["deploy-e2e"])
    assert len(runs) == 1 and runs.iloc[0]["status"] == "FINISHED"
    for proc in [*nodes.values(), link.proc]:
        assert live_group_members(proc.pid) == [], proc.args[0]
    print(f"deployment end to end: {time.perf_counter() - t0:.1f} s")
