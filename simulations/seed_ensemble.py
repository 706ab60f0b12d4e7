"""How far one run of a recipe can be trusted, and what averaging several runs gives.

    python -m simulations.seed_ensemble runs/seeds/42/bundle runs/seeds/43/bundle runs/seeds/44/bundle \\
        --manifest runs/real/split.csv
    python -m simulations.seed_ensemble runs/real/centralized/bundle --manifest runs/real/split.csv

An ensemble bundle (``model.members``) counts as its members, each the one-network run of its seed.

Every bundle scores the same knees: the validation split (pooled and per source), the training sites' test
split and every external site. For each cohort the table gives each bundle's AUROC and left–right agreement,
their mean and spread, and the *ensemble*: the runs combined as ``strnet train`` combines an ensemble's members
(:mod:`strnet.ensemble`: the mean of their calibrated logits, calibrated again, τ* by the paper's rule on its
own validation probabilities). Choosing between one run and an
ensemble is done on the validation rows; the test and external rows are reported, never used to choose.

``--soup`` adds a *model soup* (Wortsman et al. 2022): one model whose weights are the mean of the bundles'
(every run starts from the same ImageNet weights, so their fine-tuned weights may share a basin), with BatchNorm
statistics re-estimated on each training site's training images and pooled (:mod:`strnet.batchnorm`), Platt
calibration refitted and τ* chosen on validation. Unlike the ensemble it serves as one bundle.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.special import logit

from configs.schema import ThresholdConfig
from simulations.bn_probe import with_statistics
from strnet import metrics as M
from strnet.bundle import Bundle, load_bundle
from strnet.calibration import fit_platt_to_logits
from strnet.data.cache import PreprocessCache
from strnet.data.manifest import read_manifest
from strnet.ensemble import STRNetEnsemble
from strnet.evaluation import frame_metrics, predict_frame

COLUMNS = {
    "screening_auroc": "AUROC",
    "radiograph_auroc": "AUROC per film",
    "screening_sensitivity": "sens",
    "screening_specificity": "spec",
    "bilateral_n_pairs": "films",
    "bilateral_flag_disagreement": "L-R flags differ",
    "bilateral_spearman": "Spearman R/L",
    "t_score_pearson_r": "T r",
}


def cohorts(df: pd.DataFrame, train_sites: list[str]) -> dict[str, pd.DataFrame]:
    """Validation (pooled, then per source), pooled test, and each external site's whole cohort."""
    df = df[df["label_cls"] != ""]
    train = df[df["site"].isin(train_sites)]
    out = {"val (pooled)": train[train["split"] == "val"]}
    for site in train_sites:
        out[f"val {site}"] = train[(train["split"] == "val") & (train["site"] == site)]
    out["test (pooled)"] = train[train["split"] == "test"]
    for site in sorted(set(df["site"]) - set(train_sites)):
        out[site] = df[df["site"] == site]
    return {k: v.reset_index(drop=True) for k, v in out.items() if len(v)}


def mean_logit(frames: list[pd.DataFrame]) -> np.ndarray:
    """The mean of the runs' calibrated logits: the ensemble's score (:mod:`strnet.ensemble`) before its own
    Platt calibration, which is monotone, so rankings and AUROC are the ensemble's."""
    return np.mean([logit(np.clip(f["prob_bone_loss"].to_numpy(float), 1e-15, 1 - 1e-15)) for f in frames], axis=0)


def source_pairs(y: np.ndarray, score: np.ndarray, source: np.ndarray) -> dict[str, float]:
    """A pooled AUROC split by its (bone-loss, normal) pairs: those within one source and those across two.

    Pooled AUROC is the share of such pairs a model orders correctly (ties half). Across sources whose
    prevalence differs (Mendeley is mostly bone loss) a model can order pairs by telling the sources apart; within
    one source it cannot. The pooled value is the pair-count-weighted mean of the two parts.
    """
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    diff = score[pos][:, None] - score[neg][None, :]
    won = (diff > 0) + 0.5 * (diff == 0)
    same = source[pos][:, None] == source[neg][None, :]
    part = {
        name: float(won[m].mean()) if m.any() else float("nan") for name, m in (("within", same), ("across", ~same))
    }
    return {
        "within_source": part["within"],
        "across_sources": part["across"],
        "pairs_within": int(same.sum()),
        "pairs_across": int((~same).sum()),
    }


