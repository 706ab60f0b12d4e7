"""Deployment pieces without processes: certificates, node keys, the site file, the node command."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cryptography import x509

from client.node import keygen, run_with_retries, supernode_command
from client.site import site_for_node
from configs.schema import load_config
from server.deploy import make_certificates, node_public_keys, superlink_command
from strnet.cli import main
from strnet.deployment import (
    Handout,
    load_site_file,
    public_key_fingerprint,
    site_file_template,
    version_mismatches,
)
from strnet.errors import ConfigError


def test_server_certificate_names_the_hosts_and_loopback_and_is_signed_by_the_ca(tmp_path: Path) -> None:
    certs = make_certificates(tmp_path, ["fl.example.org", "10.0.0.5"])
    ca = x509.load_pem_x509_certificate(certs.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "fl.example.org" in san.get_values_for_type(x509.DNSName)
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"10.0.0.5", "127.0.0.1"}
    for secret in (certs.ca_key, certs.server_key):
        assert secret.stat().st_mode & 0o777 == 0o600


def test_node_key_is_openssh_ecdsa_private_0600_and_never_overwritten(tmp_path: Path) -> None:
    private, public, fingerprint = keygen("hospital-a", tmp_path)
    assert private.stat().st_mode & 0o777 == 0o600
    assert private.read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    assert public.read_text().startswith("ecdsa-sha2-nistp384 ")
    assert yaml.safe_load((tmp_path / "site.yaml.example").read_text())["site_id"] == "hospital-a"
    if shutil.which("ssh-keygen"):  # the oracle for the fingerprint format
        out = subprocess.run(["ssh-keygen", "-lf", str(public)], capture_output=True, text=True, check=True)
        assert out.stdout.split()[1] == fingerprint
    with pytest.raises(ConfigError, match="exists"):
        keygen("hospital-a", tmp_path)
    assert node_public_keys(tmp_path) == {"hospital-a": public}


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs OpenSSH's ssh-keygen as the oracle")
def test_a_key_made_by_ssh_keygen_is_accepted_with_its_own_fingerprint(tmp_path: Path) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", str(tmp_path / "site-b")], check=True
    )
    (tmp_path / "site-b").rename(tmp_path / "site-b.key")
    out = subprocess.run(["ssh-keygen", "-lf", str(tmp_path / "site-b.pub")], capture_output=True, text=True)
    assert node_public_keys(tmp_path) == {"site-b": tmp_path / "site-b.pub"}
    assert public_key_fingerprint((tmp_path / "site-b.pub").read_text()) == out.stdout.split()[1]
    with pytest.raises(ValueError, match="OpenSSH"):
        public_key_fingerprint("not-a-key")


def test_public_keys_other_than_ecdsa_are_refused_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "a.pub").write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGx0 a\n")
    with pytest.raises(ConfigError, match=r"a\.pub.*ECDSA"):
        node_public_keys(tmp_path)


def write_site(tmp_path: Path, **changes: object) -> Path:
    data = site_file_template("hospital-a") | {"manifest": "m.csv", "ca_cert": "ca.crt"} | changes
    data = {k: v for k, v in data.items() if v is not None}
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_site_file_resolves_relative_paths_next_to_itself(tmp_path: Path) -> None:
    site = load_site_file(write_site(tmp_path))
    assert site.manifest == tmp_path / "m.csv" and site.ca_cert == tmp_path / "ca.crt"
    assert 'site-id="hospital-a"' in site.node_config() and "threads=4" in site.node_config()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"manifest": None}, "missing key.*manifest"),
        ({"colour": "blue"}, "unknown key.*colour"),
        ({"superlink": "fl.example.org"}, "superlink.*host:port"),
        ({"threads": 0}, "threads"),
        ({"device": "tpu"}, "device 'tpu'"),
        ({"site_id": "a b"}, "site_id"),
    ],
)
def test_a_bad_site_file_names_the_file_and_the_key(tmp_path: Path, changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=rf"site\.yaml: .*{message}"):
        load_site_file(write_site(tmp_path, **changes))


def test_node_command_carries_tls_and_key_and_refuses_missing_files(tmp_path: Path) -> None:
    site = load_site_file(write_site(tmp_path))
    with pytest.raises(ConfigError, match="ca_cert"):
        supernode_command(site)
    (tmp_path / "ca.crt").write_text("x")
    (tmp_path / "hospital-a.key").write_text("x")
    cmd = supernode_command(site)
    assert cmd[cmd.index("--root-certificates") + 1] == str(tmp_path / "ca.crt")
    assert cmd[cmd.index("--auth-supernode-private-key") + 1] == str(tmp_path / "hospital-a.key")
    assert "--insecure" not in cmd and "--insecure" in supernode_command(site, insecure=True)


def test_superlink_command_is_tls_and_authenticated_unless_insecure(tmp_path: Path) -> None:
    certs = make_certificates(tmp_path / "c", ["localhost"])
    cmd = superlink_command(tmp_path, 9092, certs=certs)
    assert "--enable-supernode-auth" in cmd and "--disable-runtime-dependency-installation" in cmd
    assert "--insecure" not in cmd
    assert "--enable-supernode-auth" not in superlink_command(tmp_path, 9092, certs=None)


def test_deploy_superlink_without_tls_needs_the_explicit_flag(tmp_path: Path, capsys) -> None:
    assert main(["deploy", "superlink", "--state", str(tmp_path)]) == 2
    assert "--insecure-local-test" in capsys.readouterr().err


def test_node_config_sets_the_sites_cache_device_and_threads() -> None:
    sites = '[{"name": "a", "role": "train", "manifest": "x.csv"}]'
    cfg = load_config("demo", [f"federation.sites={sites}", "federation.quorum=1"])
    node = site_for_node(cfg, {"site-id": "a", "cache-dir": "/c", "device": "cpu", "threads": 3})
    assert (node.name, node.manifest, node.cache_dir, node.device, node.threads) == ("a", "x.csv", "/c", "cpu", 3)
    with pytest.raises(ConfigError, match="threads"):
        site_for_node(cfg, {"site-id": "a", "threads": 0})


def test_handout_round_trips_and_versions_compare_python_by_minor(tmp_path: Path) -> None:
    h = Handout("fl:9092", "PEM", {"python": "3.11.4", "torch": "2.14.1"}, {"a": "SHA256:x"})
    assert Handout.read(h.write(tmp_path / "h.json")) == h
    assert (
        version_mismatches(
            {"python": "3.11.9", "torch": "2.14.1", "flwr": "1", "strnet": "1"},
            {"python": "3.11.4", "torch": "2.14.1", "flwr": "1", "strnet": "1"},
        )
        == []
    )
    theirs = {"python": "3.12.1", "torch": "2.13.0", "flwr": "1", "strnet": "1"}
    assert version_mismatches({"python": "3.11.9", "torch": "2.14.1", "flwr": "1", "strnet": "1"}, theirs) == [
        "python 3.11 here, 3.12 at the coordinator",
        "torch 2.14.1 here, 2.13.0 at the coordinator",
    ]
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match=r"bad\.json: hand-out .*does not parse"):
        Handout.read(tmp_path / "bad.json")


def test_a_node_that_fails_at_once_is_restarted_and_one_that_ran_is_not(tmp_path: Path) -> None:
    said: list[str] = []
    counter = tmp_path / "starts"
    fail = [sys.executable, "-c", f"open({str(counter)!r}, 'a').write('x'); raise SystemExit(3)"]
    code = run_with_retries(fail, env=dict(os.environ), cwd=tmp_path, retries=2, wait_s=0, say=said.append)
    assert code == 3 and counter.read_text() == "xxx" and len(said) == 2 and "2004" in said[0]
    ok = [sys.executable, "-c", "pass"]
    assert run_with_retries(ok, env=dict(os.environ), cwd=tmp_path, retries=2, wait_s=0, say=said.append) == 0
