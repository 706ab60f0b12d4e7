"""The synthetic sites must look like the real distributed layouts and carry a learnable, non-trivial signal."""

from __future__ import annotations

import re
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pydicom
import pytest
from scipy import stats
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from simulations.knee import ScannerProfile, render_knee
from simulations.sites import PROFILES, sample_patient, write_dicom, write_sites
from strnet.data.imageio import read_radiograph
from strnet.data.manifest import who_label


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path: Path) -> None:
    a = _snapshot(write_sites(tmp_path / "a", seed=3, n_patients=4, image_size=48)["stage1"].parent)
    b = _snapshot(write_sites(tmp_path / "b", seed=3, n_patients=4, image_size=48)["stage1"].parent)
    c = _snapshot(write_sites(tmp_path / "c", seed=4, n_patients=4, image_size=48)["stage1"].parent)
    assert a == b
    assert any(name.endswith(".xlsx") for name in a) and any(name.endswith(".dcm") for name in a)
    assert a != c
    common = set(a) & set(c)
    assert any(a[k] != c[k] for k in common) or set(a) != set(c)


def test_per_site_patient_counts(tmp_path: Path) -> None:
    sites = write_sites(tmp_path, seed=1, n_patients={"stage1": 3, "stage2": 4, "hospital": 2}, image_size=48)
    assert len([p for p in sites["stage1"].rglob("*") if p.is_file()]) == 3
    # stage2: one patient has a sheet row but no image.
    assert len([p for p in sites["stage2"].rglob("*") if p.is_file() and p.suffix != ".xlsx"]) == 3
    assert len(list((sites["hospital"] / "dicom").glob("*.dcm"))) == 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"image_size": 8}, "image_size"),
        ({"n_patients": {"stage9": 3}}, "unknown site"),
        ({"n_patients": -1}, ">= 0"),
    ],
)
def test_write_sites_rejects_bad_arguments(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        write_sites(tmp_path, **kwargs)


def test_renderer_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="side"):
        render_knee(np.random.default_rng(0), -1.0, side="X")
    with pytest.raises(ValueError, match="bit_depth"):
        ScannerProfile(bit_depth=12)
    with pytest.raises(ValueError, match="bits_stored"):
        ScannerProfile(bit_depth=8, bits_stored=12)


def test_kaggle_layout(synthetic_sites: dict[str, Path]) -> None:
    root = synthetic_sites["stage1"]
    assert sorted(p.name for p in root.iterdir()) == ["Normal", "Osteopenia", "Osteoporosis"]
    files = [p for p in root.rglob("*") if p.is_file()]
    assert len(files) == 12
    suffixes = set()
    for f in files:
        assert re.fullmatch(rf"{f.parent.name} \d+\.(jpg|JPG|png)", f.name), f.name
        suffixes.add(f.suffix)
        raw = cv2.imread(str(f), cv2.IMREAD_UNCHANGED)
        assert raw.dtype == np.uint8 and raw.ndim == 2 and raw.shape[0] == raw.shape[1] == 96
    assert len(suffixes) >= 2


