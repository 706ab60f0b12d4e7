"""A hospital's side of a deployment: its key pair, and ``flower-supernode`` started from ``site.yaml``.

The private key is made at the site and never leaves it (written 0600); only ``<site>.pub`` goes to the
coordinator. ``flower-supernode`` has no device or thread flags, so those travel in the node config, which the
ClientApp reads (:func:`client.site.site_for_node`), and as ``OMP_NUM_THREADS`` for the libraries that read it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from strnet.deployment import SiteFile, flower_env, public_key_fingerprint, site_file_template
from strnet.errors import ConfigError

BIN = Path(sys.executable).parent


def keygen(site: str, out: str | Path) -> tuple[Path, Path, str]:
    """``<site>.key`` (0600, OpenSSH private) and ``<site>.pub`` (OpenSSH public), ECDSA P-384; and its fingerprint.

    Refuses to overwrite an existing key: a replaced key silently locks the site out of the federation.
    """
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    private, public = folder / f"{site}.key", folder / f"{site}.pub"
    for p in (private, public):
        if p.exists():
            raise ConfigError(f"{p}: exists; remove it first if you really mean to replace this site's key")
    key = ec.generate_private_key(ec.SECP384R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    line = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    public.write_bytes(line + f" strnet-{site}\n".encode())
    template = folder / "site.yaml.example"
    if not template.exists():
        template.write_text(yaml.safe_dump(site_file_template(site), sort_keys=False))
    return private, public, public_key_fingerprint(line)


def supernode_command(site: SiteFile, *, port: int = 9094, insecure: bool = False) -> list[str]:
    """``flower-supernode`` for this site: TLS against the coordinator's CA and the site's key, or — only with
    ``insecure`` (a local test) — neither."""
    cmd = [
        str(BIN / "flower-supernode"),
        "--superlink",
        site.superlink,
        "--node-config",
        site.node_config(),
        "--port",
        str(port),
    ]
    if insecure:
        return [*cmd, "--insecure"]
    for key in ("ca_cert", "private_key"):
        if not getattr(site, key).is_file():
            raise ConfigError(f"{site.where(key)}: {getattr(site, key)} does not exist")
    return [*cmd, "--root-certificates", str(site.ca_cert), "--auth-supernode-private-key", str(site.private_key)]


def node_env(site: SiteFile, flwr_home: Path) -> dict[str, str]:
    threads = str(site.threads)
    return flower_env(flwr_home, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)


def start_supernode(
    site: SiteFile, *, workdir: str | Path, port: int = 9094, insecure: bool = False
) -> subprocess.Popen:
    """Start the node in its own process group (stop it by that PID); its output goes to ``workdir/supernode.log``."""
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    log = open(work / "supernode.log", "ab")  # noqa: SIM115 - handed to the child, closed with it
    try:
        return subprocess.Popen(
            supernode_command(site, port=port, insecure=insecure),
            env=node_env(site, work / "flwr-home"),
            cwd=work,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        log.close()


# A node that exits this fast never joined: most often the SuperLink refused its activation because a crashed
# run of this node is still held as connected (until its heartbeat expires, about a minute; flwr code 2004).
QUICK_EXIT_S = 30.0


def run_with_retries(cmd: list[str], *, env: dict[str, str], cwd: Path, retries: int, wait_s: float, say=print) -> int:
    """Run ``flower-supernode``; when it exits non-zero within :data:`QUICK_EXIT_S`, wait and start it again, up
    to ``retries`` times — long enough to outlast the SuperLink's hold on a crashed node. Returns its exit code."""
    attempt = 0
    while True:
        started = time.monotonic()
        code = subprocess.run(cmd, env=env, cwd=cwd).returncode
        quick = time.monotonic() - started < QUICK_EXIT_S
        if code == 0 or not quick or attempt >= retries:
            return code
        attempt += 1
        say(
            f"flower-supernode exited with {code} at once; if the SuperLink refused this node (code 2004: a "
            f"crashed run of it is held as connected for about a minute) a retry will pass. Retry {attempt} of "
            f"{retries} in {wait_s:.0f} s (--retries 0 turns this off)."
        )
        time.sleep(wait_s)
