"""The cases a run uses: manifests read and merged, images warmed into the cache, summarised and audited.

Shared by the centralized run and a federated site, so both see exactly the same rows.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import pandas as pd
from tqdm import tqdm

from configs.schema import Config, SiteConfig
from strnet.data.audit import audit_manifest
from strnet.data.cache import PreprocessCache
from strnet.data.manifest import merge_manifests, read_manifest
from strnet.data.preprocess import PreprocessParams
from strnet.errors import DataError


def training_manifests(cfg: Config) -> list[str]:
    """``data.manifests`` if given, else the manifests of the federation's training sites (same data, one schema)."""
    if cfg.data.manifests:
        return list(cfg.data.manifests)
    return [s.manifest for s in cfg.federation.sites if s.role == "train"]


def external_sites(cfg: Config) -> list[SiteConfig]:
    return [s for s in cfg.federation.sites if s.role == "external"]


def load_cases(manifests: Iterable[str]) -> pd.DataFrame:
    manifests = list(manifests)
    if not manifests:
        raise DataError("<config>", "no manifests: set data.manifests or federation.sites")
    return merge_manifests(read_manifest(m) for m in manifests)


def warm_cache(
    df: pd.DataFrame, preprocess: PreprocessParams, cache: PreprocessCache, *, workers: int
) -> tuple[pd.DataFrame, list[str]]:
    """Preprocess every case once; cases whose image cannot be read are dropped with their reason.

    Shows a progress bar on a terminal (tqdm stays quiet in logs and CI).
    """
    with tqdm(total=len(df), desc="preprocess", unit="img", leave=False, disable=None) as bar:
        problems = cache.warm(df, preprocess, workers=max(1, workers), progress=lambda done, total: bar.update(1))
    bad = {p.split(": ", 1)[0] for p in problems}
    keep = ~df["path"].isin(bad)
    return df[keep].reset_index(drop=True), problems


def data_fingerprint(df: pd.DataFrame) -> str:
    """SHA-256 of the manifest content that defines the experiment (paths, labels, splits, targets)."""
    cols = ["path", "side", "site", "split", "label_cls", "t_score"]
    text = df[cols].sort_values(["path", "side"]).to_csv(index=False)
    return hashlib.sha256(text.encode()).hexdigest()


def data_summary(df: pd.DataFrame) -> dict[str, Any]:
    table = df.groupby(["split", "label_cls"]).size().unstack(fill_value=0)
    return {
        "n_rows": len(df),
        "n_images": int(df["path"].nunique()),
        "sites": sorted(set(df["site"])),
        "sources": sorted(set(df["source"])),
        "by_split": {str(k): {str(c): int(v) for c, v in row.items()} for k, row in table.iterrows()},
        "fingerprint": data_fingerprint(df),
    }


def audit_summary(df: pd.DataFrame, max_distance: int) -> dict[str, Any]:
    """The audit's counts for the bundle (the member lists stay in `strnet data audit --json`)."""
    report = audit_manifest(df, max_distance=max_distance).to_dict()
    return {k: v for k, v in report.items() if not isinstance(v, list)}
