from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from strnet.data.adapters import (
    LAYOUTS,
    norm_name,
    prepare,
    prepare_dicom_csv,
    prepare_kaggle_folders,
    prepare_mendeley,
)
from strnet.data.manifest import COLUMNS, read_manifest, validate, who_label, write_manifest
from strnet.errors import DataError


def _knee(bilateral: bool, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.full((64, 80), 12.0)
    bands = [(6, 32), (46, 74)] if bilateral else [(24, 56)]
    for a, b in bands:
        img[:, a:b] = 200
    return np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)


def _write(path: Path, bilateral: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(path.suffix.lower() if path.suffix else ".png", _knee(bilateral))
    assert ok
    path.write_bytes(buf.tobytes())
    return path


def _truncated_jpeg(path: Path) -> Path:
    _write(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _dicom(path: Path, pid: str, acc: str, bilateral: bool = False, laterality: str = "") -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.AccessionNumber, ds.Modality = pid, acc, "CR"
    if laterality:
        ds.ImageLaterality = laterality
    pixels = _knee(bilateral).astype(np.uint16) * 16
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _problem(problems: list[str], *needles: str) -> str:
    hits = [p for p in problems if all(n in p for n in needles)]
    assert hits, f"no problem mentioning {needles} in:\n" + "\n".join(problems)
    return hits[0]


def _round_trip(df: pd.DataFrame, tmp_path: Path) -> None:
    assert validate(df) == []
    back = read_manifest(write_manifest(df, tmp_path / "out" / "manifest.csv"))
    pd.testing.assert_frame_equal(back, df, check_exact=False, rtol=1e-5)


def test_norm_name_matches_messy_headers() -> None:
    assert norm_name("BMI: ") == "bmi"
    assert norm_name("T-score Value") == "tscorevalue"
    assert norm_name(" Patient Id") == "patientid"


def test_kaggle_folders_keep_good_files_and_report_bad_ones(tmp_path: Path) -> None:
    src = tmp_path / "Kaggle Set"
    both = _write(src / "Normal" / "n1.PNG", bilateral=True)
    single = _write(src / "OSTEOPENIA" / "sub" / "p1.JPG")
    bad = _truncated_jpeg(src / "osteoporosis" / "o1.jpeg")
    good_op = _write(src / "osteoporosis" / "o2.png")
    (src / "osteoporosis" / "notes.txt").write_text("not an image")
    (src / "readme.md").write_text("hi")
    _write(src / "unsorted" / "x.png")
    (src / "Normal" / ".DS_Store").write_bytes(b"\0")

    df, problems = prepare_kaggle_folders(src, site="siteA")

    assert list(df.columns) == list(COLUMNS)
    got = sorted(zip(df["path"], df["side"], df["label_cls"], strict=True))
    assert got == sorted(
        [
            (str(both.resolve()), "R", "normal"),
            (str(both.resolve()), "L", "normal"),
            (str(single.resolve()), "", "osteopenia"),
            (str(good_op.resolve()), "", "osteoporosis"),
        ]
    )
    assert all(Path(p).is_absolute() for p in df["path"])
    assert set(df["site"]) == {"siteA"} and set(df["source"]) == {"Kaggle Set"}
    assert set(df["patient_id"]) == {""}
    _problem(problems, str(bad), "truncated")
    _problem(problems, "notes.txt", "not an image")
    _problem(problems, "readme.md", "outside the class folders")
    _problem(problems, "unsorted", "not a class folder")
    assert not any(".DS_Store" in p for p in problems)
    assert len(problems) == 4
    _round_trip(df, tmp_path)


def test_empty_or_imageless_folders_raise(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no usable images") as err:
        prepare("kaggle-folders", empty, "s")
    assert err.value.path == str(empty.resolve())
    only_text = tmp_path / "text"
    (only_text / "Normal").mkdir(parents=True)
    (only_text / "Normal" / "a.txt").write_text("x")
    with pytest.raises(DataError, match=r"a\.txt"):
        prepare("kaggle-folders", only_text, "s")
    with pytest.raises(DataError, match="not found"):
        prepare("kaggle-folders", tmp_path / "missing", "s")


def test_unknown_layout_lists_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="dicom-csv") as err:
        prepare("zip", tmp_path, "s")
    assert all(layout in str(err.value) for layout in LAYOUTS)


def _mendeley(src: Path, columns: dict[str, list] | None = None) -> Path:
    _write(src / "osteopenia" / "OP1.jpg", bilateral=True)
    _write(src / "osteopenia" / "OP2.JPEG")
    _write(src / "normal" / "N1.png")
    _write(src / "osteoporosis" / "OS5.png")
    _truncated_jpeg(src / "osteoporosis" / "OS6.jpg")
    sheet = pd.DataFrame(
        columns
        or {
            "S.No": [1, 2, 3, 4, 5, None],
            "Patient Id": ["OP1", "OP2", "N1", "OS9", "OS6", None],
            "Gender": ["female", "male", "Female", "male", "female", None],
            "Age": [61, 150, 45, 70, 66, 107],
            "BMI: ": [24.5, None, 30.25, 22, 25, 42],
            "T-score Value": [-1.5, -2.0, -0.5, -3.1, -2.8, -0.16],
            "Z-Score Value": [-1.0, -1.1, 0.2, -2.0, -2.0, 0.0],
            "Diagnosis": ["osteopenia", "osteopenia", "osteoporosis", "osteoporosis", "osteoporosis", None],
        }
    )
    path = src / "patient details.xlsx"
    sheet.to_excel(path, index=False)
    return path


def test_mendeley_joins_the_sheet_and_reports_every_mismatch(tmp_path: Path) -> None:
    src = tmp_path / "mendeley"
    sheet = _mendeley(src)

    df, problems = prepare("mendeley", src, "m")

    by_id = {pid: g for pid, g in df.groupby("patient_id")}
    assert set(by_id) == {"OP1", "OP2", "N1", "OS5"}
    op1 = by_id["OP1"]
    assert sorted(op1["side"]) == ["L", "R"]
    assert op1["age"].tolist() == [61.0, 61.0] and op1["bmi"].tolist() == [24.5, 24.5]
    assert op1["t_score"].tolist() == [-1.5, -1.5] and set(op1["sex"]) == {"F"}
    op2 = by_id["OP2"].iloc[0]
    assert math.isnan(op2["age"]) and math.isnan(op2["bmi"]) and op2["sex"] == "M" and op2["t_score"] == -2.0
    _problem(problems, str(sheet), "OP2", "age=150.0", "outside")
    _problem(problems, str(sheet), "OP2", "bmi is missing")
    n1 = by_id["N1"].iloc[0]
    assert n1["label_cls"] == "normal"  # folder wins over the sheet
    _problem(problems, "N1", "disagrees", "'normal'")
    os5 = by_id["OS5"].iloc[0]
    assert os5["label_cls"] == "osteoporosis" and math.isnan(os5["t_score"]) and os5["sex"] == ""
    _problem(problems, "OS5.png", "no row")
    _problem(problems, str(sheet), "OS9", "has no image")
    _problem(problems, "OS6.jpg", "truncated")
    assert not any("'OS6' has no image" in p for p in problems)
    _problem(problems, str(sheet), "row 7", "no Patient Id")
    assert not any("patient details.xlsx: file outside" in p for p in problems)
    assert set(df["source"]) == {"mendeley"}
    _round_trip(df, tmp_path)


def test_mendeley_sheet_without_patient_id_column_raises(tmp_path: Path) -> None:
    src = tmp_path / "m2"
    sheet = _mendeley(src, columns={"Patient": ["OP1"], "Age": [50], "Diagnosis": ["osteopenia"]})
    with pytest.raises(DataError, match="Patient Id") as err:
        prepare_mendeley(src, "m")
    assert err.value.path == str(sheet)


def test_mendeley_without_sheet_raises(tmp_path: Path) -> None:
    _write(tmp_path / "m3" / "normal" / "N1.png")
    with pytest.raises(DataError, match="sheet"):
        prepare_mendeley(tmp_path / "m3", "m")


def _hospital(src: Path) -> Path:
    _dicom(src / "dicom" / "p1" / "IM0001.dcm", "P1", "A1", laterality="L")
    _dicom(src / "dicom" / "p2" / "IM0002", "P2", "A2", bilateral=True)  # suffix-less, bilateral
    _dicom(src / "dicom" / "p5" / "IM0005.DCM", "P5", "")  # no accession: matched by PatientID
    _dicom(src / "dicom" / "p9" / "IM0009.dcm", "P9", "A9")  # no CSV row
    _dicom(src / "dicom" / "p4" / "IM0004.dcm", "P4", "A4")  # duplicated key in the CSV
    (src / "dicom" / "broken.dcm").write_bytes(b"\0" * 200 + b"garbage")
    (src / "dicom" / "notes.txt").write_text("ignore me")
    csv = src / "reference_dxa.csv"
    csv.write_text(
        "PatientID,AccessionNumber,Age,Sex,BMI,DXA T-score\n"
        "P1,A1,70,F,24,-2.7\n"
        "P2,A2,60,M,28,-1.5\n"
        "P3,A3,55,F,22,0.4\n"
        "P4,A4,50,F,21,-1\n"
        "P4,A4,50,F,21,-1.1\n"
        "P5,A5,65,X,31,9\n"
    )
    return csv


def test_dicom_csv_matches_tags_and_reports_problems(tmp_path: Path) -> None:
    src = tmp_path / "hospital"
    csv = _hospital(src)

    df, problems = prepare("dicom-csv", src, "h")

    p1 = df[df["patient_id"] == "P1"]
    assert len(p1) == 1 and p1.iloc[0]["side"] == "L"
    assert p1.iloc[0]["t_score"] == -2.7 and p1.iloc[0]["label_cls"] == who_label(-2.7) == "osteoporosis"
    assert p1.iloc[0]["age"] == 70 and p1.iloc[0]["sex"] == "F" and p1.iloc[0]["bmi"] == 24
    p2 = df[df["patient_id"] == "P2"]
    assert sorted(p2["side"]) == ["L", "R"] and set(p2["label_cls"]) == {"osteopenia"}
    p5 = df[df["patient_id"] == "P5"].iloc[0]
    assert math.isnan(p5["t_score"]) and p5["label_cls"] == "" and p5["sex"] == ""
    _problem(problems, str(csv), "t_score=9.0", "outside")
    _problem(problems, str(csv), "sex='X'")
    assert set(df["patient_id"]) == {"P1", "P2", "P5"}
    _problem(problems, "broken.dcm")
    _problem(problems, "IM0009.dcm", "no row")
    _problem(problems, "IM0004.dcm", "duplicated")
    _problem(problems, str(csv), "duplicate AccessionNumber 'A4'")
    _problem(problems, str(csv), "P3", "no usable DICOM image")
    assert not any("P4 / A4" in p for p in problems)
    _problem(problems, "notes.txt", "not a DICOM")
    assert set(df["source"]) == {"hospital"}
    _round_trip(df, tmp_path)


def test_dicom_csv_column_aliases_and_missing_columns(tmp_path: Path) -> None:
    src = tmp_path / "h2"
    _dicom(src / "a.dcm", "M1", "X1")
    (src / "ref.csv").write_text("mrn,tscore_value_lumbar\nM1,-1.2\n")
    df, problems = prepare_dicom_csv(src, "h", source="custom")
    assert df["t_score"].tolist() == [-1.2] and df["label_cls"].tolist() == ["osteopenia"]
    assert df["source"].tolist() == ["custom"] and problems == []

    (src / "ref.csv").write_text("name,tscore\nM1,-1.2\n")
    with pytest.raises(DataError, match="PatientID or AccessionNumber") as err:
        prepare_dicom_csv(src, "h")
    assert err.value.path.endswith("ref.csv")
    (src / "ref.csv").write_text("PatientID,Age\nM1,50\n")
    with pytest.raises(DataError, match="T-score"):
        prepare_dicom_csv(src, "h")
    (src / "other.csv").write_text("PatientID,Age\nM1,50\n")
    with pytest.raises(DataError, match="several CSV"):
        prepare_dicom_csv(src, "h")
    with pytest.raises(DataError, match="not found"):
        prepare_dicom_csv(src, "h", csv_name="nope.csv")


@pytest.mark.realdata
def test_real_mendeley_sheet_and_images(real_data_dir: Path) -> None:
    src = real_data_dir / "knee-xray-osteoporosis-mendeley"
    df, problems = prepare("mendeley", src, "mendeley")
    images = [p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in (".jpg", ".jpeg", ".png")]
    assert df["path"].nunique() == len(images)
    assert df["patient_id"].nunique() == len(images)
    assert df[["age", "t_score"]].notna().mean().min() > 0.9
    assert validate(df) == []
    # Sheet rows without images are reported, never fatal.
    assert any("has no image" in p for p in problems)
