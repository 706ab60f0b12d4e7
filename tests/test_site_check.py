"""`strnet site check`: passes on a good synthetic site, and fails naming the problem on broken set-ups."""

from __future__ import annotations

import http.server
import shutil
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import yaml

from client.node import keygen
from client.preflight import FAIL, PASS, site_check
from server.deploy import Certificates, make_certificates, write_handout
from simulations.scenario import build_synthetic_scenario
from strnet.cli import main
from strnet.deployment import software_versions


class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Certificates, int]]:
    """A TLS endpoint answering /health with a certificate from our CA, standing in for the SuperLink."""
    certs = make_certificates(tmp_path_factory.mktemp("certs"), ["localhost"])
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs.server_cert, certs.server_key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield certs, server.server_address[1]
    server.shutdown()


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    scenario = build_synthetic_scenario(tmp_path_factory.mktemp("data"), seed=3, n_patients=6, image_size=48)
    return scenario.site_manifests["stage2"]


def make_site(tmp_path: Path, certs: Certificates, port: int, manifest: Path, *, register: bool = True) -> Path:
    """A good site: its key registered in the hand-out, the coordinator's CA, a copy of a synthetic manifest."""
    *_, fingerprint = keygen("stage2", tmp_path / "keys")
    write_handout(
        tmp_path / "handout.json",
        address=f"127.0.0.1:{port}",
        ca_cert=certs.ca_cert,
        fingerprints={"stage2": fingerprint} if register else {"other": "SHA256:none"},
    )
    shutil.copy(certs.ca_cert, tmp_path / "ca.crt")
    df = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    df["path"] = [str((manifest.parent / p).resolve()) for p in df["path"]]
    df.to_csv(tmp_path / "manifest.csv", index=False)
    site = tmp_path / "site.yaml"
    site.write_text(
        yaml.safe_dump(
            {
                "site_id": "stage2",
                "manifest": "manifest.csv",
                "superlink": f"127.0.0.1:{port}",
                "ca_cert": "ca.crt",
                "private_key": "keys/stage2.key",
                "handout": "handout.json",
                "cache_dir": "cache",
                "device": "cpu",
                "threads": 1,
            }
        )
    )
    return site


def statuses(path: Path, **kwargs: object) -> dict[str, tuple[str, str]]:
    return {c.name: (c.status, c.detail) for c in site_check(path, timeout=2, **kwargs)}


def test_a_good_site_passes_every_check(tmp_path: Path, coordinator, manifest: Path, capsys) -> None:
    certs, port = coordinator
    site = make_site(tmp_path, certs, port, manifest)
    result = statuses(site)
    assert {name: s for name, (s, _) in result.items()} == dict.fromkeys(result, PASS), result
    assert set(result) >= {
        "manifest",
        "images decode",
        "cache",
        "CA certificate",
        "node key",
        "SuperLink over TLS",
        "versions",
    }
    assert main(["site", "check", "--site-config", str(site)]) == 0
    assert "ready to join" in capsys.readouterr().out


def fails(result: dict[str, tuple[str, str]], name: str, text: str) -> None:
    status, detail = result[name]
    assert status == FAIL and text in detail, result[name]


def test_missing_manifest(tmp_path: Path, coordinator, manifest: Path) -> None:
    site = make_site(tmp_path, *coordinator, manifest)
    (tmp_path / "manifest.csv").unlink()
    fails(statuses(site), "manifest", "manifest not found")


def test_undecodable_images_are_counted_and_listed(tmp_path: Path, coordinator, manifest: Path) -> None:
    site = make_site(tmp_path, *coordinator, manifest)
    df = pd.read_csv(tmp_path / "manifest.csv", dtype=str, keep_default_na=False)
    broken = tmp_path / "broken"
    broken.mkdir()
    for i in range(len(df) // 2):  # half the rows point at files that are not images
        bad = broken / f"bad{i}.png"
        bad.write_bytes(b"not an image")
        df.loc[i, "path"], df.loc[i, "side"] = str(bad), ""
    df.to_csv(tmp_path / "manifest.csv", index=False)
    status, detail = statuses(site)["images decode"]
    assert status == FAIL and f"{len(df) // 2} of {len(df)} fail" in detail and "bad0.png" in detail


def test_wrong_ca(tmp_path: Path, coordinator, manifest: Path) -> None:
    site = make_site(tmp_path, *coordinator, manifest)
    other = make_certificates(tmp_path / "other", ["localhost"])
    shutil.copy(other.ca_cert, tmp_path / "ca.crt")
    result = statuses(site)
    fails(result, "CA certificate", "is not the CA in the hand-out")
    fails(result, "SuperLink over TLS", "certificate not trusted")


def test_unregistered_key(tmp_path: Path, coordinator, manifest: Path) -> None:
    site = make_site(tmp_path, *coordinator, manifest, register=False)
    fails(statuses(site), "node key", "is not registered at the coordinator")


def test_unreachable_superlink(tmp_path: Path, coordinator, manifest: Path) -> None:
    certs, _ = coordinator
    site = make_site(tmp_path, certs, 9, manifest)  # port 9 (discard): nothing listens on loopback
    fails(statuses(site), "SuperLink over TLS", "unreachable")


def test_version_mismatch(tmp_path: Path, coordinator, manifest: Path, capsys) -> None:
    site = make_site(tmp_path, *coordinator, manifest)
    older = software_versions() | {"torch": "2.0.0"}
    fails(statuses(site, versions=lambda: older), "versions", "torch 2.0.0 here")
    assert main(["site", "check", "--site-config", str(site)]) == 0  # the real versions match


def test_a_broken_site_file_fails_alone_and_the_cli_exits_non_zero(tmp_path: Path, capsys) -> None:
    (tmp_path / "site.yaml").write_text("site_id: a\n")
    result = statuses(tmp_path / "site.yaml")
    fails(result, "site file", "missing key(s) manifest")
    assert main(["site", "check", "--site-config", str(tmp_path / "site.yaml")]) == 1
    assert "1 check(s) failed: site file" in capsys.readouterr().out
