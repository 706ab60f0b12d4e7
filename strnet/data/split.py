"""Seeded train/val/test assignment that never lets one patient, one image or one duplicate group leak.

Leakage comes from three relations: the two knees of one patient, the two rows (R/L) of one bilateral
image, and near-duplicate images that an audit put in one group (possibly across patients or sites). Rows
joined by any of them form a connected component, and a component goes to one split as a whole.

Splitting is :class:`sklearn.model_selection.StratifiedGroupKFold` over components with ``K`` folds, where
``K`` makes every fraction a whole number of folds (0.7/0.15/0.15 -> 20 folds: 14 train, 3 val, 3 test).
The folds are stratified by ``label_cls`` within ``source`` (unknown labels are a class of their own) and
weighted by component size, so every source's class proportions per split follow its global ones at row level.
Stratifying by label alone let a small source's few normal knees all land in one split (the Mendeley test split
once held no normal knee, its validation split three), which makes per-source results meaningless.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.utils import check_random_state

from strnet.data.manifest import SPLITS

MAX_FOLDS = 100


def leakage_components(df: pd.DataFrame, groups: pd.Series | None = None) -> np.ndarray:
    """Component id per row: rows sharing a (site, patient_id), a path or a non-empty group id are joined.

    Patient ids are only unique within a site, hence the site in the key; an empty patient id means unknown
    and joins nothing.
    """
    n = len(df)
    keys: list[pd.Series] = [df["path"].astype(str).str.lower().where(df["path"].astype(str) != "")]
    pid = df["patient_id"].fillna("").astype(str)
    keys.append((df["site"].fillna("").astype(str) + "\x00" + pid).where(pid != ""))
    if groups is not None:
        missing = ~df.index.isin(groups.index)
        if missing.any():
            raise ValueError(f"groups has no entry for {int(missing.sum())} row(s) of the frame (index must align)")
        g = groups.reindex(df.index)
        valid = g.notna() & (g.astype(str).str.strip() != "")
        keys.append(g.astype(object).where(valid))
    rows, cols = [], []
    positions = np.arange(n)
    for key in keys:
        codes, _ = pd.factorize(key.to_numpy(), use_na_sentinel=True)
        has = codes >= 0
        first = pd.Series(positions[has]).groupby(codes[has]).transform("first").to_numpy()
        rows.append(positions[has])
        cols.append(first)
    r = np.concatenate([positions, *rows])
    c = np.concatenate([positions, *cols])
    graph = coo_matrix((np.ones(len(r), dtype=np.int8), (r, c)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    return labels


def _folds_per_split(fractions: tuple[float, float, float]) -> tuple[int, list[int]]:
    """Smallest K making each fraction a whole number of folds (largest remainder at MAX_FOLDS)."""
    for k in range(2, MAX_FOLDS + 1):
        counts = [f * k for f in fractions]
        if all(abs(c - round(c)) < 1e-6 for c in counts):
            return k, [round(c) for c in counts]
    raw = [f * MAX_FOLDS for f in fractions]
    counts = [int(np.floor(c)) for c in raw]
    for i in np.argsort([c - np.floor(c) for c in raw])[::-1][: MAX_FOLDS - sum(counts)]:
        counts[i] += 1
    return MAX_FOLDS, counts


def assign_splits(
    df: pd.DataFrame,
    *,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    seed: int = 42,
    groups: pd.Series | None = None,
) -> pd.DataFrame:
    """Copy of ``df`` with ``split`` set to train/val/test for every row (including unlabelled ones)."""
    fractions = tuple(float(f) for f in fractions)  # type: ignore[assignment]
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions}")
    out = df.copy()
    if len(out) == 0:
        out["split"] = pd.Series(dtype=str)
        return out
    component = leakage_components(out, groups)
    k, counts = _folds_per_split(fractions)  # type: ignore[arg-type]
    fold_split = np.repeat(np.arange(3), counts)  # fold index -> split index
    fold = stratified_group_folds(out, k, seed=seed, component=component)
    split_idx = fold_split[fold] if fold is not None else _small_split(component, fractions, seed)
    out["split"] = np.asarray(SPLITS)[split_idx]
    return out


def stratified_group_folds(
    df: pd.DataFrame, k: int, *, seed: int = 42, component: np.ndarray | None = None, groups: pd.Series | None = None
) -> np.ndarray | None:
    """Fold index (0..k-1) per row: leakage components kept whole, stratified by ``source|label_cls``.

    The one fold assignment behind the train/val/test split and cross-validation over training patients.
    ``None`` when there are fewer than ``k`` components or no class with ``k`` members
    (:class:`StratifiedGroupKFold` needs both).
    """
    if component is None:
        component = leakage_components(df, groups)
    labels = df["label_cls"].fillna("").astype(str)
    if "source" in df.columns:
        labels = df["source"].fillna("").astype(str) + "|" + labels
    labels = labels.to_numpy()
    if len(np.unique(component)) < k or int(pd.Series(labels).value_counts().max()) < k:
        return None
    fold = np.empty(len(df), dtype=int)
    sgkf = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "least populated class" for rare classes
        for i, (_, test_idx) in enumerate(sgkf.split(np.zeros(len(df)), labels, groups=component)):
            fold[test_idx] = i
    return fold


def _small_split(component: np.ndarray, fractions: tuple[float, ...], seed: int) -> np.ndarray:
    """Too few components for K folds: shuffle components and cut the row counts at the fractions."""
    ids, sizes = np.unique(component, return_counts=True)
    order = check_random_state(seed).permutation(len(ids))
    bounds = np.cumsum(fractions)[:2] * sizes.sum()
    cum = np.cumsum(sizes[order]) - sizes[order] / 2.0  # a component's midpoint decides its split
    comp_split = np.empty(len(ids), dtype=int)
    comp_split[order] = np.searchsorted(bounds, cum, side="right")
    lookup = dict(zip(ids.tolist(), comp_split.tolist(), strict=True))
    return np.array([lookup[c] for c in component.tolist()])


def hold_out_site(
    df: pd.DataFrame, site: str, fraction: float, *, seed: int = 42, groups: pd.Series | None = None
) -> pd.DataFrame:
    """Move a seeded, leakage-free fraction of ``site``'s cases to a new external site ``<site>-holdout``.

    Stands in for the paper's external hospital when only public data exist: whole components (patients,
    bilateral images, duplicate groups) move, stratified by label like :func:`assign_splits`, and the moved
    rows get ``split=test`` because an external site only ever evaluates the frozen model.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"hold-out fraction must be in (0, 1), got {fraction}")
    if site not in set(df["site"]):
        raise ValueError(f"no rows with site={site!r}; sites are {sorted(set(df['site']))}")
    out = df.copy()
    mask = (out["site"] == site).to_numpy()
    part = out[mask]
    sub_groups = groups[mask] if groups is not None else None
    chosen = assign_splits(part, fractions=(1.0 - fraction, 0.0, fraction), seed=seed, groups=sub_groups)
    moved = chosen.index[chosen["split"] == "test"]
    components = leakage_components(out, groups)
    crossing = set(components[out.index.get_indexer(moved)]) & set(components[~out.index.isin(moved)])
    if crossing:  # a duplicate group spanning two sites: keep it out of the hold-out to avoid leakage
        keep = out.index.isin(moved) & np.isin(components, list(crossing))
        moved = moved.difference(out.index[keep])
    out.loc[moved, "site"] = f"{site}-holdout"
    out.loc[moved, "split"] = "test"
    return out
