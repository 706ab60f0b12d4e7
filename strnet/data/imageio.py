"""Decode any radiograph we accept into one 2-D float32 array where brighter means denser.

PNG/JPEG (8- or 16-bit, grayscale, RGB or RGBA) go through OpenCV with ``IMREAD_UNCHANGED`` so 16-bit
data keeps its depth; DICOM goes through pydicom with its modality LUT / rescale applied and MONOCHROME1
inverted, so bone is bright in every array whatever the scanner wrote.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from strnet.errors import DataError

RASTER_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
IMAGE_SUFFIXES = RASTER_SUFFIXES | {".dcm", ".dicom"}


def is_image_file(path: str | Path) -> bool:
    """True for a supported suffix (any case). Suffix-less files are DICOM only when they say so."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return True
    # DICOM files are often named by UID (``1.2.840.113619.2.55.3``): trust the preamble, not the suffix.
    return p.is_file() and _is_dicom(p)


def _is_dicom(path: Path) -> bool:
    """pydicom's preamble check ('DICM' at byte 128); an unreadable file is simply not DICOM."""
    from pydicom.misc import is_dicom

    try:
        return is_dicom(path)
    except OSError:
        return False


def read_radiograph(path: str | Path) -> np.ndarray:
    """Return the image as a 2-D float32 array in its native intensity scale (bone bright).

    Raises :class:`DataError` naming the file for anything that is not a decodable single-frame image.
    """
    return decode_radiograph(path)[0]


def decode_radiograph(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(radiograph, as decoded)``: :func:`read_radiograph`'s array and the file's own pixels, colour channels and
    bit depth kept (OpenCV's BGR order; DICOM: the radiograph itself), from one decode.

    ``strnet predict`` judges the decoded pixels (a colour photograph is not a radiograph) and screens the
    radiograph; decoding a 2 k film twice cost as much as preprocessing it.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(p, "file not found")
    if p.stat().st_size == 0:
        raise DataError(p, "empty file")
    suffix = p.suffix.lower()
    if suffix in (".dcm", ".dicom") or (suffix not in RASTER_SUFFIXES and _is_dicom(p)):
        img = raw = _read_dicom(p)
    elif suffix in RASTER_SUFFIXES:
        raw = _decode_raster(p)
        img = _grey(raw)
    else:
        raise DataError(p, f"unsupported file type {p.suffix or '(no suffix)'!r}")
    if img.ndim != 2 or min(img.shape) < 8:
        raise DataError(p, f"not a usable 2-D image (shape {img.shape})")
    if raw.dtype.kind == "f" and not np.isfinite(img).all():  # an integer file's grey copy is finite
        raise DataError(p, "image contains NaN or infinite pixel values")
    return img, raw


def _decode_raster(p: Path) -> np.ndarray:
    data = np.fromfile(p, dtype=np.uint8)
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise DataError(p, "not a decodable image (truncated or not an image)")
    if _looks_truncated(p, data):
        raise DataError(p, "truncated image file (missing end-of-image marker)")
    return img


def _grey(img: np.ndarray) -> np.ndarray:
    if img.ndim == 3:
        channels = img.shape[2]
        if channels == 4:
            img = img[:, :, :3]
        if channels >= 3:
            # OpenCV decodes to BGR; luminance weights follow ITU-R BT.601 like PIL's "L" mode.
            img = (
                cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_BGR2GRAY)
                if img.dtype == np.uint8
                else (0.114 * img[:, :, 0] + 0.587 * img[:, :, 1] + 0.299 * img[:, :, 2])
            )
        else:
            img = img[:, :, 0]
    return img.astype(np.float32)


def _looks_truncated(p: Path, data: np.ndarray) -> bool:
    """OpenCV happily decodes half a JPEG/PNG (grey bottom); check the format's end marker instead."""
    tail = data[-64:].tobytes()
    suffix = p.suffix.lower()
    if suffix in (".jpg", ".jpeg"):
        return b"\xff\xd9" not in tail
    if suffix == ".png":
        return b"IEND" not in tail
    return False


def _read_dicom(p: Path) -> np.ndarray:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut

    try:
        ds = pydicom.dcmread(p)
        arr = ds.pixel_array
    except InvalidDicomError as exc:
        raise DataError(p, f"not a valid DICOM file ({exc})") from exc
    except Exception as exc:  # pydicom raises many types for broken pixel data
        raise DataError(p, f"unreadable DICOM pixel data ({type(exc).__name__}: {exc})") from exc
    if arr.ndim == 3 and getattr(ds, "SamplesPerPixel", 1) == 1:
        if arr.shape[0] != 1:
            raise DataError(p, f"multi-frame DICOM ({arr.shape[0]} frames) is not a radiograph")
        arr = arr[0]
    try:
        # Modality LUT Sequence or RescaleSlope/RescaleIntercept, on the stored integers as the standard says.
        arr = apply_modality_lut(arr, ds)
    except Exception as exc:
        raise DataError(p, f"invalid DICOM modality LUT/rescale ({type(exc).__name__}: {exc})") from exc
    if arr.ndim == 3:  # RGB secondary capture
        arr = arr[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    img = arr.astype(np.float32)
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "MONOCHROME1":
        img = img.max() + img.min() - img
    return img


def dicom_laterality(path: str | Path) -> str:
    """'R' / 'L' from the DICOM (Image)Laterality tag, '' when absent or unreadable."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:
        return ""
    for tag in ("ImageLaterality", "Laterality"):
        value = str(getattr(ds, tag, "") or "").strip().upper()
        if value in ("R", "L"):
            return value
    return ""


DICOM_IDENTIFIERS = {
    "study_instance_uid": "StudyInstanceUID",
    "sop_instance_uid": "SOPInstanceUID",
    "accession_number": "AccessionNumber",
}


def dicom_identifiers(path: str | Path) -> dict[str, str]:
    """The tags a hospital matches results back by (study, instance, accession, laterality); '' for each one a
    file lacks, and all '' for a file that is not DICOM — so every output row has the same columns."""
    empty = dict.fromkeys(DICOM_IDENTIFIERS, "") | {"laterality": ""}
    p = Path(path)
    if not p.is_file() or not _is_dicom(p):
        return empty
    import pydicom

    try:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
    except Exception:
        return empty
    out = {key: str(getattr(ds, tag, "") or "").strip() for key, tag in DICOM_IDENTIFIERS.items()}
    return out | {"laterality": dicom_laterality(p)}
