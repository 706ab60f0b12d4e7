"""``strnet predict``: screening outputs for new radiographs, one row per knee, broken files listed not fatal.

A bilateral radiograph yields two rows (R and L) exactly as training saw it; a corrupt or unsupported
file yields a row with ``status=error`` and the reason, and every other file is still predicted.

Inputs the model must not judge get ``status=out_of_distribution``, the reason in ``error`` and no probability,
flag, severity or T-score (:mod:`strnet.ood`): a file that fails the image checks (colour, chart-like, noise,
blank, tiny) whatever the bundle, and — when the bundle carries an ``"ood"`` entry — a knee whose features lie
beyond the bundle's limit. ``ood_score`` is the feature distance over that limit (> 1 rejects), empty for
bundles without one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from strnet.bundle import Bundle
from strnet.data.bilateral import split_bilateral
from strnet.data.dataset import KneeDataset
from strnet.data.imageio import dicom_identifiers, is_image_file, read_radiograph
from strnet.data.manifest import normalize, who_label
from strnet.errors import DataError
from strnet.evaluation import predict_frame
from strnet.ood import STATUS_OK, STATUS_OOD, OODModel, extract_features, image_problems, read_image_for_checks

OUTPUT_COLUMNS = [
    "file",
    "side",
    "study_instance_uid",
    "sop_instance_uid",
    "accession_number",
    "laterality",
    "status",
    "error",
    "ood_score",
    "prob_bone_loss",
    "threshold",
    "flag_bone_loss",
    "radiograph_prob_bone_loss",
    "radiograph_flag_bone_loss",
    "prob_osteoporosis_given_bone_loss",
    "severity",
    "t_score_estimate",
    "who_category_estimate",
    "gradcam",
]


def collect_inputs(inputs: Sequence[str | Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Expand folders recursively; returns (candidate files, [(path, reason)] for inputs that are unusable)."""
    files: list[Path] = []
    bad: list[tuple[Path, str]] = []
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            children = sorted(c for c in p.rglob("*") if c.is_file() and not c.name.startswith("."))
            if not children:
                bad.append((p, "empty folder"))
            for c in children:
                if is_image_file(c):
                    files.append(c)
                else:
                    bad.append((c, "unsupported file type"))
        elif p.is_file():
            files.append(p)
        else:
            bad.append((p, "no such file or folder"))
    return files, bad


def read_clinical(path: str | Path | None) -> pd.DataFrame:
    """Optional CSV with a ``file`` column (file name or stem) and any of ``age``, ``sex``, ``bmi``."""
    if path is None:
        return pd.DataFrame(columns=["key", "age", "sex", "bmi"])
    p = Path(path)
    try:
        df = pd.read_csv(p)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise DataError(p, f"cannot read clinical CSV ({exc})") from exc
    df.columns = [str(c).strip().lower() for c in df.columns]
    if "file" not in df.columns:
        raise DataError(p, "clinical CSV needs a 'file' column (image file name or stem)")
    df["key"] = df["file"].astype(str).map(lambda s: Path(s).stem.lower())
    for col in ("age", "sex", "bmi"):
        if col not in df.columns:
            df[col] = np.nan
    df["sex"] = df["sex"].astype(str).str.strip().str.upper().str[:1].where(df["sex"].notna(), "")
    return df[["key", "age", "sex", "bmi"]]


def _rows_for(files: Iterable[Path], clinical: pd.DataFrame) -> tuple[pd.DataFrame, list[dict], list[list[str]]]:
    """(knee rows, error rows, the image-check problems of each knee row's file, aligned with the knee rows)."""
    rows, errors = [], []
    problems: list[list[str]] = []
    lookup = clinical.drop_duplicates("key").set_index("key")
    for f in files:
        try:
            img = read_radiograph(f)
            # Judged on the file as decoded, colour included (read_radiograph has already made it grey).
            file_problems = image_problems(read_image_for_checks(f))
        except DataError as exc:
            errors.append({"file": str(f), "side": "", "status": "error", "error": exc.problem})
            continue
        sides = ["R", "L"] if split_bilateral(img) is not None else [""]
        info = lookup.loc[f.stem.lower()] if f.stem.lower() in lookup.index else None
        for side in sides:
            problems.append(file_problems)
            rows.append(
                {
                    "path": str(f.resolve()),
                    "side": side,
                    "age": None if info is None else info["age"],
                    "sex": "" if info is None else info["sex"],
                    "bmi": None if info is None else info["bmi"],
                }
            )
    return normalize(pd.DataFrame(rows)), errors, problems


