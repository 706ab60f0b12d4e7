"""Scenario: synthetic sites -> manifests -> audit -> split, the data half of every demo and e2e test.

Each site gets its own manifest (that is what a hospital node holds); ``all.csv`` is their union, split
at patient level with duplicate groups kept together.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from simulations.sites import write_sites
from strnet.data.adapters import prepare
from strnet.data.audit import audit_manifest, group_ids
from strnet.data.manifest import merge_manifests, write_manifest
from strnet.data.split import assign_splits

SITE_LAYOUTS: dict[str, str] = {"stage1": "kaggle-folders", "stage2": "mendeley", "hospital": "dicom-csv"}


@dataclass
class SyntheticScenario:
    root: Path
    site_dirs: dict[str, Path]
    site_manifests: dict[str, Path]
    manifest: Path
    problems: list[str]
    audit: dict

    def federation_sites(self, external: str = "stage2") -> list[dict[str, str]]:
        """``federation.sites`` for these sites: the two others train (stage1 first), ``external`` is evaluated."""
        train = [s for s in ("stage1", "hospital", "stage2") if s != external]
        return [{"name": s, "role": "train", "manifest": str(self.site_manifests[s])} for s in train] + [
            {"name": external, "role": "external", "manifest": str(self.site_manifests[external])}
        ]


# The smallest model and inputs that still run every step of the pipeline (end-to-end tests of the federation);
# no figures, which would take as long as such a run trains
TINY_RUN = (
    "model.backbone=tiny",
    "preprocess.size=32",
    "train.batch_size=8",
    "train.precision=fp32",
    "evaluate.figures=false",
)


def build_synthetic_scenario(
    out: str | Path,
    *,
    seed: int = 42,
    n_patients: int | dict[str, int] = 60,
    image_size: int = 256,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    max_distance: int = 2,
) -> SyntheticScenario:
    """Write the three synthetic sites and their split manifests under ``out`` (idempotent per seed).

    Near-duplicates are grouped at phash distance <= 2, not the audit's default 4: at 4 the globally similar
    synthetic knees (like the uniformly framed Mendeley films) merge different patients into one group.
    """
    root = Path(out)
    for site in SITE_LAYOUTS:  # generated folders: rewrite them whole so a smaller rerun leaves no strays
        shutil.rmtree(root / "sites" / site, ignore_errors=True)
    site_dirs = write_sites(root / "sites", seed=seed, n_patients=n_patients, image_size=image_size)
    frames: list[pd.DataFrame] = []
    problems: list[str] = []
    for site, layout in SITE_LAYOUTS.items():
        df, probs = prepare(layout, site_dirs[site], site=site, source=f"synthetic-{site}")
        frames.append(df)
        problems += probs
    merged = merge_manifests(frames)
    report = audit_manifest(merged, max_distance=max_distance)
    groups = group_ids(merged, report=report)
    split = assign_splits(merged, fractions=fractions, seed=seed, groups=groups)
    manifest = write_manifest(split, root / "manifests" / "all.csv")
    site_manifests = {}
    for site in SITE_LAYOUTS:
        site_manifests[site] = write_manifest(
            split[split["site"] == site].reset_index(drop=True), root / "manifests" / f"{site}.csv"
        )
    return SyntheticScenario(
        root=root,
        site_dirs=site_dirs,
        site_manifests=site_manifests,
        manifest=manifest,
        problems=problems,
        audit=report.to_dict(),
    )
