"""MLflow tracking: the one module that imports mlflow, shared by centralized and federated runs.

Both modes log the same way (flattened config as params, ``mode`` tag, data fingerprint, per-epoch or
per-round metrics, final metrics, figures, the bundle) so ``strnet compare`` can put them side by side.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.data.dataset_source import DatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.tracking import MlflowClient

from strnet.run import DatasetEntry

DEFAULT_DB = "mlflow.db"
# MLflow 3 opens an experiment in its GenAI view unless told otherwise; this tag and value (MLflow's
# ``ExperimentKind.CUSTOM_MODEL_DEVELOPMENT``) open the model-training view: runs, metrics, models, datasets.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
DIGEST_CHARS = 16  # MLflow's dataset digest column holds 36 characters; the full fingerprint is an input tag


class SiteSource(DatasetSource):
    """Where a federated site's data lives: at the site. It cannot be loaded from the tracking server."""

    def __init__(self, site: str) -> None:
        self.site = site

    @staticmethod
    def _get_source_type() -> str:
        return "federated_site"

    def load(self, **kwargs: Any) -> Any:
        raise NotImplementedError(f"site {self.site!r}'s data stays at the site; only its counts were sent")

    @staticmethod
    def _can_resolve(raw_source: Any) -> bool:
        return False

    @classmethod
    def _resolve(cls, raw_source: Any) -> SiteSource:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        return {"site": self.site, "held_at": "the site (the server saw counts only)"}

    @classmethod
    def from_dict(cls, source_dict: dict[str, Any]) -> SiteSource:
        return cls(str(source_dict["site"]))


def mlflow_dataset(entry: DatasetEntry) -> mlflow.data.dataset.Dataset:
    """A site's manifest rows as a pandas dataset (schema and row count in the UI), or, for a federated site,
    a metadata-only dataset: the counts are its input tags."""
    digest = entry.digest[:DIGEST_CHARS]
    if entry.rows is not None:
        return mlflow.data.from_pandas(entry.rows, source=entry.source, name=entry.name, digest=digest)
    return MetaDataset(SiteSource(entry.name), name=entry.name, digest=digest)


def default_tracking_uri(cwd: Path | None = None) -> str:
    """A local SQLite store in the working directory (MLflow 3 refuses the plain file store by default)."""
    return f"sqlite:///{(cwd or Path.cwd()).resolve() / DEFAULT_DB}"


def resolve_uri(uri: str | None) -> str:
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def _clean_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Numbers only. An undefined metric is logged as NaN (MLflow stores it as such), so every run of either mode
    carries the same metric names; infinities, which no metric here produces legitimately, are dropped."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        if isinstance(v, bool) or not isinstance(v, int | float) or math.isinf(float(v)):
            continue
        out[_safe_key(k)] = float(v)
    return out


def _safe_key(key: str) -> str:
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in key)


class Tracker:
    """A thin, explicit wrapper: start -> log -> end, usable as a context manager."""

    def __init__(self, uri: str | None = None, experiment: str = "strnet", enabled: bool = True) -> None:
        self.enabled = enabled
        self.uri = resolve_uri(uri)
        self.experiment = experiment
        self.run_id: str | None = None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:  # type: ignore[no-untyped-def]
        self.end(status="FAILED" if exc_type else "FINISHED")

    def start(self, run_name: str, tags: Mapping[str, str], params: Mapping[str, Any]) -> str | None:
        if not self.enabled:
            return None
        mlflow.set_tracking_uri(self.uri)
        experiment = mlflow.set_experiment(self.experiment)
        if experiment.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
            MlflowClient().set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        run = mlflow.start_run(run_name=run_name, tags={k: str(v) for k, v in tags.items()})
        self.run_id = run.info.run_id
        flat = {_safe_key(k): ("" if v is None else str(v))[:6000] for k, v in params.items()}
        items = list(flat.items())
        for i in range(0, len(items), 100):
            mlflow.log_params(dict(items[i : i + 100]))
        return self.run_id

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        if not self.enabled or self.run_id is None:
            return
        mlflow.log_metrics(_clean_metrics(metrics), step=step)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self.enabled and self.run_id is not None:
            mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if not self.enabled or self.run_id is None:
            return
        p = Path(path)
        if p.is_dir():
            mlflow.log_artifacts(str(p), artifact_path=artifact_path)
        elif p.exists():
            mlflow.log_artifact(str(p), artifact_path=artifact_path)

    def log_dict(self, data: dict[str, Any], name: str) -> None:
        if self.enabled and self.run_id is not None:
            mlflow.log_dict(data, name)

    def log_datasets(self, datasets: list[DatasetEntry]) -> None:
        """One dataset input per site, its context (``training``/``evaluation``) and counts as input tags."""
        if not self.enabled or self.run_id is None or not datasets:
            return
        mlflow.log_inputs(
            datasets=[mlflow_dataset(d) for d in datasets],
            contexts=[d.context for d in datasets],
            tags_list=[
                {k: str(v) for k, v in d.counts.items()} | {"fingerprint": d.digest, "digest_of": _digest_of(d)}
                for d in datasets
            ],
        )

    def log_model(self, bundle_dir: Path, tags: dict[str, str]) -> str | None:
        """The finished bundle as an MLflow pyfunc model of this run (:mod:`server.models`); its URI."""
        if not self.enabled or self.run_id is None:
            return None
        from server.models import log_bundle_model

        return log_bundle_model(Path(bundle_dir), tags)

    def end(self, status: str = "FINISHED") -> None:
        if self.enabled and self.run_id is not None:
            mlflow.end_run(status=status)
            self.run_id = None


def _digest_of(entry: DatasetEntry) -> str:
    return "manifest rows" if entry.rows is not None else "site-info counts (the server never sees the rows)"


def search_runs(uri: str | None = None, experiment: str = "strnet", filter_string: str = "") -> pd.DataFrame:
    """All runs of an experiment as a DataFrame (``mlflow.search_runs``), newest first."""
    mlflow.set_tracking_uri(resolve_uri(uri))
    exp = MlflowClient().get_experiment_by_name(experiment)
    if exp is None:
        return pd.DataFrame()
    return mlflow.search_runs([exp.experiment_id], filter_string=filter_string, order_by=["start_time DESC"])
