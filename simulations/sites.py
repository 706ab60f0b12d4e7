"""Synthetic patients and the three distributed site layouts the adapters must read.

Each site is written exactly the way its real counterpart is distributed (folder names, file-name
patterns, extension case, messy sheet headers, DICOM + CSV), so adapter, audit and federation code is
exercised on the real layouts without any patient data. Every file is a pure function of
``(seed, site, patient index)``: the same seed gives byte-identical trees, and changing one site's size does
not reshuffle the others.
"""

from __future__ import annotations

import io
import re
import zipfile
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from simulations.knee import KneeImage, ScannerProfile, render_knee
from strnet.data.manifest import who_label

SITES: tuple[str, ...] = ("stage1", "stage2", "hospital")

# Acquisition chains differ per site so federated code sees real covariate shift.
PROFILES: dict[str, ScannerProfile] = {
    "stage1": ScannerProfile(
        name="stage1", exposure=(0.7, 1.3), gamma=1.0, noise_sigma=0.012, blur_sigma=0.6, scale=1.0, aspect=1.0
    ),
    "stage2": ScannerProfile(
        name="stage2",
        exposure=(0.65, 1.25),
        gamma=0.85,
        noise_sigma=0.02,
        blur_sigma=0.8,
        border_prob=0.5,
        border_width=0.05,
        scale=1.25,
        aspect=1.4,
    ),
    "hospital": ScannerProfile(
        name="hospital",
        exposure=(0.7, 1.3),
        offset=(-0.05, 0.05),
        gamma=1.15,
        noise_sigma=0.025,
        blur_sigma=0.5,
        scale=1.25,
        aspect=0.8,
        bit_depth=16,
        bits_stored=12,
    ),
}

# Class mix close to the pooled real data (normal ~40 %, osteopenia ~30 %, osteoporosis ~30 %).
CLASS_PROBS: dict[str, float] = {"normal": 0.4, "osteopenia": 0.3, "osteoporosis": 0.3}
T_RANGES: dict[str, tuple[float, float]] = {
    "normal": (-0.95, 1.5),
    "osteopenia": (-2.45, -1.05),
    "osteoporosis": (-4.0, -2.55),
}
# Demographics: the paper's Table 3 could not be retrieved; plausible epidemiology instead — bone loss
# patients older, more often female and leaner.
DEMOGRAPHICS: dict[str, dict[str, float]] = {
    "normal": {"age": 55.0, "age_sd": 10.0, "p_female": 0.5, "bmi": 27.0, "bmi_sd": 4.0},
    "bone_loss": {"age": 65.0, "age_sd": 10.0, "p_female": 0.75, "bmi": 25.0, "bmi_sd": 4.0},
}

KAGGLE_DIRS: dict[str, str] = {"normal": "Normal", "osteopenia": "Osteopenia", "osteoporosis": "Osteoporosis"}
MENDELEY_PREFIX: dict[str, str] = {"normal": "N", "osteopenia": "OP", "osteoporosis": "OS"}
MENDELEY_COLUMNS: tuple[str, ...] = (
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
)
DXA_COLUMNS: tuple[str, ...] = ("PatientID", "AccessionNumber", "Age", "Sex", "BMI", "DXA T-score")
SHEET_NAME = "patient details.xlsx"

DX_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
_FIXED_ZIP_TIME = (2024, 1, 1, 0, 0, 0)


def sample_patient(rng: np.random.Generator) -> dict[str, float | str]:
    """One patient: class by the real mix, T-score inside that WHO band, demographics correlated with it."""
    classes = list(CLASS_PROBS)
    cls = classes[int(rng.choice(len(classes), p=list(CLASS_PROBS.values())))]
    lo, hi = T_RANGES[cls]
    t_score = round(float(rng.uniform(lo, hi)), 2)
    d = DEMOGRAPHICS["normal" if cls == "normal" else "bone_loss"]
    age = float(np.clip(round(rng.normal(d["age"], d["age_sd"])), 30, 92))
    sex = "F" if rng.random() < d["p_female"] else "M"
    bmi = round(float(np.clip(rng.normal(d["bmi"], d["bmi_sd"]), 16.0, 45.0)), 1)
    label = who_label(t_score)
    return {"t_score": t_score, "age": age, "sex": sex, "bmi": bmi, "label_cls": label}


def _patient_rng(seed: int, site: str, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, SITES.index(site), index]))


def _counts(n_patients: int | dict[str, int]) -> dict[str, int]:
    if isinstance(n_patients, int):
        counts = dict.fromkeys(SITES, n_patients)
    else:
        unknown = set(n_patients) - set(SITES)
        if unknown:
            raise ValueError(f"unknown site(s) {sorted(unknown)}; expected {SITES}")
        counts = {s: int(n_patients.get(s, 0)) for s in SITES}
    bad = {s: n for s, n in counts.items() if n < 0}
    if bad:
        raise ValueError(f"n_patients must be >= 0, got {bad}")
    return counts


