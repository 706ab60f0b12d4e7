"""Shared fixtures: one tiny synthetic multi-site tree per session, and the optional real-data share."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from flwr.app import Array
from flwr.supercore.task_identity import TaskIdentity

from simulations.sites import write_sites
from strnet import npy

ROOT = Path(__file__).resolve().parents[1]
REAL_DATA_DIR = ROOT.parent / "shared" / "data" / "knee"
PRODUCT = tuple(f"{ROOT / part}/" for part in ("client", "server", "strnet"))
TESTS = f"{ROOT / 'tests'}/"


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


@pytest.fixture(autouse=True)
def arrays_are_read_under_the_npy_lock(monkeypatch: pytest.MonkeyPatch):
    """Every test checks that client, server and strnet code read Flower arrays under :mod:`strnet.npy`'s lock
    (why: that module). A read outside it, from any thread, fails the test that made it, naming the line. Reads
    made by the tests themselves are not checked."""
    original = Array.numpy
    unguarded: list[str] = []

    def numpy(self: Array):  # type: ignore[no-untyped-def]
        if not npy._LOCK._is_owned():  # type: ignore[attr-defined]
            frame = sys._getframe(1)
            while frame is not None and not frame.f_code.co_filename.startswith(TESTS):
                if frame.f_code.co_filename.startswith(PRODUCT):
                    unguarded.append(f"{frame.f_code.co_filename}:{frame.f_lineno}")
                    break
                frame = frame.f_back
        return original(self)

    monkeypatch.setattr(Array, "numpy", numpy)
    yield
    assert not unguarded, f"Flower arrays read outside strnet.npy's lock at {sorted(set(unguarded))}"
