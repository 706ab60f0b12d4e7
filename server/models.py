"""The bundle as an MLflow model: logged with every finished run, registered under a name with an alias, and
resolved back to a bundle folder for ``strnet predict --model models:/NAME@ALIAS``.

Why a pyfunc around the bundle rather than a new format: the bundle (weights + ``metadata.json`` with τ*, the
calibration, the OOD model and the weights' SHA-256) stays the one thing ``strnet`` loads; MLflow adds the
registry (a hospital asks for ``models:/strnet-screening@champion``), a signature and an input example. The
example is a synthetic phantom (:mod:`simulations.knee`), never a real radiograph, since logged examples are
readable by anyone with access to the tracking server.

With :mod:`server.tracking`, the only modules that import MLflow; ``strnet`` reaches this one lazily, from the
CLI, only for a ``models:/`` URI.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import cv2
import mlflow
import numpy as np
import pandas as pd
import torch
import torchvision
from mlflow.models import ModelSignature
from mlflow.models.signature import infer_signature
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, DataType, Schema

from strnet.bundle import Bundle, load_bundle
from strnet.errors import DataError, StrnetError
from strnet.predict import OUTPUT_COLUMNS, predict_files

MODEL_NAME = "model"  # the logged model's name inside its run
BUNDLE_ARTIFACT = "bundle"  # the key of the bundle folder among the pyfunc's artifacts
MODEL_URI_TAG = "model_uri"  # run tag: the logged model's URI, what `strnet register` registers
SHA_TAG = "weights_sha256"  # model-version tag: the SHA-256 the bundle's metadata must record
ALIASES = ("champion", "candidate")
INPUT_COLUMNS = ("image", "age", "sex", "bmi")
# what the pyfunc returns per knee: the predict table without the temporary file name and Grad-CAM path
PYFUNC_OUTPUT = ["row", *(c for c in OUTPUT_COLUMNS if c not in ("file", "gradcam"))]

INPUT_SCHEMA = Schema(
    [
        ColSpec(DataType.binary, "image"),  # the file's bytes: PNG, JPEG or DICOM
        ColSpec(DataType.double, "age", required=False),
        ColSpec(DataType.string, "sex", required=False),
        ColSpec(DataType.double, "bmi", required=False),
    ]
)


def _suffix(data: bytes) -> str:
    """A file name suffix ``strnet.predict`` recognises; DICOM needs none (its preamble is checked)."""
    if data.startswith(b"\x89PNG"):
        return ".png"
    if data.startswith(b"\xff\xd8"):
        return ".jpg"
    return ""


def predict_images(bundle: Bundle, frame: pd.DataFrame) -> pd.DataFrame:
    """``strnet predict`` on images given as bytes (one per row, with optional ``age``, ``sex``, ``bmi``): one
    output row per knee, ``row`` naming the input row. The bytes go to a temporary folder and through
    :func:`strnet.predict.predict_files`, so the outputs (OOD refusals, bilateral splitting) are the CLI's."""
    if not isinstance(frame, pd.DataFrame) or "image" not in frame.columns:
        got = list(frame.columns) if isinstance(frame, pd.DataFrame) else type(frame).__name__
        raise DataError("model input", f"needs a DataFrame with an 'image' column of file bytes; got {got}")
    frame = frame.reset_index(drop=True)
    with tempfile.TemporaryDirectory(prefix="strnet-pyfunc-") as tmp:
        folder, rows = Path(tmp) / "images", {}
        folder.mkdir()
        for i, data in enumerate(frame["image"]):
            if not isinstance(data, bytes | bytearray) or not data:
                raise DataError("model input", f"row {i}: 'image' must be the non-empty bytes of an image file")
            path = folder / f"row-{i:06d}{_suffix(bytes(data))}"
            path.write_bytes(bytes(data))
            rows[str(path)] = i
        clinical = None
        known = [c for c in ("age", "sex", "bmi") if c in frame.columns]
        if known:
            clinical = Path(tmp) / "clinical.csv"
            table = frame[known].copy()
            table.insert(0, "file", [Path(p).name for p in rows])
            table.to_csv(clinical, index=False)
        out = predict_files(bundle, [folder], clinical_csv=clinical, workers=1)
    out.insert(0, "row", out["file"].map(rows).astype("Int64"))
    return out[PYFUNC_OUTPUT].sort_values(["row", "side"], kind="stable").reset_index(drop=True)


class BundleModel(mlflow.pyfunc.PythonModel):
    """The bundle behind MLflow's pyfunc interface; loading verifies the weights' SHA-256 (``load_bundle``)."""

    def load_context(self, context: Any) -> None:
        self.bundle = load_bundle(context.artifacts[BUNDLE_ARTIFACT])

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        return predict_images(self.bundle, model_input)


