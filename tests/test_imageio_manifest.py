from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from strnet.data.imageio import is_image_file, read_radiograph
from strnet.data.manifest import (
    COLUMNS,
    merge_manifests,
    normalize,
    read_manifest,
    screening_target,
    severity_target,
    who_label,
    write_manifest,
)
from strnet.errors import DataError


def gradient(h: int = 40, w: int = 30) -> np.ndarray:
    return np.tile(np.linspace(0, 1, w, dtype=np.float32), (h, 1))


def write_dicom(path: Path, pixels: np.ndarray, photometric: str) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = 2, -10
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def test_8bit_16bit_rgb_rgba_agree(tmp_path: Path) -> None:
    g = gradient()
    cv2.imwrite(str(tmp_path / "g8.png"), (g * 255).round().astype(np.uint8))
    cv2.imwrite(str(tmp_path / "g16.png"), (g * 65535).round().astype(np.uint16))
    rgb = np.repeat((g * 255).round().astype(np.uint8)[..., None], 3, axis=2)
    cv2.imwrite(str(tmp_path / "rgb.JPG"), rgb, [cv2.IMWRITE_JPEG_QUALITY, 100])
    rgba = np.concatenate([rgb, np.full_like(rgb[..., :1], 255)], axis=2)
    cv2.imwrite(str(tmp_path / "rgba.png"), rgba)
    a8 = read_radiograph(tmp_path / "g8.png") / 255
    a16 = read_radiograph(tmp_path / "g16.png") / 65535
    np.testing.assert_allclose(a8, a16, atol=1 / 255)
    np.testing.assert_allclose(read_radiograph(tmp_path / "rgb.JPG") / 255, a8, atol=3 / 255)
    np.testing.assert_allclose(read_radiograph(tmp_path / "rgba.png") / 255, a8, atol=1 / 255)
    assert read_radiograph(tmp_path / "g16.png").dtype == np.float32


def test_dicom_rescale_and_monochrome1_inversion(tmp_path: Path) -> None:
    stored = (gradient() * 4000).astype(np.uint16)
    write_dicom(tmp_path / "m2.dcm", stored, "MONOCHROME2")
    write_dicom(tmp_path / "1.2.840.99", 4000 - stored, "MONOCHROME1")  # UID-style name, no image suffix
    m2 = read_radiograph(tmp_path / "m2.dcm")
    np.testing.assert_allclose(m2, stored * 2.0 - 10)
    assert is_image_file(tmp_path / "1.2.840.99")
    m1 = read_radiograph(tmp_path / "1.2.840.99")
    # after inversion bone (high stored values in m2) is bright in both: same ordering of pixels
    assert np.corrcoef(m1.ravel(), m2.ravel())[0, 1] > 0.999


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("empty.png", b"", "empty file"),
        ("text.jpg", b"hello, not an image", "not a decodable image"),
        ("notes.txt", b"hello", "unsupported file type"),
        ("broken.dcm", b"\0" * 128 + b"DICMgarbage", "DICOM"),
    ],
)
def test_bad_files_name_file_and_problem(tmp_path: Path, name: str, content: bytes, problem: str) -> None:
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=problem) as info:
        read_radiograph(tmp_path / name)
    assert name in str(info.value)


def test_truncated_jpeg_is_rejected(tmp_path: Path) -> None:
    ok, buf = cv2.imencode(".jpg", (gradient(200, 200) * 255).astype(np.uint8))
    assert ok
    (tmp_path / "cut.jpg").write_bytes(buf.tobytes()[: len(buf) // 2])
    with pytest.raises(DataError, match=r"truncated|decodable"):
        read_radiograph(tmp_path / "cut.jpg")


def test_who_mapping_boundaries() -> None:
    assert [who_label(t) for t in (-1.0, -0.99, -1.01, -2.49, -2.5, -3.0)] == [
        "normal",
        "normal",
        "osteopenia",
        "osteopenia",
        "osteoporosis",
        "osteoporosis",
    ]
    assert who_label(float("nan")) == ""
    assert screening_target("osteopenia") == 1.0 and screening_target("normal") == 0.0
    assert np.isnan(screening_target("")) and np.isnan(severity_target("normal"))
    assert severity_target("osteoporosis") == 1.0 and severity_target("osteopenia") == 0.0


def manifest_rows() -> pd.DataFrame:
    return normalize(
        pd.DataFrame(
            {
                "path": ["/d/A.png", "/d/b.png", "/d/a.png"],
                "label_cls": ["normal", "osteoporosis", "normal"],
                "t_score": [0.1, -3.0, None],
                "age": [50, 70, None],
                "sex": ["F", "M", ""],
                "site": ["s", "s", "t"],
            }
        )
    )


def test_manifest_round_trip_and_relative_paths(tmp_path: Path) -> None:
    df = manifest_rows()
    out = write_manifest(df, tmp_path / "m.csv")
    back = read_manifest(out)
    assert list(back.columns) == list(COLUMNS)
    pd.testing.assert_frame_equal(back, df)
    rel = df.copy()
    rel["path"] = ["img/x.png", "img/y.png", "img/z.png"]
    write_manifest(rel, tmp_path / "rel.csv")
    assert read_manifest(tmp_path / "rel.csv")["path"].tolist() == [
        str(tmp_path / "img" / n) for n in ["x.png", "y.png", "z.png"]
    ]


def test_merge_dedupes_paths_case_insensitively() -> None:
    merged = merge_manifests([manifest_rows()])
    assert merged["path"].tolist() == ["/d/A.png", "/d/b.png"]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace("normal,", "healthy,", 1), "label_cls='healthy'"),
        (lambda t: t.replace("0.1", "abc", 1), "t_score='abc' is not a number"),
        (lambda t: t.replace(",50,", ",150,", 1), "age=150.0 outside"),
        (lambda t: t.replace("path,", "file,", 1), "missing manifest column"),
    ],
)
def test_bad_manifests_are_refused_with_row_and_column(tmp_path: Path, edit, message: str) -> None:  # type: ignore[no-untyped-def]
    good = write_manifest(manifest_rows().iloc[:2], tmp_path / "m.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text(edit(good.read_text()))
    with pytest.raises(DataError, match=message) as info:
        read_manifest(bad)
    assert "bad.csv" in str(info.value)


def test_write_refuses_invalid_manifest(tmp_path: Path) -> None:
    df = manifest_rows()
    df.loc[0, "split"] = "holdout"
    with pytest.raises(DataError, match="split='holdout'"):
        write_manifest(df, tmp_path / "x.csv")
    assert not (tmp_path / "x.csv").exists()
