"""Cross-validation over training patients: which knees each fold may see, the out-of-fold AUROC against
scikit-learn, the paired comparison, and a whole tiny run that scores every pooled knee exactly once."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.special import logit
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import roc_auc_score

import strnet.centralized
from configs import load_config
from simulations import bilateral_drivers as BD
from simulations import cross_validate as CV
from simulations.scenario import build_synthetic_scenario
from strnet.bundle import load_bundle
from strnet.data.manifest import read_manifest
from tests.tiny import TINY_RUN


def _manifest(n_patients: int = 40, seed: int = 0) -> pd.DataFrame:
    """Two sources of bilateral films (two rows per patient), a test split and an external site."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        source = "a" if p % 2 else "b"
        label = rng.choice(["normal", "osteopenia", "osteoporosis"], p=[0.4, 0.4, 0.2])
        split = rng.choice(["train", "val", "test"], p=[0.6, 0.2, 0.2])
        site = "ext" if p % 7 == 0 else f"site-{source}"
        for side in ("R", "L"):
            rows.append(
                {"path": f"/x/{p}.png", "patient_id": f"P{p}", "site": site, "source": source,
                 "split": "test" if site == "ext" else split, "label_cls": label, "side": side}
            )  # fmt: skip
    return pd.DataFrame(rows)


def test_folds_keep_patients_whole_and_leave_test_and_external_rows_alone() -> None:
    df = _manifest()
    mask = CV.pool_mask(df)
    assert not df[mask]["split"].eq("test").any() and df[~mask]["split"].eq("test").all()
    pool = df[mask].reset_index(drop=True)
    fold = CV.assign_folds(pool, 3, seed=1)
    assert sorted(set(fold)) == [0, 1, 2]
    assert (pd.Series(fold).groupby(pool["patient_id"]).nunique() == 1).all()  # both knees in one fold
    # stratified by source and label: each stratum's patients spread over the folds within one of even
    counts = pd.crosstab(pool["source"] + "|" + pool["label_cls"], fold)
    assert ((counts.max(axis=1) - counts.min(axis=1)) <= 4).all()  # 2 rows per patient
    for i in range(3):
        m = CV.fold_manifest(pool, fold, i)
        assert (m.loc[fold == i, "split"] == "test").all()
        pd.testing.assert_frame_equal(m[fold != i], pool[fold != i])
    assert (CV.assign_folds(pool, 3, seed=1) == fold).all()  # seeded


def test_bad_fold_requests_are_refused() -> None:
    pool = _manifest(6).pipe(lambda d: d[CV.pool_mask(d)]).reset_index(drop=True)
    with pytest.raises(ValueError, match="at least 2 folds"):
        CV.assign_folds(pool, 1, seed=0)
    with pytest.raises(ValueError, match="cannot make 50 folds"):
        CV.assign_folds(pool, 50, seed=0)
    with pytest.raises(ValueError, match="no labelled train or val rows"):
        CV.pool_mask(pool.assign(split="test"))


def _scored(seed: int, folds: int = 3) -> pd.DataFrame:
    df = _manifest(60).pipe(lambda d: d[CV.pool_mask(d)]).reset_index(drop=True)
    rng = np.random.default_rng(seed)
    y = (df["label_cls"] != "normal").to_numpy()
    fold = df["patient_id"].str[1:].astype(int) % folds  # a film's knees in one fold, as assign_folds keeps them
    return df.assign(prob_bone_loss=1 / (1 + np.exp(-(rng.normal(size=len(df)) + y))), fold=fold)


def test_cohort_auroc_is_scikit_learns_on_all_folds_and_per_fold() -> None:
    oof = _scored(0)
    summary = CV.summarise(oof, n_boot=200)
    assert set(summary) == {"pooled", "a", "b"}
    for name, frame in (("pooled", oof), ("a", oof[oof["source"] == "a"])):
        y = (frame["label_cls"] != "normal").to_numpy()
        row = summary[name]
        assert row["auroc"] == pytest.approx(roc_auc_score(y, frame["prob_bone_loss"]))
        assert row["knees"] == len(frame) and row["normal"] == int((~y).sum())
        assert row["ci_lo"] < row["auroc"] < row["ci_hi"]
        per_fold = [roc_auc_score(f["label_cls"] != "normal", f["prob_bone_loss"]) for _, f in frame.groupby("fold")]
        assert row["fold_aurocs"] == pytest.approx(per_fold)
        assert row["fold_sd"] == pytest.approx(np.std(per_fold, ddof=1))


