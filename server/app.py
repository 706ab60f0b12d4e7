"""Flower ServerApp: parse the flat run config, then :func:`server.federation.run_federated`.

The run config (pyproject ``[tool.flwr.app.config]``) carries only ``config`` (preset name or YAML path),
``overrides`` (space-separated ``key=value``) and ``num-server-rounds`` (0 = the config's); the resolved
configuration travels to every site once, so all sites run exactly the server's settings.
"""

from __future__ import annotations

import shlex
from logging import INFO, WARNING
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from configs.schema import Config, load_config
from server.federation import run_federated
from server.tracking import Tracker
from strnet.errors import ConfigError

app = ServerApp()


def config_from_run_config(run_config: dict[str, Any]) -> Config:
    """``config`` + ``overrides`` + ``num-server-rounds`` (flat Flower run config) -> validated Config."""
    overrides = shlex.split(str(run_config.get("overrides", "") or ""))
    rounds = int(run_config.get("num-server-rounds", 0) or 0)
    if rounds > 0:
        overrides.append(f"federation.rounds={rounds}")
    cfg = load_config(str(run_config.get("config", "demo")), overrides)
    if not cfg.federation.sites:
        raise ConfigError("federation.sites is empty: list the sites (name, role, manifest) in the config")
    return cfg


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = config_from_run_config(dict(context.run_config))
    tracker = Tracker(uri=cfg.tracking.uri, experiment=cfg.tracking.experiment, enabled=cfg.tracking.enabled)
    resume = str(context.run_config.get("resume", False)).lower() in ("true", "1", "yes")
    result = run_federated(grid, cfg, tracker=tracker, resume=resume)
    m = result.metrics
    log(
        INFO,
        "federated run done in %.0f s: kept round %d, τ*=%.2f, pooled test AUROC %.3f; bundle %s",
        result.seconds,
        int(m["best_step"]),
        m["tau_star"],
        m.get("test_screening_auroc", float("nan")),
        result.bundle_dir,
    )
    for text in result.problems:
        log(WARNING, "problem: %s", text)
