"""``strnet site check``: what a hospital's IT team runs before its node joins a federation.

Every check that can fail in the first minutes of a run — a manifest that does not parse, images the node
cannot decode, a full disk, the wrong CA, a key the coordinator never registered, a SuperLink the firewall
blocks, a torch version that computes different numbers — is tried here, locally, with a message that says
what to fix. Nothing leaves the site except one TLS handshake and a ``GET /health`` to the SuperLink.
"""

from __future__ import annotations

import shutil
import ssl
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from strnet.data.manifest import read_manifest
from strnet.data.preprocess import load_image
from strnet.deployment import (
    Handout,
    SiteFile,
    load_site_file,
    public_key_fingerprint,
    software_versions,
    split_host_port,
    version_mismatches,
)
from strnet.errors import StrnetError

PASS, WARN, FAIL = "pass", "warn", "fail"
# Up to this share of undecodable images is a warning (training drops them, with reasons); above it, a failure.
MAX_BAD_IMAGE_SHARE = 0.05
# Free space asked of the cache: one uint16 knee (the cache format) at the paper's 512² per row, plus 10 %.
CACHE_BYTES_PER_ROW = 512 * 512 * 2 * 1.1
LISTED_FAILURES = 10


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    detail: str


def _manifest(site: SiteFile) -> tuple[Check, pd.DataFrame | None]:
    try:
        df = read_manifest(site.manifest)
    except StrnetError as exc:
        return Check("manifest", FAIL, str(exc)), None
    return Check("manifest", PASS, f"{site.manifest}: {len(df)} row(s)"), df


def _images(df: pd.DataFrame) -> Check:
    failures = []
    for path, side in zip(df["path"], df["side"], strict=True):
        try:
            load_image(path, side)
        except Exception as exc:  # every reason an image fails is reported; none stops the check
            failures.append(f"{path}: {exc}")
    if not failures:
        return Check("images decode", PASS, f"all {len(df)} decode")
    listed = "; ".join(failures[:LISTED_FAILURES]) + (" …" if len(failures) > LISTED_FAILURES else "")
    share = len(failures) / max(len(df), 1)
    status = WARN if share <= MAX_BAD_IMAGE_SHARE and len(failures) < len(df) else FAIL
    return Check("images decode", status, f"{len(failures)} of {len(df)} fail: {listed}")


def _coverage(df: pd.DataFrame) -> Check:
    labelled = df[df["label_cls"] != ""]
    classes = labelled["label_cls"].value_counts().to_dict()
    splits = df["split"].replace("", "unsplit").value_counts().to_dict()
    known = {c: float(df[c].replace("", pd.NA).notna().mean()) for c in ("t_score", "age", "sex", "bmi")}
    detail = f"classes {classes or 'none'}; splits {splits}; known " + ", ".join(
        f"{c} {100 * v:.0f} %" for c, v in known.items()
    )
    if labelled.empty:
        return Check("labels and covariates", WARN, detail + " — no labels: this site can only be evaluated on")
    if (df["split"] == "train").sum() == 0:
        return Check("labels and covariates", WARN, detail + " — no train rows: run `strnet data split`")
    if len(classes) < 2:
        return Check("labels and covariates", WARN, detail + " — one class only")
    return Check("labels and covariates", PASS, detail)


def _cache(site: SiteFile, rows: int) -> Check:
    try:
        site.cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=site.cache_dir):
            pass
    except OSError as exc:
        return Check("cache", FAIL, f"{site.where('cache_dir')}: not writable ({exc})")
    free = shutil.disk_usage(site.cache_dir).free
    need = rows * CACHE_BYTES_PER_ROW
    detail = f"{site.cache_dir}: {free / 2**30:.1f} GiB free, about {need / 2**30:.2f} GiB needed"
    return Check("cache", PASS if free >= need else FAIL, detail)


