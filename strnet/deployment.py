"""What a coordinator and a hospital node agree on before a federation: the site file, the hand-out, key ids.

Both sides read these, so they live here rather than in ``server/`` (which writes the hand-out) or ``client/``
(which reads the site file), and nothing here imports Flower: a hospital can validate its file and compare
versions before any federated code runs.

* The **site file** (``site.yaml``) is the one file a hospital's IT team fills in: which site this node plays,
  where its manifest, cache and key are, which SuperLink to dial with which CA, and which hand-out it joined.
* The **hand-out** (``handout.json``) is what the coordinator gives every site: the SuperLink address, the CA
  certificate, the server's software versions (a node whose versions differ computes different numbers) and
  the fingerprints of the public keys it registered (so a site can check its key is among them before dialling).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import platform
import re
import sys
from dataclasses import asdict, dataclass, field, fields
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from strnet.errors import ConfigError

HANDOUT_VERSION = 1
# The packages whose versions must match between coordinator and sites (Python is compared major.minor).
VERSIONED_PACKAGES = ("torch", "flwr", "strnet")
DEVICES = ("auto", "cpu", "cuda")
_HOST_PORT = re.compile(r"^(?P<host>\[[0-9a-fA-F:]+\]|[A-Za-z0-9.\-]+):(?P<port>\d{1,5})$")


def flower_env(home: str | Path, **extra: str) -> dict[str, str]:
    """Environment for Flower's executables (coordinator, node, simulation): its own FLWR_HOME, never a runtime
    pip install (it would fetch a multi-GB CUDA torch), no update check or telemetry, this venv's tools first."""
    bin_dir = Path(sys.executable).parent
    return {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        **extra,
    }


def software_versions() -> dict[str, str]:
    """Python major.minor.micro and the installed versions of :data:`VERSIONED_PACKAGES` (read, not imported)."""
    out = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def version_mismatches(ours: dict[str, str], theirs: dict[str, str]) -> list[str]:
    """Human-readable differences; Python only by major.minor (patch releases do not change the numbers)."""
    problems = []
    for name in ("python", *VERSIONED_PACKAGES):
        a, b = ours.get(name, "unknown"), theirs.get(name, "unknown")
        if name == "python":
            a, b = ".".join(a.split(".")[:2]), ".".join(b.split(".")[:2])
        if a != b:
            problems.append(f"{name} {a} here, {b} at the coordinator")
    return problems


def public_key_fingerprint(openssh_public_key: bytes | str) -> str:
    """``SHA256:…`` of an OpenSSH public key line, exactly as ``ssh-keygen -lf`` prints it."""
    text = openssh_public_key.decode() if isinstance(openssh_public_key, bytes) else openssh_public_key
    parts = text.split()
    if len(parts) < 2:
        raise ValueError("not an OpenSSH public key line ('<type> <base64> [comment]')")
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except ValueError as exc:
        raise ValueError("the OpenSSH public key's base64 body does not decode") from exc
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def split_host_port(address: str) -> tuple[str, int]:
    match = _HOST_PORT.match(address.strip())
    if match is None or not 0 < int(match["port"]) < 65536:
        raise ValueError(f"{address!r} is not host:port (for example fl.example.org:9092)")
    return match["host"].strip("[]"), int(match["port"])


def _parsed(path: Path, what: str) -> Any:
    """The YAML (or JSON, a subset of it) in ``path``; a missing or unparsable file is a ConfigError naming it."""
    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: {what} not found") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: {what} does not parse ({exc})") from exc


