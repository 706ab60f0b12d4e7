"""How often a model of known quality meets a target on a cohort of a given size (``simulations.target_power``):
its statistics against scikit-learn and SciPy, its spread against Hanley & McNeil, and its reading of a manifest."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import multivariate_normal, norm, spearmanr
from sklearn.metrics import roc_auc_score

from simulations import target_power as T
from strnet.data.manifest import write_manifest


def test_rowwise_auroc_is_sklearns_with_ties() -> None:
    rng = np.random.default_rng(0)
    normal = np.round(rng.normal(size=(50, 7)), 1)  # rounding makes ties across the classes
    bone_loss = np.round(rng.normal(0.8, 1.0, size=(50, 19)), 1)
    y = np.r_[np.zeros(7), np.ones(19)]
    expected = [roc_auc_score(y, np.r_[n, b]) for n, b in zip(normal, bone_loss, strict=True)]
    np.testing.assert_allclose(T.rowwise_auroc(normal, bone_loss), expected, atol=1e-12)


def test_rowwise_spearman_is_scipys_with_ties() -> None:
    rng = np.random.default_rng(1)
    a, b = np.round(rng.normal(size=(40, 9)), 1), np.round(rng.normal(size=(40, 9)), 1)
    expected = [spearmanr(x, y).statistic for x, y in zip(a, b, strict=True)]
    np.testing.assert_allclose(T.rowwise_spearman(a, b), expected, atol=1e-12)


def test_draws_centre_on_the_true_value() -> None:
    rng = np.random.default_rng(2)
    assert T.auroc_draws(0.7, 200, 200, 400, rng).mean() == pytest.approx(0.7, abs=0.005)
    assert T.spearman_draws(0.77, 400, 400, rng).mean() == pytest.approx(0.77, abs=0.005)


def test_the_auroc_spread_is_the_exact_mann_whitney_variance() -> None:
    """The variance of the Mann–Whitney AUROC (Hanley & McNeil's form, 1982) with its Q1 and Q2 evaluated exactly
    for binormal scores: Q1 = P(two bone-loss knees both outscore one normal knee) = Φ2(Φ⁻¹(A), Φ⁻¹(A); ρ = ½),
    and Q2 the same by symmetry. Hanley & McNeil's own exponential approximation of Q1, Q2 would say 0.061; the
    binormal spread at 8 normal knees is wider. Sizes: the Mendeley hold-out's, at issue 8's target."""
    a, n0, n1 = 0.85, 8, 39
    z = norm.ppf(a)
    q = multivariate_normal(mean=[0.0, 0.0], cov=[[1.0, 0.5], [0.5, 1.0]]).cdf([z, z])
    se = math.sqrt((a * (1 - a) + (n1 - 1) * (q - a * a) + (n0 - 1) * (q - a * a)) / (n0 * n1))
    draws = T.auroc_draws(a, n0, n1, 20_000, np.random.default_rng(3))
    assert draws.std() == pytest.approx(se, rel=0.03)


def test_needed_is_the_smallest_size_whose_spread_fits() -> None:
    def draw(n: int) -> np.ndarray:  # 95 % of the values within ± 1/n of the median, exactly
        return np.repeat([-1.0 / n, 0.0, 1.0 / n], [50, 900, 50])

    assert T.needed(draw, 0.01, start=3) == 100
    assert T.needed(draw, 0.01, start=64) == 100
    assert T.needed(draw, 0.01, start=250) == 250  # a cohort that already fits needs no more than it has
    with pytest.raises(ValueError, match="more than 1000"):
        T.needed(draw, 1e-4, start=3, limit=1000)


def test_bad_parameters_are_refused_by_name() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="0 normal"):
        T.auroc_draws(0.8, 0, 10, 10, rng)
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        T.auroc_draws(1.0, 5, 10, 10, rng)
    with pytest.raises(ValueError, match="3 or more films"):
        T.spearman_draws(0.8, 2, 10, rng)


def rows(site: str, split: str, labels: list[str], *, bilateral: int = 0) -> list[dict[str, str]]:
    """One knee per label; the first ``2 * bilateral`` labels are the two knees of ``bilateral`` films."""
    out = []
    for i, label in enumerate(labels):
        film = i // 2 if i < 2 * bilateral else i
        side = ("R", "L")[i % 2] if i < 2 * bilateral else ""
        out.append(
            {"path": f"/x/{site}-{split}-{film}.png", "patient_id": f"{site}-{film}", "site": site, "source": site}
            | {"split": split, "label_cls": label, "side": side}
        )
    return out


def test_cohort_counts_counts_labelled_knees_and_films_with_both_knees() -> None:
    frame = pd.DataFrame(
        rows("s", "test", ["normal", "osteopenia", "osteoporosis", "normal", "", "osteopenia"], bilateral=2)
    )
    lone_right = {"path": "/x/lone.png", "patient_id": "p", "site": "s", "source": "s", "split": "test"}
    frame = pd.concat([frame, pd.DataFrame([lone_right | {"label_cls": "normal", "side": "R"}])], ignore_index=True)
    # film 0: normal R + osteopenia L (mixed: neither class's film); film 1: osteoporosis + normal (mixed)
    assert T.cohort_counts(frame) == {
        "normal": 3,
        "bone_loss": 3,
        "bilateral_films": 2,
        "normal_films": 0,
        "bone_loss_films": 0,
    }
    same = pd.DataFrame(rows("s", "test", ["normal", "normal", "osteopenia", "osteoporosis", "normal"], bilateral=2))
    assert T.cohort_counts(same) == {
        "normal": 3,
        "bone_loss": 2,
        "bilateral_films": 2,
        "normal_films": 1,
        "bone_loss_films": 1,
    }


def test_the_command_reports_each_cohort_of_a_split_manifest(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bone = ["osteopenia", "osteoporosis"]
    table = (
        rows("stage1", "train", ["normal"] * 4 + bone * 4)
        + rows("stage1", "test", ["normal", "osteopenia"] * 3, bilateral=3)
        + rows("holdout", "test", ["normal"] * 2 + bone * 4 + ["osteopenia", "normal"], bilateral=1)
    )
    manifest = write_manifest(pd.DataFrame(table), tmp_path / "split.csv")
    out = tmp_path / "power.json"
    assert T.main(["--manifest", str(manifest), "--draws", "500", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result) == {"test (pooled)", "holdout"}
    assert result["holdout"]["counts"] == {
        "normal": 3,
        "bone_loss": 9,
        "bilateral_films": 1,
        "normal_films": 1,
        "bone_loss_films": 0,
    }
    assert result["test (pooled)"]["counts"]["bilateral_films"] == 3
    meets = [s["meets"] for s in result["holdout"]["auroc"].values()]
    assert meets == sorted(meets) and meets[0] < 0.1 < meets[-1]  # a better model passes more often
    assert "spearman" not in result["holdout"]  # one film is no rank correlation
    assert result["holdout"]["disagreement"]["0.100"]["meets"] == pytest.approx(0.9)  # 0 of 1 film
    assert result["holdout"]["films_needed_for_disagreement"] > 1
    assert result["test (pooled)"]["films_needed"] > 3
    assert result["holdout"]["normal_knees_needed"] > 3
    assert (
        "## holdout: 3 normal, 9 bone-loss knees, 1 bilateral films (1 normal, 0 bone loss)" in capsys.readouterr().out
    )


def test_a_manifest_without_a_training_split_is_refused(tmp_path: Path) -> None:
    manifest = write_manifest(pd.DataFrame(rows("s", "test", ["normal", "osteopenia"])), tmp_path / "m.csv")
    with pytest.raises(SystemExit, match="no rows with split 'train'"):
        T.main(["--manifest", str(manifest)])


def test_flag_disagreement_is_binomial() -> None:
    """9 films at the cross-validated rate of 8.8 %: the 10 % target allows 0 films, met with chance 0.912⁹."""
    s = T.disagreement_summary(0.088, 9, 0.10)
    assert s["meets"] == pytest.approx(0.912**9, rel=1e-12)
    p_up_to_2 = sum(math.comb(9, k) * 0.088**k * 0.912 ** (9 - k) for k in range(3))  # 0.962 < 0.975
    assert p_up_to_2 < 0.975 and (s["low"], s["high"]) == (0.0, 3 / 9)
    two = T.disagreement_summary(0.088, 18, 0.10)  # 18 films: 0 or 1 of them
    assert two["meets"] == pytest.approx(0.912**18 + 18 * 0.088 * 0.912**17, rel=1e-12)
    with pytest.raises(ValueError, match="one or more films"):
        T.disagreement_summary(0.1, 0, 0.1)


def test_the_two_knees_of_a_film_correlate_as_asked_and_keep_the_marginal() -> None:
    rng = np.random.default_rng(4)
    scores = T.class_scores(0.7, 5, 2, 0.6, 40_000, rng)  # a lone knee, then two films' knee pairs
    assert scores.shape == (40_000, 5)
    assert np.corrcoef(scores[:, 1], scores[:, 2])[0, 1] == pytest.approx(0.6, abs=0.02)
    assert abs(np.corrcoef(scores[:, 2], scores[:, 3])[0, 1]) < 0.02  # two films are independent
    np.testing.assert_allclose(scores.mean(axis=0), 0.7, atol=0.02)
    np.testing.assert_allclose(scores.std(axis=0), 1.0, atol=0.02)
    clustered = T.auroc_draws(0.75, 8, 30, 20_000, rng, normal_films=3, bone_loss_films=12, film_correlation=0.7)
    independent = T.auroc_draws(0.75, 8, 30, 20_000, rng)
    assert clustered.mean() == pytest.approx(0.75, abs=0.005)
    assert clustered.std() > 1.1 * independent.std()  # fewer independent cases, a wider spread


def test_at_full_correlation_a_film_counts_once() -> None:
    """ρ = 1: a film's two knees score alike, and the AUROC is that of one knee per film (each pair of films
    then stands for four identical knee pairs, which leaves the share of correctly ordered pairs unchanged)."""
    rng = np.random.default_rng(5)
    normal = T.class_scores(0.0, 6, 3, 1.0, 50, rng)  # three films, no lone knee
    bone_loss = T.class_scores(1.0, 9, 4, 1.0, 50, rng)  # a lone knee and four films
    np.testing.assert_array_equal(normal[:, 0::2], normal[:, 1::2])
    np.testing.assert_array_equal(bone_loss[:, 1::2], bone_loss[:, 2::2])
    once = T.rowwise_auroc(normal[:, 0::2], bone_loss[:, [0, 1, 3, 5, 7]])
    twice = T.rowwise_auroc(normal, np.concatenate([bone_loss[:, :1], bone_loss[:, :1], bone_loss[:, 1:]], axis=1))
    np.testing.assert_allclose(twice, once, atol=1e-12)


def test_a_film_structure_the_class_cannot_hold_is_refused() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="3 bilateral films need 6 knees, the class has 5"):
        T.class_scores(0.0, 5, 3, 0.5, 10, rng)
    with pytest.raises(ValueError, match="film correlation must lie in"):
        T.class_scores(0.0, 5, 1, 1.5, 10, rng)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--draws", "0", "need 100 or more"),
        ("--margin", "0", "strictly between 0 and 1"),
        ("--film-correlation", "1.5", "must lie in \\[0, 1\\]"),
        ("--auroc-target", "85", "--auroc-target 85.0: must lie in"),
    ],
)
def test_bad_options_are_refused_before_the_manifest_is_read(
    tmp_path: Path, capsys: pytest.CaptureFixture, option: str, value: str, message: str
) -> None:
    with pytest.raises(SystemExit) as stop:
        T.main(["--manifest", str(tmp_path / "absent.csv"), option, value])
    assert stop.value.code == 2
    assert re.search(message, capsys.readouterr().err)
