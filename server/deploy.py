"""The coordinator's side of a deployment: certificates, a TLS + node-authenticated SuperLink, the hand-out.

Everything runs through Flower's own executables (``flower-superlink``, ``flwr supernode register``); this
module only writes their inputs and starts them. flwr 1.42 serves the Fleet, Control and runtime APIs over
HTTPS on one port; TLS is server-side only (nodes verify our CA), and nodes prove who they are with an OpenSSH
ECDSA key the coordinator registered. The SuperLink's own executor dials 127.0.0.1, so the server certificate
always names it.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from strnet.deployment import Handout, flower_env, public_key_fingerprint, software_versions
from strnet.errors import ConfigError

BIN = Path(sys.executable).parent
CONNECTION = "strnet"  # the [superlink.<name>] entry `flwr` commands use, in the coordinator's FLWR_HOME
CERT_DAYS = 365
DEFAULT_PORT = 9092


@dataclass(frozen=True)
class Certificates:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def in_dir(cls, folder: str | Path) -> Certificates:
        d = Path(folder)
        return cls(d / "ca.crt", d / "ca.key", d / "server.pem", d / "server.key")

    def check(self) -> None:
        for name in ("ca_cert", "server_cert", "server_key"):
            p = getattr(self, name)
            if not p.is_file():
                raise ConfigError(f"{p}: missing ({name}); create the set with `strnet deploy certs`")


def _private(path: Path, data: bytes) -> None:
    """Write a secret readable by its owner only, never briefly world-readable."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def make_certificates(out: str | Path, hosts: list[str], *, days: int = CERT_DAYS) -> Certificates:
    """A self-signed CA and a server certificate whose subject alternative names hold ``hosts`` and 127.0.0.1."""
    certs = Certificates.in_dir(out)
    certs.ca_cert.parent.mkdir(parents=True, exist_ok=True)
    names: list[x509.GeneralName] = []
    for host in [*hosts, "127.0.0.1", "localhost"]:
        try:
            entry: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            entry = x509.DNSName(host)
        if entry not in names:
            names.append(entry)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "STR-Net federation CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0] if hosts else "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    pkcs8 = serialization.PrivateFormat.PKCS8
    certs.ca_cert.write_bytes(ca.public_bytes(pem))
    certs.server_cert.write_bytes(server.public_bytes(pem))
    _private(certs.ca_key, ca_key.private_bytes(pem, pkcs8, serialization.NoEncryption()))
    _private(certs.server_key, server_key.private_bytes(pem, pkcs8, serialization.NoEncryption()))
    return certs


def node_public_keys(folder: str | Path) -> dict[str, Path]:
    """``<site>.pub`` files in ``folder``, by site name; each must be an OpenSSH ECDSA public key."""
    keys = {}
    for path in sorted(Path(folder).glob("*.pub")):
        text = path.read_text().strip()
        if not text.startswith("ecdsa-sha2-nistp"):
            raise ConfigError(f"{path}: not an OpenSSH ECDSA public key (flwr 1.42 node auth needs ECDSA)")
        public_key_fingerprint(text)  # raises on a malformed body
        keys[path.stem] = path
    if not keys:
        raise ConfigError(f"{folder}: no <site>.pub public keys to register")
    return keys


def write_connection(home: Path, address: str, ca_cert: Path | None) -> None:
    """The ``[superlink.strnet]`` entry that ``flwr run``/``flwr supernode register`` use against this SuperLink."""
    home.mkdir(parents=True, exist_ok=True)
    tls = f'root-certificates = "{ca_cert}"' if ca_cert is not None else "insecure = true"
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "{address}"\n{tls}\n'
    )


