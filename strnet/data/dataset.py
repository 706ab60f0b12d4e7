"""The torch Dataset: one manifest row (one knee) -> normalised image, clinical covariates and targets.

Augmentation randomness is drawn from a fresh ``torch.Generator`` seeded from (seed, epoch, index), never
from global or per-worker RNG state, so a run gives the same batches with 0, 2 or 8 DataLoader workers and
after resuming at any epoch. Targets that are unknown are NaN; the losses and metrics mask them.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from strnet.data import preprocess as _pre
from strnet.data.augment import Augmenter, AugmentParams
from strnet.data.cache import PreprocessCache
from strnet.data.manifest import normalize, screening_target, severity_target
from strnet.data.preprocess import PreprocessParams

# Centring of the clinical covariates: roughly the cohort's typical values, so "unknown" (0) means "average".
AGE_CENTER, AGE_SCALE = 60.0, 15.0
BMI_CENTER, BMI_SCALE = 27.0, 5.0
SEX_CODES = {"F": 1.0, "M": 0.0}
SEX_UNKNOWN = 0.5


def encode_tabular(age: float | None, sex: str | None, bmi: float | None) -> np.ndarray:
    """float32 [3]: (age-60)/15, sex F=1 M=0 unknown=0.5, (bmi-27)/5; a missing number becomes 0 (the centre)."""

    def centred(v: float | None, center: float, scale: float) -> float:
        if v is None:
            return 0.0
        v = float(v)
        return 0.0 if math.isnan(v) else (v - center) / scale

    s = SEX_CODES.get(str(sex).strip().upper() if isinstance(sex, str) else "", SEX_UNKNOWN)
    return np.array([centred(age, AGE_CENTER, AGE_SCALE), s, centred(bmi, BMI_CENTER, BMI_SCALE)], np.float32)


def screening_pos_weight(df: pd.DataFrame) -> float:
    """n_normal / n_bone_loss over the labelled train rows (all labelled rows when none is marked train).

    Returns 1.0 when either class is absent (e.g. a federated site with no bone-loss case), where the ratio is
    0 or infinite and would silence or explode the positive term of the BCE.
    """
    rows = df
    if "split" in df.columns and (df["split"] == "train").any():
        rows = df[df["split"] == "train"]
    labels = rows["label_cls"].fillna("").astype(str)
    n_normal = int((labels == "normal").sum())
    n_loss = int(labels.isin(("osteopenia", "osteoporosis")).sum())
    if n_normal == 0 or n_loss == 0:
        return 1.0
    return n_normal / n_loss


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Independent 63-bit seed per (seed, epoch, index); SeedSequence mixes them so neighbours do not correlate."""
    state = np.random.SeedSequence([int(seed), int(epoch), int(index)]).generate_state(1, dtype=np.uint64)[0]
    return int(state) & ((1 << 63) - 1)


class KneeDataset(Dataset):
    """Items: image float32 [1,S,S], tabular float32 [3], y_screen, y_severity, t_score (float32, NaN = unknown), index.

    Without a cache each item is decoded and preprocessed on the fly (prediction on a handful of files).
    """

    def __init__(
        self,
        df: pd.DataFrame,
        params: PreprocessParams,
        cache: PreprocessCache | None,
        augment: AugmentParams | None = None,
        seed: int = 42,
        partners: bool = False,
    ) -> None:
        self.df = normalize(df.reset_index(drop=True))
        self.params = params
        self.cache = cache
        self.augmenter = Augmenter(augment) if augment is not None else None
        self.seed = int(seed)
        self.epoch = 0
        self._paths = self.df["path"].tolist()
        self._sides = self.df["side"].tolist()
        self._tabular = (
            np.stack(
                [
                    encode_tabular(a, s, b)
                    for a, s, b in zip(self.df["age"], self.df["sex"], self.df["bmi"], strict=True)
                ]
            )
            if len(self.df)
            else np.zeros((0, 3), np.float32)
        )
        self._y_screen = np.array([screening_target(c) for c in self.df["label_cls"]], np.float32)
        self._y_severity = np.array([severity_target(c) for c in self.df["label_cls"]], np.float32)
        self._t_score = self.df["t_score"].to_numpy(np.float32)
        # each knee's film partner (the other knee of its bilateral film, when both rows are here), else -1
        self._partner = partner_indices(self.df) if partners else None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.df)

    def load(self, index: int) -> np.ndarray:
        """The preprocessed [0, 1] knee (no augmentation, no normalisation)."""
        path, side = self._paths[index], self._sides[index]
        if self.cache is not None:
            return self.cache.get(path, side, self.params)
        return _pre.load_preprocessed(path, side, self.params)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} cases")
        item = {
            "image": self.image(index),
            "tabular": torch.from_numpy(self._tabular[index].copy()),
            "y_screen": torch.tensor(self._y_screen[index]),
            "y_severity": torch.tensor(self._y_severity[index]),
            "t_score": torch.tensor(self._t_score[index]),
            "index": torch.tensor(index, dtype=torch.int64),
        }
        if self._partner is not None:
            # the partner as it is drawn as its own item this epoch (its own augmentation seed); a knee without
            # one carries zeros, which the training step leaves out
            partner = int(self._partner[index])
            item["has_partner"] = torch.tensor(partner >= 0)
            item["partner_image"] = self.image(partner) if partner >= 0 else torch.zeros_like(item["image"])
        return item

    def image(self, index: int) -> torch.Tensor:
        """The normalised [1,S,S] input of row ``index``, augmented when the dataset augments."""
        pixels = np.asarray(self.load(index), dtype=np.float32)
        if self.augmenter is not None:
            generator = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, index))
            image = self.augmenter(torch.from_numpy(np.ascontiguousarray(pixels)).unsqueeze(0), generator)
            image = ((image - self.params.mean) / self.params.std).to(torch.float32)
        else:
            # numpy on one new array, not torch: the same float32 operations and bits, without torch's per-op
            # dispatch and second temporary (a third of the time per knee that `strnet predict` spends here)
            normalized = np.subtract(pixels, self.params.mean, dtype=np.float32)
            np.divide(normalized, self.params.std, out=normalized)
            image = torch.from_numpy(normalized).unsqueeze(0)
        return image


def partner_indices(df: pd.DataFrame) -> np.ndarray:
    """For each row, the row of the other knee of its film (same file, one right and one left knee), else -1.

    A film is its path, case-folded as the bilateral metrics read it; a file with one knee row, or with rows
    that are not one R and one L, has no partner."""
    out = np.full(len(df), -1, np.int64)
    film = df["path"].astype(str).str.lower().to_numpy()
    side = df["side"].fillna("").astype(str).str.upper().to_numpy()
    for rows in pd.Series(np.arange(len(df))).groupby(film).groups.values():
        rows = np.asarray(list(rows))
        if len(rows) == 2 and sorted(side[rows]) == ["L", "R"]:
            out[rows[0]], out[rows[1]] = rows[1], rows[0]
    return out