def test_mendeley_layout_and_sheet(synthetic_sites: dict[str, Path]) -> None:
    root = synthetic_sites["stage2"]
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["normal", "osteopenia", "osteoporosis"]
    prefix = {"normal": "N", "osteopenia": "OP", "osteoporosis": "OS"}
    images = {}
    channels, wide = set(), 0
    for f in (p for p in root.rglob("*") if p.is_file() and p.suffix != ".xlsx"):
        assert re.fullmatch(rf"{prefix[f.parent.name]}\d+\.(JPEG|jpg|JPG)", f.name), f.name
        images[f.stem] = f.parent.name
        raw = cv2.imread(str(f), cv2.IMREAD_UNCHANGED)
        channels.add(1 if raw.ndim == 2 else raw.shape[2])
        wide += raw.shape[1] > 1.3 * raw.shape[0]
    assert channels == {1, 3}  # RGB and grayscale mixed
    assert wide >= len(images) // 2  # mostly bilateral (side-by-side) films

    sheet = pd.read_excel(root / "patient details.xlsx", sheet_name=None)
    assert len(sheet) == 1
    df = next(iter(sheet.values()))
    assert list(df.columns) == [
        "S.No",
        "Patient Id",
        "Joint Pain:",
        "Gender",
        "Age",
        "height  (meter)",
        "Weight (KG) ",
        "T-score Value",
        "Z-Score Value",
        "BMI: ",
        "Site",
        "Diagnosis",
    ]
    ids = set(df["Patient Id"])
    assert len(ids - set(images)) == 1  # a sheet row with no image
    assert len(set(images) - ids) == 1  # an image with no sheet row
    assert set(df["Gender"]) <= {"male", "female"}
    np.testing.assert_allclose(df["BMI: "], df["Weight (KG) "] / df["height  (meter)"] ** 2)
    for _, row in df.iterrows():
        assert row["Diagnosis"] == who_label(float(row["T-score Value"]))
        if row["Patient Id"] in images:
            assert images[row["Patient Id"]] == row["Diagnosis"]


