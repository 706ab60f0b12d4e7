"""Figures decode as PNGs (degenerate inputs included), τ* sits where sklearn says, the report is escaped."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
from sklearn.metrics import confusion_matrix, roc_auc_score

from strnet import metrics as M
from strnet import plots
from strnet.report import fmt, write_report


@pytest.fixture(scope="module")
def scores() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(40, int), np.ones(30, int)]
    p = np.clip(0.35 + 0.3 * y + rng.normal(0, 0.18, y.size), 0, 1)
    return y, p


def _decodes(path: Path) -> tuple[int, int]:
    assert path.is_file() and path.stat().st_size > 0, path
    img = cv2.imread(str(path))
    assert img is not None, f"{path} is not a decodable image"
    assert img.shape[0] > 50 and img.shape[1] > 50
    return img.shape[:2]


def test_operating_point_matches_sklearn_confusion_matrix(scores: tuple[np.ndarray, np.ndarray]) -> None:
    y, p = scores
    for threshold in (0.2, float(np.median(p)), p[5], 0.9):
        tn, fp, fn, tp = confusion_matrix(y, (p >= threshold).astype(int), labels=[0, 1]).ravel()
        fpr, tpr = plots.operating_point(y, p, threshold)
        assert fpr == pytest.approx(fp / (fp + tn))
        assert tpr == pytest.approx(tp / (tp + fn))
    # a score exactly at τ* is flagged (prob >= τ*)
    fpr, tpr = plots.operating_point([0, 1], [0.5, 0.5], 0.5)
    assert (fpr, tpr) == (1.0, 1.0)
    fpr, tpr = plots.operating_point([1, 1], [0.2, 0.7], 0.5)
    assert np.isnan(fpr) and tpr == 0.5


def test_all_figures_decode(tmp_path: Path, scores: tuple[np.ndarray, np.ndarray]) -> None:
    y, p = scores
    rng = np.random.default_rng(1)
    t_true = rng.uniform(-4, 1, 50)
    t_pred = t_true + rng.normal(0.2, 0.5, 50)
    paths = [
        plots.roc_curve_plot(y, p, 0.5, tmp_path / "roc.png"),
        plots.pr_curve_plot(y, p, 0.5, tmp_path / "pr.png"),
        plots.confusion_matrix_plot(y, p, 0.5, tmp_path / "cm.png"),
        plots.score_histogram_plot(y, p, 0.5, tmp_path / "hist.png"),
        plots.reliability_plot({"raw": M.score_histogram(y, p, 100)}, tmp_path / "cal.png", n_groups=5),
        plots.tscore_scatter_plot(t_true, t_pred, tmp_path / "sub" / "ts.png"),
        plots.bland_altman_plot(t_true, t_pred, tmp_path / "ba.png"),
    ]
    for path in paths:
        _decodes(path)
    assert {p.name for p in tmp_path.rglob("*.png")} == {p.name for p in paths}


def test_roc_legend_carries_sklearn_auroc(tmp_path: Path, scores: tuple[np.ndarray, np.ndarray], monkeypatch) -> None:
    """The label text drawn on the figure carries sklearn's AUROC and the operating point's sens/spec."""
    y, p = scores
    drawn: list[str] = []
    original = plots._save

    def spy(out, title, draw):
        def wrapped(ax):
            draw(ax)
            drawn.extend(line.get_label() for line in ax.get_lines())

        return original(out, title, wrapped)

    monkeypatch.setattr(plots, "_save", spy)
    plots.roc_curve_plot(y, p, 0.5, tmp_path / "roc.png")
    auc = roc_auc_score(y, p)
    fpr, tpr = plots.operating_point(y, p, 0.5)
    assert any(f"AUROC = {auc:.3f}" in s for s in drawn)
    assert any(f"sensitivity {tpr:.1%}, specificity {1 - fpr:.1%}" in s for s in drawn)


@pytest.mark.parametrize(
    ("y", "p"),
    [
        (np.array([], int), np.array([], float)),
        (np.ones(6, int), np.linspace(0.1, 0.9, 6)),
        (np.zeros(6, int), np.linspace(0.1, 0.9, 6)),
        (np.array([0, 1, 0, 1]), np.array([0.1, np.nan, 0.3, 0.9])),
    ],
    ids=["empty", "all-positive", "all-negative", "nan-score"],
)
def test_degenerate_classification_inputs_still_write_figures(tmp_path: Path, y: np.ndarray, p: np.ndarray) -> None:
    for fn in (plots.roc_curve_plot, plots.pr_curve_plot, plots.confusion_matrix_plot, plots.score_histogram_plot):
        _decodes(fn(y, p, 0.5, tmp_path / f"{fn.__name__}.png"))
    _decodes(plots.reliability_plot({"raw": np.zeros((2, 100), np.int64)}, tmp_path / "cal.png"))


def test_degenerate_regression_inputs_still_write_figures(tmp_path: Path) -> None:
    for a, b in (([], []), ([-1.0], [-1.2]), ([np.nan, -2.0], [-1.0, np.nan]), ([-1.0, -1.0, -1.0], [-2, -2, -2])):
        _decodes(plots.tscore_scatter_plot(a, b, tmp_path / "ts.png"))
        _decodes(plots.bland_altman_plot(a, b, tmp_path / "ba.png"))


def test_placeholder_differs_from_real_figure(tmp_path: Path, scores: tuple[np.ndarray, np.ndarray]) -> None:
    """A degenerate ROC is a text placeholder (almost all white), not an empty-looking axis."""
    y, p = scores
    real = cv2.imread(str(plots.roc_curve_plot(y, p, 0.5, tmp_path / "real.png")), cv2.IMREAD_GRAYSCALE)
    stub = cv2.imread(str(plots.roc_curve_plot(np.ones(4, int), p[:4], 0.5, tmp_path / "stub.png")), 0)
    assert (stub < 128).mean() < (real < 128).mean()


def _report(tmp_path: Path, figures: dict[str, Path], **kw) -> Path:
    args = dict(
        title='<script>alert("x")</script> cohort & co',
        metrics={"auroc": 0.81234, "sensitivity": 0.9, "specificity": float("nan"), "brier": np.float64(0.1875)},
        cis={"auroc": (0.75, 0.86789), "sensitivity": (float("nan"), 0.95)},
        threshold_info={"value": 0.3456, "min_sensitivity": 0.9, "rule": "sensitivity-constrained"},
        figures=figures,
        severity={"n": 12, "auroc": 0.6667},
        regression={"n": 20, "mae": 0.71111, "rmse": 0.9, "pearson_r": 0.5556, "pearson_ci": (0.1, 0.8)},
        dataset_summary={
            "cases": 70,
            "sites": "<b>site A</b>",
            "labels": {"normal": 40, "osteopenia": 20, "osteoporosis": 10},
        },
        notes=["Mendeley T-scores are calcaneal QUS, not DXA."],
    )
    args.update(kw)
    return write_report(tmp_path / "report", **args)


def test_report_embeds_figures_formats_numbers_and_escapes(tmp_path: Path, scores) -> None:
    y, p = scores
    figs = {
        "roc": plots.roc_curve_plot(y, p, 0.5, tmp_path / "report" / "figures" / "roc.png"),
        "confusion": plots.confusion_matrix_plot(y, p, 0.5, tmp_path / "report" / "figures" / "cm.png"),
    }
    html_path = _report(tmp_path, figs)
    md_path = html_path.with_name("report.md")
    assert html_path.name == "report.html" and md_path.is_file()
    page = html_path.read_text(encoding="utf-8")
    md = md_path.read_text(encoding="utf-8")

    for text in (page, md):
        assert "<script>" not in text
        assert "<b>site A</b>" not in text
        for value in ("0.812", "0.750 – 0.868", "0.900", "0.188", "0.346", "0.711", "0.556", "0.100 – 0.800"):
            assert value in text, value
        assert "n/a" in text  # NaN specificity / half-NaN CI
        assert "0.429" in text  # prevalence (20 + 10) / 70 derived from the label counts
        assert "QUS" in text and "not a diagnosis" in text
        assert "best specificity among those reaching the required sensitivity of at least 0.900" in text
    assert "&lt;script&gt;" in page

    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(embedded) == len(figs)
    for data, path in zip(embedded, figs.values(), strict=True):
        assert base64.b64decode(data) == path.read_bytes()
    assert "figures/roc.png" in md and "figures/cm.png" in md


def test_report_survives_missing_figure_and_empty_sections(tmp_path: Path) -> None:
    fallback = {"value": 0.5, "rule": "fallback-balanced-accuracy", "min_sensitivity": 0.9}
    html_path = _report(
        tmp_path,
        {"roc": tmp_path / "nope.png"},
        metrics={},
        cis={},
        severity=None,
        regression=None,
        threshold_info=fallback,
    )
    page = html_path.read_text(encoding="utf-8")
    assert "No threshold on the validation split reached the required sensitivity of at least 0.900" in page
    assert "nope.png" in page and "Figure not available" in page
    assert page.count("Not computable") == 3


def test_fmt() -> None:
    assert fmt(0.12345) == "0.123"
    assert fmt(np.float32(np.nan)) == "n/a"
    assert fmt(None) == "n/a"
    assert fmt(float("inf")) == "n/a"
    assert fmt(np.int64(7)) == "7"
    assert fmt((0.1, 0.2)) == "0.100, 0.200"