def test_compare_pairs_the_same_knees_and_refuses_other_folds() -> None:
    a, b = _scored(0), _scored(1)
    same = CV.compare(a, a, n_boot=50)
    assert all(r["difference"] == 0 and r["ci_lo"] == r["ci_hi"] == 0 for r in same.values())
    diff = CV.compare(a, b, n_boot=200)
    for name, frame_a in (("pooled", a), ("b", a[a["source"] == "b"])):
        frame_b = b.loc[frame_a.index]
        y = frame_a["label_cls"] != "normal"
        expected = roc_auc_score(y, frame_b["prob_bone_loss"]) - roc_auc_score(y, frame_a["prob_bone_loss"])
        assert diff[name]["difference"] == pytest.approx(expected)
        assert diff[name]["ci_lo"] <= diff[name]["difference"] <= diff[name]["ci_hi"]
    # the pooled row's within- and across-source parts, counted pair by pair
    for run, frame in (("a", a), ("b", b)):
        pos, neg = frame[frame["label_cls"] != "normal"], frame[frame["label_cls"] == "normal"]
        won: dict[bool, list[float]] = {True: [], False: []}
        for _, p in pos.iterrows():
            for _, n in neg.iterrows():
                d = p["prob_bone_loss"] - n["prob_bone_loss"]
                won[p["source"] == n["source"]].append(1.0 if d > 0 else 0.5 if d == 0 else 0.0)
        assert diff["pooled"][f"within_source_{run}"] == pytest.approx(np.mean(won[True]))
        assert diff["pooled"][f"across_sources_{run}"] == pytest.approx(np.mean(won[False]))
    with pytest.raises(ValueError, match="different folds"):
        CV.compare(a, b.assign(fold=(b["fold"] + 1) % 3))
    with pytest.raises(ValueError, match="different knees"):
        CV.compare(a, b.iloc[:-2])


def test_bilateral_agreement_reads_each_film_with_one_right_and_one_left_knee() -> None:
    oof = _scored(0)
    oof["flag_bone_loss"] = (oof["prob_bone_loss"] >= 0.6).astype(float)
    oof = oof.drop(index=oof.index[oof["path"] == oof["path"].iloc[0]][1:])  # the first film keeps one knee
    out = CV.bilateral_agreement(oof)
    assert set(out) == {"pooled", "a", "b"} and out["pooled"]["films"] == oof["path"].nunique() - 1
    for name, frame in (("pooled", oof), ("a", oof[oof["source"] == "a"])):
        right, left = [], []
        for _, film in frame.groupby("path"):
            if sorted(film["side"]) == ["L", "R"]:
                right.append(film[film["side"] == "R"].iloc[0])
                left.append(film[film["side"] == "L"].iloc[0])
        p_r = np.array([r["prob_bone_loss"] for r in right])
        p_l = np.array([r["prob_bone_loss"] for r in left])
        f_r = np.array([r["flag_bone_loss"] for r in right])
        f_l = np.array([r["flag_bone_loss"] for r in left])
        assert out[name]["films"] == len(right) > 0
        assert out[name]["flags_differ"] == pytest.approx(np.mean(f_r != f_l))
        assert out[name]["mean_abs_dp"] == pytest.approx(np.mean(np.abs(p_r - p_l)))
        assert out[name]["spearman"] == pytest.approx(spearmanr(p_r, p_l).statistic)
    films = CV.bilateral_agreement(CV.bilateral_as_films(oof))  # whole films: no knee pairs left to compare
    assert films["pooled"]["films"] == 0 and np.isnan(films["pooled"]["spearman"])


def test_side_differences_of_two_runs_are_paired_by_film() -> None:
    a, b = _scored(0), _scored(1)
    b = b.iloc[::-1].reset_index(drop=True)  # another row order: films, not rows, are paired
    got = CV.side_difference_agreement(a, b)
    diff = {}
    for name, frame in (("a", a), ("b", b)):
        wide = frame.pivot(index="path", columns="side", values="prob_bone_loss")
        diff[name] = wide["R"] - wide["L"]
    assert got["films"] == a["path"].nunique()
    want = spearmanr(diff["a"], diff["b"].loc[diff["a"].index]).statistic
    assert got["spearman_of_differences"] == pytest.approx(want)
    assert CV.side_difference_agreement(a, a)["spearman_of_differences"] == pytest.approx(1.0)
    assert CV.side_differences(CV.bilateral_as_films(a)).empty


def test_whole_films_replace_both_knee_rows_and_keep_a_lone_knee() -> None:
    df = _manifest(10)
    df.loc[df.index[-1], "side"] = "x"  # marks the last film's left row for removal: one knee left
    df = df[df["side"] != "x"].reset_index(drop=True)
    films = CV.bilateral_as_films(df)
    assert len(films) == df["path"].nunique()
    lone = df["path"].iloc[-1]
    assert films.loc[films["path"] == lone, "side"].tolist() == ["R"]
    assert (films.loc[films["path"] != lone, "side"] == "").all()
    pd.testing.assert_frame_equal(  # labels, splits and sites as the film's rows had them
        films.drop(columns="side"), df.drop_duplicates("path").drop(columns="side").reset_index(drop=True)
    )


