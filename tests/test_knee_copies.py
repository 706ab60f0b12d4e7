from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from strnet.cli import main as cli_main
from strnet.data.knee_copies import (
    SIGNATURE_SIDE,
    audit_knees,
    clean_knees,
    copy_pairs,
    mirrored,
    signature,
)
from strnet.data.manifest import normalize, read_manifest, write_manifest


def film(seed: int) -> np.ndarray:
    """A 'radiograph': a smooth random bright field on a black border, so the Otsu crop finds the field."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(60, 255, (7, 5)).astype(np.float32)
    field = cv2.resize(coarse, (300, 420), interpolation=cv2.INTER_CUBIC)
    img = np.zeros((520, 400), np.float32)
    img[50:470, 50:350] = field
    return np.clip(img, 0, 255).astype(np.uint8)


def export(img: np.ndarray, *, mirror: bool = False) -> np.ndarray:
    """What another set does to a film: another size, a lossy re-encoding, and for some knees the mirror image
    (a left knee filed as a right one, which no perceptual hash matches)."""
    small = cv2.resize(img[:, ::-1] if mirror else img, (240, 312), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE)


def write(path: Path, img: np.ndarray) -> str:
    assert cv2.imwrite(str(path), img)
    return str(path)


@pytest.fixture()
def knees(tmp_path: Path) -> dict[str, str]:
    a, b = film(1), film(2)
    return {
        "a": write(tmp_path / "a_film.png", a),
        "a_copy": write(tmp_path / "a_copy.png", export(a)),
        "a_mirror": write(tmp_path / "a_mirror.png", export(a, mirror=True)),
        "b": write(tmp_path / "b_film.png", b),
        "c": write(tmp_path / "c_film.png", film(3)),
    }


def frame(rows: list[dict[str, str]]) -> pd.DataFrame:
    return normalize(pd.DataFrame(rows))


def test_signature_product_is_the_pearson_correlation_of_the_block_means() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.random((2, SIGNATURE_SIDE * 4, SIGNATURE_SIDE * 4)).astype(np.float32)
    y = 0.7 * x + 0.3 * y

    def area(img: np.ndarray) -> np.ndarray:
        return cv2.resize(img, (SIGNATURE_SIDE, SIGNATURE_SIDE), interpolation=cv2.INTER_AREA).ravel()

    expected = np.corrcoef(area(x), area(y))[0, 1]
    assert float(signature(x) @ signature(y)) == pytest.approx(expected, abs=1e-5)
    assert float(np.linalg.norm(signature(x))) == pytest.approx(1.0, abs=1e-5)
    assert not signature(np.full((256, 256), 0.4, np.float32)).any()  # a constant crop correlates with nothing


def test_copy_pairs_match_brute_force_and_never_link_two_knees_of_one_file() -> None:
    rng = np.random.default_rng(1)
    base = rng.normal(size=(6, SIGNATURE_SIDE * SIGNATURE_SIDE)).astype(np.float32)
    sig = np.concatenate([base, base[:2] + 0.05 * rng.normal(size=(2, base.shape[1])), mirrored(base[2:3])])
    sig = (sig - sig.mean(1, keepdims=True)).astype(np.float32)
    sig /= np.linalg.norm(sig, axis=1, keepdims=True)
    brute = {
        (i, j)
        for i in range(len(sig))
        for j in range(i + 1, len(sig))
        if max(sig[i] @ sig[j], sig[i] @ mirrored(sig[j : j + 1])[0]) >= 0.99
    }
    i, j, corr, flip = copy_pairs(sig, 0.99)
    assert set(zip(i.tolist(), j.tolist(), strict=True)) == brute == {(0, 6), (1, 7), (2, 8)}
    assert flip.tolist() == [False, False, True] and (corr >= 0.99).all()
    same_file = np.arange(len(sig))
    same_file[6] = 0  # rows 0 and 6 are the two knees of one film
    i, j, _, _ = copy_pairs(sig, 0.99, same_file=same_file)
    assert set(zip(i.tolist(), j.tolist(), strict=True)) == {(1, 7), (2, 8)}


def test_audit_links_an_exported_copy_and_its_mirror_image_to_the_film(knees: dict[str, str]) -> None:
    df = frame(
        [
            {"path": knees["a"], "site": "films", "label_cls": "osteopenia", "split": "train"},
            {"path": knees["a_copy"], "site": "crops", "label_cls": "osteopenia", "split": "test"},
            {"path": knees["a_mirror"], "site": "crops", "label_cls": "osteopenia", "split": "val"},
            {"path": knees["b"], "site": "films", "label_cls": "normal", "split": "train"},
            {"path": knees["c"], "site": "crops", "label_cls": "normal", "split": "train"},
        ]
    )
    audit = audit_knees(df, workers=1)
    assert audit.n_signed == 5 and not audit.problems
    [group] = audit.groups
    assert sorted(group.rows) == sorted([knees["a"], knees["a_copy"], knees["a_mirror"]])
    assert group.mirrored and not group.label_conflict
    assert group.sites == ["crops", "films"] and group.splits == ["test", "train", "val"]
    assert audit.row_group[3] != audit.row_group[4] and audit.copies == 2
    data = audit.to_dict()
    assert (data["cross_source_groups"], data["cross_split_groups"], data["copy_rows"]) == (1, 1, 2)


def test_clean_drops_conflicts_keeps_the_largest_labelled_copy_and_rows_it_could_not_read(
    knees: dict[str, str], tmp_path: Path
) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    df = frame(
        [
            {"path": knees["a_copy"], "label_cls": "osteopenia"},
            {"path": knees["a"], "label_cls": "osteopenia"},
            {"path": knees["a_mirror"], "label_cls": ""},
            {"path": knees["b"], "label_cls": "normal"},
            {"path": str(broken), "label_cls": "normal"},
        ]
    )
    audit = audit_knees(df, workers=1)
    assert [row for row, _ in audit.problems] == [str(broken)]
    kept, stats = clean_knees(df, audit, pixels={knees["a"]: 520 * 400, knees["a_copy"]: 312 * 240})
    assert kept["path"].tolist() == [knees["a"], knees["b"], str(broken)]
    assert stats == {"rows_in": 5, "rows_out": 3, "dropped_knee_label_conflict": 0, "dropped_knee_copy": 2}

    df.loc[0, "label_cls"] = "osteoporosis"  # the same knee taught as two classes: none of its rows can stay
    kept, stats = clean_knees(df, audit_knees(df, workers=1))
    assert kept["path"].tolist() == [knees["b"], str(broken)] and stats["dropped_knee_label_conflict"] == 3
    with pytest.raises(ValueError, match="covers 5 rows, the manifest has 4"):
        clean_knees(df.iloc[:4], audit)


def test_cli_audit_cleans_knee_copies_after_file_copies_and_reports_them(
    knees: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def written(name: str, keys: tuple[str, str]) -> str:
        rows = [{"path": knees[k], "label_cls": "osteopenia", "source": name} for k in keys]
        return str(write_manifest(frame(rows), tmp_path / f"{name}.csv"))

    films, crops = written("films", ("a", "b")), written("crops", ("a_mirror", "c"))
    out = tmp_path / "out"
    assert cli_main(["data", "audit", films, crops, "--json", str(out / "a.json"), "--clean", str(out / "c.csv")]) == 0
    assert "knees in more than one row: 1 (1 copy rows; 1 across sources or sites" in capsys.readouterr().out
    report = json.loads((out / "a.json").read_text())
    assert report["duplicate_groups"] == 0  # no file hash links the mirrored knee to its film: only the knee pass does
    knee_report = report["knees"]
    assert (knee_report["groups_with_copies"], knee_report["copy_rows"]) == (1, 1)
    assert sorted(read_manifest(out / "c.csv")["path"]) == sorted([knees["a"], knees["b"], knees["c"]])

    args = ["data", "audit", films, crops, "--knee-correlation", "-1", "--json", str(out / "b.json")]
    assert cli_main([*args, "--clean", str(out / "d.csv")]) == 0
    assert json.loads((out / "b.json").read_text())["knees"] is None
    assert len(read_manifest(out / "d.csv")) == 4
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        cli_main(["data", "audit", films, "--knee-correlation", "1.5"])
    assert stopped.value.code == 2 and "--knee-correlation: 1.5 is not a correlation" in capsys.readouterr().err


@pytest.mark.realdata
def test_real_share_holds_one_knee_as_a_normal_crop_and_a_film_s_osteopenia_knee(real_data_dir: Path) -> None:
    crops = real_data_dir / "os-collected-data-224"
    df = frame(
        [
            {"path": str(crops / "Normal/Normal 218.jpg"), "label_cls": "normal"},
            {"path": str(crops / "Osteopenia/Osteopenia 174.jpg"), "side": "L", "label_cls": "osteopenia"},
            {"path": str(crops / "Osteopenia/Osteopenia 174.jpg"), "side": "R", "label_cls": "osteopenia"},
            {"path": str(crops / "Normal/Normal 12.jpg"), "label_cls": "normal"},
        ]
    )
    audit = audit_knees(df, workers=1)
    [group] = audit.groups
    assert group.rows == [str(crops / "Normal/Normal 218.jpg"), str(crops / "Osteopenia/Osteopenia 174.jpg") + "#L"]
    assert group.mirrored and group.label_conflict and group.min_correlation > 0.995
