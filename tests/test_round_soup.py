"""federation.keep_rounds and simulations.round_soup: every round's weights on disk, and their averages scored."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.supercore.task_identity import TaskIdentity

from configs import load_config
from server.checkpoint import ROUNDS, load_rounds
from server.federation import run_federated
from simulations.inprocess import InProcessGrid
from simulations.round_soup import candidates, main, soup
from simulations.scenario import TINY_RUN, build_synthetic_scenario
from strnet.bundle import load_bundle
from strnet.errors import ConfigError, DataError


def test_a_soup_is_the_mean_of_floating_arrays_and_keeps_the_last_counters() -> None:
    rng = np.random.default_rng(0)
    states = [{"w": rng.normal(size=(3, 4)).astype(np.float32), "n": np.array(r, np.int64)} for r in (5, 6, 7)]
    got = soup(states)
    assert got["w"].dtype == np.float32 and got["n"].dtype == np.int64
    np.testing.assert_allclose(got["w"], (states[0]["w"] + states[1]["w"] + states[2]["w"]) / 3, rtol=1e-6)
    assert int(got["n"]) == 7
    assert np.array_equal(soup(states[:1])["w"], states[0]["w"])


def test_candidates_follow_fixed_rules_around_the_kept_round() -> None:
    val = {1: 0.5, 2: 0.7, 3: 0.9, 4: 0.8, 5: 0.9, 6: 0.6}
    got = candidates(val, window=2)
    assert got == {
        "kept round": [3],  # the first of two equal best scores, as the strategy keeps it
        "2 ending at the kept round": [2, 3],
        "2 best by validation AUPRC": [3, 5],
        "last 2": [5, 6],
        "all from the first third on": [3, 4, 5, 6],
    }


@pytest.fixture(scope="module")
def kept_run(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("soup")
    scenario = build_synthetic_scenario(root / "data", seed=42, n_patients=20, image_size=64)
    sites = scenario.federation_sites()
    overrides = [
        *TINY_RUN,
        "federation.rounds=3",
        "federation.keep_rounds=true",
        "tracking.enabled=false",
        "tscore.rounds=0",
        "ood.enabled=false",
        "evaluate.bootstrap=20",
        f"federation.sites={json.dumps(sites)}",
        f"output_dir={json.dumps(str(root / 'run'))}",
        f"data.cache_dir={json.dumps(str(root / 'cache'))}",
    ]
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # as conftest's flower_task_identity
    try:
        result = run_federated(InProcessGrid(3), load_config("demo", overrides))  # type: ignore[arg-type]
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
    return scenario, root / "run", result


def test_every_round_is_kept_and_the_kept_round_is_the_bundle(kept_run) -> None:  # type: ignore[no-untyped-def]
    _, run, result = kept_run
    rounds = load_rounds(run)
    assert sorted(rounds) == [1, 2, 3] and sorted(p.name for p in (run / ROUNDS).iterdir()) == [
        "round-1.pt",
        "round-2.pt",
        "round-3.pt",
    ]
    best = int(result.metrics["best_step"])
    bundle = load_bundle(run / "bundle").model.state_dict()
    for key, value in bundle.items():  # the T-score refit is off: the bundle holds the kept round's weights
        assert np.array_equal(value.numpy(), rounds[best][key]), key
    assert any(not np.array_equal(rounds[1][k], rounds[3][k]) for k in bundle)


def test_round_soup_scores_rounds_and_averages_on_validation_and_chooses_there(kept_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    scenario, run, _ = kept_run
    assert main([str(run), "--manifest", str(scenario.manifest), "--train-sites", "stage1", "hospital",
                 "--window", "2", "--cache", str(tmp_path / "cache")]) == 0  # fmt: skip
    got = json.loads((run / "round_soup.json").read_text())
    rounds = {int(r): v for r, v in got["rounds"].items()}
    cands = got["candidates"]
    kept = cands["kept round"]["rounds"][0]
    assert rounds[kept]["val_auprc"] == max(v["val_auprc"] for v in rounds.values())
    # a soup of one round is that round
    assert cands["kept round"]["val_auprc"] == pytest.approx(rounds[kept]["val_auprc"], abs=1e-12)
    assert got["chosen_on_validation"] == max(cands, key=lambda n: cands[n]["val_auprc"])
    assert {r["cohort"] for r in got["reported"]} == {"test (pooled)", "stage2"}
    assert len(got["reported"]) == 2 * len(cands)


def test_a_run_without_kept_rounds_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"federation\.keep_rounds"):
        load_rounds(tmp_path)


def test_a_broken_round_file_is_named(kept_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, run, _ = kept_run
    folder = tmp_path / ROUNDS
    folder.mkdir()
    good = (run / ROUNDS / "round-1.pt").read_bytes()
    (folder / "round-1.pt").write_bytes(good)
    (folder / "round-2.pt").write_bytes(good[: len(good) // 2])  # cut short, as by a full disk
    with pytest.raises(DataError, match=r"round-2\.pt.*unreadable round file"):
        load_rounds(tmp_path)
    torch.save({"format": 2, "weights": {}}, folder / "round-2.pt")  # some other file under the name
    with pytest.raises(DataError, match=r"round-2\.pt.*not a round file of federation\.keep_rounds"):
        load_rounds(tmp_path)
    (folder / "round-2.pt").unlink()
    assert sorted(load_rounds(tmp_path)) == [1]  # the good file still reads
