"""What a site keeps on disk for a resume: per-round files, pruned optimizer states, plain-data loading."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from client.kept import KeptState, flush, load_run_config, save_run_config
from strnet.errors import DataError


def test_optimizer_states_keep_the_two_latest_rounds(tmp_path: Path) -> None:
    from strnet.site import load_optimizer_state

    kept = KeptState(tmp_path, "ab12cd34", "hospital")
    for r in (1, 2, 3):
        kept.save_optimizer({"state": {0: {"step": torch.tensor(float(r))}}, "param_groups": []}, r)
    assert kept.optimizer(1) is None
    for r in (2, 3):
        assert load_optimizer_state(kept.optimizer(r), torch.device("cpu"), "hospital")["state"][0]["step"] == r


def test_the_large_files_go_when_the_run_no_longer_needs_them(tmp_path: Path) -> None:
    """Optimizer states when training is over (including a write still queued), final models after the frozen
    evaluation; BatchNorm tensors and the DP accountant (small) stay, and other federations are untouched."""
    store, other = KeptState(tmp_path, "ab" * 8, "alpha"), KeptState(tmp_path, "cd" * 8, "alpha")
    for kept in (store, other):
        kept.save_batchnorm({"bn.weight": torch.ones(2)}, 1)
        kept.save_optimizer({"state": {}, "param_groups": []}, 1)
        kept.save_model("ee" * 8, {"w": torch.zeros(2)})
    store.save_optimizer({"state": {}, "param_groups": []}, 2)  # queued: dropped all the same
    store.drop_optimizer_states()
    assert store.optimizer(1) is None and store.optimizer(2) is None and store.model("ee" * 8) is not None
    store.drop_models()
    assert store.model("ee" * 8) is None and store.batchnorm(1) is not None
    assert other.optimizer(1) is not None and other.model("ee" * 8) is not None


def test_a_background_optimizer_write_is_on_disk_before_any_read_and_its_failure_surfaces(tmp_path: Path) -> None:
    store = KeptState(tmp_path, "ab" * 8, "alpha")
    state = {"state": {0: {"exp_avg": torch.arange(1000.0)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}
    store.save_optimizer(state, 1)
    data = store.optimizer(1)  # waits for the queued write
    assert data is not None and torch.equal(torch.load(io.BytesIO(data))["state"][0]["exp_avg"], torch.arange(1000.0))
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache folder should be")
    KeptState(blocked, "cd" * 8, "beta").save_optimizer(state, 1)  # returns at once; the write fails behind it
    with pytest.raises(OSError):
        flush()
    flush()  # reported once, then the queue is empty


def test_a_tampered_optimizer_file_is_refused_when_loaded(tmp_path: Path) -> None:
    from strnet.errors import SiteError
    from strnet.site import load_optimizer_state

    kept = KeptState(tmp_path, "ab12cd34", "hospital")
    kept.save_optimizer({"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": []}, 1)
    assert load_optimizer_state(kept.optimizer(1), torch.device("cpu"), "hospital")["state"][0]["step"] == 3.0
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (Path.touch, (marker,))

    torch.save({"state": Payload()}, kept.folder / "optimizer-round-2.pt")
    with pytest.raises(SiteError, match=r"hospital.*not plain tensor data"):
        load_optimizer_state(kept.optimizer(2), torch.device("cpu"), "hospital")
    assert not marker.exists()


def test_batchnorm_by_round_and_the_latest_before_a_round(tmp_path: Path) -> None:
    kept = KeptState(tmp_path, "ab12cd34", "hospital")
    for r in (1, 2, 4):
        kept.save_batchnorm({"bn.running_mean": torch.full((2,), float(r))}, r)
    assert kept.batchnorm(2)["bn.running_mean"].tolist() == [2.0, 2.0]
    assert kept.batchnorm(4, before=True)["bn.running_mean"].tolist() == [2.0, 2.0]  # training round 4 starts from 2
    assert kept.batchnorm(3) is None and kept.batchnorm(1, before=True) is None


def test_a_tampered_state_file_is_refused_and_ids_are_checked(tmp_path: Path) -> None:
    kept = KeptState(tmp_path, "ab12cd34", "hospital")
    kept.save_batchnorm({"x": torch.zeros(1)}, 1)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (Path.touch, (marker,))

    torch.save({"x": Payload()}, kept.folder / "batchnorm-round-1.pt")
    with pytest.raises(DataError, match="not a plain-data state file"):
        kept.batchnorm(1)
    assert not marker.exists()
    with pytest.raises(ValueError, match="hex id"):
        KeptState(tmp_path, "../../etc", "hospital")


def test_run_config_is_kept_by_digest(tmp_path: Path) -> None:
    save_run_config(tmp_path, "0123456789abcdef", '{"seed": 1}', "ab12cd34")
    assert load_run_config(tmp_path, "0123456789abcdef") == ('{"seed": 1}', "ab12cd34")
    assert load_run_config(tmp_path, "fedcba9876543210") is None
    assert load_run_config(tmp_path, "../x") is None