def predict_files(
    bundle: Bundle,
    inputs: Sequence[str | Path],
    *,
    clinical_csv: str | Path | None = None,
    gradcam_dir: str | Path | None = None,
    precision: str = "auto",
) -> pd.DataFrame:
    files, bad = collect_inputs(inputs)
    df, errors, problems = _rows_for(files, read_clinical(clinical_csv))
    errors += [{"file": str(p), "side": "", "status": "error", "error": why} for p, why in bad]
    records: list[dict] = []
    if len(df):
        pred = predict_frame(bundle, df, cache=None, precision=precision)
        verdicts = _ood_verdicts(bundle, df, problems)
        for (_, r), (score, status, reason) in zip(pred.iterrows(), verdicts, strict=True):
            if status != STATUS_OK:
                # No probability-based output at all: a number next to a rejection invites being read anyway.
                records.append(
                    {"file": r["path"], "side": r["side"], "status": status, "error": reason, "ood_score": score}
                )
                continue
            flagged = bool(r["flag_bone_loss"])
            records.append(
                {
                    "file": r["path"],
                    "side": r["side"],
                    "status": STATUS_OK,
                    "error": "",
                    "ood_score": score,
                    "prob_bone_loss": r["prob_bone_loss"],
                    "threshold": bundle.threshold,
                    "flag_bone_loss": int(flagged),
                    "prob_osteoporosis_given_bone_loss": r["prob_osteoporosis_given_bone_loss"],
                    "severity": ("osteoporosis" if r["prob_osteoporosis_given_bone_loss"] >= 0.5 else "osteopenia")
                    if flagged
                    else "",
                    "t_score_estimate": r["t_score_estimate"],
                    "who_category_estimate": who_label(float(r["t_score_estimate"])),
                    "gradcam": "",
                }
            )
        if gradcam_dir is not None:
            _gradcams(bundle, df, records, Path(gradcam_dir))
    out = pd.DataFrame(records + errors)
    for col in OUTPUT_COLUMNS:
        if col not in out.columns:
            out[col] = ""
    _radiograph_outputs(out, bundle.threshold)
    # PACS identifiers, so a hospital can match every row back to its study and image
    ids = {f: dicom_identifiers(f) for f in out["file"].unique()}
    for key in ("study_instance_uid", "sop_instance_uid", "accession_number", "laterality"):
        out[key] = [ids[f][key] for f in out["file"]]
    return out[OUTPUT_COLUMNS]


def _radiograph_outputs(out: pd.DataFrame, threshold: float) -> None:
    """The film's answer beside each knee's: the mean probability of its judged knees, flagged at τ*.

    Bone loss is systemic, so a bilateral film is one screening decision; its knees are listed separately for
    the severity, T-score and Grad-CAM, and a knee judged out of distribution does not vote."""
    ok = out["status"] == "ok"
    prob = pd.to_numeric(out["prob_bone_loss"].where(ok), errors="coerce")
    film = prob.groupby(out["file"]).transform("mean")
    out["radiograph_prob_bone_loss"] = film.where(ok, "")
    out["radiograph_flag_bone_loss"] = (film >= threshold).astype(int).where(ok & film.notna(), "")


def _ood_verdicts(bundle: Bundle, df: pd.DataFrame, problems: list[list[str]]) -> list[tuple[float, str, str]]:
    """(ood_score, status, reason) per row of ``df``: image checks always, feature distance when the bundle has one."""
    entry = bundle.metadata.get("ood")
    if not entry:
        return [(math.nan, STATUS_OOD if pr else STATUS_OK, "; ".join(pr)) for pr in problems]
    ood = OODModel.from_dict(entry)
    # A second pass over the images (predict_frame does not expose features); prediction inputs are few.
    feats = extract_features(bundle.model, KneeDataset(df, bundle.preprocess, None, augment=None))
    return [ood.assess(f, pr) for f, pr in zip(feats, problems, strict=True)]


def _gradcams(bundle: Bundle, df: pd.DataFrame, records: list[dict], out_dir: Path) -> None:
    from strnet.gradcam import grad_cam, save_overlay

    out_dir.mkdir(parents=True, exist_ok=True)
    ds = KneeDataset(df, bundle.preprocess, None, augment=None)
    model = bundle.model.cpu().float()
    mean, std = bundle.preprocess.mean, bundle.preprocess.std
    for i, rec in enumerate(tqdm(records, desc="grad-cam", unit="knee", leave=False, disable=None)):
        if rec["status"] != STATUS_OK:
            continue  # nothing was predicted, so there is nothing to explain
        item = ds[i]
        image = item["image"].unsqueeze(0)
        cam = grad_cam(model, image, item["tabular"].unsqueeze(0), layer=model.gradcam_layer, output="screen")
        gray = np.clip(image[0, 0].numpy() * std + mean, 0, 1)
        name = Path(rec["file"]).stem + (f"_{rec['side']}" if rec["side"] else "") + "_gradcam.png"
        path = out_dir / name
        save_overlay(path, gray, cam)
        rec["gradcam"] = str(path)
