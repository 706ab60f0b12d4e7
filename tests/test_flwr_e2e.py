"""`flwr run .` end to end on a tiny synthetic scenario: local SuperLink, Ray simulation, 3 SuperNodes.

The SuperLink runs in its own process group (simulations.flower_sim) and is stopped by that PID.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import mlflow
import pytest
import yaml

from configs.schema import load_config
from simulations.flower_sim import REPO, local_superlink
from simulations.scenario import TINY_RUN, build_synthetic_scenario


@pytest.mark.slow
def test_flwr_run_end_to_end(tmp_path: Path) -> None:
    scenario = build_synthetic_scenario(tmp_path / "data", seed=42, n_patients=20, image_size=64)
    sites = scenario.federation_sites()
    db = tmp_path / "mlflow.db"
    cfg = load_config(
        "demo",
        [
            *TINY_RUN,
            "federation.rounds=2",
            "federation.quorum=2",
            f"federation.sites={json.dumps(sites)}",
            f"output_dir={json.dumps(str(tmp_path / 'run'))}",
            f"data.cache_dir={json.dumps(str(tmp_path / 'cache'))}",
            f"tracking.uri={json.dumps(f'sqlite:///{db}')}",
            "tracking.experiment=e2e",
        ],
    )
    config_path = tmp_path / "federated.yaml"
    config_path.write_text(yaml.safe_dump(cfg.to_dict()))

    t0 = time.perf_counter()
    with local_superlink(tmp_path) as link:
        run = link.run(REPO, f'config="{config_path}"', num_supernodes=3, timeout=420)
        superlink_pid = link.proc.pid
    seconds = time.perf_counter() - t0
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    bundle = Path(cfg.output_dir) / "bundle"
    assert (bundle / "metadata.json").is_file() and (bundle / "model.pt").is_file(), log[-4000:]
    meta = json.loads((bundle / "metadata.json").read_text())
    assert meta["training"]["mode"] == "federated"
    assert meta["threshold"]["sites"] == ["hospital", "stage1"]

    mlflow.set_tracking_uri(f"sqlite:///{db}")
    runs = mlflow.search_runs(experiment_names=["e2e"])
    assert len(runs) == 1
    row = runs.iloc[0]
    assert row["tags.mode"] == "federated" and row["status"] == "FINISHED"
    assert row["metrics.tau_star"] == pytest.approx(meta["threshold"]["value"])
    for key in (
        "metrics.test_screening_auroc",
        "metrics.history/val_screening_auprc",
        "metrics.site.stage2.test_screening_sensitivity",
    ):
        assert key in runs.columns, key
    with pytest.raises(ProcessLookupError):  # the SuperLink's whole process group is gone
        os.killpg(superlink_pid, 0)
    print(f"flwr run end to end: {seconds:.1f} s")