def test_hospital_dicom_and_reference_csv(synthetic_sites: dict[str, Path]) -> None:
    root = synthetic_sites["hospital"]
    ref = pd.read_csv(root / "reference_dxa.csv", dtype={"PatientID": str, "AccessionNumber": str})
    assert list(ref.columns) == ["PatientID", "AccessionNumber", "Age", "Sex", "BMI", "DXA T-score"]
    assert set(ref["Sex"]) <= {"F", "M"}
    by_id = ref.set_index("PatientID")
    photometrics, bits = set(), set()
    files = sorted((root / "dicom").glob("*.dcm"))
    assert len(files) == 12
    for f in files:
        ds = pydicom.dcmread(f)
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.Modality == "DX" and ds.BitsAllocated == 16 and ds.PixelRepresentation == 0
        assert ds.ImageLaterality in ("R", "L")
        assert ds.PatientID in by_id.index
        assert by_id.at[ds.PatientID, "AccessionNumber"] == ds.AccessionNumber
        assert by_id.at[ds.PatientID, "Sex"] == ds.PatientSex
        assert int(ds.pixel_array.max()) < (1 << ds.BitsStored)
        photometrics.add(ds.PhotometricInterpretation)
        bits.add(ds.BitsStored)
        # Bone (centre of the film) must come out brighter than the edges (air / soft tissue).
        img = read_radiograph(f)
        h, w = img.shape
        centre = img[h // 3 : 2 * h // 3, 2 * w // 5 : 3 * w // 5].mean()
        edges = np.concatenate([img[:, : w // 10].ravel(), img[:, -w // 10 :].ravel()]).mean()
        assert centre > edges + 0.1 * (img.max() - img.min()), f.name
    assert photometrics == {"MONOCHROME1", "MONOCHROME2"}
    assert bits == {12, 16}
    assert set(ref["PatientID"]) == {pydicom.dcmread(f, stop_before_pixels=True).PatientID for f in files}


def test_every_synthetic_image_decodes(synthetic_sites: dict[str, Path]) -> None:
    for root in synthetic_sites.values():
        for f in root.rglob("*"):
            if f.is_file() and f.suffix.lower() in (".jpg", ".jpeg", ".png", ".dcm"):
                assert read_radiograph(f).ndim == 2


@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
def test_dicom_photometric_reads_bone_bright(tmp_path: Path, photometric: str) -> None:
    profile = PROFILES["hospital"]
    knee = render_knee(np.random.default_rng(5), 0.5, image_size=64, profile=profile)
    path = write_dicom(
        tmp_path / "k.dcm",
        knee,
        patient_id="P1",
        accession="A1",
        sex="F",
        age=60,
        laterality="R",
        photometric=photometric,
        bits_stored=profile.bits_stored,
        uid_seed="t",
    )
    stored = pydicom.dcmread(path).pixel_array.astype(np.float64)
    bone, rest = knee.bone_mask, ~knee.bone_mask
    raw_bone_brighter = stored[bone].mean() > stored[rest].mean()
    assert raw_bone_brighter == (photometric == "MONOCHROME2")  # MONOCHROME1 is stored bone-dark
    img = read_radiograph(path).astype(np.float64)
    assert img[bone].mean() > img[rest].mean() + 0.1 * (img.max() - img.min())
    # Up to a constant offset the reader recovers the rendered pixels exactly.
    diff = img - knee.pixels.astype(np.float64)
    assert np.ptp(diff) == 0


def test_sample_patient_matches_target_epidemiology() -> None:
    rng = np.random.default_rng(0)
    df = pd.DataFrame([sample_patient(rng) for _ in range(2000)])
    assert (df["label_cls"] == df["t_score"].map(who_label)).all()
    frac = df["label_cls"].value_counts(normalize=True)
    np.testing.assert_allclose([frac["normal"], frac["osteopenia"], frac["osteoporosis"]], [0.4, 0.3, 0.3], atol=0.04)
    loss = df["label_cls"] != "normal"
    age = stats.ttest_ind(df.loc[loss, "age"], df.loc[~loss, "age"])
    bmi = stats.ttest_ind(df.loc[loss, "bmi"], df.loc[~loss, "bmi"])
    assert age.statistic > 0 and age.pvalue < 1e-6
    assert bmi.statistic < 0 and bmi.pvalue < 1e-6
    female = pd.crosstab(loss, df["sex"] == "F")
    assert stats.chi2_contingency(female).pvalue < 1e-6
    assert (df.loc[loss, "sex"] == "F").mean() > (df.loc[~loss, "sex"] == "F").mean()


def _bone_texture_features(knee_pixels: np.ndarray, bone_mask: np.ndarray, max_value: int) -> list[float]:
    img = knee_pixels.astype(np.float32) / max_value
    inner = cv2.erode(bone_mask.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    high_pass = img - cv2.GaussianBlur(img, (0, 0), 2)
    mu = float(img[inner].mean())
    return [float(high_pass[inner].std()) / mu, float(img[inner].std()) / mu]


def test_bone_status_is_learnable_but_not_from_mean_brightness() -> None:
    rng = np.random.default_rng(11)
    features, means, y = [], [], []
    profiles = list(PROFILES.values())
    for i in range(150):
        p = sample_patient(rng)
        profile = profiles[i % len(profiles)]
        knee = render_knee(rng, float(p["t_score"]), image_size=96, profile=profile, side="RL"[i % 2])
        features.append(_bone_texture_features(knee.pixels, knee.bone_mask, profile.max_value))
        means.append(float(knee.pixels.mean()) / profile.max_value)
        y.append(p["label_cls"] != "normal")
    model = make_pipeline(StandardScaler(), LogisticRegression())
    proba = cross_val_predict(model, np.array(features), np.array(y), cv=5, method="predict_proba")[:, 1]
    texture_auc = roc_auc_score(y, proba)
    mean_auc = roc_auc_score(y, means)
    print(f"texture AUROC {texture_auc:.3f}, mean-intensity AUROC {mean_auc:.3f}")
    assert texture_auc > 0.7, texture_auc
    assert max(mean_auc, 1 - mean_auc) < 0.9, mean_auc


def test_bilateral_film_has_bone_in_both_halves_and_renders_fast() -> None:
    rng = np.random.default_rng(2)
    knee = render_knee(rng, -2.0, image_size=96, profile=PROFILES["stage2"], bilateral=True, marker=True)
    w = knee.bone_mask.shape[1]
    left, right = knee.bone_mask[:, : w // 2].mean(), knee.bone_mask[:, w // 2 :].mean()
    assert left > 0.1 and right > 0.1 and knee.marker == "R"
    start = time.perf_counter()
    for _ in range(10):
        render_knee(rng, 0.0, image_size=256)
    assert (time.perf_counter() - start) / 10 < 0.05
