"""The plain transfer-learning baseline: what it reads from a knee, the ImageNet network it starts from, and a tiny
run that scores every fold's knees once, in the columns ``cross_validate compare`` pairs."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from simulations import cross_validate as CV
from simulations import plain_baseline as PB
from simulations.scenario import build_synthetic_scenario
from strnet.data.manifest import read_manifest, write_manifest
from strnet.model import _load_state_file, efficientnet_lite0_checkpoint


def test_plain_pixels_are_the_knee_over_255_squashed_to_size(tmp_path: Path) -> None:
    img = np.zeros((90, 60), np.uint8)
    img[:, 30:] = 200
    path = tmp_path / "knee.png"
    cv2.imwrite(str(path), img)
    out = PB.plain_pixels(str(path), "", 32)
    assert out.shape == (32, 32) and out.dtype == np.float32
    expected = cv2.resize(img.astype(np.float32) / 255.0, (32, 32), interpolation=cv2.INTER_AREA)
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_the_network_starts_from_the_wheels_imagenet_weights_with_one_new_logit() -> None:
    net = PB.imagenet_net()
    state = _load_state_file(efficientnet_lite0_checkpoint())
    torch.testing.assert_close(net._conv_stem.weight, state["_conv_stem.weight"])  # three channels, not averaged
    torch.testing.assert_close(net._bn1.running_var, state["_bn1.running_var"])
    assert net(torch.zeros(2, 3, 64, 64)).shape == (2, 1)


def test_inputs_refuse_an_unknown_kind() -> None:
    with pytest.raises(ValueError, match="--input"):
        PB.load_inputs(pd.DataFrame({"path": [], "side": []}), "raw", 224)


def test_a_tiny_run_scores_every_fold_once_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scenario = build_synthetic_scenario(tmp_path / "scenario", seed=3, n_patients=12, image_size=64)
    df = read_manifest(scenario.manifest)
    pool = df[CV.pool_mask(df)].reset_index(drop=True)
    fold = CV.assign_folds(pool, 2, seed=0)
    src = tmp_path / "cv"
    for i in (0, 1):
        write_manifest(CV.fold_manifest(pool, fold, i), src / f"fold-{i}" / "manifest.csv")

    oof = PB.run(src, tmp_path / "plain", epochs=1, seed=0, size=32)
    assert sorted(zip(oof["path"], oof["side"], strict=True)) == sorted(zip(pool["path"], pool["side"], strict=True))
    for i in (0, 1):
        assert set(oof.loc[oof["fold"] == i, "path"]) == set(pool.loc[fold == i, "path"])
    assert oof["prob_bone_loss"].between(0, 1).all()
    assert ((oof["prob_bone_loss"] >= 0.5) == (oof["flag_bone_loss"] == 1)).all()
    assert CV.summarise(oof)["pooled"]["knees"] == len(pool)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("trained again")

    monkeypatch.setattr(PB, "train_and_score", refuse)
    again = PB.run(src, tmp_path / "plain", epochs=1, seed=0, size=32)
    pd.testing.assert_frame_equal(again, pd.read_csv(tmp_path / "plain" / "oof.csv", keep_default_na=False))
    with pytest.raises(ValueError, match="not a cross_validate run"):
        PB.run(tmp_path / "scenario", tmp_path / "other")
