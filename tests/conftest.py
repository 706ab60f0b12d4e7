"""Shared fixtures: one tiny synthetic multi-site tree per session, and the optional real-data share."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.supercore.task_identity import TaskIdentity

from simulations.sites import write_sites

REAL_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "knee"


@pytest.fixture(scope="session")
def synthetic_sites(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """stage1 / stage2 / hospital site folders (12 patients each, 96 px), written once; treat as read-only."""
    return write_sites(tmp_path_factory.mktemp("synthetic_sites"), seed=7, n_patients=12, image_size=96)


@pytest.fixture
def real_data_dir() -> Path:
    """The developer share of real knee data; skips the test where it is not mounted."""
    if not REAL_DATA_DIR.is_dir():
        pytest.skip(f"real data not available at {REAL_DATA_DIR}")
    return REAL_DATA_DIR


@pytest.fixture
def flower_task_identity():
    """Messages are stamped with the process's run/node/task ids, which a SuperLink/SuperNode sets; do the same."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