def pair_columns(frame: pd.DataFrame) -> dict[str, float]:
    """AUROC over the (bone-loss, normal) pairs within one source and across two (NaN for a one-source cohort):
    a federated site only ever compares knees of its own source, so the two parts tell its costs apart."""
    labelled = frame[frame["label_cls"] != ""]
    if labelled["source"].nunique() < 2:
        return {"within": np.nan, "across": np.nan}
    y = (labelled["label_cls"] != "normal").to_numpy(int)
    pairs = source_pairs(y, labelled["prob_bone_loss"].to_numpy(float), labelled["source"].to_numpy())
    return {"within": pairs["within_source"], "across": pairs["across_sources"]}


def combine(bundles: list[Bundle], val: pd.DataFrame, cache: PreprocessCache | None) -> Bundle:
    """The runs as the ensemble ``strnet train`` makes with ``model.members`` (:class:`STRNetEnsemble`): each run's
    own calibration on its logit, their mean calibrated by Platt and τ* chosen on validation."""
    model = STRNetEnsemble([copy.deepcopy(b.model) for b in bundles]).eval()
    for k, b in enumerate(bundles):
        model.set_member_calibration(k, b.calibration.a, b.calibration.b)
    metadata = copy.deepcopy(bundles[0].metadata)
    metadata["model"]["members"] = len(bundles)
    return _calibrated(model, metadata, val, cache)


def soup(bundles: list[Bundle], train: list[pd.DataFrame], val: pd.DataFrame, cache: PreprocessCache | None) -> Bundle:
    """The mean of the bundles' weights as one bundle: statistics re-estimated, calibration and τ* refitted."""
    states = [b.model.state_dict() for b in bundles]
    mean = {
        k: torch.stack([s[k].float() for s in states]).mean(0).to(v.dtype) if v.is_floating_point() else v
        for k, v in states[0].items()
    }
    model = copy.deepcopy(bundles[0].model)
    model.load_state_dict(mean)
    model = with_statistics(model, train, bundles[0], cache)
    return _calibrated(model, copy.deepcopy(bundles[0].metadata), val, cache)


def _calibrated(model: torch.nn.Module, metadata: dict, val: pd.DataFrame, cache: PreprocessCache | None) -> Bundle:
    """A combined model as a bundle: Platt fitted on its validation logits, τ* by the paper's rule on top."""
    metadata["calibration"] = None
    raw = predict_frame(Bundle(model, metadata), val, cache=cache, progress=False)
    y = (raw["label_cls"] != "normal").to_numpy(int)
    metadata["calibration"] = fit_platt_to_logits(logit(raw["prob_bone_loss_uncalibrated"].to_numpy(float)), y)
    calibrated = predict_frame(Bundle(model, metadata), val, cache=cache, progress=False)
    metadata["threshold"]["value"] = rule_threshold(metadata, y, calibrated["prob_bone_loss"].to_numpy(float))
    return Bundle(model, metadata)


def rule_threshold(metadata: dict, y: np.ndarray, prob: np.ndarray) -> float:
    """The paper's τ* rule with the grid and sensitivity the bundle's own τ* was chosen with."""
    start, stop, step = metadata["threshold"]["grid"]
    grid = ThresholdConfig(grid_start=start, grid_stop=stop, grid_step=step).grid()
    return M.select_threshold(y, prob, metadata["threshold"]["min_sensitivity"], grid)


ARCHITECTURE = ("backbone", "neck_dim", "dropout", "norm", "input_size")


def architecture(bundle: Bundle) -> dict:
    """What makes two runs the same network (an ensemble's members share it with a one-network run)."""
    return {k: bundle.metadata["model"].get(k) for k in ARCHITECTURE}


