"""Cross-validation over the training patients: a selection basis for recipe choices that one validation split
is too small to carry.

The Mendeley validation split holds 5 normal knees, so one run's Mendeley validation AUROC moves by about 0.07
per knee. Here the training and validation rows of the training sites (never the test split, never an external
site) are cut into ``K`` folds by the split's own rule (:func:`strnet.data.split.stratified_group_folds`: whole
patients, films and duplicate groups, stratified by source and label), and each fold is scored once, out of fold,
by a model trained with ``strnet train``'s pipeline on the rest. Inside a fold the rows that were validation rows
stay validation rows (early stop, calibration, τ*), so no model is selected on the rows it is scored on. On the
real share every one of the 24 normal Mendeley knees of training and validation is then scored, instead of 5.

    python -m simulations.cross_validate run --config cpu --manifest runs/real/split.csv \\
        --set model.members=1 --out runs/cv/base
    python -m simulations.cross_validate run --config cpu --manifest runs/real/split.csv \\
        --set model.members=1 --set loss.label_smoothing=0.1 --out runs/cv/smooth
    python -m simulations.cross_validate compare runs/cv/base runs/cv/smooth
    python -m simulations.cross_validate no-mirror runs/cv/base --out runs/cv/base-nomirror
    python -m simulations.cross_validate markers runs/cv/base --out runs/cv/base-markers
    python -m simulations.cross_validate covariates runs/cv/base --columns age
    python -m simulations.cross_validate ensemble runs/cv/base runs/cv/seed43 --out runs/cv/ensemble
    python -m simulations.cross_validate tscore runs/cv/base --out runs/cv/tscore

``run`` writes ``oof.csv`` (every scored knee with its fold) and ``cv.json`` (AUROC per cohort: all folds'
out-of-fold scores together with a radiograph-level bootstrap interval, and the mean and spread of the folds'
own AUROC). ``compare`` pairs two runs on the same folds: the difference B − A per cohort with a paired
radiograph-level bootstrap interval. A run whose ``oof.csv`` already holds a fold skips that fold, so an
interrupted run resumes. Every fold is an MLflow run tagged ``cv.name`` and ``cv.fold``; ``cv.json`` also lists
each fold's kept epoch and inner validation AUROC.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.metrics import roc_auc_score

from configs import Config, load_config
from configs.schema import TScoreConfig
from simulations.paired_difference import paired_auroc_difference
from simulations.seed_ensemble import source_pairs
from strnet import metrics as M
from strnet.data.manifest import read_manifest, write_manifest
from strnet.data.split import stratified_group_folds
from strnet.evaluation import strict_json

POOL_SPLITS = ("train", "val")
FOLD_FILE = "predictions.csv"


def pool_mask(df: pd.DataFrame) -> np.ndarray:
    """The labelled training and validation rows: what cross-validation may cut. Test rows and external sites
    (their rows are all ``test``) stay untouched."""
    mask = (df["split"].isin(POOL_SPLITS) & (df["label_cls"].fillna("") != "")).to_numpy()
    if not mask.any():
        raise ValueError("no labelled train or val rows to cross-validate")
    return mask


def assign_folds(pool: pd.DataFrame, k: int, *, seed: int, groups: pd.Series | None = None) -> np.ndarray:
    """Fold per row of ``pool``; raises where the rows cannot make ``k`` stratified, leakage-free folds."""
    if k < 2:
        raise ValueError(f"need at least 2 folds, got {k}")
    fold = stratified_group_folds(pool, k, seed=seed, groups=groups)
    if fold is None:
        raise ValueError(f"{len(pool)} rows cannot make {k} folds: too few patients or no class with {k} members")
    return fold


def folds_from(oof: pd.DataFrame, pool: pd.DataFrame, where: str) -> np.ndarray:
    """The folds another run cut, by film: how a variant whose manifest has other rows (whole films instead of
    their two knees) is scored on the same patients per fold."""
    by_film = oof.assign(film=oof["path"].str.lower()).groupby("film")["fold"]
    if (by_film.nunique() > 1).any():
        raise ValueError(f"{where}: a film's knees sit in two folds")
    lookup = by_film.first()
    films = pool["path"].str.lower()
    missing = sorted(set(films) - set(lookup.index))
    if missing:
        raise ValueError(f"{where}: {len(missing)} film(s) of this manifest were not scored there, e.g. {missing[0]}")
    return films.map(lookup).to_numpy(int)


def bilateral_as_films(df: pd.DataFrame) -> pd.DataFrame:
    """Each bilateral film whose right and left knee rows are both kept becomes one whole-film row (``side`` empty:
    the model sees the radiograph, as a plain whole-film classifier does). A film with one knee row left keeps it
    as it is: the audit removed the other knee as a copy of another image, and the whole film would bring it back.
    The two rows of a film share the patient's label, T-score and covariates."""
    film = df["path"].str.lower()
    sides = df.groupby(film)["side"].transform(lambda s: "".join(sorted(s)))
    both = (sides == "LR").to_numpy()
    keep = ~both | (df["side"] == "R").to_numpy()
    out = df[keep].reset_index(drop=True)
    out.loc[both[keep], "side"] = ""
    return out


