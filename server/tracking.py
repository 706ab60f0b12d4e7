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
from mlflow.tracking import MlflowClient

DEFAULT_DB = "mlflow.db"


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
        mlflow.set_experiment(self.experiment)
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

    def end(self, status: str = "FINISHED") -> None:
        if self.enabled and self.run_id is not None:
            mlflow.end_run(status=status)
            self.run_id = None


def search_runs(uri: str | None = None, experiment: str = "strnet", filter_string: str = "") -> pd.DataFrame:
    """All runs of an experiment as a DataFrame (``mlflow.search_runs``), newest first."""
    mlflow.set_tracking_uri(resolve_uri(uri))
    exp = MlflowClient().get_experiment_by_name(experiment)
    if exp is None:
        return pd.DataFrame()
    return mlflow.search_runs([exp.experiment_id], filter_string=filter_string, order_by=["start_time DESC"])
