"""A model bundle: weights plus the metadata needed to use them correctly (MONAI-bundle style).

``model.pt`` holds the state dict; ``metadata.json`` holds the backbone, the preprocessing, τ* and how it
was chosen, what the model was trained on, library versions and the SHA-256 of ``model.pt``. Every
consumer loads through :func:`load_bundle`, which refuses weights whose hash does not match — a frozen
screening threshold is only meaningful for the exact weights it was chosen with.
"""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from strnet.calibration import Platt
from strnet.data.preprocess import PreprocessParams
from strnet.ensemble import STRNetEnsemble
from strnet.ensemble import build as build_model
from strnet.errors import DataError
from strnet.model import STRNet, served_state

WEIGHTS_NAME = "model.pt"
METADATA_NAME = "metadata.json"
FORMAT_VERSION = 1


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def library_versions() -> dict[str, str]:
    import numpy
    import sklearn
    import torchvision

    import strnet

    return {
        "strnet": strnet.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": numpy.__version__,
        "scikit-learn": sklearn.__version__,
    }


@dataclass
class Bundle:
    model: STRNet | STRNetEnsemble
    metadata: dict[str, Any]
    path: Path | None = None  # None: a frozen model in memory, not yet written

    @property
    def threshold(self) -> float:
        return float(self.metadata["threshold"]["value"])

    @property
    def calibration(self) -> Platt:
        """The screening calibration τ* was chosen on (identity for bundles made before calibration existed)."""
        return Platt.from_dict(self.metadata.get("calibration"))

    @property
    def test_time_mirror(self) -> bool:
        return bool(self.metadata.get("model", {}).get("test_time_mirror", False))

    @property
    def precision(self) -> str:
        """The autocast setting the bundle was calibrated and its τ* chosen at (its run's ``train.precision``),
        which serving uses unless told otherwise: on a CPU with native bf16, ``auto`` serves an fp32 bundle in
        bf16, which moved the cross-validated knees' probabilities by 0.012 on average (up to 0.16) and changed
        5 of 333 flags at τ*. Bundles without a recorded run config are served ``auto``."""
        return str(self.metadata.get("training", {}).get("config", {}).get("train", {}).get("precision", "auto"))

    @property
    def histogram_bins(self) -> int:
        """The score histogram of the run that made the bundle (evaluations report the same binned statistics)."""
        return int(self.metadata.get("training", {}).get("config", {}).get("threshold", {}).get("histogram_bins", 1000))

    @property
    def preprocess(self) -> PreprocessParams:
        p = dict(self.metadata["preprocess"])
        p["clip_percentiles"] = tuple(p["clip_percentiles"])
        return PreprocessParams(**p)


def save_bundle(
    out_dir: str | Path,
    *,
    state_dict: dict[str, torch.Tensor],
    model_config: dict[str, Any],
    preprocess: PreprocessParams,
    threshold: dict[str, Any],
    training: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``model.pt`` and ``metadata.json``; ``threshold`` must carry at least ``value`` and ``rule``."""
    if "value" not in threshold:
        raise ValueError("threshold metadata needs a 'value'")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / WEIGHTS_NAME
    torch.save({k: v.detach().cpu() for k, v in served_state(state_dict).items()}, weights)
    metadata = {
        "format_version": FORMAT_VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": {**model_config, "input_size": preprocess.size, "input_channels": 1},
        "preprocess": preprocess.to_dict(),
        "threshold": threshold,
        "training": training,
        "versions": library_versions(),
        "weights_file": WEIGHTS_NAME,
        "weights_sha256": sha256_file(weights),
        "outputs": {
            "screen": "P(bone loss) = sigmoid(calibration.a * logit + calibration.b); flag when >= threshold.value",
            "severity": "P(osteoporosis | bone loss) = sigmoid(logit)",
            "t_score": "estimated T-score (WHO: normal >= -1.0, osteoporosis <= -2.5)",
        },
        **(extra or {}),
    }
    (out / METADATA_NAME).write_text(json.dumps(metadata, indent=2, default=_json_default))
    return out


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


ALIAS_PREFIX = "backbone.last_block."


def load_bundle(path: str | Path, map_location: str | torch.device = "cpu") -> Bundle:
    """Load a bundle folder, verifying the weights' SHA-256 against the metadata before unpickling."""
    root = Path(path)
    meta_path = root / METADATA_NAME
    if not meta_path.is_file():
        raise DataError(root, f"not a model bundle (no {METADATA_NAME})")
    try:
        metadata = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(meta_path, f"invalid JSON ({exc})") from exc
    weights = root / metadata.get("weights_file", WEIGHTS_NAME)
    if not weights.is_file():
        raise DataError(weights, "bundle weights missing")
    actual = sha256_file(weights)
    if actual != metadata.get("weights_sha256"):
        raise DataError(
            weights,
            f"SHA-256 mismatch: metadata says {metadata.get('weights_sha256')}, file is {actual} "
            "(weights were modified or belong to another bundle; refusing to use them)",
        )
    m = metadata["model"]
    model = build_model(
        members=int(m.get("members", 1)),
        backbone=m["backbone"],
        weights="none",
        neck_dim=int(m.get("neck_dim", 128)),
        dropout=float(m.get("dropout", 0.3)),
        norm=str(m.get("norm", "batch")),
    )
    state = torch.load(weights, map_location=map_location, weights_only=True)
    # bundles written before trunks exposed ``last_block`` as a property carry its tensors a second time
    state = {k: v for k, v in state.items() if not k.startswith(ALIAS_PREFIX)}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise DataError(
            weights,
            f"the weights do not fit the model {METADATA_NAME} describes ({m['backbone']}, "
            f"{m.get('members', 1)} network(s)): {str(exc).splitlines()[0]}",
        ) from exc
    model.eval()
    return Bundle(model=model, metadata=metadata, path=root)
