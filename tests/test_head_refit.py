"""The head-refit probe: its rows are scikit-learn's logistic regression on the training knees' neck features,
scored on validation and test, pooled, per site and by pairs within and across sites (against brute force)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from simulations.head_refit import refit_table
from simulations.scenario import build_synthetic_scenario
from strnet.bundle import load_bundle, save_bundle
from strnet.data.manifest import read_manifest
from strnet.data.preprocess import PreprocessParams
from strnet.evaluation import predict_frame
from strnet.model import build_strnet

MODEL = {"backbone": "tiny", "weights": "none", "neck_dim": 128, "dropout": 0.3}
SITES = ["stage1", "stage2"]


def pairs_by_hand(y: np.ndarray, s: np.ndarray, site: np.ndarray) -> tuple[float, float]:
    won: dict[bool, list[float]] = {True: [], False: []}
    for i in np.flatnonzero(y == 1):
        for j in np.flatnonzero(y == 0):
            won[bool(site[i] == site[j])].append(1.0 if s[i] > s[j] else 0.5 if s[i] == s[j] else 0.0)
    return float(np.mean(won[True])), float(np.mean(won[False]))


@pytest.fixture(scope="module")
def bundle_and_rows(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("head")
    manifest = build_synthetic_scenario(root / "data", seed=5, n_patients=24, image_size=48).manifest
    torch.manual_seed(0)
    path = save_bundle(
        root / "bundle",
        state_dict=build_strnet(**MODEL).eval().state_dict(),
        model_config=MODEL,
        preprocess=PreprocessParams(size=32),
        threshold={"value": 0.5, "rule": "test", "min_sensitivity": 0.86, "grid": [0.2, 0.8, 0.01]},
        training={"mode": "test"},
        extra={"calibration": {"method": "platt", "a": 1.5, "b": -0.5, "status": "fitted"}},
    )
    return load_bundle(path), read_manifest(manifest)


def test_the_refitted_heads_are_sklearns_regression_on_the_training_features(bundle_and_rows) -> None:  # type: ignore[no-untyped-def]
    bundle, df = bundle_and_rows
    table = refit_table(bundle, df, SITES, None, [0.5]).set_index(["split", "head"])
    rows = df[df["site"].isin(SITES) & (df["label_cls"] != "")]

    def frame(split: str):  # type: ignore[no-untyped-def]
        out = predict_frame(
            bundle, rows[rows["split"] == split], cache=None, with_features=True, progress=False, precision="fp32"
        )
        return np.stack(out["neck_features"].to_numpy()), (out["label_cls"] != "normal").to_numpy(int), out

    x_train, y_train, train = frame("train")
    cell = train["source"].astype(str) + (train["label_cls"] == "normal").astype(str)
    weight = (1.0 / cell.map(cell.value_counts())).to_numpy()
    checked = 0
    for split in ("val", "test"):
        x, y, out = frame(split)
        site = out["site"].to_numpy()
        own = np.log(out["prob_bone_loss"] / (1 - out["prob_bone_loss"])).to_numpy()
        assert table.loc[(split, "the bundle's"), "pooled"] == pytest.approx(roc_auc_score(y, own), abs=1e-12)
        for balance, w in (("none", None), ("source_label", weight / weight.mean())):
            score = LogisticRegression(C=0.5, max_iter=5000).fit(x_train, y_train, sample_weight=w).decision_function(x)
            row = table.loc[(split, f"refit C=0.5, balance {balance}")]
            assert row["pooled"] == pytest.approx(roc_auc_score(y, score), abs=1e-9)
            for name in SITES:  # a site whose split holds one class has no AUROC of its own
                m = site == name
                if len(set(y[m])) == 2:
                    assert row[name] == pytest.approx(roc_auc_score(y[m], score[m]), abs=1e-9)
                    checked += 1
                else:
                    assert np.isnan(row[name])
            assert (row["within"], row["across"]) == pytest.approx(pairs_by_hand(y, score, site), abs=1e-9)
    assert checked > 0
