"""The seed study's two combinations of runs: the ensemble is ``strnet train``'s (the mean of the runs' calibrated
logits, calibrated again), the soup is one model with the mean of their weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.special import logit
from sklearn.metrics import roc_auc_score

from configs.schema import ThresholdConfig
from simulations.scenario import build_synthetic_scenario
from simulations.seed_ensemble import cohorts, combine, soup, summarise
from strnet.bundle import load_bundle, save_bundle
from strnet.data.cache import PreprocessCache
from strnet.data.manifest import read_manifest
from strnet.data.preprocess import PreprocessParams
from strnet.evaluation import predict_frame
from strnet.metrics import select_threshold
from strnet.model import batchnorm_keys, build_strnet

MODEL = {"backbone": "tiny", "weights": "none", "neck_dim": 128, "dropout": 0.3}
THRESHOLD = {"value": 0.5, "rule": "test", "min_sensitivity": 0.86, "grid": [0.2, 0.8, 0.01]}
TRAIN_SITES = ["stage1", "stage2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("seeds")
    manifest = build_synthetic_scenario(root / "data", seed=5, n_patients=24, image_size=48).manifest
    bundles = []
    for seed in (0, 1, 2):  # three untrained "runs": different weights, the same architecture
        torch.manual_seed(seed)
        model = build_strnet(**MODEL).eval()
        bundles.append(
            save_bundle(
                root / str(seed) / "bundle",
                state_dict=model.state_dict(),
                model_config=MODEL,
                preprocess=PreprocessParams(size=32),
                threshold=THRESHOLD,
                training={"mode": "test"},
                extra={"calibration": {"method": "platt", "a": 0.5 + seed, "b": seed - 1.0, "status": "fitted"}},
            )
        )
    return manifest, bundles


def test_the_ensemble_is_the_runs_calibrated_logits_averaged_and_the_spread_is_over_single_runs(
    runs: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    manifest, bundles = runs
    table, spread = summarise(bundles, manifest, TRAIN_SITES, tmp_path / "cache")
    parts = cohorts(read_manifest(manifest), TRAIN_SITES)
    test, val = parts["test (pooled)"], parts["val (pooled)"]
    loaded = [load_bundle(b) for b in bundles]
    frames = [predict_frame(b, test, cache=None, progress=False) for b in loaded]
    # each run's probability through its own calibration, then logit, mean, and the ensemble's own Platt on top
    made = combine(loaded, val, None)
    zs = [logit(f["prob_bone_loss"].to_numpy(float)) for f in frames]
    expected = made.calibration.probabilities(np.mean(zs, axis=0))
    served = predict_frame(made, test, cache=None, progress=False)["prob_bone_loss"].to_numpy(float)
    np.testing.assert_allclose(served, expected, atol=1e-6)
    y_val = (val["label_cls"] != "normal").to_numpy(int)
    p_val = predict_frame(made, val, cache=None, progress=False)["prob_bone_loss"].to_numpy(float)
    assert made.threshold == select_threshold(y_val, p_val, 0.86, ThresholdConfig().grid())

    y = (test["label_cls"] != "normal").to_numpy(int)
    row = table[(table["cohort"] == "test (pooled)")].set_index("run")
    assert row.loc["ensemble", "AUROC"] == pytest.approx(roc_auc_score(y, served), abs=1e-12)
    singles = [roc_auc_score(y, f["prob_bone_loss"]) for f in frames]
    assert row.loc[["0", "1", "2"], "AUROC"].tolist() == pytest.approx(singles, abs=1e-12)
    assert spread.loc["test (pooled)", "AUROC mean"] == pytest.approx(np.mean(singles))
    assert spread.loc["test (pooled)", "AUROC std"] == pytest.approx(np.std(singles, ddof=1))
    # every cohort the study reads: validation pooled and per training site, pooled test, the external site
    assert list(spread.index) == ["val (pooled)", "val stage1", "val stage2", "test (pooled)", "hospital"]
    # the pooled test split by its (bone-loss, normal) pairs: within one source, across two; a one-source cohort
    # has no such split. The two parts weighted by their pair counts are the pooled AUROC.
    # (scored through the study's own cache: its stored images move an untrained run's near-equal scores)
    cache = PreprocessCache(tmp_path / "cache")
    for run, bundle in zip(["0", "1", "2"], loaded, strict=True):
        frame = predict_frame(bundle, test, cache=cache, progress=False)
        source, label = frame["source"].to_numpy(), (frame["label_cls"] != "normal").to_numpy(int)
        pos, neg = np.flatnonzero(label == 1), np.flatnonzero(label == 0)
        same = source[pos][:, None] == source[neg][None, :]
        assert same.any() and not same.all()
        score = frame["prob_bone_loss"].to_numpy(float)
        won = (score[pos][:, None] > score[neg][None, :]) + 0.5 * (score[pos][:, None] == score[neg][None, :])
        assert row.loc[run, "within"] == pytest.approx(won[same].mean(), abs=1e-12)
        assert row.loc[run, "across"] == pytest.approx(won[~same].mean(), abs=1e-12)
        weighted = (row.loc[run, "within"] * same.sum() + row.loc[run, "across"] * (~same).sum()) / same.size
        assert weighted == pytest.approx(row.loc[run, "AUROC"], abs=1e-12)
    assert table[table["cohort"] == "val stage1"][["within", "across"]].isna().all().all()
    assert spread.loc["test (pooled)", "across mean"] == pytest.approx(row.loc[["0", "1", "2"], "across"].mean())


def test_the_soup_is_the_mean_of_the_weights_with_its_own_statistics_and_tau(runs: tuple[Path, list[Path]]) -> None:
    manifest, bundles = runs
    df = read_manifest(manifest)
    loaded = [load_bundle(b) for b in bundles]
    train = [df[(df["site"] == s) & (df["split"] == "train")] for s in TRAIN_SITES]
    val = cohorts(df, TRAIN_SITES)["val (pooled)"]
    made = soup(loaded, train, val, None)
    states = [b.model.state_dict() for b in loaded]
    statistics = {k for k in batchnorm_keys(made.model) if k.endswith(("running_mean", "running_var"))}
    assert statistics
    for key, value in made.model.state_dict().items():
        if key in statistics or not value.is_floating_point():
            continue
        assert torch.allclose(value, torch.stack([s[key] for s in states]).mean(0), atol=1e-6), key
    # BatchNorm statistics are the soup's own, not the mean of the runs'
    key = sorted(statistics)[0]
    assert not torch.allclose(made.model.state_dict()[key], torch.stack([s[key] for s in states]).mean(0))
    # calibration refitted and τ* chosen by the paper's rule on the soup's own validation probabilities
    assert made.metadata["calibration"] != loaded[0].metadata.get("calibration")
    y = (val["label_cls"] != "normal").to_numpy(int)
    p = predict_frame(made, val, cache=None, progress=False)["prob_bone_loss"].to_numpy(float)
    assert made.threshold == select_threshold(y, p, 0.86, ThresholdConfig().grid())


def test_runs_that_cannot_be_told_apart_or_compared_are_refused(runs: tuple[Path, list[Path]], tmp_path: Path) -> None:
    manifest, bundles = runs
    with pytest.raises(ValueError, match="distinct folder names"):
        summarise([bundles[0], bundles[0]], manifest, TRAIN_SITES, tmp_path)
    other = build_strnet(**(MODEL | {"neck_dim": 64}))
    odd = save_bundle(
        tmp_path / "odd" / "bundle",
        state_dict=other.state_dict(),
        model_config=MODEL | {"neck_dim": 64},
        preprocess=PreprocessParams(size=32),
        threshold=THRESHOLD,
        training={"mode": "test"},
    )
    with pytest.raises(ValueError, match=f"{odd}: another model"):
        summarise([bundles[0], odd], manifest, TRAIN_SITES, tmp_path)


def test_an_ensemble_bundle_counts_as_its_members(runs: tuple[Path, list[Path]], tmp_path: Path) -> None:
    """`strnet train`'s ensemble bundle read as its members gives the rows the members' own bundles give, and
    combining those members gives the ensemble row again."""
    manifest, bundles = runs
    loaded = [load_bundle(b) for b in bundles]
    made = combine(loaded, cohorts(read_manifest(manifest), TRAIN_SITES)["val (pooled)"], None)
    members = [{"seed": seed, "calibration": b.metadata["calibration"]} for seed, b in enumerate(loaded)]
    ensemble = save_bundle(
        tmp_path / "three" / "bundle",
        state_dict=made.model.state_dict(),
        model_config=MODEL | {"members": 3},
        preprocess=PreprocessParams(size=32),
        threshold=made.metadata["threshold"],
        training={"mode": "test", "members": members},
        extra={"calibration": made.metadata["calibration"]},
    )
    as_members, _ = summarise([ensemble], manifest, TRAIN_SITES, tmp_path / "cache")
    as_runs, _ = summarise(bundles, manifest, TRAIN_SITES, tmp_path / "cache")
    ranks = ["cohort", "knees", "AUROC", "AUROC per film", "Spearman R/L", "T r"]
    for seed in range(3):
        mine = as_members[as_members["run"] == f"three seed {seed}"][ranks].reset_index(drop=True)
        pd.testing.assert_frame_equal(mine, as_runs[as_runs["run"] == str(seed)][ranks].reset_index(drop=True))
    pd.testing.assert_frame_equal(
        as_members[as_members["run"] == "ensemble"].reset_index(drop=True),
        as_runs[as_runs["run"] == "ensemble"].reset_index(drop=True),
    )
    with pytest.raises(ValueError, match="two or more runs"):
        summarise([bundles[0]], manifest, TRAIN_SITES, tmp_path / "cache")
