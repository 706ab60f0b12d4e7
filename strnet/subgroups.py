"""Screening metrics by subgroup (sex, age band, BMI band, source) at the frozen τ*, with 95 % intervals.

Why: a pooled AUROC can hide a model that works for one group and not another, and a clinician deciding
whether to trust a flag for *this* patient needs to see it. Every subgroup is shown, small ones marked rather
than hidden (fewer than :data:`SMALL_N` knees or fewer than :data:`SMALL_CLASS` of a class: wide or undefined
intervals), so the table never suggests that a group was checked when it was not.

Computed from per-knee predictions (a centralized run's evaluations, ``strnet evaluate`` at a site) with the
metric and bootstrap functions of :mod:`strnet.metrics`; the interval resamples whole radiographs, like the
pooled one. A federation's server holds no per-knee prediction: each site releases, per split it evaluates, a
per-class score histogram for every level of :data:`LEVELS` (fixed vocabularies, so no array's shape depends
on the data), and ``server/subgroups.py`` builds the same table from their sums (source: one row per site).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from strnet import metrics as M

SMALL_N = 30
SMALL_CLASS = 5
METRICS = ("auroc", "sensitivity", "specificity")
UNKNOWN = "unknown"
AGE_BANDS = ((50.0, "< 50"), (65.0, "50–64"), (75.0, "65–74"), (math.inf, "≥ 75"))
BMI_BANDS = ((18.5, "< 18.5"), (25.0, "18.5–24.9"), (30.0, "25–29.9"), (math.inf, "≥ 30"))
CENTRALIZED_NOTE = (
    "from per-knee predictions: AUROC exact; 95% intervals from a stratified bootstrap over whole radiographs"
)


def _band(bands: tuple[tuple[float, str], ...]) -> Callable[[Any], str]:
    def label(value: Any) -> str:
        v = pd.to_numeric(value, errors="coerce")
        if pd.isna(v):
            return UNKNOWN
        return next(name for upper, name in bands if v < upper)

    return label


def _sex(value: Any) -> str:
    text = str(value).strip().upper()[:1] if isinstance(value, str) else ""
    return {"F": "female", "M": "male"}.get(text, UNKNOWN)


VARIABLES: dict[str, tuple[str, Callable[[Any], str]]] = {
    "sex": ("sex", _sex),
    "age band": ("age", _band(AGE_BANDS)),
    "BMI band": ("bmi", _band(BMI_BANDS)),
    "source": ("source", lambda v: str(v) if isinstance(v, str) and v else UNKNOWN),
}


# The levels a federated site histograms (``source`` is not among them: a site's whole split is its source).
# Fixed, and the same labels the per-knee table uses, so both modes' rows line up level by level.
LEVELS: dict[str, tuple[str, ...]] = {
    "sex": ("female", "male", UNKNOWN),
    "age band": (*(name for _, name in AGE_BANDS), UNKNOWN),
    "BMI band": (*(name for _, name in BMI_BANDS), UNKNOWN),
}
SUBGROUP_LEVELS: tuple[tuple[str, str], ...] = tuple((v, level) for v, levels in LEVELS.items() for level in levels)
_VARIABLE_SLUGS = {"sex": "sex", "age band": "age", "BMI band": "bmi"}


def level_slug(variable: str, level: str) -> str:
    """An ASCII name for a level (``sex_female``, ``age_50_to_64``, ``bmi_ge30``): wire arrays and statistic ids."""
    text = level.replace("≥", "ge").replace("<", "lt").replace("–", "_to_").replace(".", "_").replace(" ", "")
    return f"{_VARIABLE_SLUGS[variable]}_{text.lower()}"


def level_codes(frame: pd.DataFrame) -> np.ndarray:
    """(rows, len(LEVELS)) int64: each row's level of every :data:`LEVELS` variable, as an index into its
    vocabulary (a missing column reads as unknown). What a site histograms; the rows themselves stay there."""
    out = np.empty((len(frame), len(LEVELS)), np.int64)
    for j, (variable, vocabulary) in enumerate(LEVELS.items()):
        column, level_of = VARIABLES[variable]
        values = frame[column] if column in frame else pd.Series([None] * len(frame), index=frame.index)
        out[:, j] = [vocabulary.index(level_of(v)) for v in values]
    return out


def subgroup_metrics(pred: pd.DataFrame, threshold: float, *, n_boot: int, seed: int) -> list[dict[str, Any]]:
    """One row per (variable, level) of the labelled knees of a :func:`strnet.evaluation.predict_frame` table:
    knees, bone-loss and normal knees, AUROC/sensitivity/specificity at ``threshold`` with their 95 % intervals
    (NaN where undefined: one class only), ``small`` with the reason, and ``withheld`` (always '' here)."""
    labelled = pred[pred["label_cls"].astype(str) != ""]
    if labelled.empty:
        return []
    y_all = (labelled["label_cls"].astype(str) != "normal").to_numpy(int)
    p_all = labelled["prob_bone_loss"].to_numpy(float)
    film_all = pd.factorize(labelled["path"].astype(str).str.lower())[0]
    rows = []
    for variable, (column, level_of) in VARIABLES.items():
        values = labelled[column] if column in labelled else pd.Series([None] * len(labelled), index=labelled.index)
        levels = values.map(level_of).to_numpy(object)
        for level in sorted(set(levels), key=lambda v: (v == UNKNOWN, _order(variable, v))):
            keep = levels == level
            y, p = y_all[keep], p_all[keep]
            m = M.classification_metrics(y, p, threshold)
            row: dict[str, Any] = {"variable": variable, "level": level, "n": int(m["n"])}
            row |= {"n_pos": int(m["n_pos"]), "n_neg": int(m["n_neg"])}
            if n_boot > 0:
                cis = M.bootstrap_ci(y, p, threshold, metric_names=METRICS, n_boot=n_boot, seed=seed,
                                     groups=film_all[keep])  # fmt: skip
            else:
                cis = {k: (math.nan, math.nan) for k in METRICS}
            for k in METRICS:
                row |= {k: float(m[k]), f"{k}_ci_lo": float(cis[k][0]), f"{k}_ci_hi": float(cis[k][1])}
            row["small"] = small_reason(row["n"], row["n_pos"], row["n_neg"])
            row["withheld"] = ""  # a federated row names the sites that withheld it (server/subgroups.py)
            rows.append(row)
    return rows


def _order(variable: str, level: str) -> tuple[int, str]:
    bands = {"age band": AGE_BANDS, "BMI band": BMI_BANDS}.get(variable)
    if bands is None:
        return (0, level)
    names = [name for _, name in bands]
    return (names.index(level) if level in names else len(names), level)


def small_reason(n: int, n_pos: int, n_neg: int) -> str:
    """Why a subgroup's numbers are fragile ('' when it is not small)."""
    reasons = []
    if n < SMALL_N:
        reasons.append(f"n < {SMALL_N}")
    if n_pos < SMALL_CLASS:
        reasons.append(f"{n_pos} bone-loss knee(s)")
    if n_neg < SMALL_CLASS:
        reasons.append(f"{n_neg} normal knee(s)")
    return "small: " + ", ".join(reasons) if reasons else ""


def undefined_reason(metric: str, n_pos: int, n_neg: int) -> str:
    """Why a subgroup metric is undefined, in words for the report."""
    if metric == "sensitivity" or (metric == "auroc" and n_pos == 0):
        return "undefined (no bone-loss knees)" if n_pos == 0 else "undefined"
    if metric == "specificity" or (metric == "auroc" and n_neg == 0):
        return "undefined (no normal knees)" if n_neg == 0 else "undefined"
    return "undefined"


def as_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["variable", "level", "n", "n_pos", "n_neg"] + [
        c for k in METRICS for c in (k, f"{k}_ci_lo", f"{k}_ci_hi")
    ] + ["small", "withheld"])  # fmt: skip


def finite(value: Any) -> bool:
    return isinstance(value, int | float | np.floating) and math.isfinite(float(value))
