"""The same knee in two files: copies that no file hash links, found on the knee crops the model reads.

The file audit (:mod:`strnet.data.audit`) compares whole files. Public knee sets also reuse each other's
radiographs after cropping one knee out of a bilateral film, re-framing or re-encoding it, so the copy is a
different file with a different hash. On the developer share, 68 knees of the 538 rows the file clean leaves
sit in more than one row (50 across the two sets, 18 inside the 224 set), 29 of them under two labels; 45 of
the 192 validation, test and hold-out knees had a copy in a training split: a knee scored by a model that
trained on it, and labels the model is taught both ways.

So every manifest row is preprocessed the way the model sees it (Otsu crop of the row's knee, percentile clip)
and reduced to a 64 x 64 signature with zero mean and unit norm. Two rows are copies when the correlation of
their signatures, or of one with the other's mirror image (a left knee exported as a right one), reaches
``min_correlation``. Links are closed transitively into groups, as the file audit does. Two rows of one file
are never linked: they are the two knees of one bilateral film, alike but distinct, and a split keeps them
together already.

On the share, correlations of 0.985 and above held only the same knee in a visual check; 0.95-0.97 already
paired different patients' long-leg films, whose black background dominates the signature. Mirrored pairs at
0.97-0.985 were not inspected; they may hold the other knee of one patient (a patient-level link left alone).

Scaling: all pairs as one float32 matrix product in row blocks (~0.1 s for 2 000 rows); preprocessing
dominates (538 knees of 0.05-2.5 MP films in 1.7 s on 2 cores) and runs in a thread pool.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from strnet.data.manifest import normalize
from strnet.data.pool import map_in_threads
from strnet.data.preprocess import PreprocessParams, load_preprocessed

SIGNATURE_SIDE = 64
_POOL = 4  # the crop is preprocessed at SIGNATURE_SIDE * _POOL and averaged over _POOL x _POOL blocks
_BLOCK = 1024
DEFAULT_MIN_CORRELATION = 0.985


@dataclass
class KneeGroup:
    """Rows that show one knee; ``rows`` are ``path#side`` so a bilateral film's two knees stay apart."""

    group: int
    rows: list[str]
    labels: list[str]
    sources: list[str]
    sites: list[str]
    splits: list[str]
    label_conflict: bool
    min_correlation: float  # weakest direct link inside the group
    mirrored: bool  # at least one link matched a knee with the other's mirror image


@dataclass
class KneeAudit:
    n_rows: int
    n_signed: int
    min_correlation: float
    groups: list[KneeGroup] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)
    row_group: list[int] = field(default_factory=list)  # per row of the audited frame; -1 for an unsigned row
    seconds: float = 0.0

    @property
    def copies(self) -> int:
        """Rows beyond the first of each group."""
        return sum(len(g.rows) - 1 for g in self.groups)

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_rows": self.n_rows,
            "n_signed": self.n_signed,
            "min_correlation": self.min_correlation,
            "groups_with_copies": len(self.groups),
            "copy_rows": self.copies,
            "label_conflict_groups": sum(g.label_conflict for g in self.groups),
            "cross_source_groups": sum(len(g.sources) > 1 or len(g.sites) > 1 for g in self.groups),
            "cross_split_groups": sum(len(g.splits) > 1 for g in self.groups),
            "seconds": round(self.seconds, 3),
            "groups": [asdict(g) for g in self.groups],
            "problems": [{"row": r, "problem": p} for r, p in self.problems],
        }


def row_key(path: str, side: str) -> str:
    return f"{path}#{side}" if side else path


