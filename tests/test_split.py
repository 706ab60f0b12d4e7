from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from strnet.data.manifest import LABELS, normalize, validate
from strnet.data.split import assign_splits, leakage_components


def _frame(n_patients: int = 150, seed: int = 0) -> tuple[pd.DataFrame, pd.Series]:
    """300 rows: 100 two-knee patients, 50 bilateral images without patient id; plus audit groups."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        label = rng.choice([*LABELS, ""], p=[0.4, 0.3, 0.2, 0.1])
        if p < 100:  # known patient, one image per knee
            rows += [{"path": f"/d/p{p}_{s}.png", "patient_id": f"P{p}", "side": s, "label_cls": label} for s in "RL"]
        else:  # unknown patient, one bilateral image -> two rows sharing the path
            rows += [{"path": f"/d/b{p}.png", "patient_id": "", "side": s, "label_cls": label} for s in "RL"]
    df = normalize(pd.DataFrame(rows).assign(site="s1", source="x"))
    df.index = df.index + 1000  # groups must align by index, not by position
    groups = pd.Series([None] * len(df), index=df.index, dtype=object)
    # Ten duplicate groups, each linking a known patient with an unknown-patient image.
    for g in range(10 if n_patients >= 110 else 0):
        groups.loc[df.index[df["patient_id"] == f"P{g * 7}"][0]] = f"dup{g}"
        groups.loc[df.index[df["path"] == f"/d/b{100 + g}.png"][1]] = f"dup{g}"
    return df, groups


def _spans(df: pd.DataFrame, key: pd.Series) -> int:
    """Number of key values whose rows fall into more than one split."""
    keyed = pd.DataFrame({"key": key, "split": df["split"]}).dropna()
    keyed = keyed[keyed["key"] != ""]
    return int((keyed.groupby("key")["split"].nunique() > 1).sum())


def test_no_patient_image_or_group_spans_two_splits() -> None:
    df, groups = _frame()
    out = assign_splits(df, groups=groups)
    assert set(out["split"]) == {"train", "val", "test"}
    assert _spans(out, out["patient_id"]) == 0
    assert _spans(out, out["path"]) == 0
    assert _spans(out, groups) == 0
    # The groups really join patients with other images: without them the components are more numerous.
    assert len(np.unique(leakage_components(df))) == 150
    assert len(np.unique(leakage_components(df, groups))) == 140
    assert validate(out) == []
    assert out.index.equals(df.index) and df["split"].eq("").all()  # input untouched


def test_split_sizes_and_class_proportions_follow_the_global_ones() -> None:
    df, groups = _frame()
    out = assign_splits(df, groups=groups, fractions=(0.7, 0.15, 0.15))
    sizes = out["split"].value_counts(normalize=True)
    for split, frac in zip(("train", "val", "test"), (0.7, 0.15, 0.15), strict=True):
        assert abs(sizes[split] - frac) < 0.05
    overall = out["label_cls"].value_counts(normalize=True)
    per_split = pd.crosstab(out["split"], out["label_cls"], normalize="index")
    assert (per_split - overall).abs().to_numpy().max() < 0.1


def test_seeded_and_deterministic() -> None:
    df, groups = _frame()
    a = assign_splits(df, seed=3, groups=groups)
    b = assign_splits(df, seed=3, groups=groups)
    c = assign_splits(df, seed=4, groups=groups)
    pd.testing.assert_series_equal(a["split"], b["split"])
    assert (a["split"] != c["split"]).sum() > 20


def test_patient_ids_are_site_local_and_unlabelled_rows_get_a_split() -> None:
    df = normalize(
        pd.DataFrame(
            {
                "path": [f"/d/{i}.png" for i in range(4)],
                "patient_id": ["A", "A", "A", ""],
                "site": ["s1", "s1", "s2", "s1"],
                "label_cls": ["", "", "normal", ""],
            }
        )
    )
    comp = leakage_components(df)
    assert comp[0] == comp[1] and comp[0] != comp[2] and len(set(comp)) == 3
    out = assign_splits(df, seed=1)
    assert out["split"].isin(["train", "val", "test"]).all()
    assert out["split"].iloc[0] == out["split"].iloc[1]


def test_small_frames_and_degenerate_fractions() -> None:
    df, _ = _frame(n_patients=5)
    out = assign_splits(df, seed=0)
    assert _spans(out, out["path"]) == 0 and _spans(out, out["patient_id"]) == 0
    assert out["split"].isin(["train", "val", "test"]).all()
    assert (assign_splits(df, fractions=(1.0, 0.0, 0.0))["split"] == "train").all()
    big, _ = _frame()
    assert (assign_splits(big, fractions=(1.0, 0.0, 0.0))["split"] == "train").all()
    assert assign_splits(df.iloc[:0])["split"].tolist() == []


def test_bad_arguments() -> None:
    df, groups = _frame(n_patients=5)
    with pytest.raises(ValueError, match="fractions"):
        assign_splits(df, fractions=(0.5, 0.2, 0.2))
    with pytest.raises(ValueError, match="fractions"):
        assign_splits(df, fractions=(1.2, -0.1, -0.1))
    with pytest.raises(ValueError, match="groups"):
        assign_splits(df, groups=groups.reset_index(drop=True))


def test_tiny_frames_fall_back_without_error() -> None:
    """A site with a dozen cases (fewer per class than folds) still gets a seeded, group-respecting split."""
    df = pd.DataFrame(
        {
            "path": [f"/x/{i}.png" for i in range(12)],
            "patient_id": [f"p{i // 2}" for i in range(12)],
            "site": "s",
            "label_cls": ["normal", "osteopenia", "osteoporosis"] * 4,
        }
    )
    out = assign_splits(df, seed=1)
    assert set(out["split"]) <= {"train", "val", "test"} and (out["split"] == "train").any()
    assert out.groupby("patient_id")["split"].nunique().max() == 1
    pd.testing.assert_series_equal(out["split"], assign_splits(df, seed=1)["split"])


def test_hold_out_site_moves_whole_patients_of_one_site() -> None:
    from strnet.data.split import hold_out_site

    rng = np.random.default_rng(0)
    n = 200
    df = pd.DataFrame(
        {
            "path": [f"/x/{i}.png" for i in range(n)],
            "patient_id": [f"p{i // 2}" for i in range(n)],
            "site": np.where(np.arange(n) < 120, "a", "b"),
            "label_cls": rng.choice(["normal", "osteopenia", "osteoporosis"], n),
        }
    )
    split = assign_splits(df, seed=3)
    out = hold_out_site(split, "a", 0.25, seed=3)
    held = out[out["site"] == "a-holdout"]
    assert 0.15 < len(held) / 120 < 0.35
    assert (held["split"] == "test").all()
    assert (out.loc[out["site"] == "b"] == split.loc[split["site"] == "b"]).all().all()
    assert out.groupby("patient_id")["site"].nunique().max() == 1
    with pytest.raises(ValueError, match="no rows with site"):
        hold_out_site(split, "zzz", 0.25)