def write_sites(
    out: Path, seed: int = 42, n_patients: int | dict[str, int] = 60, image_size: int = 256
) -> dict[str, Path]:
    """Write stage1 (kaggle folders), stage2 (mendeley) and hospital (DICOM + CSV) under ``out``."""
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32, got {image_size}")
    out = Path(out)
    counts = _counts(n_patients)
    return {
        "stage1": write_kaggle_site(out / "stage1", seed, counts["stage1"], image_size),
        "stage2": write_mendeley_site(out / "stage2", seed, counts["stage2"], image_size),
        "hospital": write_hospital_site(out / "hospital", seed, counts["hospital"], image_size),
    }


def _imwrite(path: Path, img: np.ndarray) -> None:
    params = [cv2.IMWRITE_JPEG_QUALITY, 92] if path.suffix.lower() in (".jpg", ".jpeg") else []
    ok, buf = cv2.imencode(path.suffix.lower(), img, params)
    if not ok:
        raise OSError(f"{path}: could not encode image")
    path.write_bytes(buf.tobytes())


def write_kaggle_site(root: Path, seed: int, n: int, image_size: int) -> Path:
    """``Normal/Normal 12.jpg`` style: single knee, 8-bit, square, extensions .jpg/.JPG/.png mixed."""
    profile = PROFILES["stage1"]
    for d in KAGGLE_DIRS.values():
        (root / d).mkdir(parents=True, exist_ok=True)
    numbers = dict.fromkeys(KAGGLE_DIRS, 0)
    for i in range(n):
        rng = _patient_rng(seed, "stage1", i)
        p = sample_patient(rng)
        side = str(rng.choice(["R", "L"]))
        img = render_knee(
            rng, p["t_score"], image_size=image_size, profile=profile, side=side, marker=rng.random() < 0.3
        )
        cls = str(p["label_cls"])
        numbers[cls] += 1
        ext = str(rng.choice([".jpg", ".jpg", ".JPG", ".png"]))
        _imwrite(root / KAGGLE_DIRS[cls] / f"{KAGGLE_DIRS[cls]} {numbers[cls]}{ext}", img.pixels)
    return root


def write_mendeley_site(root: Path, seed: int, n: int, image_size: int) -> Path:
    """``normal/N12.JPEG`` style plus ``patient details.xlsx``; one sheet row lacks an image, one image a row."""
    profile = PROFILES["stage2"]
    for d in MENDELEY_PREFIX:
        (root / d).mkdir(parents=True, exist_ok=True)
    numbers = dict.fromkeys(MENDELEY_PREFIX, 0)
    rows: list[dict[str, object]] = []
    no_image = n - 1 if n >= 2 else -1
    no_row = n - 2 if n >= 3 else -1
    for i in range(n):
        rng = _patient_rng(seed, "stage2", i)
        p = sample_patient(rng)
        cls = str(p["label_cls"])
        numbers[cls] += 1
        pid = f"{MENDELEY_PREFIX[cls]}{numbers[cls]}"
        bilateral = rng.random() < 0.8
        img = render_knee(
            rng,
            p["t_score"],
            image_size=image_size,
            profile=profile,
            bilateral=bilateral,
            side=str(rng.choice(["R", "L"])),
            marker=rng.random() < 0.8,
            bmi=float(p["bmi"]),
        )
        as_rgb = rng.random() < 0.5
        ext = str(rng.choice([".JPEG", ".jpg", ".jpg", ".JPG"]))
        row = _mendeley_row(rng, len(rows) + 1, pid, p)
        if i != no_image:
            pixels = cv2.cvtColor(img.pixels, cv2.COLOR_GRAY2BGR) if as_rgb else img.pixels
            _imwrite(root / cls / f"{pid}{ext}", pixels)
        if i != no_row:
            rows.append(row)
    sheet = pd.DataFrame(rows, columns=list(MENDELEY_COLUMNS))
    write_deterministic_xlsx(sheet, root / SHEET_NAME)
    return root


def _mendeley_row(rng: np.random.Generator, sno: int, pid: str, p: dict[str, float | str]) -> dict[str, object]:
    female = p["sex"] == "F"
    height = round(float(rng.normal(1.58 if female else 1.70, 0.06)), 4)
    weight = round(float(p["bmi"]) * height * height, 1)
    z_score = round(float(p["t_score"]) + 0.025 * (float(p["age"]) - 30.0) + float(rng.normal(0, 0.3)), 2)
    return {
        "S.No": float(sno),
        "Patient Id": pid,
        "Joint Pain:": str(rng.choice(["yes", "no"])),
        "Gender": "female" if female else "male",
        "Age": float(p["age"]),
        "height  (meter)": height,
        "Weight (KG) ": weight,
        "T-score Value": float(p["t_score"]),
        "Z-Score Value": z_score,
        "BMI: ": weight / (height * height),
        "Site": "knee",
        "Diagnosis": str(p["label_cls"]),
    }


