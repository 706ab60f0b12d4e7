"""Everything a site sends in a whole federated run, audited from the node's own log of its replies."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import client.app as client_app
from client.audit import AUDIT_ENV, read_log, shapes, unregistered, violations
from configs.schema import Config, load_config
from server.federation import initial_state, run_federated
from server.pooled import QuorumError
from simulations.inprocess import InProcessGrid
from simulations.scenario import TINY_RUN, build_synthetic_scenario

pytestmark = pytest.mark.usefixtures("flower_task_identity")


def config(root: Path, n_patients: int, *extra: str) -> Config:
    scenario = build_synthetic_scenario(root / "data", seed=5, n_patients=n_patients, image_size=48)
    sites = scenario.federation_sites()
    return load_config(
        "demo",
        [
            *TINY_RUN,
            "federation.rounds=1",
            "tscore.rounds=1",
            "evaluate.bootstrap=20",
            "tracking.enabled=false",
            f"federation.sites={json.dumps(sites)}",
            f"output_dir={json.dumps(str(root / 'run'))}",
            f"data.cache_dir={json.dumps(str(root / 'cache'))}",
            *extra,
        ],
    )


def audited_run(
    root: Path, n_patients: int, monkeypatch: pytest.MonkeyPatch, *, server_refuses: bool = False
) -> tuple[list[dict], Config]:
    cfg = config(root, n_patients)
    log = root / "sent.jsonl"
    monkeypatch.setenv(AUDIT_ENV, str(log))
    if server_refuses:  # the server drops replies with unexpected statistics; the node's log still has them
        with pytest.raises(QuorumError, match="unexpected"):
            run_federated(InProcessGrid(3), cfg)  # type: ignore[arg-type]
    else:
        run_federated(InProcessGrid(3), cfg)  # type: ignore[arg-type]
    return read_log(log), cfg


def forbidden_tokens(cfg: Config) -> set[str]:
    """Every path, file name, file stem and patient id in the sites' manifests."""
    tokens: set[str] = set()
    for site in cfg.federation.sites:
        df = pd.read_csv(site.manifest, dtype=str, keep_default_na=False)
        for path in df["path"]:
            p = Path(path)
            tokens |= {path, p.name, p.stem}
        tokens |= {pid for pid in df["patient_id"] if pid}
    return tokens


def model_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in initial_state(cfg)[0].items()}


def test_every_reply_of_a_run_holds_only_model_arrays_fixed_size_counts_and_scalars(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    small, cfg = audited_run(tmp_path / "small", 20, monkeypatch)
    large, _ = audited_run(tmp_path / "large", 30, monkeypatch)
    kinds = {e["message_type"] for e in small}
    assert {"train", "query.val_stats", "query.calibration", "evaluate.frozen"} <= kinds, kinds
    assert violations(small, model_shapes=model_shapes(cfg), forbidden=forbidden_tokens(cfg)) == []
    # every array and metric a site sent is one strnet.released.REGISTRY lists (the list in docs/deploy.md)
    assert unregistered(small) == []
    # no array's shape depends on how many images a site holds: a run on 50 % more patients sends the same shapes
    assert shapes(small) == shapes(large)


def test_the_audit_catches_a_site_made_to_leak(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original_reply, original_encode = client_app._reply, client_app.encode

    def leaking_reply(message, runner, **records):  # type: ignore[no-untyped-def]
        reply = original_reply(message, runner, **records)
        reply.content.config_records["info"]["first-file"] = str(runner.df["path"].iloc[0])
        return reply

    def per_image_scores(counts):  # type: ignore[no-untyped-def]
        return {**original_encode(counts), "scores": np.zeros(int(np.asarray(counts.hist).sum()))}

    monkeypatch.setattr(client_app, "_reply", leaking_reply)
    monkeypatch.setattr(client_app, "encode", per_image_scores)
    small, cfg = audited_run(tmp_path / "small", 20, monkeypatch, server_refuses=True)
    large, _ = audited_run(tmp_path / "large", 30, monkeypatch, server_refuses=True)
    found = violations(small, model_shapes=model_shapes(cfg), forbidden=forbidden_tokens(cfg))
    assert any("first-file" in v for v in found), found
    differ = {k for k in shapes(small) if shapes(small)[k] != shapes(large).get(k)}
    assert any(key == "scores" for _, _, key in differ), differ
    assert any("'scores'" in u for u in unregistered(small))