@dataclass(frozen=True)
class Handout:
    """What the coordinator gives every site (written by ``strnet deploy superlink``)."""

    superlink: str  # host:port the nodes dial
    ca_cert_pem: str  # the CA that signed the SuperLink's certificate
    versions: dict[str, str]
    fingerprints: dict[str, str]  # site name -> SHA256 fingerprint of its registered public key
    version: int = HANDOUT_VERSION

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def read(cls, path: str | Path) -> Handout:
        path = Path(path)
        data = _parsed(path, "hand-out (the coordinator gives it to every site)")
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: hand-out is not a JSON object")
        names = {f.name for f in fields(cls)}
        missing = sorted(names - set(data) - {"version"})
        if missing:
            raise ConfigError(f"{path}: hand-out lacks {', '.join(missing)}")
        if data.get("version", HANDOUT_VERSION) != HANDOUT_VERSION:
            raise ConfigError(f"{path}: hand-out version {data.get('version')} is not {HANDOUT_VERSION}")
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class SiteFile:
    """The hospital's ``site.yaml``: every key required, so a node never runs on a silently assumed value."""

    site_id: str
    manifest: Path
    superlink: str
    ca_cert: Path
    private_key: Path
    handout: Path
    cache_dir: Path
    device: str = "cpu"
    threads: int = 1
    source: Path | None = field(default=None, compare=False)  # the file it was read from, for messages

    def where(self, key: str) -> str:
        return f"{self.source}: {key}" if self.source else key

    def node_config(self) -> str:
        """The ``--node-config`` string for ``flower-supernode`` (TOML values: strings quoted)."""
        values = {
            "site-id": self.site_id,
            "manifest": str(self.manifest),
            "cache-dir": str(self.cache_dir),
            "device": self.device,
            "threads": self.threads,
        }
        return " ".join(f"{k}={json.dumps(v)}" for k, v in values.items())


SITE_KEYS = ("site_id", "manifest", "superlink", "ca_cert", "private_key", "handout", "cache_dir", "device", "threads")


def load_site_file(path: str | Path) -> SiteFile:
    """Read and validate ``site.yaml``; every error names the file and the key. Relative paths are resolved
    against the file's folder, so the file works wherever the node is started from."""
    path = Path(path)
    data = _parsed(path, "site file")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of {', '.join(SITE_KEYS)}")
    unknown = sorted(set(data) - set(SITE_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; the keys are {', '.join(SITE_KEYS)}")
    missing = [k for k in SITE_KEYS if k not in data or data[k] in (None, "")]
    if missing:
        raise ConfigError(f"{path}: missing key(s) {', '.join(missing)}")
    base = path.resolve().parent

    def text(key: str) -> str:
        value = data[key]
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise ConfigError(f"{path}: {key} must be a string, got {type(value).__name__}")
        return str(value).strip()

    def file(key: str) -> Path:
        p = Path(text(key)).expanduser()
        return p if p.is_absolute() else base / p

    site_id = text("site_id")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", site_id):
        raise ConfigError(f"{path}: site_id {site_id!r} must be letters, digits, '_', '.', '-'")
    superlink = text("superlink")
    try:
        split_host_port(superlink)
    except ValueError as exc:
        raise ConfigError(f"{path}: superlink: {exc}") from exc
    device = text("device")
    if device not in DEVICES and not re.fullmatch(r"cuda:\d+", device):
        raise ConfigError(f"{path}: device {device!r} must be one of {', '.join(DEVICES)} or cuda:N")
    threads = data["threads"]
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"{path}: threads must be a whole number >= 1, got {threads!r}")
    return SiteFile(
        site_id=site_id,
        manifest=file("manifest"),
        superlink=superlink,
        ca_cert=file("ca_cert"),
        private_key=file("private_key"),
        handout=file("handout"),
        cache_dir=file("cache_dir"),
        device=device,
        threads=threads,
        source=path,
    )


def site_file_template(site_id: str) -> dict[str, Any]:
    """A filled-in example, written next to a new key pair so the hospital edits rather than writes."""
    return {
        "site_id": site_id,
        "manifest": "/data/strnet/manifest.csv",
        "superlink": "fl.example.org:9092",
        "ca_cert": "ca.crt",
        "private_key": f"{site_id}.key",
        "handout": "handout.json",
        "cache_dir": "/data/strnet/cache",
        "device": "cpu",
        "threads": 4,
    }
