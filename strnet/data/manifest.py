"""The one canonical manifest every command reads.

A manifest is a CSV with exactly the columns in :data:`COLUMNS`. Adapters turn each distributed layout into
it; everything downstream (audit, split, preprocessing, training, the federation) reads only manifests, so
adding a hospital means writing or choosing an adapter and nothing else.

Conventions (validated by :func:`validate`):

* ``path`` — the image file. Relative paths are resolved against the manifest's own folder on read;
  adapters write absolute paths.
* ``label_cls`` — ``normal`` / ``osteopenia`` / ``osteoporosis`` or empty (unknown, e.g. an unlabelled
  external cohort). Screening target: ``label_cls != normal``; severity target: ``osteoporosis`` among the
  bone-loss cases.
* ``t_score``, ``age``, ``bmi`` — floats, NaN when unknown. ``sex`` — ``F``, ``M`` or empty.
* ``split`` — ``train`` / ``val`` / ``test`` or empty (not yet split).
* ``side`` — ``R``, ``L`` or empty. For a bilateral radiograph the adapter writes two rows with the same
  ``path``, one per side; the loader then crops that knee (see :mod:`strnet.data.bilateral`). For a
  single-knee image ``side`` is laterality information only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from strnet.errors import DataError

COLUMNS: tuple[str, ...] = (
    "path",
    "patient_id",
    "site",
    "source",
    "split",
    "label_cls",
    "t_score",
    "age",
    "sex",
    "bmi",
    "side",
)
LABELS: tuple[str, ...] = ("normal", "osteopenia", "osteoporosis")
SPLITS: tuple[str, ...] = ("train", "val", "test")
SEXES: tuple[str, ...] = ("F", "M")
SIDES: tuple[str, ...] = ("R", "L")
STRING_COLUMNS: tuple[str, ...] = ("path", "patient_id", "site", "source", "split", "label_cls", "sex", "side")
FLOAT_COLUMNS: tuple[str, ...] = ("t_score", "age", "bmi")

# Plausible ranges; values outside are data-entry errors, not patients.
RANGES: dict[str, tuple[float, float]] = {"t_score": (-7.0, 5.0), "age": (0.0, 120.0), "bmi": (8.0, 80.0)}

# WHO thresholds on the T-score.
WHO_NORMAL_MIN = -1.0
WHO_OSTEOPOROSIS_MAX = -2.5


def who_label(t_score: float) -> str:
    """WHO category of a T-score: normal >= -1.0, osteoporosis <= -2.5, osteopenia in between; '' for NaN."""
    if t_score is None or (isinstance(t_score, float) and math.isnan(t_score)):
        return ""
    if t_score >= WHO_NORMAL_MIN:
        return "normal"
    if t_score <= WHO_OSTEOPOROSIS_MAX:
        return "osteoporosis"
    return "osteopenia"


def empty_manifest() -> pd.DataFrame:
    return normalize(pd.DataFrame({c: [] for c in COLUMNS}))


def normalize(df: pd.DataFrame) -> pd.DataFrame:
    """Give a frame exactly the manifest columns and dtypes (missing strings '' and floats NaN)."""
    out = pd.DataFrame(index=range(len(df)))
    for col in COLUMNS:
        values = df[col].tolist() if col in df.columns else [None] * len(df)
        if col in FLOAT_COLUMNS:
            out[col] = pd.to_numeric(pd.Series(values, dtype=object), errors="coerce").astype(float)
        else:
            out[col] = [("" if _is_missing(v) else str(v).strip()) for v in values]
    return out


def _is_missing(v: object) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def validate(df: pd.DataFrame, source: str | Path = "<manifest>") -> list[str]:
    """Return one message per problem (row numbers are 1-based data rows); empty list when valid."""
    problems: list[str] = []
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        return [f"{source}: missing column(s) {', '.join(missing)}"]
    checks = {"label_cls": LABELS, "split": SPLITS, "sex": SEXES, "side": SIDES}
    for col, allowed in checks.items():
        bad = df.index[~df[col].isin((*allowed, ""))]
        for i in bad[:20]:
            problems.append(f"{source}: row {i + 1}: {col}={df.at[i, col]!r} is not one of {allowed} or empty")
    empty_path = df.index[df["path"] == ""]
    for i in empty_path[:20]:
        problems.append(f"{source}: row {i + 1}: empty path")
    for col, (lo, hi) in RANGES.items():
        vals = df[col]
        bad = df.index[vals.notna() & ((vals < lo) | (vals > hi) | ~np.isfinite(vals))]
        for i in bad[:20]:
            problems.append(f"{source}: row {i + 1}: {col}={vals[i]} outside [{lo}, {hi}]")
    dup = df.duplicated(subset=["path", "side"], keep="first")
    for i in df.index[dup][:20]:
        problems.append(f"{source}: row {i + 1}: duplicate (path, side) {df.at[i, 'path']!r} {df.at[i, 'side']!r}")
    return problems


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Read and validate a manifest; relative image paths are resolved against the manifest's folder."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "manifest not found")
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise DataError(path, f"not a readable CSV ({exc})") from exc
    missing = [c for c in COLUMNS if c not in raw.columns]
    if missing:
        raise DataError(path, f"missing manifest column(s): {', '.join(missing)}")
    for col in FLOAT_COLUMNS:
        raw[col] = raw[col].replace("", np.nan)
        bad = pd.to_numeric(raw[col], errors="coerce").isna() & raw[col].notna()
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise DataError(path, f"row {i + 1}: {col}={raw[col].iloc[i]!r} is not a number")
    df = normalize(raw)
    base = path.parent.resolve()
    df["path"] = [p if Path(p).is_absolute() else str((base / p).resolve()) for p in df["path"]]
    problems = validate(df, path)
    if problems:
        raise DataError(path, "invalid manifest:\n  " + "\n  ".join(problems))
    return df


def write_manifest(df: pd.DataFrame, path: str | Path) -> Path:
    """Validate and write; refuses to write a manifest that :func:`read_manifest` would reject."""
    path = Path(path)
    df = normalize(df)
    problems = validate(df, path)
    if problems:
        raise DataError(path, "refusing to write an invalid manifest:\n  " + "\n  ".join(problems))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    df.to_csv(tmp, index=False, float_format="%.6g")
    tmp.replace(path)
    return path


def merge_manifests(frames: Iterable[pd.DataFrame]) -> pd.DataFrame:
    """Concatenate manifests, keeping the first row of each (path, side) compared case-insensitively.

    The paper deduplicated by path case-insensitively: the same file listed by two exports (``N1.JPEG`` vs
    ``n1.jpeg`` on a case-insensitive share) must not be counted twice.
    """
    frames = [normalize(f) for f in frames]
    if not frames:
        return empty_manifest()
    df = pd.concat(frames, ignore_index=True)
    key = df["path"].str.lower() + "\x00" + df["side"]
    return df.loc[~key.duplicated(keep="first")].reset_index(drop=True)


def screening_target(label_cls: str) -> float:
    """1.0 for bone loss, 0.0 for normal, NaN when unknown."""
    if label_cls == "":
        return float("nan")
    return 0.0 if label_cls == "normal" else 1.0


def severity_target(label_cls: str) -> float:
    """1.0 osteoporosis, 0.0 osteopenia, NaN for normal or unknown (the severity loss is masked there)."""
    return {"osteoporosis": 1.0, "osteopenia": 0.0}.get(label_cls, float("nan"))
