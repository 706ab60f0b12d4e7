"""One-page evaluation report for a clinician collaborator: ``report.md`` plus a self-contained ``report.html``.

Both files are rendered from the same list of blocks so they cannot disagree. The HTML embeds every
figure as base64 PNG so it can be e-mailed as one file; every piece of text that came from data
(title, site names, notes) is escaped, because site and file names are not under our control.
"""

from __future__ import annotations

import base64
import html
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SCREENING_NAMES: dict[str, str] = {
    "auroc": "AUROC",
    "auprc": "AUPRC (average precision)",
    "sensitivity": "Sensitivity",
    "specificity": "Specificity",
    "ppv": "Positive predictive value",
    "npv": "Negative predictive value",
    "accuracy": "Accuracy",
    "balanced_accuracy": "Balanced accuracy",
    "f1": "F1 score",
    "youden_j": "Youden's J",
    "mcc": "Matthews correlation",
    "brier": "Brier score (lower is better)",
}

REGRESSION_NAMES: dict[str, str] = {
    "n": "Knees with a reference T-score",
    "mae": "Mean absolute error (T-score units)",
    "rmse": "Root-mean-square error (T-score units)",
    "pearson_r": "Pearson r",
    "bland_altman_bias": "Bland–Altman bias (estimate − reference)",
    "bland_altman_loa_low": "Bland–Altman lower limit of agreement",
    "bland_altman_loa_high": "Bland–Altman upper limit of agreement",
    "who_n": "Knees with a label and a reference T-score",
    "who_auroc": "AUROC of the T-score estimate for bone loss",
    "who_sensitivity": "Sensitivity of the WHO read (estimate < −1.0)",
    "who_specificity": "Specificity of the WHO read (estimate < −1.0)",
}

THRESHOLD_NAMES: dict[str, str] = {
    "rule": "Selection rule",
    "min_sensitivity": "Required sensitivity",
    "sensitivity": "Sensitivity on validation",
    "specificity": "Specificity on validation",
    "balanced_accuracy": "Balanced accuracy on validation",
    "n_pos": "Validation knees with bone loss",
    "n_neg": "Validation knees without bone loss",
    "chosen_on": "Chosen on",
    "sites": "Sites whose validation knees chose it",
    "n_cases": "Validation knees it was chosen on",
    "excluded": "Sites left out of the choice",
    "grid": "Threshold grid (start, end, step)",
    "statistics_privacy": "Private statistics (privacy.statistics)",
}
COUNT_NAMES = ("n", "n_pos", "n_neg", "tp", "fp", "tn", "fn")  # the confusion table's, never a metric row

FIGURE_CAPTIONS: dict[str, str] = {
    "roc": "ROC curve; the red dot is the frozen operating point τ*.",
    "pr": "Precision–recall curve with the prevalence baseline.",
    "confusion": "Confusion matrix at τ*; row percentages read as specificity (top) and sensitivity (bottom).",
    "histogram": "Predicted probability by reference class; the dashed line is τ*.",
    "calibration": "Calibration: predicted probability against the observed fraction with bone loss.",
    "reliability": "Reliability: predicted probability against the observed fraction with bone loss, before and "
    "after calibration.",
    "tscore": "Estimated against reference T-score over the WHO bands.",
    "bland_altman": "Bland–Altman agreement between estimated and reference T-score.",
}

CAUTION = (
    "Research use only. STR-Net flags knees whose radiograph suggests reduced bone mineral density so that "
    "a DXA referral can be considered; it is not a diagnosis of osteoporosis, does not replace DXA, and has "
    "not been cleared as a medical device. Performance can differ on scanners, populations and protocols "
    "not represented in the cohort above."
)
QUS_CAUTION = (
    "Where the reference T-score comes from calcaneal quantitative ultrasound (QUS) rather than hip/spine DXA, "
    "the WHO categories and T-score agreement are indicative only: QUS and DXA T-scores are not interchangeable."
)


def fmt(value: Any) -> str:
    """Three decimals for reals, integers as-is, 'n/a' for missing or non-finite values."""
    if value is None:
        return "n/a"
    if isinstance(value, np.ndarray) and value.ndim > 0:
        value = value.tolist()
    elif isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.3f}" if math.isfinite(value) else "n/a"
    if isinstance(value, Mapping):
        return ", ".join(f"{k}: {fmt(v)}" for k, v in value.items()) or "n/a"
    if isinstance(value, Sequence) and not isinstance(value, str):
        return ", ".join(fmt(v) for v in value) or "n/a"
    text = str(value)
    return text if text else "n/a"