def signature(crop: np.ndarray) -> np.ndarray:
    """Zero-mean, unit-norm 64 x 64 block average of a preprocessed crop in [0, 1]; all zeros for a crop with no
    contrast (a float32 mean leaves a residue that unit norm would blow up into a pattern)."""
    s = SIGNATURE_SIDE
    pooled = crop.reshape(s, crop.shape[0] // s, s, crop.shape[1] // s).mean(axis=(1, 3), dtype=np.float64)
    pooled -= pooled.mean()
    norm = float(np.linalg.norm(pooled))
    out = pooled / norm if norm > 1e-6 else np.zeros_like(pooled)
    return out.astype(np.float32).reshape(-1)


def _signed(args: tuple[str, str]) -> np.ndarray | str:
    path, side = args
    try:
        return signature(load_preprocessed(path, side, PreprocessParams(size=SIGNATURE_SIDE * _POOL)))
    except Exception as exc:  # one bad file must not stop an audit of thousands; the file audit names most
        return f"cannot preprocess knee ({type(exc).__name__}: {exc})"


def signatures(df: pd.DataFrame, workers: int | None = None) -> tuple[np.ndarray, list[str | None]]:
    """``(n, 4096)`` signatures in row order, and per row the problem that left it unsigned (None if signed)."""
    jobs = list(zip(df["path"].astype(str), df["side"].astype(str), strict=True))
    results = map_in_threads(_signed, jobs, workers)
    out = np.zeros((len(jobs), SIGNATURE_SIDE * SIGNATURE_SIDE), dtype=np.float32)
    problems: list[str | None] = []
    for k, r in enumerate(results):
        if isinstance(r, str):
            problems.append(r)
        else:
            out[k] = r
            problems.append(None)
    return out, problems


def mirrored(sig: np.ndarray) -> np.ndarray:
    s = SIGNATURE_SIDE
    return np.ascontiguousarray(sig.reshape(-1, s, s)[:, :, ::-1].reshape(len(sig), -1))


def copy_pairs(
    sig: np.ndarray, min_correlation: float, same_file: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pairs i < j whose signatures (or one and the other's mirror) correlate >= ``min_correlation``:
    ``(i, j, correlation, mirrored)``. ``same_file[i] == same_file[j]`` never links (two knees of one film)."""
    mir = mirrored(sig)
    rows, cols, corrs, flips = [], [], [], []
    for start in range(0, len(sig), _BLOCK):
        block = sig[start : start + _BLOCK]
        direct, flipped = block @ sig.T, block @ mir.T
        best = np.maximum(direct, flipped)
        i, j = np.nonzero(best >= min_correlation)
        i = i + start
        keep = i < j
        if same_file is not None:
            keep &= same_file[i] != same_file[j]
        i, j = i[keep], j[keep]
        rows.append(i)
        cols.append(j)
        corrs.append(best[i - start, j])
        flips.append(flipped[i - start, j] > direct[i - start, j])
    if not rows:
        e = np.zeros(0, dtype=np.int64)
        return e, e, np.zeros(0, dtype=np.float32), np.zeros(0, dtype=bool)
    return np.concatenate(rows), np.concatenate(cols), np.concatenate(corrs), np.concatenate(flips)


def audit_knees(
    df: pd.DataFrame, *, min_correlation: float = DEFAULT_MIN_CORRELATION, workers: int | None = None
) -> KneeAudit:
    """Sign every row's knee, link copies and report the groups with more than one row."""
    import time

    if not 0.0 < min_correlation <= 1.0:
        raise ValueError(f"min_correlation must be in (0, 1], got {min_correlation}")
    t0 = time.perf_counter()
    df = normalize(df).reset_index(drop=True)
    sig, problems = signatures(df, workers=workers)
    ok = np.array([p is None for p in problems], dtype=bool)
    index = np.flatnonzero(ok)
    files = pd.factorize(df["path"].astype(str).str.lower())[0]
    i, j, corr, flip = copy_pairs(sig[index], min_correlation, same_file=files[index])
    i, j = index[i], index[j]
    n = len(df)
    graph = coo_matrix((np.ones(len(i), dtype=np.int8), (i, j)), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    row_group = np.where(ok, comp, -1)
    keys = [row_key(p, s) for p, s in zip(df["path"], df["side"], strict=True)]
    groups: list[KneeGroup] = []
    linked = pd.DataFrame({"a": i, "corr": corr, "flip": flip, "g": comp[i] if len(i) else []})
    for gid, links in linked.groupby("g", sort=True):
        members = np.flatnonzero(row_group == gid)
        part = df.iloc[members]
        labels = sorted({v for v in part["label_cls"] if v})
        groups.append(
            KneeGroup(
                group=int(gid),
                rows=[keys[m] for m in members],
                labels=labels,
                sources=sorted({v for v in part["source"] if v}),
                sites=sorted({v for v in part["site"] if v}),
                splits=sorted({v for v in part["split"] if v}),
                label_conflict=len(labels) > 1,
                min_correlation=round(float(links["corr"].min()), 5),
                mirrored=bool(links["flip"].any()),
            )
        )
    return KneeAudit(
        n_rows=n,
        n_signed=int(ok.sum()),
        min_correlation=min_correlation,
        groups=groups,
        problems=[(keys[k], p) for k, p in enumerate(problems) if p is not None],
        row_group=row_group.tolist(),
        seconds=time.perf_counter() - t0,
    )


def clean_knees(
    df: pd.DataFrame, audit: KneeAudit, pixels: Mapping[str, int] | None = None
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Drop every row of a group whose copies disagree on the label; keep one row of every other group.

    The kept row is the one a model learns most from: labelled first, then the largest source film
    (``pixels`` per path: the original film rather than the cut-out), then the smallest path. Rows the audit
    could not sign stay (their files passed the file audit; the training cache reports them again).
    """
    df = normalize(df).reset_index(drop=True)
    if len(audit.row_group) != len(df):
        raise ValueError(f"the knee audit covers {len(audit.row_group)} rows, the manifest has {len(df)}")
    pixels = pixels or {}
    group = pd.Series(audit.row_group, index=df.index)
    conflict = {g.group for g in audit.groups if g.label_conflict}
    reason = pd.Series("", index=df.index)
    for g in audit.groups:
        members = group.index[group == g.group]
        if g.group in conflict:
            reason[members] = "label_conflict"
            continue
        keep = min(
            members,
            key=lambda k: (df.at[k, "label_cls"] == "", -pixels.get(df.at[k, "path"], 0), df.at[k, "path"]),
        )
        reason[members.drop(keep)] = "copy"
    stats = {
        "rows_in": len(df),
        "rows_out": int((reason == "").sum()),
        "dropped_knee_label_conflict": int((reason == "label_conflict").sum()),
        "dropped_knee_copy": int((reason == "copy").sum()),
    }
    return df.loc[reason == ""].reset_index(drop=True), stats