def runs_of(name: str, bundle: Bundle, val: pd.DataFrame, cache: PreprocessCache | None) -> dict[str, Bundle]:
    """A bundle as the runs it holds: itself, or an ensemble's members (``<name> seed <s>``), each the one-network
    run its seed gave — its own calibration, and τ* by the paper's rule on its own validation probabilities."""
    if not isinstance(bundle.model, STRNetEnsemble):
        return {name: bundle}
    out = {}
    for net, member in zip(bundle.model.members, bundle.metadata["training"]["members"], strict=True):
        metadata = copy.deepcopy(bundle.metadata) | {"calibration": member["calibration"]}
        metadata["model"]["members"] = 1
        run = Bundle(net, metadata)
        calibrated = predict_frame(run, val, cache=cache, progress=False)
        y = (calibrated["label_cls"] != "normal").to_numpy(int)
        metadata["threshold"]["value"] = rule_threshold(metadata, y, calibrated["prob_bone_loss"].to_numpy(float))
        out[f"{name} seed {member['seed']}"] = run
    return out


def run_name(bundle: Path) -> str:
    """A run's folder name (``runs/seeds/43/bundle`` -> ``43``)."""
    return bundle.parent.name if bundle.name == "bundle" else bundle.name


def summarise(
    bundles: list[Path], manifest: Path, train_sites: list[str], cache_dir: Path, *, with_soup: bool = False
) -> tuple[pd.DataFrame, pd.DataFrame]:
    df = read_manifest(manifest)
    parts = cohorts(df, train_sites)
    cache = PreprocessCache(cache_dir)
    names = [run_name(b) for b in bundles]
    if len(set(names)) < len(names):
        raise ValueError(f"need runs with distinct folder names, got {[str(b) for b in bundles]}")
    loaded: dict[str, Bundle] = {}
    for name, path in zip(names, bundles, strict=True):
        bundle = load_bundle(path)
        if architecture(bundle) != architecture(load_bundle(bundles[0])):
            raise ValueError(
                f"{path}: another model than {bundles[0]} ({bundle.metadata['model']}); runs of one recipe only"
            )
        loaded |= runs_of(name, bundle, parts["val (pooled)"], cache)
    if len(loaded) < 2:
        raise ValueError(f"need two or more runs (bundles, or an ensemble's members), got {[str(b) for b in bundles]}")
    singles = list(loaded)
    runs = list(loaded.values())
    loaded["ensemble"] = combine(runs, parts["val (pooled)"], cache)
    if with_soup:
        train = [df[(df["site"] == s) & (df["split"] == "train")] for s in train_sites]
        loaded["soup"] = soup(runs, train, parts["val (pooled)"], cache)
    frames = {
        name: {run: predict_frame(b, part, cache=cache, progress=False) for run, b in loaded.items()}
        for name, part in parts.items()
    }
    rows = []
    for name, per_run in frames.items():
        for run, frame in per_run.items():
            threshold = loaded[run].threshold
            metrics, _ = frame_metrics(frame, threshold, n_bins=1000, n_boot=0, seed=0)
            rows.append(
                {"cohort": name, "run": run, "knees": len(frame), "τ*": threshold}
                | {title: metrics.get(key, np.nan) for key, title in COLUMNS.items()}
                | pair_columns(frame)
            )
    table = pd.DataFrame(rows)
    spread = (
        table[table["run"].isin(singles)]
        .groupby("cohort", sort=False)[[*COLUMNS.values(), "within", "across"]]
        .agg(["mean", "std"])
    )
    spread.columns = [f"{a} {b}" for a, b in spread.columns]
    return table, spread


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "bundles", nargs="+", type=Path, help="bundle folders of one recipe (one per seed; an ensemble: its members)"
    )
    parser.add_argument("--manifest", required=True, type=Path)
    parser.add_argument("--train-sites", nargs="+", default=["stage1", "stage2"])
    parser.add_argument("--cache", type=Path, default=Path(".cache/preprocessed"))
    parser.add_argument("--soup", action="store_true", help="also score the mean of the bundles' weights")
    args = parser.parse_args(argv)
    table, spread = summarise(args.bundles, args.manifest, args.train_sites, args.cache, with_soup=args.soup)
    with pd.option_context("display.width", 200, "display.precision", 3, "display.max_columns", 40):
        print(table.to_string(index=False))
        print()
        print(spread.to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