def write_deterministic_xlsx(df: pd.DataFrame, path: Path) -> Path:
    """Write a one-sheet workbook whose bytes depend only on the data.

    openpyxl stamps the creation/modification time into ``docProps/core.xml`` and every zip entry; both are
    pinned here so that two runs with the same seed are byte-identical.
    """
    buf = io.BytesIO()
    df.to_excel(buf, index=False, engine="openpyxl")
    stamp = "2024-01-01T00:00:00Z"
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename == "docProps/core.xml":
                text = data.decode("utf-8")
                text = re.sub(r"(<dcterms:(?:created|modified)[^>]*>)[^<]*(<)", rf"\g<1>{stamp}\g<2>", text)
                data = text.encode("utf-8")
            entry = zipfile.ZipInfo(info.filename, date_time=_FIXED_ZIP_TIME)
            entry.compress_type = zipfile.ZIP_DEFLATED
            dst.writestr(entry, data)
    path.write_bytes(out.getvalue())
    return path


def write_hospital_site(root: Path, seed: int, n: int, image_size: int) -> Path:
    """``dicom/*.dcm`` (DX, 16-bit words, MONOCHROME1 and 2 mixed) plus ``reference_dxa.csv``."""
    profile = PROFILES["hospital"]
    dicom_dir = root / "dicom"
    dicom_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, object]] = []
    for i in range(n):
        rng = _patient_rng(seed, "hospital", i)
        p = sample_patient(rng)
        side = str(rng.choice(["R", "L"]))
        bits_stored = 12 if i % 2 == 0 else 16
        site_profile = replace(profile, bits_stored=bits_stored)
        img = render_knee(
            rng,
            p["t_score"],
            image_size=image_size,
            profile=site_profile,
            side=side,
            marker=rng.random() < 0.7,
            bmi=float(p["bmi"]),
        )
        patient_id = f"H{seed % 1000:03d}{i:04d}"
        accession = f"ACC{seed % 1000:03d}{i:05d}"
        photometric = "MONOCHROME1" if rng.random() < 0.5 else "MONOCHROME2"
        write_dicom(
            dicom_dir / f"{patient_id}.dcm",
            img,
            patient_id=patient_id,
            accession=accession,
            sex=str(p["sex"]),
            age=float(p["age"]),
            laterality=side,
            photometric=photometric,
            bits_stored=bits_stored,
            uid_seed=f"strnet-synthetic-{seed}-{i}",
        )
        rows.append(
            {
                "PatientID": patient_id,
                "AccessionNumber": accession,
                "Age": float(p["age"]),
                "Sex": p["sex"],
                "BMI": float(p["bmi"]),
                "DXA T-score": float(p["t_score"]),
            }
        )
    pd.DataFrame(rows, columns=list(DXA_COLUMNS)).to_csv(root / "reference_dxa.csv", index=False)
    return root


def write_dicom(
    path: Path,
    image: KneeImage,
    *,
    patient_id: str,
    accession: str,
    sex: str,
    age: float,
    laterality: str,
    photometric: str,
    bits_stored: int,
    uid_seed: str,
) -> Path:
    """A DX DICOM file; MONOCHROME1 stores the inverted image (bone dark) exactly as such scanners do."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"photometric must be MONOCHROME1 or MONOCHROME2, got {photometric!r}")
    max_value = (1 << bits_stored) - 1
    pixels = image.pixels.astype(np.uint32)
    if int(pixels.max(initial=0)) > max_value:
        raise ValueError(f"pixel values exceed {bits_stored} stored bits")
    stored = (max_value - pixels) if photometric == "MONOCHROME1" else pixels
    stored = stored.astype(np.uint16)

    sop_uid = generate_uid(entropy_srcs=[uid_seed, "sop"])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = DX_SOP_CLASS
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[uid_seed, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[uid_seed, "series"])
    ds.Modality = "DX"
    ds.PatientID = patient_id
    ds.PatientName = f"SYNTHETIC^{patient_id}"
    ds.PatientSex = sex
    ds.PatientAge = f"{round(age):03d}Y"
    ds.AccessionNumber = accession
    ds.BodyPartExamined = "KNEE"
    ds.ViewPosition = "AP"
    ds.ImageLaterality = laterality
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.RescaleSlope = "1"
    ds.RescaleIntercept = "0"
    ds.RescaleType = "US"
    ds.PixelData = stored.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path
