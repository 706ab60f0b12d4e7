from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import imagehash
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from strnet.data.audit import (
    AuditReport,
    FileHash,
    audit_manifest,
    clean_manifest,
    group_files,
    group_ids,
    hamming_matrix,
    hash_file,
    hash_files,
    near_pairs,
    run_audit,
    summarize,
)
from strnet.data.manifest import normalize, read_manifest, write_manifest


def smooth_image(seed: int, size: int = 64) -> np.ndarray:
    """A smooth random 8-bit 'radiograph': different seeds give unrelated perceptual hashes."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (6, 6)).astype(np.float32)
    return np.clip(cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC), 0, 255).astype(np.uint8)


def near_copy(img: np.ndarray, seed: int) -> np.ndarray:
    """Resize, add slight noise; written as a low-quality JPEG by the caller."""
    rng = np.random.default_rng(seed)
    small = cv2.resize(img, (48, 48), interpolation=cv2.INTER_AREA).astype(np.float32)
    return np.clip(small + rng.normal(0, 2.0, small.shape), 0, 255).astype(np.uint8)


def write(path: Path, img: np.ndarray, *params: int) -> str:
    assert cv2.imwrite(str(path), img, list(params))
    return str(path)


def phash_int(path: str | Path) -> int:
    return int(str(imagehash.phash(Image.open(path))), 16)


def hamming(a: int, b: int) -> int:
    return bin(a ^ b).count("1")


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, str]:
    a = smooth_image(1)
    out = {
        "a": write(tmp_path / "a.png", a),
        "b": write(tmp_path / "b.png", smooth_image(2)),
        "c": write(tmp_path / "c.png", smooth_image(3)),
        "a_near": write(tmp_path / "a_near.jpg", near_copy(a, 0), cv2.IMWRITE_JPEG_QUALITY, 60),
    }
    out["a_copy"] = str(shutil.copyfile(out["a"], tmp_path / "renamed_copy.png"))
    (tmp_path / "broken.png").write_bytes(b"not an image at all")
    out["broken"] = str(tmp_path / "broken.png")
    out["missing"] = str(tmp_path / "missing.png")
    return out


def manifest(rows: list[dict[str, str]]) -> pd.DataFrame:
    return normalize(pd.DataFrame(rows))


def test_phash_matches_imagehash_when_window_is_identity(tmp_path: Path) -> None:
    img = smooth_image(7)
    img[:2] = 0  # >1 % black and >1 % white: the 1st-99th percentile window is exactly 0..255
    img[-2:] = 255
    path = write(tmp_path / "x.png", img)
    h = hash_file(path)
    assert h.phash == phash_int(path)
    assert (h.height, h.width) == img.shape
    assert h.n_bytes == Path(path).stat().st_size


def test_sixteen_bit_hashes_like_its_eight_bit_export(tmp_path: Path) -> None:
    img = smooth_image(11)
    p8 = write(tmp_path / "x8.png", img)
    p16 = write(tmp_path / "x16.png", (img.astype(np.uint16) * 200 + 1000).astype(np.uint16))
    assert cv2.imread(p16, cv2.IMREAD_UNCHANGED).dtype == np.uint16
    assert hamming(hash_file(p8).phash, hash_file(p16).phash) <= 2
    # An unrelated 16-bit image is far away, so the windowing did not flatten everything.
    other = write(tmp_path / "o16.png", (smooth_image(12).astype(np.uint16) * 250))
    assert hamming(hash_file(p16).phash, hash_file(other).phash) > 10


def test_near_copy_is_close_and_different_images_are_far(files: dict[str, str]) -> None:
    h = {k: hash_file(files[k]).phash for k in ("a", "b", "c", "a_near")}
    assert hamming(h["a"], h["a_near"]) <= 4
    for x, y in (("a", "b"), ("a", "c"), ("b", "c"), ("a_near", "b"), ("a_near", "c")):
        assert hamming(h[x], h[y]) > 8, (x, y)


def test_hamming_matrix_matches_python_popcount() -> None:
    rng = np.random.default_rng(0)
    h = rng.integers(0, 2**63, 30, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, 30, dtype=np.uint64)
    d = hamming_matrix(h)
    ref = np.array([[hamming(int(x), int(y)) for y in h] for x in h])
    np.testing.assert_array_equal(d, ref)


def fh(i: int, phash: int, sha: str | None = None) -> FileHash:
    return FileHash(f"f{i:03d}", sha or f"sha{i}", phash, 10, 10, 100)


def test_grouping_is_transitive() -> None:
    a = 0
    b = a ^ 0b11  # 2 bits from a
    c = b ^ 0b1100  # 2 bits from b, 4 from a
    far = (1 << 64) - 1
    labels = group_files([fh(0, a), fh(1, b), fh(2, c), fh(3, far)], max_distance=2)
    assert labels[0] == labels[1] == labels[2] != labels[3]
    # Same bytes link files whatever their phash (defensive: exact edges are separate from near ones).
    labels = group_files([fh(0, a, "s"), fh(1, far, "s"), fh(2, c)], max_distance=0)
    assert labels[0] == labels[1] != labels[2]


def reference_partition(hashes: list[int], shas: list[str], max_distance: int) -> set[frozenset[int]]:
    parent = list(range(len(hashes)))

    def find(x: int) -> int:
        while parent[x] != x:
            x = parent[x]
        return x

    for i in range(len(hashes)):
        for j in range(i + 1, len(hashes)):
            if hamming(hashes[i], hashes[j]) <= max_distance or shas[i] == shas[j]:
                parent[find(i)] = find(j)
    groups: dict[int, set[int]] = {}
    for i in range(len(hashes)):
        groups.setdefault(find(i), set()).add(i)
    return {frozenset(g) for g in groups.values()}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grouping_matches_brute_force(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    import strnet.data.audit as audit

    monkeypatch.setattr(audit, "_BLOCK", 7)  # exercise the blocked distance loop
    rng = np.random.default_rng(seed)
    centers = [int(x) for x in rng.integers(0, 2**62, 6, dtype=np.uint64)]
    hashes, shas = [], []
    for _ in range(60):
        h = centers[rng.integers(len(centers))]
        for bit in rng.choice(64, rng.integers(0, 6), replace=False):
            h ^= 1 << int(bit)
        hashes.append(h)
        shas.append(f"s{rng.integers(40)}")  # some random exact-duplicate edges too
    files = [FileHash(f"p{k}", shas[k], hashes[k], 1, 1, 1) for k in range(60)]
    labels = group_files(files, max_distance=4)
    got: dict[int, set[int]] = {}
    for k, g in enumerate(labels):
        got.setdefault(int(g), set()).add(k)
    assert {frozenset(g) for g in got.values()} == reference_partition(hashes, shas, 4)
    assert sorted(set(labels.tolist())) == list(range(len(got)))
    i, j, d = near_pairs(np.array(hashes, dtype=np.uint64), 4)
    assert all(hamming(hashes[a], hashes[b]) == dd <= 4 and a < b for a, b, dd in zip(i, j, d, strict=True))


def test_audit_counts_groups_conflicts_and_problems(files: dict[str, str]) -> None:
    df = manifest(
        [
            {"path": files["a"], "label_cls": "normal", "split": "train", "source": "s1", "side": "R"},
            {"path": files["a"], "label_cls": "normal", "split": "train", "source": "s1", "side": "L"},
            {"path": files["a_copy"], "label_cls": "osteoporosis", "split": "test", "source": "s1"},
            {"path": files["a_near"], "label_cls": "normal", "split": "train", "source": "s2"},
            {"path": files["b"], "label_cls": "normal", "split": "train", "source": "s1", "side": "R"},
            {"path": files["b"], "label_cls": "osteopenia", "split": "val", "source": "s1", "side": "L"},
            {"path": files["c"], "label_cls": "osteopenia", "split": "train", "source": "s1"},
            {"path": files["broken"], "label_cls": "normal", "source": "s1"},
            {"path": files["missing"], "label_cls": "normal", "source": "s1"},
        ]
    )
    report = audit_manifest(df, max_distance=4, workers=1)
    assert report.n_rows == 9
    assert report.n_images == 4 + 1  # a, a_copy, a_near, b, c readable
    assert report.n_unique == 3
    assert report.n_groups == report.duplicate_groups == 1
    assert report.exact_duplicate_files == 1
    assert report.near_duplicate_files == 1
    # b's sides differ in label (allowed) but sit in two splits (leakage of one radiograph).
    assert report.label_conflict_groups == 1
    assert report.cross_split_groups == 2
    assert report.cross_source_groups == 1
    assert {p.path for p in report.problems} == {files["broken"], files["missing"]}
    assert all(p.problem for p in report.problems)

    dup = next(g for g in report.groups if len(g.paths) > 1)
    assert set(dup.paths) == {files["a"], files["a_copy"], files["a_near"]}
    assert dup.exact and dup.near and dup.label_conflict and dup.cross_split and dup.cross_source
    assert dup.labels == ["normal", "osteoporosis"]
    assert dup.sources == ["s1", "s2"]

    text = summarize(report)
    assert "label-conflict groups: 1" in text and files["broken"] in text

    # Without the near copy at distance 0 only the exact copy is grouped.
    strict = audit_manifest(df, max_distance=0, workers=1)
    assert strict.exact_duplicate_files == 1 and strict.near_duplicate_files == 0


def test_json_keys_and_types(files: dict[str, str], tmp_path: Path) -> None:
    df = manifest([{"path": files[k], "label_cls": "normal"} for k in ("a", "a_copy", "b", "broken")])
    report = audit_manifest(df, workers=1)
    out = tmp_path / "audit.json"
    report.to_json(out)
    data = json.loads(out.read_text())
    for key in (
        "n_images",
        "n_groups",
        "duplicate_groups",
        "label_conflict_groups",
        "cross_split_groups",
        "cross_source_groups",
    ):
        assert type(data[key]) is int, key
    assert data["n_images"] == 3 and data["duplicate_groups"] == 1
    assert [sorted(g["paths"]) for g in data["groups"]] == [sorted([files["a"], files["a_copy"]])]
    assert data["problems"] == [{"path": files["broken"], "problem": data["problems"][0]["problem"]}]
    assert {f["phash"] for f in data["files"] if f["path"] in (files["a"], files["a_copy"])} == {
        f"{phash_int(files['a']):016x}"
    }


def test_group_ids_aligned_to_rows(files: dict[str, str]) -> None:
    df = manifest(
        [
            {"path": files["a"], "side": "R"},
            {"path": files["a"], "side": "L"},
            {"path": files["a_near"]},
            {"path": files["b"]},
            {"path": files["broken"]},
            {"path": files["c"]},
        ]
    )
    df.index = [10, 11, 12, 13, 14, 15]
    ids = group_ids(df, workers=1)
    assert list(ids.index) == list(df.index)
    assert ids[10] == ids[11] == ids[12]
    assert len({ids[10], ids[13], ids[14], ids[15]}) == 4


def test_clean_keeps_one_file_per_group_and_drops_conflicts(files: dict[str, str], tmp_path: Path) -> None:
    big = write(tmp_path / "big.png", cv2.resize(smooth_image(1), (96, 96), interpolation=cv2.INTER_CUBIC))
    df = manifest(
        [
            {"path": files["a"], "label_cls": "normal", "side": "R"},
            {"path": files["a"], "label_cls": "normal", "side": "L"},
            {"path": files["a_copy"], "label_cls": "normal"},
            {"path": big, "label_cls": "normal"},
            {"path": files["b"], "label_cls": "normal"},
            {"path": files["c"], "label_cls": "osteopenia", "side": "R"},
            {"path": files["c"], "label_cls": "osteopenia", "side": "L"},
            {"path": str(shutil.copyfile(files["c"], tmp_path / "c2.png")), "label_cls": "osteoporosis"},
            {"path": files["broken"], "label_cls": "normal"},
        ]
    )
    report = audit_manifest(df, workers=1)
    assert report.duplicate_groups == 2 and report.label_conflict_groups == 1
    cleaned, stats = clean_manifest(df, report)
    # The 96 px version is the largest file of a's group; b is a singleton; c's group conflicts.
    assert sorted(cleaned["path"]) == sorted([big, files["b"]])
    assert stats == {
        "rows_in": 9,
        "rows_out": 2,
        "dropped_label_conflict": 3,
        "dropped_duplicate": 3,
        "dropped_unreadable": 1,
    }
    # Ties on size fall back to the path: of two byte-identical files the smaller path is kept, with both sides.
    df2 = df[df["path"].isin([files["a"], files["a_copy"]])]
    cleaned2, _ = clean_manifest(df2, audit_manifest(df2, workers=1))
    assert list(cleaned2["path"]) == [files["a"], files["a"]] and list(cleaned2["side"]) == ["R", "L"]


def test_parallel_hashing_matches_serial(tmp_path: Path) -> None:
    paths = [write(tmp_path / f"{k}.png", smooth_image(k % 9, 32)) for k in range(18)]
    (tmp_path / "bad.png").write_bytes(b"\x89PNG")
    paths.append(str(tmp_path / "bad.png"))
    serial = hash_files(paths, workers=1)
    parallel = hash_files(paths, workers=2)
    assert serial == parallel
    assert len(serial[0]) == 18 and [p.path for p in serial[1]] == [paths[-1]]


def test_run_audit_writes_json_and_clean_manifest(files: dict[str, str], tmp_path: Path) -> None:
    m1 = write_manifest(manifest([{"path": files["a"], "label_cls": "normal", "source": "x"}]), tmp_path / "m1.csv")
    m2 = write_manifest(
        manifest([{"path": files[k], "label_cls": "normal", "source": "y"} for k in ("a_copy", "b")]),
        tmp_path / "m2.csv",
    )
    report = run_audit([m1, m2], json_out=tmp_path / "out/a.json", clean_out=tmp_path / "out/clean.csv")
    assert isinstance(report, AuditReport) and report.cross_source_groups == 1
    assert json.loads((tmp_path / "out/a.json").read_text())["duplicate_groups"] == 1
    assert sorted(read_manifest(tmp_path / "out/clean.csv")["path"]) == sorted([files["a"], files["b"]])


def test_rejects_bad_distance() -> None:
    with pytest.raises(ValueError, match="max_distance"):
        audit_manifest(manifest([]), max_distance=-1)


@pytest.mark.realdata
def test_real_data_has_cross_source_copies_and_label_conflicts(real_data_dir: Path) -> None:
    rows = []
    for folder, source in (("os-collected-data-224", "os224"), ("knee-xray-osteoporosis-mendeley", "mendeley")):
        for class_dir in sorted((real_data_dir / folder).iterdir()):
            if class_dir.is_dir():
                rows += [
                    {"path": str(f), "source": source, "label_cls": class_dir.name.lower()}
                    for f in sorted(class_dir.iterdir())
                ]
    report = audit_manifest(manifest(rows), max_distance=2)
    assert report.n_images > 1000 and not report.problems
    assert report.cross_source_groups > 0
    assert report.label_conflict_groups > 0
    assert report.exact_duplicate_files > 0 and report.near_duplicate_files > 0
