from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.utils.class_weight import compute_class_weight
from torch.utils.data import DataLoader

from strnet.data.augment import AugmentParams
from strnet.data.cache import PreprocessCache
from strnet.data.dataset import KneeDataset, encode_tabular, partner_indices, screening_pos_weight
from strnet.data.imageio import read_radiograph
from strnet.data.manifest import normalize
from strnet.data.preprocess import PreprocessParams, preprocess
from strnet.errors import DataError

PARAMS = PreprocessParams(size=64)
LABELS = ["normal", "osteopenia", "osteoporosis", ""]
T_SCORES = [0.3, -1.7, -3.1, math.nan]


@pytest.fixture
def manifest(tmp_path: Path) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    rows = []
    for i, label in enumerate(LABELS):
        img = np.zeros((90, 70), np.uint16)
        img[8:-8, 6:-6] = cv2.GaussianBlur(rng.integers(5000, 60000, (74, 58)).astype(np.float32), (0, 0), 1.2)
        path = tmp_path / f"knee{i}.png"
        cv2.imwrite(str(path), img)
        rows.append(
            {
                "path": str(path),
                "patient_id": f"p{i}",
                "site": "s",
                "split": "train",
                "label_cls": label,
                "t_score": T_SCORES[i],
                "age": [70.0, None, 45.0, 60.0][i],
                "sex": ["F", "M", "", "F"][i],
                "bmi": [32.0, 22.0, None, 27.0][i],
            }
        )
    return normalize(pd.DataFrame(rows))


def test_encode_tabular_centres_and_fills_unknowns() -> None:
    np.testing.assert_allclose(encode_tabular(75.0, "F", 22.0), [1.0, 1.0, -1.0])
    np.testing.assert_allclose(encode_tabular(45.0, "m", 37.0), [-1.0, 0.0, 2.0])
    for unknown in (encode_tabular(None, "", None), encode_tabular(math.nan, None, math.nan)):
        np.testing.assert_array_equal(unknown, [0.0, 0.5, 0.0])
    assert encode_tabular(60.0, "F", 27.0).dtype == np.float32


def test_item_contents_without_cache(manifest: pd.DataFrame) -> None:
    ds = KneeDataset(manifest, PARAMS, cache=None)
    assert len(ds) == 4
    for i in range(4):
        item = ds[i]
        assert item["image"].shape == (1, 64, 64) and item["image"].dtype == torch.float32
        expected = (preprocess(read_radiograph(manifest.at[i, "path"]), PARAMS) - 0.5) / 0.25
        np.testing.assert_allclose(item["image"][0].numpy(), expected, atol=1e-6)
        row = manifest.iloc[i]
        np.testing.assert_array_equal(item["tabular"].numpy(), encode_tabular(row["age"], row["sex"], row["bmi"]))
        assert int(item["index"]) == i
    ys = [float(ds[i]["y_screen"]) for i in range(4)]
    sev = [float(ds[i]["y_severity"]) for i in range(4)]
    ts = [float(ds[i]["t_score"]) for i in range(4)]
    assert ys[:3] == [0.0, 1.0, 1.0] and math.isnan(ys[3])
    assert math.isnan(sev[0]) and sev[1:3] == [0.0, 1.0] and math.isnan(sev[3])
    np.testing.assert_allclose(ts, T_SCORES, atol=1e-6)  # NaN == NaN here
    with pytest.raises(IndexError):
        ds[4]


def test_cached_items_match_uncached_and_collate(manifest: pd.DataFrame, tmp_path: Path) -> None:
    cached = KneeDataset(manifest, PARAMS, PreprocessCache(tmp_path / "cache"))
    plain = KneeDataset(manifest, PARAMS, None)
    batch = next(iter(DataLoader(cached, batch_size=4)))
    assert batch["image"].shape == (4, 1, 64, 64) and batch["tabular"].shape == (4, 3)
    for key in ("y_screen", "y_severity", "t_score"):
        assert batch[key].dtype == torch.float32 and batch[key].shape == (4,)
    assert torch.isnan(batch["y_screen"]).tolist() == [False, False, False, True]
    assert batch["index"].tolist() == [0, 1, 2, 3]
    ref = torch.stack([plain[i]["image"] for i in range(4)])
    assert (batch["image"] - ref).abs().max() <= 1 / 65535 / 0.25


