"""Subgroup screening metrics against scikit-learn, small subgroups marked, and a report whose metric tables hold
metrics with intervals only (counts in the confusion table, no 'n/a' interval)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from strnet.evaluation import frame_metrics, report_sections
from strnet.report import QUALITY_NAMES, write_report
from strnet.subgroups import subgroup_metrics

TAU = 0.5
RAW_KEYS = {"n", "n_pos", "n_neg", "tp", "fp", "tn", "fn", "threshold", "brier_raw", "ece", "ece_raw", "n_cases"}


@pytest.fixture(scope="module")
def pred() -> pd.DataFrame:
    """A prediction table as predict_frame writes it: 160 knees on 120 films, with sex, age, BMI and source; the
    men are all normal (AUROC undefined there), ages have gaps ('unknown')."""
    rng = np.random.default_rng(3)
    n = 160
    film = np.r_[np.arange(80), np.repeat(np.arange(80, 120), 2)]
    sex = np.where(film % 7 == 0, "M", "F")
    label = np.where(sex == "M", "normal", rng.choice(["normal", "osteopenia", "osteoporosis"], n))
    y = (label != "normal").astype(float)
    prob = np.clip(0.3 + 0.35 * y + rng.normal(0, 0.2, n), 0.001, 0.999)
    age = rng.uniform(40, 90, n)
    age[::11] = np.nan
    return pd.DataFrame(
        {
            "path": [f"/x/film{f}.png" for f in film],
            "side": np.where(np.r_[np.zeros(80), np.tile([0, 1], 40)] == 1, "L", "R"),
            "site": "a",
            "source": np.where(film < 100, "kaggle", "mendeley"),
            "label_cls": label,
            "sex": sex,
            "age": age,
            "bmi": rng.uniform(17, 38, n),
            "t_score": np.where(y == 1, -2.0, 0.0) + rng.normal(0, 0.5, n),
            "prob_bone_loss": prob,
            "prob_bone_loss_uncalibrated": prob,
            "prob_bone_loss_mirror": prob,
            "prob_osteoporosis_given_bone_loss": rng.uniform(0, 1, n),
            "t_score_estimate": rng.normal(-1, 1, n),
        }
    )


def test_subgroup_metrics_match_sklearn_and_mark_small_groups(pred: pd.DataFrame) -> None:
    rows = subgroup_metrics(pred, TAU, n_boot=200, seed=0)
    by = {(r["variable"], r["level"]): r for r in rows}
    assert {v for v, _ in by} == {"sex", "age band", "BMI band", "source"}
    # every labelled knee is in exactly one level of each variable
    for variable in ("sex", "age band", "BMI band", "source"):
        assert sum(r["n"] for r in rows if r["variable"] == variable) == len(pred)
    y = (pred["label_cls"] != "normal").to_numpy(int)
    p = pred["prob_bone_loss"].to_numpy()
    female = (pred["sex"] == "F").to_numpy()
    f = by[("sex", "female")]
    assert f["auroc"] == pytest.approx(roc_auc_score(y[female], p[female]))
    assert f["sensitivity"] == pytest.approx(((p >= TAU) & (y == 1) & female).sum() / (y[female] == 1).sum())
    assert f["auroc_ci_lo"] < f["auroc"] < f["auroc_ci_hi"]
    # the men are all normal: AUROC and sensitivity undefined, specificity defined; marked small, not dropped
    m = by[("sex", "male")]
    assert m["n_pos"] == 0 and math.isnan(m["auroc"]) and math.isnan(m["sensitivity"])
    assert 0 <= m["specificity"] <= 1 and "0 bone-loss knee(s)" in m["small"]
    unknown_age = by[("age band", "unknown")]
    assert unknown_age["n"] == int(pred["age"].isna().sum()) and "n < 30" in unknown_age["small"]
    old = (pred["age"] >= 75).to_numpy()
    assert by[("age band", "≥ 75")]["n"] == int(old.sum())
    assert [lvl for v, lvl in by if v == "age band"] == ["< 50", "50–64", "65–74", "≥ 75", "unknown"]
    # a large, two-class subgroup is not marked
    assert by[("source", "kaggle")]["small"] == ""


def _tables(md: str) -> list[tuple[list[str], list[list[str]]]]:
    tables, lines = [], md.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("| ") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            header = [c.strip() for c in line.strip("|").split(" | ")]
            rows = []
            for row in lines[i + 2 :]:
                if not row.startswith("| "):
                    break
                rows.append([c.strip() for c in re.split(r"(?<!\\)\|", row.strip().strip("|"))])
            tables.append((header, rows))
    return tables


def test_report_metric_tables_hold_intervals_counts_in_the_confusion_table(pred: pd.DataFrame, tmp_path: Path) -> None:
    metrics, _ = frame_metrics(pred, TAU, n_bins=100, n_boot=200, seed=0)
    sections = report_sections(metrics)
    html = write_report(
        tmp_path,
        title="subgroups",
        metrics=sections["screening"],
        cis=sections["cis"],
        threshold_info={
            "value": TAU,
            "rule": "sensitivity-constrained",
            "min_sensitivity": 0.86,
            "n_pos": 30,
            "n_neg": 20,
            "n_cases": 50,
            "sites": ["a"],
        },
        figures={},
        severity=sections["severity"],
        regression=sections["t_score"],
        dataset_summary={"cases": len(pred)},
        notes=[],
        quality={k: metrics[k] for k in QUALITY_NAMES if k in metrics},
        subgroups=subgroup_metrics(pred, TAU, n_boot=200, seed=0),
    )
    md = html.with_name("report.md").read_text(encoding="utf-8")
    tables = _tables(md)
    metric_tables = [t for t in tables if "95% CI" in t[0]]
    assert len(metric_tables) >= 2  # screening, T-score agreement
    for _, rows in metric_tables:
        for row in rows:
            assert "n/a" not in row[2], row
            assert row[0] not in RAW_KEYS, row
    # no raw key is a row label anywhere in the report
    assert not {row[0] for _, rows in tables for row in rows} & RAW_KEYS
    confusion = next(rows for header, rows in tables if header[0] == "Knees at τ\\*")
    tp, fp, tn, fn = (int(metrics[f"screening_{k}"]) for k in ("tp", "fp", "tn", "fn"))
    assert confusion[0][1:] == [str(tp), str(fn), str(tp + fn)]
    assert confusion[1][1:] == [str(fp), str(tn), str(fp + tn)]
    assert confusion[2][1:] == [str(tp + fp), str(fn + tn), str(len(pred))]
    _, rows = next(t for t in tables if t[0][0] == "Subgroup")
    cells = {row[0]: row for row in rows}
    assert "undefined (no bone-loss knees)" in cells["sex: male"][2]
    assert cells["sex: male"][5].startswith("small")
    assert re.fullmatch(r"0\.\d{3} \(0\.\d{3} – [01]\.\d{3}\)", cells["sex: female"][2])
    assert "Screening by subgroup" in html.read_text(encoding="utf-8")