def fmt_ci(ci: Any) -> str:
    if ci is None:
        return "n/a"
    try:
        lo, hi = ci
    except (TypeError, ValueError):
        return "n/a"
    if fmt(lo) == "n/a" or fmt(hi) == "n/a":
        return "n/a"
    return f"{fmt(lo)} – {fmt(hi)}"


@dataclass
class _Block:
    """A heading, paragraphs, tables or figures; rendered identically to Markdown and HTML."""

    heading: str = ""
    paragraphs: list[str] = field(default_factory=list)
    tables: list[tuple[list[str], list[list[str]]]] = field(default_factory=list)
    figures: list[tuple[str, Path]] = field(default_factory=list)
    bullets: list[str] = field(default_factory=list)


def _prevalence(summary: Mapping[str, Any]) -> float | None:
    if "prevalence" in summary:
        return summary["prevalence"]
    labels = summary.get("labels")
    if isinstance(labels, Mapping):
        known = {k: float(v) for k, v in labels.items() if k in ("normal", "osteopenia", "osteoporosis")}
        total = sum(known.values())
        if total > 0:
            return (known.get("osteopenia", 0.0) + known.get("osteoporosis", 0.0)) / total
    return None


def _readable(key: str) -> str:
    return str(key).replace("_", " ").capitalize()


def _split_rows(
    metrics: Mapping[str, Any], names: Mapping[str, str], cis: Mapping[str, Any]
) -> tuple[list[list[str]], list[list[str]]]:
    """(rows with a 95 % interval, rows without one). A metric whose interval is missing or undefined goes in
    the plain table rather than beside an 'n/a'; counts are left out (they have their own table)."""
    with_ci: list[list[str]] = []
    plain: list[list[str]] = []
    keys = [k for k in names if k in metrics] + [k for k in metrics if k not in names]
    for key in keys:
        value = metrics[key]
        if key in COUNT_NAMES or isinstance(value, Mapping | list | tuple):
            continue
        label, interval = names.get(key, _readable(key)), fmt_ci(cis.get(key))
        if interval != "n/a" and fmt(value) != "n/a":
            with_ci.append([label, fmt(value), interval])
        else:
            plain.append([label, fmt(value)])
    return with_ci, plain


