"""Subgroup screening metrics against scikit-learn, small subgroups marked, the federated table from released
per-level histograms against the per-knee one (levels under k withheld and shown so), and a report whose metric
tables hold metrics with intervals only (counts in the confusion table, no 'n/a' interval)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from server.subgroups import federated_subgroups
from strnet import metrics as M
from strnet.errors import SiteError
from strnet.evaluation import frame_metrics, report_sections
from strnet.protocol import MessageKind, decode_splits, encode_splits
from strnet.released import StatisticsPrivacy, protect, restore_evaluation
from strnet.report import QUALITY_NAMES, subgroup_rows, write_report
from strnet.subgroups import VARIABLES, subgroup_metrics
from strnet.sufficient import EvaluationCounts

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


def auroc_tolerance(y: np.ndarray, p: np.ndarray, n_bins: int) -> float:
    """How far a histogram AUROC can be from the per-knee one: a bone-loss/normal pair in different bins is
    ordered the same by both, a pair sharing a bin counts 1/2 there and 0, 1/2 or 1 per knee — so at most half
    the share of pairs that share a bin."""
    h = M.score_histogram(y, p, n_bins).astype(float)
    return 0.5 * float((h[0] * h[1]).sum()) / max(float(h[0].sum() * h[1].sum()), 1.0) + 1e-12


def level_mask(pred: pd.DataFrame, variable: str, level: str) -> np.ndarray:
    column, level_of = VARIABLES[variable]
    return (pred[column].map(level_of) == level).to_numpy()


def test_federated_subgroups_from_released_histograms_match_per_knee_and_name_what_was_withheld(
    pred: pd.DataFrame,
) -> None:
    """Two sites (the fixture's sources) release their per-level histograms under k = 12: the pooled rows equal
    subgroup_metrics on the concatenated knees (counts exactly, AUROC within the binning bound); a level some
    site withheld is pooled without it and names it; one withheld wherever it has knees has no numbers."""
    tau, bins, k = 0.5, 100, 12
    policy = StatisticsPrivacy(enabled=True, min_cases=k)
    sites = {str(s): part.assign(site=str(s)) for s, part in pred.groupby("source")}
    per_site, withheld = {}, {}
    for site, part in sites.items():
        counts = frame_metrics(part, tau, n_bins=bins, n_boot=0, seed=0)[1]
        release = protect(MessageKind.FROZEN, encode_splits({"test": counts}), policy)  # what leaves the site
        empty = EvaluationCounts.empty(bins).arrays()
        restored = restore_evaluation(release.arrays, release.withheld, threshold=tau, empty=empty)
        per_site[site] = decode_splits(site, restored, n_bins=bins)["test"]
        withheld[site] = set(release.withheld)
    rows = federated_subgroups(per_site, withheld, tau, min_cases=k, n_boot=100, seed=0)
    central = {(r["variable"], r["level"]): r for r in subgroup_metrics(pred, tau, n_boot=0, seed=0)}
    assert [(r["variable"], r["level"]) for r in rows] == list(central)  # same levels, same order
    y_all = (pred["label_cls"] != "normal").to_numpy(int)
    p_all = pred["prob_bone_loss"].to_numpy()
    cases = {"exact": 0, "partial": 0, "withheld": 0}
    for row in rows:
        key = (row["variable"], row["level"])
        assert set(row) == set(central[key]), key  # the same keys as the per-knee table
        mask = level_mask(pred, *key)
        n_at = {s: int(mask[(pred["source"] == s).to_numpy()].sum()) for s in sites}
        held = sorted(s for s, n in n_at.items() if 0 < n < k)
        if row["variable"] == "source":
            held = []  # a whole site's split is well over k here
        if held and len(held) == sum(n > 0 for n in n_at.values()):
            cases["withheld"] += 1
            assert row["n"] is None and all(math.isnan(row[m]) for m in ("auroc", "sensitivity", "specificity"))
            assert row["withheld"] == f"withheld by {', '.join(held)} (fewer than k={k} knees)"
            continue
        keep = mask & ~pred["source"].isin(held).to_numpy()
        y, p = y_all[keep], p_all[keep]
        expected = M.classification_metrics(y, p, tau)
        assert (row["n"], row["n_pos"], row["n_neg"]) == (len(y), int(y.sum()), int((1 - y).sum())), key
        for m in ("sensitivity", "specificity"):
            assert row[m] == pytest.approx(expected[m], nan_ok=True), key
        if 0 < y.sum() < len(y):
            assert abs(row["auroc"] - roc_auc_score(y, p)) <= auroc_tolerance(y, p, bins), key
            assert row["auroc_ci_lo"] <= row["auroc_ci_hi"]
        else:
            assert math.isnan(row["auroc"]), key
        if held:
            cases["partial"] += 1
            assert row["withheld"] == f"without {', '.join(held)}: withheld there (fewer than k={k} knees)"
        else:
            cases["exact"] += 1
            assert row["withheld"] == "" and row["small"] == central[key]["small"], key
    assert all(cases.values()), cases  # each kind of row was exercised
    # the report shows a withheld level as withheld, never as a count
    shown = {r[0]: r for r in subgroup_rows(rows)}
    gone = next(r for r in rows if r["n"] is None)
    assert shown[f"{gone['variable']}: {gone['level']}"][1:5] == ["withheld"] * 4


def test_a_reply_with_malformed_subgroup_histograms_is_refused_naming_the_site(pred: pd.DataFrame) -> None:
    arrays = encode_splits({"test": frame_metrics(pred, 0.5, n_bins=100, n_boot=0, seed=0)[1]})
    arrays["test.subgroup_sex_female"] = arrays["test.subgroup_sex_female"] + 1  # 100 more knees than the split
    with pytest.raises(SiteError, match=r"site 'hospital': .*subgroup histograms of sex count more knees than"):
        decode_splits("hospital", arrays, n_bins=100)
    del arrays["test.subgroup_bmi_ge30"]
    with pytest.raises(SiteError, match=r"site 'hospital': malformed statistics: missing \['subgroup_bmi_ge30'\]"):
        decode_splits("hospital", arrays, n_bins=100)


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
