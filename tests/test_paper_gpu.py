"""The one-GPU paper recipe (simulations.paper_gpu): export -> run (CPU, tiny) -> report, and its pieces against
the project's own code and Flower's and scikit-learn's (the run itself may import neither)."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from sklearn.metrics import average_precision_score

from configs import load_config
from configs.schema import config_from_dict
from server.pooled import weighted_average
from simulations import paper_gpu as G
from strnet.engine import TrainParams
from strnet.losses import LossWeights, MultiTaskLoss
from strnet.metrics import metrics_from_histogram, score_histogram
from strnet.model import build_strnet

ROOT = Path(__file__).resolve().parents[1]
# What the GPU machine lacks (or the issue wants the script not to need).
BLOCKED = ("pandas", "sklearn", "scipy", "yaml", "cv2", "flwr", "mlflow", "opacus", "pydicom")
TINY = [
    "preprocess.size=32",
    "model.backbone=tiny",
    "train.epochs=2",
    "federation.rounds=2",
    "train.batch_size=8",
    "train.eval_batch_size=16",
    "train.precision=fp32",
]
# site -> split -> knees; stage2 rows come in right/left pairs of one film (bilateral Mendeley films)
LAYOUT = {"stage1": {"train": 14, "val": 6, "test": 6}, "stage2": {"train": 10, "val": 4, "test": 4}}
LABELS = ("normal", "osteopenia", "osteoporosis")


def _knee(rng: np.random.Generator, path: Path) -> None:
    img = np.zeros((56, 48), np.uint16)
    img[6:-6, 5:-5] = cv2.GaussianBlur(rng.integers(5000, 60000, (44, 38)).astype(np.float32), (0, 0), 1.2)
    cv2.imwrite(str(path), img)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny three-site manifest in the real split's shape: stage1/stage2 train/val/test, a stage2 hold-out."""
    root = tmp_path_factory.mktemp("paper_gpu_sites")
    rng = np.random.default_rng(11)
    rows: list[dict[str, object]] = []
    layout = {**LAYOUT, "stage2-holdout": {"test": 4}}
    for site, splits in layout.items():
        for split, n in splits.items():
            bilateral = site != "stage1"
            for k in range(n // 2 if bilateral else n):
                path = root / f"{site}_{split}_{k}.png"
                _knee(rng, path)
                label = LABELS[(k + len(rows)) % 3]
                for side in ("R", "L") if bilateral else ("",):
                    rows.append(
                        {
                            "path": str(path),
                            "patient_id": f"{site}-{split}-{k}",
                            "site": site,
                            "source": "mendeley" if bilateral else "kaggle",
                            "split": split,
                            "label_cls": label if (k or split != "train") else "",  # one unlabelled knee
                            "t_score": {"normal": -0.2, "osteopenia": -1.8, "osteoporosis": -3.0}[label]
                            if bilateral
                            else "",
                            "age": 50 + k if bilateral else "",
                            "sex": "F" if bilateral else "",
                            "bmi": 25.0 if bilateral else "",
                            "side": side,
                        }
                    )
    path = root / "split.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def exported(manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("paper_gpu_data") / "data.npz"
    cache = out.parent / "cache"
    meta = G.export("paper-gpu", out, overrides=TINY, manifest=str(manifest), cache_dir=str(cache))
    return out, meta


@pytest.fixture(scope="module")
def results(exported: tuple[Path, dict], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """``run`` on the CPU in a fresh interpreter in which importing any of BLOCKED raises ImportError."""
    data, _ = exported
    out = tmp_path_factory.mktemp("paper_gpu_out")
    # A blocked module looks absent: find_spec gives a spec without an origin (torch._dynamo probes optional
    # libraries that way) and importing it raises ModuleNotFoundError.
    script = f"""
import importlib.machinery, sys
BLOCKED = {BLOCKED!r}
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            return importlib.machinery.ModuleSpec(name, self)
        return None
    def create_module(self, spec):
        raise ModuleNotFoundError(f"{{spec.name}} is not on the GPU machine", name=spec.name)
    def exec_module(self, module):
        pass
sys.meta_path.insert(0, Block())
from simulations.paper_gpu import main
code = main(sys.argv[1:])
leaked = sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)
print("LEAKED", leaked)
sys.exit(code or bool(leaked))
"""
    args = ["run", "--data", str(data), "--out", str(out), "--device", "cpu", "--compile", "off"]
    proc = subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


# ---------------------------------------------------------------------------------------------- the whole path


def test_export_writes_one_file_with_the_rows_and_the_recipe(exported: tuple[Path, dict], manifest: Path) -> None:
    path, meta = exported
    with np.load(path, allow_pickle=False) as blob:
        df = pd.read_csv(manifest, keep_default_na=False)
        assert meta["n_rows"] == len(df) == len(blob["rows_row_id"]) == len(blob["offsets"]) - 1
        assert blob["rows_row_id"][0] == f"{df.path[0]}|{df.side[0]}"
        assert blob["tabular"].shape == (len(df), 3) and blob["y_screen"].shape == (len(df),)
        assert np.isnan(blob["y_screen"]).sum() == 3  # the unlabelled knees (one stage1 knee, one stage2 film)
        # the recipe travels as JSON and is the resolved preset with the overrides
        assert config_from_dict(json.loads(str(blob["recipe"]))) == load_config("paper-gpu", TINY)
    q = meta["quantisation"]
    assert 0 < q["uint8_mean_abs"] <= q["uint8_max_abs"] <= 0.5 / 255 + 1e-6
    assert q["uint8_mean_abs"] <= q["stored_mean_abs"] < 0.05 and meta["encoding"] == "jpeg"


def test_run_needs_only_torch_torchvision_numpy_and_writes_everything(
    results: tuple[Path, str], manifest: Path
) -> None:
    out, stdout = results
    assert "LEAKED []" in stdout
    assert sorted(p.name for p in out.iterdir()) == [
        "predictions_centralized.csv",
        "predictions_federated.csv",
        "progress.log",
        "timings.json",
    ]
    timings = json.loads((out / "timings.json").read_text())
    assert timings["env"]["card"] == "cpu" and timings["env"]["torch"] == torch.__version__
    assert timings["init"] == "random" and timings["precision"] == "fp32"
    assert timings["compile"] == {"status": "off (--compile off)", "used": False}
    assert timings["data"]["decode_s"] >= 0 and timings["wall_s"] > 0
    for mode in G.MODES:
        r = timings[mode]
        assert r["run"] == 2 and r["stopped_by"] == "max_epochs" and 1 <= r["best"] <= 2
        assert r["train_images"] == 2 * sum(s["train"] for s in LAYOUT.values())  # the same knees in both modes
        assert r["train_s"] > 0 and r["train_images_per_s"] > 0 and len(r["history"]) == 2
    assert timings["federated"]["site_train_sizes"] == {"stage1": 14, "stage2": 10}
    assert timings["smoke"]["centralized"]["run"] == 1 and timings["smoke"]["federated"]["run"] == 1
    assert timings["smoke"]["checks"]["augment_max_abs_vs_cpu"] == 0.0 and timings["failed_phases"] == []
    # every validation and test knee (hold-out included) has a prediction in both modes
    df = pd.read_csv(manifest, keep_default_na=False)
    wanted = {f"{p}|{s}" for p, s, split in zip(df.path, df.side, df.split, strict=True) if split in ("val", "test")}
    for mode in G.MODES:
        with (out / f"predictions_{mode}.csv").open() as fh:
            rows = list(csv.DictReader(fh))
        assert {r["row_id"] for r in rows} == wanted and len(rows) == len(wanted)
        assert all(0.0 <= float(r["prob_screen"]) <= 1.0 for r in rows)


def test_report_computes_tau_and_metrics_with_the_project_code(results: tuple[Path, str], tmp_path: Path) -> None:
    out, _ = results
    assert G.main(["report", "--results", str(out), "--out", str(tmp_path), "--bootstrap", "50"]) == 0
    md = (tmp_path / "report.md").read_text()
    for text in ("centralized", "federated", "τ*", "test stage2-holdout (external)", "AUROC", "## Timings"):
        assert text in md
    summary = json.loads((tmp_path / "report.json").read_text())
    for mode in G.MODES:
        m = summary["modes"][mode]
        assert 0.2 <= m["threshold"]["value"] <= 0.8
        assert m["cohorts"]["val (pooled)"]["screening_n"] == 10  # 6 stage1 knees + 2 bilateral stage2 films
        assert "test source mendeley" in m["cohorts"]


# ---------------------------------------------------------------------------------------------- the pieces


def _scores(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    y = (rng.random(n) < 0.6).astype(float)
    p = np.clip(rng.normal(0.4 + 0.2 * y, 0.2), 0, 1).round(2)  # rounded: many tied scores
    return y, p


@pytest.mark.parametrize("seed", range(5))
def test_average_precision_is_sklearns_and_the_projects_histogram_auprc(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y, p = _scores(rng, 200)
    ours = G.average_precision(torch.tensor(y), torch.tensor(p))
    assert float(ours) == pytest.approx(average_precision_score(y, p), abs=1e-12)
    p_fine = rng.random(200)
    binned = G.average_precision(torch.tensor(y), torch.tensor(p_fine, dtype=torch.float32), n_bins=1000)
    expected = metrics_from_histogram(score_histogram(y, p_fine.astype(np.float32).astype(np.float64), 1000))
    assert float(binned) == pytest.approx(expected["auprc"], abs=1e-12)
    y_nan = y.copy()
    y_nan[:20] = np.nan  # unknown labels are left out
    assert float(G.average_precision(torch.tensor(y_nan), torch.tensor(p))) == pytest.approx(
        average_precision_score(y[20:], p[20:]), abs=1e-12
    )
    assert math.isnan(float(G.average_precision(torch.zeros(5), torch.rand(5))))


def _state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = build_strnet(backbone="tiny", weights="none")
    model.train()
    for _ in range(seed + 1):  # different BatchNorm statistics and counters per site
        model.backbone(torch.randn(4, 1, 16, 16))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_fedavg_equals_flowers_aggregation() -> None:
    states, sizes = [_state(0), _state(3)], [228, 118]
    ours = G.fedavg(states, sizes)
    records = [
        RecordDict({"arrays": ArrayRecord(s), "metrics": MetricRecord({"num-examples": n})})
        for s, n in zip(states, sizes, strict=True)
    ]
    flower = aggregate_arrayrecords(records, "num-examples")
    assert set(ours) == set(flower.keys()) == set(states[0])
    for key, value in ours.items():
        theirs = flower[key].numpy()
        assert value.dtype == states[0][key].dtype
        if value.is_floating_point():
            np.testing.assert_array_equal(value.numpy(), theirs, err_msg=key)  # the same fp32 arithmetic
        else:  # num_batches_tracked: Flower leaves the weighted mean as a float; rounded back, as our server does
            assert value.item() == round(float(theirs)) and value.item() == round((228 * 1 + 118 * 4) / 346)
    # and the project's server (float64, cast back): the same within fp32 rounding
    project = weighted_average([{k: v.numpy() for k, v in s.items()} for s in states], sizes)
    for key, value in ours.items():
        np.testing.assert_allclose(value.numpy(), project[key], rtol=1e-6, atol=1e-7, err_msg=key)


@pytest.mark.parametrize(("epoch", "smoothing"), [(0, 0.0), (7, 0.0), (7, 0.1)])
def test_multitask_loss_equals_the_projects_loss(epoch: int, smoothing: float) -> None:
    torch.manual_seed(epoch)
    n = 12
    outputs = {k: torch.randn(n, requires_grad=True) for k in ("screen", "severity", "t_score")}
    y = torch.tensor([0, 1, 1, np.nan, 0, 1, 1, 0, np.nan, 1, 0, 1], dtype=torch.float32)
    sev = torch.where(y == 1, torch.randint(0, 2, (n,)).float(), torch.tensor(float("nan")))
    t = torch.where(torch.rand(n) < 0.5, torch.randn(n) - 1, torch.tensor(float("nan")))
    weights = LossWeights(label_smoothing=smoothing)
    expected, parts = MultiTaskLoss(pos_weight=0.7, weights=weights)(
        outputs, {"y_screen": y, "y_severity": sev, "t_score": t}, epoch
    )
    grads = torch.autograd.grad(expected, list(outputs.values()), allow_unused=True)
    ours, our_parts = G.multitask_loss(outputs, y, sev, t, pos_weight=torch.tensor(0.7), weights=weights, epoch=epoch)
    our_grads = torch.autograd.grad(ours, list(outputs.values()), allow_unused=True)
    torch.testing.assert_close(ours, expected)
    for a, b in zip(our_grads, grads, strict=True):  # the T-score output is unused during the warm-up in both
        assert (a is None) == (b is None) and (a is None or torch.allclose(a, b))
    assert our_parts.tolist() == pytest.approx([parts[k] for k in ("screen", "severity", "t_score", "total")])
    # a batch without any severity or T-score label: those terms are an exact 0, as in MultiTaskLoss
    none = torch.full((n,), float("nan"))
    ours, our_parts = G.multitask_loss(outputs, y, none, none, pos_weight=torch.tensor(0.7), weights=weights, epoch=9)
    assert our_parts[1] == 0 and our_parts[2] == 0 and torch.isfinite(ours)


def test_schedule_is_the_recipes_own() -> None:
    """The GPU script runs strnet's RecipeSchedule itself (torch only): one schedule in the project."""
    from strnet.schedule import RecipeSchedule

    assert G.RecipeSchedule is RecipeSchedule and RecipeSchedule.__module__ == "strnet.schedule"
    rng = np.random.default_rng(0)
    scores = np.concatenate([rng.random(8) * 0.5 + np.linspace(0, 0.4, 8), np.full(5, 0.6), rng.random(20) * 0.3])
    scores[3] = np.nan
    params = TrainParams(plateau_patience=2, early_stop_patience=6, min_epochs=3)
    theirs = RecipeSchedule(params)
    for s in scores:
        theirs.step(float(s))
    assert theirs.lr < params.lr and theirs.should_stop


def test_epoch_seed_is_the_engines() -> None:
    from strnet.engine import epoch_seed

    assert [G.epoch_seed(42, e) for e in range(5)] == [epoch_seed(42, e) for e in range(5)]


def test_recipe_overrides_and_refusals() -> None:
    recipe = load_config("paper-gpu").to_dict()
    G.apply_sets(recipe, ["train.epochs=3", "model.weights=/w/resnet50.pth"])
    assert recipe["train"]["epochs"] == 3 and recipe["model"]["weights"] == "/w/resnet50.pth"
    G.check_recipe(recipe)
    with pytest.raises(SystemExit, match="unknown key 'epoch'"):
        G.apply_sets(recipe, ["train.epoch=3"])
    with pytest.raises(SystemExit, match=r"federation\.strategy='fedprox'"):
        G.check_recipe(G.apply_sets(recipe, ["federation.strategy=fedprox"]))


def test_paper_gpu_preset_is_the_published_recipe_in_bf16() -> None:
    gpu, paper = load_config("paper-gpu"), load_config("paper")
    assert (gpu.train.precision, gpu.train.channels_last, gpu.model.weights) == ("bf16", True, "none")
    assert gpu.train == paper.train.__class__(**{**paper.train.__dict__, "precision": "bf16"})
    for section in ("preprocess", "augment", "loss", "threshold", "seed"):
        assert getattr(gpu, section) == getattr(paper, section)
    assert (gpu.model.backbone, gpu.preprocess.size, gpu.federation.rounds, gpu.federation.local_epochs) == (
        "resnet50",
        512,
        100,
        1,
    )
    assert [s.name for s in gpu.federation.sites if s.role == "train"] == ["stage1", "stage2"]


def test_a_budget_ends_a_mode_after_the_epoch_that_spends_it(exported: tuple[Path, dict]) -> None:
    data = G.Data(exported[0], torch.device("cpu"))
    recipe = G.apply_sets(data.recipe, ["train.epochs=5", "federation.rounds=5"])
    trainer = G.Trainer(data, recipe, torch.device("cpu"), log=lambda _: None)
    live: dict = {}
    result = trainer.fit("federated", budget_s=1e-3, live=live)
    assert (result["run"], result["stopped_by"], result["best"]) == (1, "budget", 1)
    assert live["history"] == result["history"] and result["optimizer_steps"] == 2 + 2  # 14 and 10 knees, batch 8
    full = trainer.fit("centralized", budget_s=1e6, max_units=3)
    assert full["run"] == 3 and full["stopped_by"] == "max_epochs" and full["optimizer_steps"] == 3 * 3