def _count(value: Any) -> str:
    """A count as an integer ('46', never '46.000')."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return fmt(value)
    return str(int(v)) if math.isfinite(v) and v == int(v) else fmt(value)


def _confusion_rows(metrics: Mapping[str, Any]) -> list[list[str]]:
    tp, fp, tn, fn = (metrics.get(k, math.nan) for k in ("tp", "fp", "tn", "fn"))
    return [
        ["Bone loss (reference)", _count(tp), _count(fn), _count(metrics.get("n_pos", tp + fn))],
        ["Normal (reference)", _count(fp), _count(tn), _count(metrics.get("n_neg", fp + tn))],
        ["Total", _count(tp + fp), _count(fn + tn), _count(metrics.get("n", tp + fp + tn + fn))],
    ]


RADIOGRAPH_BOOTSTRAP = "a stratified bootstrap that resamples whole radiographs (the two knees of a film together)"
SUBGROUP_HEADER = [
    "Subgroup",
    "Knees (bone loss / normal)",
    "AUROC (95% CI)",
    "Sensitivity at τ* (95% CI)",
    "Specificity at τ* (95% CI)",
    "Note",
]


def _with_interval(row: Mapping[str, Any], metric: str) -> str:
    from strnet.subgroups import finite, undefined_reason

    value, lo, hi = (row.get(f"{metric}{t}") for t in ("", "_ci_lo", "_ci_hi"))
    if not finite(value):
        return undefined_reason(metric, int(row["n_pos"]), int(row["n_neg"]))
    if finite(lo) and finite(hi):
        return f"{fmt(float(value))} ({fmt(float(lo))} – {fmt(float(hi))})"
    return f"{fmt(float(value))} (interval undefined)"


def subgroup_rows(rows: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    """The report's subgroup table: every subgroup, small ones marked in the note, undefined values named, and
    (federated) a level withheld under k shown as withheld, never as numbers."""
    out = []
    for r in rows:
        note = "; ".join(str(t) for t in (r.get("small"), r.get("withheld")) if t)
        if r.get("n") is None:
            out.append([f"{r['variable']}: {r['level']}", *(["withheld"] * 4), note])
            continue
        out.append(
            [
                f"{r['variable']}: {r['level']}",
                f"{r['n']} ({r['n_pos']} / {r['n_neg']})",
                *(_with_interval(r, m) for m in ("auroc", "sensitivity", "specificity")),
                note,
            ]
        )
    return out


QUALITY_NAMES = {
    "radiograph_n": "Radiographs",
    "radiograph_auroc": "AUROC per radiograph",
    "radiograph_sensitivity": "Sensitivity per radiograph",
    "radiograph_specificity": "Specificity per radiograph",
    "bilateral_n_pairs": "Bilateral films",
    "bilateral_flag_disagreement": "Films whose two knees get different flags",
    "bilateral_mean_abs_dp": "Mean |P(right) − P(left)|",
    "bilateral_spearman": "Spearman right vs left",
    "mirror_mean_abs_dp": "Mean |P(knee) − P(mirrored knee)|",
    "mirror_flag_change": "Flags changed by mirroring",
    "screening_ece": "ECE (calibrated)",
    "screening_ece_raw": "ECE (uncalibrated)",
    "screening_brier": "Brier (calibrated)",
    "screening_brier_raw": "Brier (uncalibrated)",
}


CALIBRATION_KEYS = ("brier", "brier_raw", "ece", "ece_raw")  # screening_* values the calibration section shows
QUALITY_COUNTS = ("radiograph_n", "bilateral_n_pairs")


def _blocks(
    *,
    metrics: Mapping[str, Any],
    cis: Mapping[str, Any],
    threshold_info: Mapping[str, Any],
    figures: Mapping[str, Path],
    severity: Mapping[str, Any] | None,
    regression: Mapping[str, Any] | None,
    dataset_summary: Mapping[str, Any],
    notes: Sequence[str],
    headline: str = "",
    quality: Mapping[str, Any] | None = None,
    subgroups: Sequence[Mapping[str, Any]] | None = None,
    interval_method: str = RADIOGRAPH_BOOTSTRAP,
    subgroup_note: str = "",
) -> list[_Block]:
    blocks = [_Block("Read first", [headline])] if headline else []
    blocks += [
        _Block(
            "What the model is",
            [
                "STR-Net reads a routine knee radiograph (one knee; bilateral films are split into right and left) "
                "together with age, sex and BMI, and outputs (1) the probability of bone loss (osteopenia or "
                "osteoporosis, WHO T-score ≤ −1.0), (2) among flagged knees, the probability of osteoporosis "
                "(T-score ≤ −2.5), and (3) an estimated T-score. A knee is flagged when the bone-loss probability "
                "is at or above the operating threshold τ*."
            ],
        )
    ]

    cohort = _Block("Cohort")
    rows = [[str(k).replace("_", " ").capitalize(), fmt(v)] for k, v in dataset_summary.items()]
    prev = _prevalence(dataset_summary)
    if "prevalence" not in dataset_summary and prev is not None:
        rows.append(["Prevalence of bone loss (labelled knees)", fmt(prev)])
    cohort.tables.append((["Item", "Value"], rows))
    blocks.append(cohort)

    thr = _Block("Operating threshold τ*")
    value = threshold_info.get("value", threshold_info.get("threshold"))
    rule = str(threshold_info.get("rule", ""))
    target = threshold_info.get("min_sensitivity")
    target_txt = f" of at least {fmt(target)}" if target is not None else ""
    if "fallback" in rule:
        how = (
            f"No threshold on the validation split reached the required sensitivity{target_txt}, so τ* was chosen "
            "there by the best balanced accuracy instead"
        )
    else:
        how = (
            f"τ* was chosen on the validation split as the threshold with the best specificity among those reaching "
            f"the required sensitivity{target_txt} (a screening test must not miss bone loss)"
        )
    thr.paragraphs.append(
        f"τ* = {fmt(value)}. {how}, and then frozen: the cohort in this report was evaluated at that fixed "
        "threshold, never re-tuned on it. A knee is flagged when its bone-loss probability is ≥ τ*."
    )
    details = [
        [THRESHOLD_NAMES.get(k, _readable(k)), fmt(v)]
        for k, v in threshold_info.items()
        if k not in ("value", "threshold")
    ]
    if details:
        thr.tables.append((["Detail", "Value"], details))
    blocks.append(thr)

    screen = _Block("Screening performance (bone loss vs normal) at τ*")
    if metrics:
        # ECE and Brier (before and after calibration) are in the calibration section when it is there
        shown = {k: v for k, v in metrics.items() if not (quality and k in CALIBRATION_KEYS)}
        with_ci, plain = _split_rows(shown, SCREENING_NAMES, cis)
        screen.paragraphs.append(
            f"95% confidence intervals are from {interval_method}. Counts of knees at τ* are in the confusion "
            "table below."
        )
        if with_ci:
            screen.tables.append((["Metric", "Value", "95% CI"], with_ci))
        if plain:
            screen.tables.append((["Measure (no interval computed)", "Value"], plain))
        if all(k in metrics for k in ("tp", "fp", "tn", "fn")):
            screen.tables.append((["Knees at τ*", "Flagged (≥ τ*)", "Not flagged", "Total"], _confusion_rows(metrics)))
    else:
        screen.paragraphs.append("Not computable: no labelled knees.")
    blocks.append(screen)

    if quality:
        q = _Block("Per radiograph, left-right agreement, mirror stability and calibration")
        q.tables.append(
            (
                ["Measure", "Value"],
                [
                    [QUALITY_NAMES.get(k, _readable(k)), _count(v) if k in QUALITY_COUNTS else fmt(v)]
                    for k, v in quality.items()
                ],
            )
        )
        q.paragraphs.append(
            "A radiograph's probability is the mean of its knees' (bone loss is systemic). On bilateral films the "
            "two knees should agree; mirror stability is the mean change in probability when a knee is mirrored. "
            "ECE/Brier 'uncalibrated' are the network's own probabilities, the others after Platt calibration."
        )
        blocks.append(q)

    sev = _Block("Severity (osteoporosis vs osteopenia, among knees with bone loss)")
    if severity:
        rows = [["Knees with bone loss", _count(severity["n"])]] if "n" in severity else []
        rows += _split_rows(severity, SCREENING_NAMES, {})[1]
        sev.tables.append((["Measure (no interval computed)", "Value"], rows))
        sev.paragraphs.append(
            "Ranking of the osteoporosis probability among knees with bone loss; no intervals computed."
        )
    else:
        sev.paragraphs.append("Not computable: no labelled knees with bone loss.")
    blocks.append(sev)

    agree = _Block("T-score agreement")
    if regression:
        reg_cis = {"pearson_r": regression.get("pearson_ci")}
        counts = [[REGRESSION_NAMES[k], _count(regression[k])] for k in ("n", "who_n") if k in regression]
        reg = {k: v for k, v in regression.items() if k not in ("pearson_ci", "n", "who_n")}
        with_ci, plain = _split_rows(reg, REGRESSION_NAMES, reg_cis)
        if with_ci:
            agree.tables.append((["Measure", "Value", "95% CI"], with_ci))
        agree.tables.append((["Measure (no interval computed)", "Value"], counts + plain))
        agree.paragraphs.append(
            "95% of differences between estimated and reference T-score are expected within the limits of agreement. "
            "The WHO read calls bone loss when the estimate is below −1.0; unlike the screening probability it "
            "also reads age, sex and BMI, so it answers partly from risk factors rather than the image."
        )
    else:
        agree.paragraphs.append("Not computable: fewer than two knees with a reference T-score.")
    blocks.append(agree)

    if subgroups:
        sub = _Block("Screening by subgroup (sex, age, BMI, source) at τ*")
        sub.paragraphs.append(
            "Every subgroup of the labelled knees, at the same frozen τ*. Small subgroups (fewer than 30 knees or "
            "fewer than 5 of a class) are marked, not hidden: their intervals are wide or undefined, and a metric "
            "that needs a class the subgroup lacks is shown as undefined. Age bands in years, BMI bands in kg/m²; "
            "'unknown' where the manifest has no value."
        )
        if subgroup_note:
            sub.paragraphs.append(subgroup_note[:1].upper() + subgroup_note[1:] + ".")
        sub.tables.append((SUBGROUP_HEADER, subgroup_rows(subgroups)))
        blocks.append(sub)

    if figures:
        figs = _Block("Figures")
        figs.figures = [(FIGURE_CAPTIONS.get(k, k.replace("_", " ")), Path(p)) for k, p in figures.items()]
        blocks.append(figs)

    caution = _Block("Caution", [CAUTION])
    if any("qus" in n.lower() or "mendeley" in n.lower() for n in notes):
        caution.paragraphs.append(QUS_CAUTION)
    caution.bullets = [str(n) for n in notes]
    blocks.append(caution)
    return blocks


def _md(text: str) -> str:
    """Markdown viewers pass raw HTML through, so data-derived text is escaped there too."""
    return html.escape(text, quote=False).replace("*", "\\*")


def _md_cell(text: str) -> str:
    return _md(text).replace("|", "\\|").replace("\n", " ")


def _render_md(title: str, blocks: list[_Block], out_dir: Path) -> str:
    lines = [f"# {_md(title)}", ""]
    for b in blocks:
        lines += [f"## {_md(b.heading)}", ""]
        for p in b.paragraphs:
            lines += [_md(p), ""]
        for header, rows in b.tables:
            lines.append("| " + " | ".join(_md_cell(h) for h in header) + " |")
            lines.append("|" + "---|" * len(header))
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
            lines.append("")
        for caption, path in b.figures:
            try:
                ref = Path(os.path.relpath(path, out_dir)).as_posix()
            except ValueError:  # different drive on Windows
                ref = path.as_posix()
            lines += [f"![{_md(caption)}]({ref})", "", f"*{_md(caption)}*", ""]
        lines += [f"- {_md(item)}" for item in b.bullets]
        if b.bullets:
            lines.append("")
    return "\n".join(lines)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:960px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{border-bottom:2px solid #ccc;padding-bottom:.2em}h2{margin-top:1.6em;color:#1f4e79}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.3em .7em;text-align:left}
th{background:#f1f4f8}td:nth-child(n+2){font-variant-numeric:tabular-nums}
figure{display:inline-block;width:46%;margin:.5em 1%;vertical-align:top}figure img{width:100%}
figcaption{font-size:.9em;color:#555}.caution{background:#fff6e5;border-left:4px solid #e69a00;padding:.5em 1em}
"""