def fold_manifest(pool: pd.DataFrame, fold: np.ndarray, i: int) -> pd.DataFrame:
    """Fold ``i`` as a manifest ``strnet train`` reads: its rows become the test split (scored, never trained or
    selected on); the others keep their train or val split."""
    out = pool.copy()
    out.loc[fold == i, "split"] = "test"
    return out


def fold_config(cfg: Config, manifest: Path, out_dir: Path) -> Config:
    """``cfg`` trained on one fold's manifest, its external sites dropped (cross-validation never scores them)."""
    sites = tuple(s for s in cfg.federation.sites if s.role == "train")
    return dataclasses.replace(
        cfg,
        output_dir=str(out_dir),
        data=dataclasses.replace(cfg.data, manifests=(str(manifest),)),
        federation=dataclasses.replace(cfg.federation, sites=sites),
    )


def cohorts(oof: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """All scored knees, then each source's."""
    out = {"pooled": oof}
    for source, part in oof.groupby("source", sort=True):
        out[str(source)] = part
    return out


def _labels(frame: pd.DataFrame) -> np.ndarray:
    return (frame["label_cls"] != "normal").to_numpy(int)


def _films(frame: pd.DataFrame) -> np.ndarray:
    return frame["path"].astype(str).str.lower().to_numpy()


def cohort_auroc(frame: pd.DataFrame, *, n_boot: int = 2000, seed: int = 42) -> dict[str, float | int | list[float]]:
    """Out-of-fold AUROC of one cohort: all folds' scores together (interval: whole radiographs resampled), and
    each fold's own AUROC (its mean and SD; a fold without both classes in the cohort is left out)."""
    y, p = _labels(frame), frame["prob_bone_loss"].to_numpy(float)
    row: dict[str, float | int | list[float]] = {"knees": len(frame), "normal": int((y == 0).sum())}
    if len(np.unique(y)) < 2:
        return row | {"auroc": float("nan")}
    lo, hi = M.bootstrap_ci(y, p, 0.5, ["auroc"], n_boot=n_boot, seed=seed, groups=_films(frame))["auroc"]
    per_fold = [
        float(roc_auc_score(_labels(f), f["prob_bone_loss"]))
        for _, f in frame.groupby("fold")
        if len(np.unique(_labels(f))) == 2
    ]
    return row | {
        "auroc": float(roc_auc_score(y, p)),
        "ci_lo": lo,
        "ci_hi": hi,
        "fold_aurocs": per_fold,
        "fold_mean": float(np.mean(per_fold)) if per_fold else float("nan"),
        "fold_sd": float(np.std(per_fold, ddof=1)) if len(per_fold) > 1 else float("nan"),
    }


def summarise(oof: pd.DataFrame, *, n_boot: int = 2000) -> dict[str, dict]:
    return {name: cohort_auroc(frame, n_boot=n_boot) for name, frame in cohorts(oof).items()}


def bilateral_agreement(oof: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Left–right agreement of the out-of-fold scores, per cohort, over every film scored with one right and one
    left knee (a film's knees sit in one fold, so one network scored both): films, the share whose two flags
    differ (each at its fold's τ*), mean |P(R) − P(L)| and Spearman's ρ of P(R) against P(L)."""
    out = {}
    for name, frame in cohorts(oof).items():
        side = frame["side"].astype(str).str.upper()
        knees = frame.assign(film=_films(frame), side=side)[side.isin(["R", "L"])]
        sides = knees.groupby("film")["side"].agg(lambda s: "".join(sorted(s)))
        pairs = knees[knees["film"].isin(sides.index[sides == "LR"])]
        if pairs.empty:  # whole-film rows, or one knee per film
            out[name] = {
                "films": 0,
                "flags_differ": float("nan"),
                "mean_abs_dp": float("nan"),
                "spearman": float("nan"),
            }
            continue
        wide = pairs.pivot(index="film", columns="side", values=["prob_bone_loss", "flag_bone_loss"])
        p_r, p_l = wide[("prob_bone_loss", "R")].to_numpy(float), wide[("prob_bone_loss", "L")].to_numpy(float)
        differ = wide[("flag_bone_loss", "R")].to_numpy(float) != wide[("flag_bone_loss", "L")].to_numpy(float)
        n = len(wide)
        out[name] = {
            "films": n,
            "flags_differ": float(differ.mean()) if n else float("nan"),
            "mean_abs_dp": float(np.abs(p_r - p_l).mean()) if n else float("nan"),
            "spearman": float(stats.spearmanr(p_r, p_l).statistic) if n >= 3 else float("nan"),
        }
    return out


def side_differences(oof: pd.DataFrame) -> pd.Series:
    """P(R) − P(L) of every film scored with one right and one left knee, indexed by film."""
    side = oof["side"].astype(str).str.upper()
    knees = oof.assign(film=_films(oof), side=side)[side.isin(["R", "L"])]
    wide = knees.pivot_table(index="film", columns="side", values="prob_bone_loss", aggfunc="first")
    if not {"R", "L"} <= set(wide.columns):
        return pd.Series(dtype=float)
    wide = wide.dropna(subset=["R", "L"])
    return wide["R"] - wide["L"]


def side_difference_agreement(a: pd.DataFrame, b: pd.DataFrame) -> dict[str, float]:
    """Spearman's ρ of P(R) − P(L) between two runs over the films both scored: near 1 when the two knees of a
    film differ the same way in both runs' eyes (something in the knees), near 0 when each run's difference is its
    own (noise in the networks), which averaging runs would cancel."""
    da, db = side_differences(a), side_differences(b)
    films = da.index.intersection(db.index)
    rho = stats.spearmanr(da[films], db[films]).statistic if len(films) >= 3 else float("nan")
    return {"films": len(films), "spearman_of_differences": float(rho)}


def per_film(oof: pd.DataFrame) -> pd.DataFrame:
    """One row per radiograph: the mean of its knees' probabilities, as ``strnet predict`` answers for a film."""
    film = oof["path"].str.lower()
    if (oof.groupby(film)[["label_cls", "fold"]].nunique() > 1).any().any():
        raise ValueError("a film's rows disagree on label or fold")
    agg = {"prob_bone_loss": "mean", "path": "first", "label_cls": "first", "source": "first", "fold": "first"}
    return oof.groupby(film).agg(agg).reset_index(drop=True).assign(side="")


def compare(
    a: pd.DataFrame, b: pd.DataFrame, *, n_boot: int = 2000, films: bool = False
) -> dict[str, dict[str, float]]:
    """B − A per cohort on the knees both scored (``films``: on radiographs, each the mean of its rows), paired
    over whole radiographs; the pooled row also splits each run's AUROC into its (bone-loss, normal) pairs within
    one source and across sources (:func:`simulations.seed_ensemble.source_pairs`). The two runs must have
    cut the same folds (same manifest, ``--folds`` and ``--seed``, or ``--folds-from``), or a knee's two scores
    come from different splits."""
    if films:
        a, b = per_film(a), per_film(b)
    joined = a.merge(b, on=["path", "side"], suffixes=("_a", "_b"), validate="one_to_one")
    if len(joined) != len(a) or len(joined) != len(b):
        raise ValueError(f"the runs scored different knees ({len(a)} and {len(b)}, {len(joined)} in common)")
    if (joined["fold_a"] != joined["fold_b"]).any():
        raise ValueError("the runs cut different folds: use the same manifest, --folds and --seed")
    joined["source"], joined["label_cls"] = joined["source_a"], joined["label_cls_a"]
    out = {}
    for name, frame in cohorts(joined).items():
        y = _labels(frame)
        if len(np.unique(y)) < 2:
            continue
        out[name] = paired_auroc_difference(
            y,
            frame["prob_bone_loss_a"].to_numpy(float),
            frame["prob_bone_loss_b"].to_numpy(float),
            _films(frame),
            n_boot=n_boot,
        )
    if "pooled" in out:  # how much of each run's pooled AUROC is telling the sources apart
        y, source = _labels(joined), joined["source"].to_numpy()
        for run in ("a", "b"):
            parts = source_pairs(y, joined[f"prob_bone_loss_{run}"].to_numpy(float), source)
            out["pooled"] |= {f"{k}_{run}": parts[k] for k in ("within_source", "across_sources")}
    return out


def run(
    cfg: Config,
    manifest: pd.DataFrame,
    out: Path,
    *,
    k: int,
    seed: int,
    groups: pd.Series | None = None,
    tracking: bool = True,
    name: str | None = None,
    fold_of: pd.DataFrame | None = None,
    fold_of_name: str = "--folds-from",
) -> pd.DataFrame:
    """Train and score every fold not yet in ``out/oof.csv``; returns all out-of-fold rows. ``fold_of``: another
    run's ``oof.csv`` whose folds to reuse (:func:`folds_from`)."""
    from strnet.centralized import run_centralized

    mask = pool_mask(manifest)
    pool = manifest[mask].reset_index(drop=True)
    if fold_of is not None:
        fold = folds_from(fold_of, pool, fold_of_name)
        k = int(fold.max()) + 1
    else:
        fold = assign_folds(pool, k, seed=seed, groups=None if groups is None else groups[mask].reset_index(drop=True))
    out.mkdir(parents=True, exist_ok=True)
    oof_path = out / "oof.csv"
    done = pd.read_csv(oof_path, keep_default_na=False) if oof_path.exists() else pd.DataFrame()
    tracker = None
    if tracking and cfg.tracking.enabled:
        from server.tracking import Tracker

        tracker = Tracker(uri=cfg.tracking.uri, experiment=cfg.tracking.experiment)
    for i in range(k):
        if len(done) and (done["fold"] == i).any():
            continue
        fold_dir = out / f"fold-{i}"
        path = fold_dir / "manifest.csv"
        write_manifest(fold_manifest(pool, fold, i), path)
        tags = {"cv.name": name or out.name, "cv.fold": str(i), "cv.folds": str(k)}
        run_centralized(fold_config(cfg, path, fold_dir), tracker=tracker, tags=tags, progress=False)
        scored = pd.read_csv(fold_dir / "test_report" / FOLD_FILE, keep_default_na=False)
        if len(scored) != int((fold == i).sum()):
            raise RuntimeError(f"{fold_dir}: scored {len(scored)} knees, fold {i} holds {int((fold == i).sum())}")
        done = pd.concat([done, scored.assign(fold=i)], ignore_index=True)
        done.to_csv(oof_path, index=False)
    return done


def rescore(run_dir: Path, cache_dir: Path | None, *, mirror: bool = True, mask_markers: bool = False) -> pd.DataFrame:
    """Every fold's network scores its own out-of-fold knees again, changed at inference only: without test-time
    mirror averaging (``mirror=False``), or with side markers painted out of the images (``mask_markers``,
    :mod:`strnet.data.markers`). The same networks on the same knees, so a difference is what the change does at
    inference; its Platt fit was made on the unchanged inputs, which leaves each fold's ranking as the network's
    own."""
    from strnet.bundle import load_bundle
    from strnet.data.cache import PreprocessCache
    from strnet.evaluation import predict_frame

    cache = PreprocessCache(cache_dir) if cache_dir else None
    parts = []
    for fold_dir in sorted(run_dir.glob("fold-*"), key=lambda d: int(d.name.split("-")[1])):
        manifest = read_manifest(fold_dir / "manifest.csv")
        rows = manifest[manifest["split"] == "test"].reset_index(drop=True)
        bundle = load_bundle(fold_dir / "bundle")
        if not mirror:
            bundle.metadata["model"]["test_time_mirror"] = False
        if mask_markers:
            bundle.metadata["preprocess"]["mask_markers"] = True
        parts.append(predict_frame(bundle, rows, cache=cache, progress=False).assign(fold=int(fold_dir.name[5:])))
    if not parts:
        raise ValueError(f"{run_dir}: no fold-* folders (not a cross_validate run)")
    return pd.concat(parts, ignore_index=True)


def ensemble(run_dirs: Sequence[Path], cache_dir: Path | None) -> pd.DataFrame:
    """Finished runs on the same folds (other seeds of one recipe) combined fold by fold as ``strnet train``
    combines ``model.members``: each fold's networks as one :class:`~strnet.ensemble.STRNetEnsemble`, its Platt
    calibration and τ* fitted on that fold's validation knees (``simulations.seed_ensemble.combine``), then its
    out-of-fold knees scored. The folds must hold the same knees in every run."""
    from simulations.seed_ensemble import combine
    from strnet.bundle import load_bundle
    from strnet.data.cache import PreprocessCache
    from strnet.evaluation import predict_frame

    if len(run_dirs) < 2:
        raise ValueError("an ensemble needs at least two runs")
    cache = PreprocessCache(cache_dir) if cache_dir else None
    folds = [sorted(d.glob("fold-*"), key=lambda f: int(f.name.split("-")[1])) for d in run_dirs]
    names = [[f.name for f in fs] for fs in folds]
    if not names[0] or any(n != names[0] for n in names):
        raise ValueError(f"runs {[str(d) for d in run_dirs]} do not hold the same fold-* folders: {names}")
    parts = []
    for fold_dirs in zip(*folds, strict=True):
        manifests = [read_manifest(f / "manifest.csv") for f in fold_dirs]
        keys = [sorted(zip(m["path"], m["side"], m["split"], strict=True)) for m in manifests]
        if any(k != keys[0] for k in keys):
            raise ValueError(f"{[str(f) for f in fold_dirs]}: the runs cut this fold differently")
        manifest = manifests[0]
        val = manifest[manifest["split"] == "val"].reset_index(drop=True)
        rows = manifest[manifest["split"] == "test"].reset_index(drop=True)
        model = combine([load_bundle(f / "bundle") for f in fold_dirs], val, cache)
        fold = int(fold_dirs[0].name[5:])
        parts.append(predict_frame(model, rows, cache=cache, progress=False).assign(fold=fold))
    return pd.concat(parts, ignore_index=True)


def covariate_oof(oof: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """A logistic regression on clinical columns alone, per source, trained on the other folds' knees of a run:
    what the same folds give without the image (rows missing a column are left out)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    missing = [c for c in columns if c not in oof.columns]
    if missing:
        raise ValueError(f"oof.csv has no column(s) {missing}")
    x_all = oof[list(columns)].apply(pd.to_numeric, errors="coerce")
    rows = oof[x_all.notna().all(axis=1)].copy()
    rows["prob_bone_loss"] = np.nan
    for _, part in rows.groupby("source"):
        y = _labels(part)
        for i in sorted(part["fold"].unique()):
            train, score = part["fold"] != i, part["fold"] == i
            if len(np.unique(y[train.to_numpy()])) < 2:
                continue
            model = make_pipeline(StandardScaler(), LogisticRegression())
            model.fit(x_all.loc[train[train].index], y[train.to_numpy()])
            rows.loc[score[score].index, "prob_bone_loss"] = model.predict_proba(x_all.loc[score[score].index])[:, 1]
    return rows.dropna(subset=["prob_bone_loss"])


TSCORE_IMAGES = ("on", "off", "auto")


def refit_tscore(run_dir: Path, cache_dir: Path | None, tscore: TScoreConfig) -> pd.DataFrame:
    """Every fold's network refits its T-score branch on its own training and validation knees with the image
    adapter on, off and auto (:func:`strnet.tscore.refit`), then estimates its out-of-fold knees' T-scores.

    One row per out-of-fold knee with a reference T-score: ``t_score_bundle`` (the branch as the fold's run left
    it) and ``t_score_<image>`` for each setting, with the path each fit kept (``image_path_<image>``), beside
    ``t_score_covariates_linear``, a least-squares line on the branch's own age, sex and BMI encoding fitted on the
    fold's training knees (a reference without the image). No mirror averaging, so the columns differ only in the
    branch. The refits start from the bundle's branch, which its
    run already refitted with the image on.
    """
    import copy

    import torch
    from sklearn.linear_model import LinearRegression

    from strnet.bundle import load_bundle
    from strnet.data.cache import PreprocessCache
    from strnet.tscore import BranchData, predict_branch, refit_centralized

    cache = PreprocessCache(cache_dir) if cache_dir else None
    cpu = torch.device("cpu")
    parts = []
    for fold_dir in sorted(run_dir.glob("fold-*"), key=lambda d: int(d.name.split("-")[1])):
        manifest = read_manifest(fold_dir / "manifest.csv")
        with_t = manifest[pd.to_numeric(manifest["t_score"], errors="coerce").notna()]
        rows = with_t[with_t["split"] == "test"].reset_index(drop=True)
        if rows.empty:
            continue
        bundle = load_bundle(fold_dir / "bundle")
        held_out = BranchData.of(bundle.model, rows, bundle.preprocess, cache, cpu)
        part = rows[["path", "side", "source", "t_score"]].assign(fold=int(fold_dir.name[5:]))
        part["t_score"] = held_out.target.numpy()
        part["t_score_bundle"] = predict_branch(bundle.model, held_out).detach().numpy()
        train = BranchData.of(bundle.model, with_t[with_t["split"] == "train"], bundle.preprocess, cache, cpu)
        linear = LinearRegression().fit(train.tabular.numpy(), train.target.numpy())
        part["t_score_covariates_linear"] = linear.predict(held_out.tabular.numpy())
        for image in TSCORE_IMAGES:
            model = copy.deepcopy(bundle.model)
            train_rows, val_rows = (with_t[with_t["split"] == k] for k in ("train", "val"))
            schedule = dataclasses.replace(tscore, image=image).schedule()
            info = refit_centralized(
                model,
                train_rows,
                val_rows,
                bundle.preprocess,
                cache,
                cpu,
                lr=tscore.lr,
                weight_decay=tscore.weight_decay,
                **schedule,
            )
            part[f"t_score_{image}"] = predict_branch(model, held_out).detach().numpy()
            part[f"image_path_{image}"] = info.get("image_path", info["status"])
        parts.append(part)
    if not parts:
        raise ValueError(f"{run_dir}: no fold-* folder with held-out T-scores (not a cross_validate run?)")
    return pd.concat(parts, ignore_index=True)


def tscore_agreement(rows: pd.DataFrame, *, reference: str = "t_score_bundle", n_boot: int = 2000) -> dict:
    """Pearson r and MAE of every ``t_score_*`` column against the reference T-scores, and each column's r minus
    ``reference``'s with a paired bootstrap interval over whole radiographs (a film's knees share a patient)."""
    from scipy.stats import pearsonr

    truth = rows["t_score"].to_numpy(float)
    columns = [c for c in rows.columns if c.startswith("t_score_")]
    films = rows["path"].to_numpy()
    index = {f: np.flatnonzero(films == f) for f in pd.unique(films)}
    keys = list(index)
    rng = np.random.default_rng(0)
    draws = [np.concatenate([index[keys[j]] for j in rng.integers(0, len(keys), len(keys))]) for _ in range(n_boot)]
    out: dict[str, dict[str, float]] = {}
    for c in columns:
        est = rows[c].to_numpy(float)
        r = float(pearsonr(truth, est)[0])
        row = {"r": r, "mae": float(np.mean(np.abs(est - truth))), "n": len(truth), "films": len(keys)}
        if c != reference:
            ref = rows[reference].to_numpy(float)
            d = [pearsonr(truth[i], est[i])[0] - pearsonr(truth[i], ref[i])[0] for i in draws]
            lo, hi = np.nanpercentile(d, [2.5, 97.5])
            row |= {"r_minus_reference": r - float(pearsonr(truth, ref)[0]), "ci_lo": float(lo), "ci_hi": float(hi)}
        out[c.removeprefix("t_score_")] = row
    return out


def fold_run(fold_dir: Path) -> dict[str, float]:
    """What a fold's run kept (``summary.json``): its epoch and its inner validation AUROC, monitored and bundled."""
    metrics = json.loads((fold_dir / "summary.json").read_text())["metrics"]
    keys = ("best_step", "epochs_run", "val_monitored_screening_auroc", "val_screening_auroc", "test_screening_auroc")
    return {k: metrics[k] for k in keys if k in metrics}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train and score every fold")
    r.add_argument("--config", required=True)
    r.add_argument("--manifest", required=True, help="the split manifest (make real-data-prepare's split.csv)")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    r.add_argument("--folds", type=int, default=5)
    r.add_argument("--seed", type=int, default=42, help="seed of the fold assignment (the model's is the config's)")
    r.add_argument("--max-distance", type=int, default=2, help="near-duplicate distance (audit); -1: none")
    r.add_argument("--folds-from", help="a finished run's folder: cut its folds (by film) instead of new ones")
    r.add_argument("--films", action="store_true", help="bilateral films as one whole-film row (bilateral_as_films)")
    r.add_argument("--no-tracking", action="store_true")
    r.add_argument("--out", required=True)
    b = sub.add_parser("bilateral", help="left–right agreement of finished runs' out-of-fold scores, per source")
    b.add_argument("run_dirs", nargs="+")
    c = sub.add_parser("compare", help="B − A per cohort, paired over radiographs")
    c.add_argument("a")
    c.add_argument("b")
    c.add_argument("--films", action="store_true", help="compare radiographs (mean of a film's rows), not knees")
    m = sub.add_parser("no-mirror", help="a finished run's fold networks re-scored without mirror averaging")
    m.add_argument("run_dir")
    m.add_argument("--cache-dir", default=".cache/preprocessed")
    m.add_argument("--out", required=True)
    k = sub.add_parser("markers", help="a finished run's fold networks re-scored with side markers painted out")
    k.add_argument("run_dir")
    k.add_argument("--cache-dir", default=".cache/preprocessed")
    k.add_argument("--out", required=True)
    e = sub.add_parser("ensemble", help="finished runs on the same folds (other seeds) combined fold by fold")
    e.add_argument("run_dirs", nargs="+")
    e.add_argument("--cache-dir", default=".cache/preprocessed")
    e.add_argument("--out", required=True)
    v = sub.add_parser("covariates", help="clinical columns alone on a finished run's folds, per source")
    v.add_argument("run_dir")
    v.add_argument("--columns", nargs="+", default=["age"])
    t = sub.add_parser("tscore", help="a finished run's fold networks refit the T-score branch, image on/off/auto")
    t.add_argument("run_dir")
    t.add_argument("--config", default="cpu", help="the tscore: settings of the refit")
    t.add_argument("--cache-dir", default=".cache/preprocessed")
    t.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.command == "tscore":
        Path(args.out).mkdir(parents=True, exist_ok=True)
        rows = refit_tscore(Path(args.run_dir), Path(args.cache_dir), load_config(args.config).tscore)
        rows.to_csv(Path(args.out) / "tscore.csv", index=False)
        agreement = tscore_agreement(rows)
        (Path(args.out) / "tscore.json").write_text(json.dumps(strict_json(agreement), indent=1))
        print(json.dumps(strict_json(agreement), indent=1))
        return 0
    if args.command == "covariates":
        oof = pd.read_csv(Path(args.run_dir) / "oof.csv", keep_default_na=False)
        print(json.dumps(strict_json(summarise(covariate_oof(oof, args.columns))), indent=1))
        return 0
    if args.command in ("no-mirror", "markers"):
        Path(args.out).mkdir(parents=True, exist_ok=True)
        change = {"mirror": False} if args.command == "no-mirror" else {"mask_markers": True}
        oof = rescore(Path(args.run_dir), Path(args.cache_dir), **change)
        oof.to_csv(Path(args.out) / "oof.csv", index=False)
        return 0
    if args.command == "ensemble":
        Path(args.out).mkdir(parents=True, exist_ok=True)
        oof = ensemble([Path(d) for d in args.run_dirs], Path(args.cache_dir))
        oof.to_csv(Path(args.out) / "oof.csv", index=False)
        print(json.dumps(strict_json({"cohorts": summarise(oof), "bilateral": bilateral_agreement(oof)}), indent=1))
        return 0
    if args.command == "bilateral":
        oofs = {d: pd.read_csv(Path(d) / "oof.csv", keep_default_na=False) for d in args.run_dirs}
        rows: dict[str, dict] = {d: bilateral_agreement(oof) for d, oof in oofs.items()}
        first, *others = args.run_dirs
        for d in others:  # do the runs see the same difference between a film's two knees?
            rows[d]["side_differences_against_" + first] = side_difference_agreement(oofs[first], oofs[d])
        print(json.dumps(strict_json(rows), indent=1))
        return 0
    if args.command == "compare":
        read = [pd.read_csv(Path(d) / "oof.csv", keep_default_na=False) for d in (args.a, args.b)]
        print(json.dumps(compare(*read, films=args.films), indent=1))
        return 0
    out = Path(args.out)
    manifest = read_manifest(args.manifest)
    if args.films:
        manifest = bilateral_as_films(manifest)
    fold_of = None
    if args.folds_from:
        fold_of = pd.read_csv(Path(args.folds_from) / "oof.csv", keep_default_na=False)
    groups = None
    if args.max_distance >= 0:
        from strnet.data.audit import group_ids

        groups = group_ids(manifest, max_distance=args.max_distance)
    cfg = load_config(args.config, args.set)
    oof = run(
        cfg,
        manifest,
        out,
        k=args.folds,
        seed=args.seed,
        groups=groups,
        tracking=not args.no_tracking,
        fold_of=fold_of,
        fold_of_name=str(Path(args.folds_from or "") / "oof.csv"),
    )
    k = int(oof["fold"].max()) + 1
    summary = {
        "folds": k,
        "seed": args.seed,
        "folds_from": args.folds_from,
        "films": args.films,
        "overrides": args.set,
        "cohorts": summarise(oof),
        "cohorts_per_film": summarise(per_film(oof)),
        "runs": [fold_run(out / f"fold-{i}") for i in range(k)],
    }
    (out / "cv.json").write_text(json.dumps(strict_json(summary), indent=1))
    for cohort, row in summary["cohorts"].items():
        print(f"{cohort}: {json.dumps(row)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