def _ca(site: SiteFile, handout: Handout | None) -> Check:
    try:
        ours = x509.load_pem_x509_certificate(site.ca_cert.read_bytes())
    except (OSError, ValueError) as exc:
        return Check("CA certificate", FAIL, f"{site.where('ca_cert')}: {site.ca_cert} does not load ({exc})")
    if handout is not None:
        theirs = x509.load_pem_x509_certificate(handout.ca_cert_pem.encode())
        if ours.fingerprint(ours.signature_hash_algorithm) != theirs.fingerprint(theirs.signature_hash_algorithm):
            return Check("CA certificate", FAIL, f"{site.ca_cert} is not the CA in the hand-out {site.handout}")
    return Check("CA certificate", PASS, f"{site.ca_cert}: {ours.subject.rfc4514_string()}")


def _key(site: SiteFile, handout: Handout | None) -> Check:
    try:
        key = serialization.load_ssh_private_key(site.private_key.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        return Check("node key", FAIL, f"{site.where('private_key')}: does not load as an OpenSSH key ({exc})")
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        return Check("node key", FAIL, f"{site.private_key}: not ECDSA (flwr node authentication needs ECDSA)")
    mode = site.private_key.stat().st_mode & 0o777
    line = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    fingerprint = public_key_fingerprint(line)
    if handout is not None and fingerprint not in handout.fingerprints.values():
        return Check(
            "node key", FAIL, f"{fingerprint} is not registered at the coordinator (send it {site.site_id}.pub)"
        )
    if mode & 0o077:
        return Check(
            "node key",
            WARN,
            f"{fingerprint} registered, but {site.private_key} is readable by others (mode {mode:o}; chmod 600)",
        )
    return Check("node key", PASS, f"{fingerprint} registered")


def _superlink(site: SiteFile, timeout: float) -> Check:
    host, port = split_host_port(site.superlink)
    try:
        context = ssl.create_default_context(cafile=str(site.ca_cert))
    except (OSError, ssl.SSLError) as exc:
        return Check("SuperLink over TLS", FAIL, f"cannot use {site.ca_cert} as a CA ({exc})")
    url = f"https://{host}:{port}/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as reply:
            status = reply.status
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, ssl.SSLCertVerificationError):
            return Check(
                "SuperLink over TLS",
                FAIL,
                f"{site.superlink}: certificate not trusted by {site.ca_cert} "
                f"({reason.verify_message}) — wrong CA, or the certificate does not name {host}",
            )
        return Check(
            "SuperLink over TLS",
            FAIL,
            f"{site.superlink}: unreachable ({reason}) — firewall, address, or the SuperLink is not running",
        )
    except OSError as exc:
        return Check("SuperLink over TLS", FAIL, f"{site.superlink}: unreachable ({exc})")
    if status != 200:
        return Check("SuperLink over TLS", FAIL, f"{url} answered {status}")
    return Check("SuperLink over TLS", PASS, f"{site.superlink} answers, certificate verified")


def site_check(
    path: str | Path, *, timeout: float = 5.0, versions: Callable[[], dict[str, str]] = software_versions
) -> list[Check]:
    """Every pre-flight check of ``site.yaml``; a failed step does not hide the ones after it."""
    try:
        site = load_site_file(path)
    except StrnetError as exc:
        return [Check("site file", FAIL, str(exc))]
    checks = [Check("site file", PASS, f"{path}: site {site.site_id}")]
    try:
        handout: Handout | None = Handout.read(site.handout)
        checks.append(Check("hand-out", PASS, f"{site.handout}: {len(handout.fingerprints)} registered node(s)"))
    except StrnetError as exc:
        handout = None
        checks.append(Check("hand-out", FAIL, str(exc)))
    manifest, df = _manifest(site)
    checks.append(manifest)
    if df is not None:
        checks += [_images(df), _coverage(df)]
    checks.append(_cache(site, 0 if df is None else len(df)))
    checks += [_ca(site, handout), _key(site, handout), _superlink(site, timeout)]
    if handout is not None:
        problems = version_mismatches(versions(), handout.versions)
        checks.append(Check("versions", FAIL if problems else PASS, "; ".join(problems) or "match the coordinator"))
    return checks


def render(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    return "\n".join(f"{c.status.upper():4}  {c.name:{width}}  {c.detail}" for c in checks)