def superlink_command(state: Path, port: int, *, certs: Certificates | None, host: str = "0.0.0.0") -> list[str]:
    """``flower-superlink`` with TLS and node authentication, or — only for ``certs=None`` — neither."""
    cmd = [
        str(BIN / "flower-superlink"),
        "--disable-runtime-dependency-installation",
        "--host",
        host,
        "--port",
        str(port),
        "--database",
        str(state / "superlink.db"),
        "--log-file",
        str(state / "superlink.log"),
    ]
    if certs is None:
        return [*cmd, "--insecure"]
    return [
        *cmd,
        "--ssl-ca-certfile",
        str(certs.ca_cert),
        "--ssl-certfile",
        str(certs.server_cert),
        "--ssl-keyfile",
        str(certs.server_key),
        "--enable-supernode-auth",
    ]


def healthy(port: int, ca_cert: Path | None, host: str = "127.0.0.1") -> bool:
    """The SuperLink answers ``/health`` — over TLS verified against our CA when there is one."""
    scheme = "https" if ca_cert else "http"
    context = ssl.create_default_context(cafile=str(ca_cert)) if ca_cert else None
    try:
        with urllib.request.urlopen(f"{scheme}://{host}:{port}/health", timeout=1, context=context) as r:
            return r.status == 200
    except OSError:
        return False


@dataclass
class SuperLink:
    proc: subprocess.Popen
    port: int
    home: Path
    state: Path
    ca_cert: Path | None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return flower_env(self.home)

    def stop(self) -> None:
        stop_process_group(self.proc)


def stop_process_group(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL, to the process group ``proc`` leads (it and the ServerApp/ClientApp it started)."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            os.killpg(proc.pid, sig)  # the leader is gone; the rest of its group gets the same signal
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return


def start_superlink(
    state: str | Path,
    *,
    port: int = DEFAULT_PORT,
    certs: Certificates | None,
    host: str = "0.0.0.0",
    ready_timeout: float = 60,
) -> SuperLink:
    """Start ``flower-superlink`` in its own process group and wait until it answers; FLWR_HOME under ``state``."""
    state = Path(state).resolve()
    state.mkdir(parents=True, exist_ok=True)
    home = state / "flwr-home"
    if certs is not None:
        certs.check()
    write_connection(home, f"127.0.0.1:{port}", certs.ca_cert if certs else None)
    log = open(state / "superlink.out", "ab")  # noqa: SIM115 - handed to the child, closed with it
    proc = subprocess.Popen(
        superlink_command(state, port, certs=certs, host=host),
        env=flower_env(home),
        cwd=state,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    link = SuperLink(proc, port, home, state, certs.ca_cert if certs else None)
    deadline = time.monotonic() + ready_timeout
    while not healthy(port, link.ca_cert):
        if proc.poll() is not None:
            raise RuntimeError(f"flower-superlink exited with {proc.returncode}; see {state / 'superlink.log'}")
        if time.monotonic() > deadline:
            link.stop()
            raise RuntimeError(f"flower-superlink not answering after {ready_timeout:.0f} s; see {state}")
        time.sleep(0.3)
    return link


def register_keys(link: SuperLink, keys: dict[str, Path]) -> dict[str, str]:
    """``flwr supernode register`` each site's public key; returns site -> fingerprint of what was registered."""
    flwr = shutil.which("flwr", path=str(BIN)) or "flwr"
    fingerprints = {}
    for site, key in keys.items():
        done = subprocess.run(
            [flwr, "supernode", "register", str(key), CONNECTION, "--name", site],
            env=link.env(),
            cwd=link.state,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode != 0 and "already" not in (done.stdout + done.stderr).lower():
            raise RuntimeError(f"registering {key} failed: {(done.stdout + done.stderr).strip()[-800:]}")
        fingerprints[site] = public_key_fingerprint(key.read_text())
    return fingerprints


def write_handout(path: str | Path, *, address: str, ca_cert: Path, fingerprints: dict[str, str]) -> Handout:
    handout = Handout(
        superlink=address,
        ca_cert_pem=ca_cert.read_text(),
        versions=software_versions(),
        fingerprints=dict(sorted(fingerprints.items())),
    )
    handout.write(path)
    return handout