def phantom_example(bundle: Bundle, seed: int = 0) -> pd.DataFrame:
    """One synthetic AP knee radiograph (a procedural phantom, no patient) as PNG bytes with clinical values."""
    from simulations.knee import render_knee

    knee = render_knee(np.random.default_rng(seed), -1.8, image_size=2 * bundle.preprocess.size, side="R")
    ok, png = cv2.imencode(".png", knee.pixels)
    if not ok:
        raise StrnetError("could not encode the phantom input example as PNG")
    return pd.DataFrame({"image": [png.tobytes()], "age": [67.0], "sex": ["F"], "bmi": [27.5]})


def log_bundle_model(bundle_dir: Path, tags: dict[str, str]) -> str:
    """Log the bundle as a pyfunc model in the active run; returns its URI (also the run tag ``model_uri``).

    Requirements are given, not inferred (inference loads the model in a subprocess: minutes on 2 cores); the
    model needs this repository's package installed where it is loaded."""
    bundle = load_bundle(bundle_dir)
    example = phantom_example(bundle)
    output = predict_images(bundle, example)
    signature = ModelSignature(inputs=INPUT_SCHEMA, outputs=infer_signature(example, output).outputs)
    info = mlflow.pyfunc.log_model(
        name=MODEL_NAME,
        python_model=BundleModel(),
        artifacts={BUNDLE_ARTIFACT: str(bundle_dir)},
        signature=signature,
        input_example=example,
        pip_requirements=[
            f"mlflow=={mlflow.__version__}",
            f"torch=={torch.__version__.split('+')[0]}",
            f"torchvision=={torchvision.__version__.split('+')[0]}",
            f"pandas=={pd.__version__}",
        ],
        metadata={"strnet_bundle": BUNDLE_ARTIFACT, **tags},
        tags=tags,
    )
    mlflow.set_tag(MODEL_URI_TAG, info.model_uri)
    return info.model_uri


def register_model(run_id: str, name: str, alias: str, *, uri: str, description: str = "") -> tuple[str, str]:
    """Register the model a finished run logged under ``name`` and point ``alias`` at the new version;
    returns (version, ``models:/NAME@ALIAS``)."""
    if alias not in ALIASES:
        raise StrnetError(f"alias {alias!r}: use one of {', '.join(ALIASES)}")
    if not name.strip():
        raise StrnetError("model name is empty: give --name, e.g. strnet-screening")
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    try:
        run = client.get_run(run_id)
    except mlflow.exceptions.MlflowException as exc:
        raise StrnetError(f"run {run_id!r} not found in {uri}") from exc
    model_uri = run.data.tags.get(MODEL_URI_TAG)
    if not model_uri:
        raise StrnetError(f"run {run_id} logged no model (no '{MODEL_URI_TAG}' tag): was it finished by strnet?")
    tags = {k: run.data.tags[k] for k in ("mode", "preset", "strategy") if k in run.data.tags}
    meta = mlflow.artifacts.load_dict(f"runs:/{run_id}/bundle/metadata.json")
    version = mlflow.register_model(model_uri, name, tags=tags | {SHA_TAG: meta["weights_sha256"], "run_id": run_id})
    if description:
        client.update_model_version(name, version.version, description=description)
    client.set_registered_model_alias(name, alias, version.version)
    return str(version.version), f"models:/{name}@{alias}"


def resolve_model_uri(model_uri: str, dst: Path, *, uri: str) -> Path:
    """Download a registered model (``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``) and return its bundle
    folder, after checking that the bundle records the SHA-256 the model version was registered with
    (``load_bundle`` then checks the weights file against it)."""
    spec = model_uri[len("models:/") :]
    name, at, alias = spec.partition("@")
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    try:
        if at:
            version = client.get_model_version_by_alias(name, alias)
        else:
            name, _, number = spec.rpartition("/")
            version = client.get_model_version(name, number)
    except mlflow.exceptions.MlflowException as exc:
        raise DataError(model_uri, f"not a registered model version in {uri} ({exc.message})") from exc
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst)))
    bundle_dir = local / "artifacts" / BUNDLE_ARTIFACT
    if not (bundle_dir / "metadata.json").is_file():
        raise DataError(model_uri, "the model holds no strnet bundle (artifacts/bundle/metadata.json)")
    recorded = json.loads((bundle_dir / "metadata.json").read_text()).get("weights_sha256")
    expected = version.tags.get(SHA_TAG)
    if expected is None or recorded != expected:
        raise DataError(
            model_uri,
            f"SHA-256 mismatch: version {version.version} was registered with {expected}, its bundle records "
            f"{recorded} (refusing to use it)",
        )
    return bundle_dir