def _render_html(title: str, blocks: list[_Block], missing: list[str]) -> str:
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
    ]
    for b in blocks:
        cls = ' class="caution"' if b.heading == "Caution" else ""
        parts.append(f"<section{cls}><h2>{e(b.heading)}</h2>")
        parts += [f"<p>{e(p)}</p>" for p in b.paragraphs]
        for header, rows in b.tables:
            parts.append("<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr></thead><tbody>")
            parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows]
            parts.append("</tbody></table>")
        for caption, path in b.figures:
            try:
                data = base64.b64encode(path.read_bytes()).decode("ascii")
            except OSError as exc:
                missing.append(f"{path}: {exc.strerror or exc}")
                parts.append(f"<p><em>{e(caption)} — figure not available ({e(str(path))}).</em></p>")
                continue
            parts.append(
                f'<figure><img alt="{e(caption)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{e(caption)}</figcaption></figure>"
            )
        if b.bullets:
            parts.append("<ul>" + "".join(f"<li>{e(n)}</li>" for n in b.bullets) + "</ul>")
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(
    out_dir: Path,
    *,
    title: str,
    metrics: dict,
    cis: dict,
    threshold_info: dict,
    figures: dict[str, Path],
    severity: dict | None,
    regression: dict | None,
    dataset_summary: dict,
    notes: list[str],
    headline: str = "",
    quality: dict | None = None,
    subgroups: list[dict] | None = None,
    interval_method: str = RADIOGRAPH_BOOTSTRAP,
    subgroup_note: str = "",
) -> Path:
    """Write ``report.md`` and ``report.html`` into ``out_dir``; returns the HTML path.

    A figure file that cannot be read is listed in the report's notes instead of failing the whole
    evaluation, because the metrics are still worth reading.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    blocks = _blocks(
        metrics=metrics or {},
        cis=cis or {},
        threshold_info=threshold_info or {},
        figures=figures or {},
        severity=severity,
        regression=regression,
        dataset_summary=dataset_summary or {},
        notes=notes or [],
        headline=headline,
        quality=quality or {},
        subgroups=subgroups or [],
        interval_method=interval_method,
        subgroup_note=subgroup_note,
    )
    missing: list[str] = []
    page = _render_html(title, blocks, missing)
    if missing:
        blocks[-1].bullets += [f"Figure not available: {m}" for m in missing]
        page = _render_html(title, blocks, [])
    (out / "report.md").write_text(_render_md(title, blocks, out), encoding="utf-8")
    html_path = out / "report.html"
    html_path.write_text(page, encoding="utf-8")
    return html_path
