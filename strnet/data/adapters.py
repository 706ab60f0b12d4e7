"""Turn each distributed data layout into the canonical manifest (see :mod:`strnet.data.manifest`).

Every adapter returns ``(manifest, problems)``. A hospital export always holds a few broken files, stray
notes and sheet rows without images; one bad file must not cost the site its good ones, so per-file trouble
becomes a human-readable problem line naming the file, and only what makes the whole folder unusable (no
images at all, a sheet without its key column) raises :class:`~strnet.errors.DataError`.

Each image is decoded exactly once: decoding proves the file is usable and feeds bilateral detection, which
decides whether the image yields one row or two (side ``R`` and ``L``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from strnet.data.bilateral import split_bilateral
from strnet.data.imageio import dicom_laterality, is_image_file, read_radiograph
from strnet.data.manifest import LABELS, RANGES, normalize, who_label
from strnet.errors import DataError

LAYOUTS: tuple[str, ...] = ("kaggle-folders", "mendeley", "dicom-csv")

# Column aliases, compared after :func:`norm_name`.
ID_ALIASES = ("patientid", "mrn", "id")
ACCESSION_ALIASES = ("accession", "accessionnumber", "accessionno")
TSCORE_ALIASES = ("tscore", "dxatscore", "tscorevalue")
AGE_ALIASES = ("age", "ageyears")
SEX_ALIASES = ("sex", "gender")
BMI_ALIASES = ("bmi",)
DIAGNOSIS_ALIASES = ("diagnosis", "label", "class")

_SEX_VALUES = {"f": "F", "female": "F", "w": "F", "woman": "F", "m": "M", "male": "M", "man": "M"}
_IGNORED_NAMES = frozenset({"thumbs.db", "desktop.ini"})

Result = tuple[pd.DataFrame, list[str]]


def norm_name(name: object) -> str:
    """Lower-case a column or folder name and drop everything but letters and digits ('BMI: ' -> 'bmi')."""
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


def _find_column(columns: Iterable[object], aliases: tuple[str, ...], contains: str | None = None) -> object | None:
    """The first column whose normalized name is an alias; failing that, one whose name contains ``contains``."""
    columns = list(columns)
    normed = [norm_name(c) for c in columns]
    for alias in aliases:
        if alias in normed:
            return columns[normed.index(alias)]
    if contains is not None:
        for col, n in zip(columns, normed, strict=True):
            if contains in n:
                return col
    return None


def _ignored(path: Path) -> bool:
    return path.name.startswith(".") or path.name.lower() in _IGNORED_NAMES


def _files_under(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and not any(_ignored(q) for q in p.parents) and not _ignored(p)
    )


def _check_folder(src: str | Path) -> Path:
    src = Path(src)
    if not src.is_dir():
        raise DataError(src, "data folder not found")
    return src.resolve()


def _image_rows(path: Path, problems: list[str], single_side: str = "") -> list[str] | None:
    """Decode ``path`` once; the sides it yields (two for a bilateral view), or None when unusable."""
    try:
        img = read_radiograph(path)
    except DataError as exc:
        problems.append(str(exc))
        return None
    return ["R", "L"] if split_bilateral(img) is not None else [single_side]


def _no_images(src: Path, problems: list[str]) -> DataError:
    detail = f" ({len(problems)} problem(s), first: {problems[0]})" if problems else ""
    return DataError(src, f"no usable images found{detail}")


def _class_folder_images(src: Path, problems: list[str], allowed_top: Iterable[Path] = ()) -> list[tuple[Path, str]]:
    """(image, label) for every image inside a class folder; everything else becomes a problem line."""
    allowed = {p.resolve() for p in allowed_top}
    found: list[tuple[Path, str]] = []
    for child in sorted(src.iterdir()):
        if _ignored(child) or child.resolve() in allowed:
            continue
        if child.is_file():
            problems.append(f"{child}: file outside the class folders {LABELS}; skipped")
            continue
        label = norm_name(child.name)
        if label not in LABELS:
            n = len(_files_under(child))
            problems.append(f"{child}: folder is not a class folder {LABELS}; its {n} file(s) skipped")
            continue
        for f in _files_under(child):
            if is_image_file(f):
                found.append((f, label))
            else:
                problems.append(f"{f}: not an image file (suffix {f.suffix or '(none)'!r}); skipped")
    return found


def _folder_rows(images: list[tuple[Path, str]], problems: list[str], site: str, source: str) -> list[dict]:
    rows: list[dict] = []
    for path, label in images:
        sides = _image_rows(path, problems)
        if sides is None:
            continue
        for side in sides:
            rows.append({"path": str(path), "site": site, "source": source, "label_cls": label, "side": side})
    return rows


def prepare_kaggle_folders(src: str | Path, site: str, source: str | None = None) -> Result:
    """Class folders ``Normal/ Osteopenia/ Osteoporosis/`` (any case); patient ids are unknown ('')."""
    src = _check_folder(src)
    problems: list[str] = []
    rows = _folder_rows(_class_folder_images(src, problems), problems, site, source or src.name)
    if not rows:
        raise _no_images(src, problems)
    return normalize(pd.DataFrame(rows)), problems


# ---------------------------------------------------------------- Mendeley: class folders + patient sheet


def _find_sheet(src: Path) -> Path:
    sheets = sorted(
        p for p in src.iterdir() if p.is_file() and p.suffix.lower() in (".xlsx", ".xls") and not _ignored(p)
    )
    if not sheets:
        raise DataError(src, "no patient sheet (*.xlsx) found next to the class folders")
    if len(sheets) > 1:
        named = [p for p in sheets if norm_name(p.stem) == "patientdetails"]
        if len(named) == 1:
            return named[0]
        raise DataError(src, f"several sheets, cannot tell which holds the patients: {[p.name for p in sheets]}")
    return sheets[0]


def _read_sheet(sheet: Path) -> pd.DataFrame:
    try:
        return pd.read_excel(sheet, dtype=object)
    except Exception as exc:  # openpyxl/xlrd raise many types for corrupt workbooks
        raise DataError(sheet, f"not a readable spreadsheet ({type(exc).__name__}: {exc})") from exc


def _blank(v: object) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and v.strip() == "")


def _clean_number(value: object, column: str, where: str, problems: list[str]) -> float:
    """A float within :data:`RANGES`, else NaN plus a problem line saying why."""
    if _blank(value):
        problems.append(f"{where}: {column} is missing")
        return math.nan
    try:
        x = float(str(value).strip()) if isinstance(value, str) else float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        problems.append(f"{where}: {column}={value!r} is not a number; left empty")
        return math.nan
    lo, hi = RANGES[column]
    if not math.isfinite(x) or not lo <= x <= hi:
        problems.append(f"{where}: {column}={x} outside [{lo}, {hi}]; left empty")
        return math.nan
    return x


def _clean_sex(value: object, where: str, problems: list[str]) -> str:
    if _blank(value):
        problems.append(f"{where}: sex is missing")
        return ""
    sex = _SEX_VALUES.get(str(value).strip().lower())
    if sex is None:
        problems.append(f"{where}: sex={value!r} is not male/female; left empty")
        return ""
    return sex


def _clinical(record: pd.Series, cols: dict[str, object], where: str, problems: list[str]) -> dict:
    """age/sex/bmi/t_score of one sheet or CSV row; columns the file lacks stay empty without complaint."""
    out: dict = {}
    for field in ("age", "bmi", "t_score"):
        col = cols.get(field)
        out[field] = math.nan if col is None else _clean_number(record[col], field, where, problems)
    col = cols.get("sex")
    out["sex"] = "" if col is None else _clean_sex(record[col], where, problems)
    return out


def prepare_mendeley(src: str | Path, site: str, source: str | None = None) -> Result:
    """Class folders plus ``patient details.xlsx``; the image stem (``OP3``) is the sheet's ``Patient Id``.

    The folder label wins over the sheet's Diagnosis (a disagreement is reported). The Mendeley T-scores are
    calcaneal QUS, not DXA; they are kept in ``t_score`` and the folder label remains the reference.
    """
    src = _check_folder(src)
    sheet = _find_sheet(src)
    table = _read_sheet(sheet)
    id_col = _find_column(table.columns, ID_ALIASES)
    if id_col is None:
        raise DataError(sheet, f"missing required column 'Patient Id' (columns: {[str(c) for c in table.columns]})")
    cols = {
        "age": _find_column(table.columns, AGE_ALIASES),
        "sex": _find_column(table.columns, SEX_ALIASES),
        "bmi": _find_column(table.columns, BMI_ALIASES),
        "t_score": _find_column(table.columns, TSCORE_ALIASES, contains="tscore"),
    }
    diag_col = _find_column(table.columns, DIAGNOSIS_ALIASES)
    problems: list[str] = []

    records: dict[str, tuple[int, pd.Series]] = {}
    for i, record in table.iterrows():
        excel_row = int(i) + 2  # 1-based, after the header row
        if _blank(record[id_col]):
            if not record.map(_blank).all():
                problems.append(f"{sheet}: row {excel_row} has no Patient Id; ignored")
            continue
        pid = str(record[id_col]).strip()
        key = pid.upper()
        if key in records:
            problems.append(
                f"{sheet}: row {excel_row}: duplicate Patient Id {pid!r} (first in row {records[key][0]}); ignored"
            )
            continue
        records[key] = (excel_row, record)

    images = _class_folder_images(src, problems, allowed_top=[sheet])
    rows: list[dict] = []
    used: set[str] = set()
    for path, label in images:
        pid = path.stem.strip()
        used.add(pid.upper())  # an unreadable image is reported as such, not as a sheet row without image
        sides = _image_rows(path, problems)
        if sides is None:
            continue
        row = {"path": str(path), "patient_id": pid, "site": site, "source": source or src.name, "label_cls": label}
        hit = records.get(pid.upper())
        if hit is None:
            problems.append(f"{path}: no row for Patient Id {pid!r} in {sheet.name}; clinical values left empty")
        else:
            excel_row, record = hit
            where = f"{sheet}: row {excel_row} ({pid})"
            row.update(_clinical(record, cols, where, problems))
            if diag_col is not None and not _blank(record[diag_col]):
                diagnosis = norm_name(record[diag_col])
                if diagnosis != label:
                    problems.append(
                        f"{where}: Diagnosis {record[diag_col]!r} disagrees with folder {label!r}; kept {label!r}"
                    )
        rows.extend({**row, "side": side} for side in sides)
    for key, (excel_row, record) in records.items():
        if key not in used:
            problems.append(f"{sheet}: row {excel_row}: Patient Id {str(record[id_col]).strip()!r} has no image")
    if not rows:
        raise _no_images(src, problems)
    return normalize(pd.DataFrame(rows)), problems


# ---------------------------------------------------------------- DICOM tree + reference DXA CSV


def _find_csv(src: Path, csv_name: str | None) -> Path:
    if csv_name is not None:
        path = src / csv_name
        if not path.is_file():
            raise DataError(path, "reference CSV not found")
        return path
    csvs = sorted(p for p in src.iterdir() if p.is_file() and p.suffix.lower() == ".csv" and not _ignored(p))
    if not csvs:
        raise DataError(src, "no reference CSV (*.csv) found; pass csv_name")
    if len(csvs) > 1:
        raise DataError(src, f"several CSV files, pass csv_name to choose one: {[p.name for p in csvs]}")
    return csvs[0]


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(path, f"not a readable CSV ({exc})") from exc


def _unique_index(
    table: pd.DataFrame, col: object, csv: Path, what: str, problems: list[str], report_duplicates: bool
) -> tuple[dict[str, int], set[str]]:
    """Map key -> row position for keys that occur once; duplicated keys are returned separately."""
    positions: dict[str, list[int]] = {}
    for pos, value in enumerate(table[col].astype(str).str.strip()):
        if value:
            positions.setdefault(value, []).append(pos)
    dups = {k for k, v in positions.items() if len(v) > 1}
    if report_duplicates:
        for k in sorted(dups):
            rows = ", ".join(str(p + 2) for p in positions[k])
            problems.append(f"{csv}: duplicate {what} {k!r} in rows {rows}; those rows are not used")
    return {k: v[0] for k, v in positions.items() if len(v) == 1}, dups


def _dicom_keys(path: Path) -> tuple[str, str]:
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID", "AccessionNumber"])
    return str(getattr(ds, "PatientID", "") or "").strip(), str(getattr(ds, "AccessionNumber", "") or "").strip()


def _is_dicom_candidate(path: Path) -> bool:
    """DICOM by suffix or by the 'DICM' magic at byte 128 (archives often name files by UID: '1.2.840.3')."""
    if path.suffix.lower() in (".dcm", ".dicom"):
        return True
    try:
        with path.open("rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def prepare_dicom_csv(src: str | Path, site: str, source: str | None = None, csv_name: str | None = None) -> Result:
    """A tree of DICOM files plus one CSV of reference DXA T-scores keyed by PatientID or AccessionNumber.

    AccessionNumber is tried first because one patient may have several exams; the label is the WHO
    category of the CSV T-score.
    """
    src = _check_folder(src)
    csv = _find_csv(src, csv_name)
    table = _read_csv(csv)
    id_col = _find_column(table.columns, ID_ALIASES)
    acc_col = _find_column(table.columns, ACCESSION_ALIASES)
    if id_col is None and acc_col is None:
        raise DataError(csv, f"missing a PatientID or AccessionNumber column (columns: {list(table.columns)})")
    t_col = _find_column(table.columns, TSCORE_ALIASES, contains="tscore")
    if t_col is None:
        raise DataError(csv, f"missing the T-score column (columns: {list(table.columns)})")
    cols = {
        "age": _find_column(table.columns, AGE_ALIASES),
        "sex": _find_column(table.columns, SEX_ALIASES),
        "bmi": _find_column(table.columns, BMI_ALIASES),
        "t_score": t_col,
    }
    problems: list[str] = []
    by_acc, dup_acc = (
        ({}, set()) if acc_col is None else _unique_index(table, acc_col, csv, "AccessionNumber", problems, True)
    )
    by_id, dup_id = (
        ({}, set()) if id_col is None else _unique_index(table, id_col, csv, "PatientID", problems, acc_col is None)
    )

    rows: list[dict] = []
    used: set[int] = set()
    for path in _files_under(src):
        if path.resolve() == csv.resolve():
            continue
        if not _is_dicom_candidate(path):
            problems.append(f"{path}: not a DICOM file (suffix {path.suffix!r}); skipped")
            continue
        sides = _image_rows(path, problems, single_side="")
        if sides is None:
            continue
        try:
            pid, acc = _dicom_keys(path)
        except Exception as exc:  # the pixels decoded, so this is a damaged header
            problems.append(f"{path}: unreadable DICOM header ({type(exc).__name__}: {exc})")
            continue
        pos = _match(pid, acc, by_acc, dup_acc, by_id, dup_id)
        if isinstance(pos, str):
            problems.append(f"{path}: {pos} in {csv.name}; skipped")
            continue
        used.add(pos)
        record = table.iloc[pos]
        where = f"{csv}: row {pos + 2}"
        clinical = _clinical(record, cols, where, problems)
        if sides == [""]:
            sides = [dicom_laterality(path)]
        row = {
            "path": str(path),
            "patient_id": pid or (str(record[id_col]).strip() if id_col is not None else ""),
            "site": site,
            "source": source or src.name,
            "label_cls": who_label(clinical["t_score"]),
            **clinical,
        }
        rows.extend({**row, "side": side} for side in sides)
    duplicated = set()
    for col, dups in ((acc_col, dup_acc), (id_col, dup_id if acc_col is None else set())):
        if col is not None and dups:
            duplicated |= set(np.flatnonzero(table[col].astype(str).str.strip().isin(dups)).tolist())
    for pos in range(len(table)):
        if pos in used or pos in duplicated:  # duplicates were reported above
            continue
        key = " / ".join(str(table.iloc[pos][c]).strip() for c in (id_col, acc_col) if c is not None)
        if key.replace("/", "").strip():
            problems.append(f"{csv}: row {pos + 2} ({key}) has no usable DICOM image")
    if not rows:
        raise _no_images(src, problems)
    return normalize(pd.DataFrame(rows)), problems


def _match(
    pid: str, acc: str, by_acc: dict[str, int], dup_acc: set[str], by_id: dict[str, int], dup_id: set[str]
) -> int | str:
    """Row position for a DICOM's keys, or the reason there is none."""
    if acc and acc in by_acc:
        return by_acc[acc]
    if acc and acc in dup_acc:
        return f"AccessionNumber {acc!r} is duplicated"
    if pid and pid in by_id:
        return by_id[pid]
    if pid and pid in dup_id:
        return f"PatientID {pid!r} matches several rows and AccessionNumber {acc!r} does not pick one"
    if not pid and not acc:
        return "no PatientID or AccessionNumber tag to look up"
    return f"no row for PatientID {pid!r} / AccessionNumber {acc!r}"


_ADAPTERS = {"kaggle-folders": prepare_kaggle_folders, "mendeley": prepare_mendeley, "dicom-csv": prepare_dicom_csv}


def prepare(layout: str, src: str | Path, site: str, source: str | None = None) -> Result:
    """Run the adapter for ``layout``; ``source`` defaults to the data folder's name."""
    adapter = _ADAPTERS.get(layout)
    if adapter is None:
        raise ValueError(f"unknown layout {layout!r}; valid layouts: {', '.join(LAYOUTS)}")
    return adapter(src, site, source)