def test_folds_from_another_run_follow_its_films_and_name_what_is_missing() -> None:
    oof = _scored(0)
    pool = CV.bilateral_as_films(oof.drop(columns=["fold", "prob_bone_loss"]))
    fold = CV.folds_from(oof, pool, "runs/cv/base")
    expected = oof.drop_duplicates("path").set_index("path")["fold"]
    assert (fold == pool["path"].map(expected).to_numpy()).all()
    with pytest.raises(ValueError, match=r"runs/cv/base: 1 film\(s\) of this manifest were not scored there"):
        CV.folds_from(oof[oof["path"] != pool["path"].iloc[0]], pool, "runs/cv/base")
    split = oof.copy()
    split.loc[split.index[0], "fold"] = (split["fold"].iloc[0] + 1) % 3
    with pytest.raises(ValueError, match="a film's knees sit in two folds"):
        CV.folds_from(split, pool, "runs/cv/base")


def test_per_film_comparison_reads_the_mean_of_a_films_knees() -> None:
    a = _scored(0)
    b = CV.per_film(_scored(1).assign(fold=a["fold"]))  # B scored whole films
    films = CV.per_film(a)
    assert len(films) == a["path"].nunique()
    first = a[a["path"] == films["path"].iloc[0]]
    assert films["prob_bone_loss"].iloc[0] == pytest.approx(first["prob_bone_loss"].mean())
    out = CV.compare(a, b, films=True, n_boot=50)
    y = films["label_cls"] != "normal"
    expected = roc_auc_score(y, b["prob_bone_loss"]) - roc_auc_score(y, films["prob_bone_loss"])
    assert out["pooled"]["difference"] == pytest.approx(expected) and out["pooled"]["n"] == len(films)


@pytest.mark.slow
def test_a_tiny_cross_validation_scores_every_pooled_knee_once_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scenario = build_synthetic_scenario(tmp_path / "scenario", seed=3, n_patients=24, image_size=64)
    df = read_manifest(scenario.manifest)
    overrides = [*TINY_RUN, f"data.cache_dir={tmp_path / 'cache'}", "train.epochs=2", "loss.warmup_epochs=1"]
    overrides.append("model.test_time_mirror=true")
    cfg = load_config("demo", overrides)
    oof = CV.run(cfg, df, tmp_path / "cv", k=2, seed=0, tracking=False)

    pool = df[CV.pool_mask(df)]
    assert len(oof) == len(pool)
    assert sorted(zip(oof["path"], oof["side"], strict=True)) == sorted(zip(pool["path"], pool["side"], strict=True))
    for i in (0, 1):
        fold_rows = read_manifest(tmp_path / "cv" / f"fold-{i}" / "manifest.csv")
        scored = set(oof.loc[oof["fold"] == i, "path"])
        assert scored == set(fold_rows.loc[fold_rows["split"] == "test", "path"])
        assert not scored & set(fold_rows.loc[fold_rows["split"] != "test", "path"])  # never trained or selected on
        assert (tmp_path / "cv" / f"fold-{i}" / "bundle" / "model.pt").exists()
        assert 1 <= CV.fold_run(tmp_path / "cv" / f"fold-{i}")["best_step"] <= 2
    assert oof["prob_bone_loss"].between(0, 1).all()

    # the same networks on the same knees without mirror averaging: every knee in its fold, other scores
    plain = CV.rescore(tmp_path / "cv", tmp_path / "cache", mirror=False)
    pd.testing.assert_frame_equal(plain[["path", "side", "fold"]], oof[["path", "side", "fold"]])
    assert not np.allclose(plain["prob_bone_loss"], oof["prob_bone_loss"])
    with pytest.raises(ValueError, match="not a cross_validate run"):
        CV.rescore(tmp_path / "cache", None)

    # the left-right diagnosis re-renders each bilateral film's knees from the pipeline's steps: its "as trained"
    # rendering must give the run's own out-of-fold scores (interventions raises otherwise)
    params = load_bundle(tmp_path / "cv" / "fold-0" / "bundle").preprocess
    pairs = BD.load_films(oof, params)
    assert len(pairs) >= 3
    drivers = BD.interventions(tmp_path / "cv", pairs, params).set_index("variant")
    assert list(drivers.index) == list(BD.VARIANTS)
    assert drivers.loc["as trained", "knee_moved"] < BD.REPRODUCE_ATOL
    assert drivers.loc["matched crop", "knee_moved"] > drivers.loc["as trained", "knee_moved"]

    # a run combined with itself is its own networks: in every fold the ensemble's logit is an affine map of the
    # run's (its Platt refit on top of theirs); runs cut into other folds are refused
    twice = CV.ensemble([tmp_path / "cv", tmp_path / "cv"], tmp_path / "cache")
    pd.testing.assert_frame_equal(twice[["path", "side", "fold"]], oof[["path", "side", "fold"]])
    for i in (0, 1):
        fold = (oof["fold"] == i).to_numpy()
        z_run, z_twice = (logit(f.loc[fold, "prob_bone_loss"].to_numpy(float)) for f in (oof, twice))
        slope, intercept = np.polyfit(z_run, z_twice, 1)
        assert slope > 0
        np.testing.assert_allclose(z_twice, slope * z_run + intercept, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="same fold-"):
        CV.ensemble([tmp_path / "cv", tmp_path / "cache"], None)

    # each fold's network refits its T-score branch with the image adapter on, off and auto: auto is one of the two
    ts = CV.refit_tscore(tmp_path / "cv", tmp_path / "cache", replace(cfg.tscore, rounds=3, patience=0))
    with_t = oof[pd.to_numeric(oof["t_score"], errors="coerce").notna()]
    assert sorted(zip(ts["path"], ts["side"], strict=True)) == sorted(zip(with_t["path"], with_t["side"], strict=True))
    assert (ts["image_path_on"] == "on").all() and (ts["image_path_off"] == "off").all()
    for _, part in ts.groupby("fold"):
        pick = part["image_path_auto"].iloc[0]
        np.testing.assert_allclose(part["t_score_auto"], part[f"t_score_{pick}"], rtol=0, atol=1e-6)
    assert not np.allclose(ts["t_score_on"], ts["t_score_off"])
    assert ts["t_score_covariates_linear"].notna().all()

    # a finished run resumes without training
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("trained again")

    monkeypatch.setattr(strnet.centralized, "run_centralized", refuse)
    again = CV.run(cfg, df, tmp_path / "cv", k=2, seed=0, tracking=False)
    pd.testing.assert_frame_equal(again, pd.read_csv(tmp_path / "cv" / "oof.csv", keep_default_na=False))