def test_augmentation_reproducible_across_workers_and_epochs(manifest: pd.DataFrame, tmp_path: Path) -> None:
    cache = PreprocessCache(tmp_path / "cache")
    assert cache.warm(manifest, PARAMS) == []
    ds = KneeDataset(manifest, PARAMS, cache, augment=AugmentParams(border_mask_p=1.0), seed=3)
    plain = torch.stack([KneeDataset(manifest, PARAMS, cache)[i]["image"] for i in range(4)])

    def epoch_images(epoch: int, workers: int) -> torch.Tensor:
        ds.set_epoch(epoch)
        loader = DataLoader(ds, batch_size=2, num_workers=workers)
        return torch.cat([b["image"] for b in loader])

    e0 = epoch_images(0, 0)
    assert torch.equal(e0, epoch_images(0, 2))
    e1 = epoch_images(1, 0)
    assert not torch.equal(e0, e1)
    assert all(not torch.equal(e0[i], plain[i]) for i in range(4))
    ds.set_epoch(0)
    assert torch.equal(ds[2]["image"], e0[2])
    other_seed = KneeDataset(manifest, PARAMS, cache, augment=AugmentParams(border_mask_p=1.0), seed=4)
    assert not torch.equal(other_seed[2]["image"], e0[2])


def test_bad_image_raises_data_error_naming_the_file(manifest: pd.DataFrame, tmp_path: Path) -> None:
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    df = normalize(pd.concat([manifest, pd.DataFrame({"path": [str(bad)], "label_cls": ["normal"]})]))
    for cache in (None, PreprocessCache(tmp_path / "cache")):
        ds = KneeDataset(df, PARAMS, cache)
        ds[0]
        with pytest.raises(DataError, match=r"corrupt\.png"):
            ds[4]


def test_pos_weight_matches_sklearn_balanced_ratio() -> None:
    labels = ["normal"] * 7 + ["osteopenia"] * 2 + ["osteoporosis"] + ["", "normal", "osteoporosis"]
    splits = ["train"] * 11 + ["val", "val"]
    df = normalize(pd.DataFrame({"label_cls": labels, "split": splits}))
    train = df[(df["split"] == "train") & (df["label_cls"] != "")]
    y = (train["label_cls"] != "normal").astype(int).to_numpy()
    w = compute_class_weight("balanced", classes=np.array([0, 1]), y=y)
    assert screening_pos_weight(df) == pytest.approx(w[1] / w[0])
    assert screening_pos_weight(df[df["split"] == "train"]) == pytest.approx(7 / 3)
    assert screening_pos_weight(df.assign(split="")) == pytest.approx(8 / 4)  # unsplit: all labelled rows
    assert screening_pos_weight(df[df["label_cls"] == "normal"]) == 1.0  # one class only


def test_dataset_with_cache_pickles_for_spawned_workers(manifest: pd.DataFrame, tmp_path: Path) -> None:
    import pickle

    cache = PreprocessCache(tmp_path / "cache")
    ds = KneeDataset(manifest, PARAMS, cache, augment=AugmentParams(), seed=5)
    ds.set_epoch(2)
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[1]["image"], ds[1]["image"])
    assert clone.cache is not None and clone.cache._hashes == cache._hashes


def test_a_knee_carries_its_film_partner_as_that_knee_is_drawn_on_its_own(manifest: pd.DataFrame) -> None:
    """loss.bilateral: the other knee of a bilateral film, augmented with its own seed for the epoch."""
    film = manifest.iloc[[0, 0]].assign(side=["R", "L"])
    rows = normalize(pd.concat([film, manifest.iloc[1:]], ignore_index=True))
    np.testing.assert_array_equal(partner_indices(rows), [1, 0, -1, -1, -1])
    ds = KneeDataset(rows, PARAMS, None, augment=AugmentParams(border_mask_p=1.0), seed=3, partners=True)
    ds.set_epoch(2)
    first, second, single = ds[0], ds[1], ds[2]
    assert torch.equal(first["partner_image"], second["image"]) and torch.equal(second["partner_image"], first["image"])
    assert bool(first["has_partner"]) and not bool(single["has_partner"])
    assert torch.count_nonzero(single["partner_image"]) == 0
    assert "partner_image" not in KneeDataset(rows, PARAMS, None)[0]


def test_only_one_right_and_one_left_knee_of_one_file_are_partners() -> None:
    rows = pd.DataFrame(
        {
            "path": ["a.png", "A.PNG", "b.png", "b.png", "c.png", "c.png", "c.png", "d.png"],
            "side": ["R", "l", "R", "R", "R", "L", "L", "R"],
        }
    )
    # a and A: one film (case-folded, as the bilateral metrics read it); b: two right knees; c: three rows
    np.testing.assert_array_equal(partner_indices(rows), [1, 0, -1, -1, -1, -1, -1, -1])