def test_covariates_alone_are_scored_out_of_fold_per_source() -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    oof = _scored(0)
    rng = np.random.default_rng(1)
    oof["age"] = 40 + 20 * (oof["label_cls"] != "normal") + rng.normal(0, 10, len(oof))
    oof.loc[oof.index[:4], "age"] = np.nan  # left out, not guessed
    got = CV.covariate_oof(oof, ["age"])
    assert len(got) == len(oof) - 4
    part = oof[(oof["source"] == "a") & oof["age"].notna()]
    y = (part["label_cls"] != "normal").to_numpy()
    score = part["fold"] == 1
    model = make_pipeline(StandardScaler(), LogisticRegression()).fit(part.loc[~score, ["age"]], y[~score.to_numpy()])
    expected = model.predict_proba(part.loc[score, ["age"]])[:, 1]
    assert got.loc[part.index[score.to_numpy()], "prob_bone_loss"].to_numpy() == pytest.approx(expected)
    with pytest.raises(ValueError, match=r"oof.csv has no column\(s\) \['bmi'\]"):
        CV.covariate_oof(oof, ["bmi"])


def test_tscore_agreement_matches_scipy_and_pairs_whole_films() -> None:
    rng = np.random.default_rng(0)
    films = np.repeat([f"f{i}.png" for i in range(30)], 2)  # two knees per film
    truth = np.repeat(rng.normal(-1.5, 1.0, 30), 2) + rng.normal(0, 0.1, 60)
    rows = pd.DataFrame(
        {
            "path": films,
            "t_score": truth,
            "t_score_bundle": truth + rng.normal(0, 1.0, 60),
            "t_score_off": truth + rng.normal(0, 0.3, 60),
        }
    )
    got = CV.tscore_agreement(rows, n_boot=200)
    for name in ("bundle", "off"):
        assert got[name]["r"] == pytest.approx(pearsonr(truth, rows[f"t_score_{name}"])[0])
        assert got[name]["mae"] == pytest.approx(np.mean(np.abs(rows[f"t_score_{name}"] - truth)))
        assert (got[name]["n"], got[name]["films"]) == (60, 30)
    assert "ci_lo" not in got["bundle"]
    diff = got["off"]["r_minus_reference"]
    assert diff == pytest.approx(got["off"]["r"] - got["bundle"]["r"])
    assert 0 < got["off"]["ci_lo"] < diff < got["off"]["ci_hi"]  # the closer estimate wins clearly here
