"""The wire format between sites and server, and which site a node plays; shared by ClientApp and ServerApp.

Kept apart from ``client.app`` so the server can decode replies without instantiating a ClientApp, and so
both ends agree on one encoding: a (2, n) histogram travels as ``<name>_neg`` / ``<name>_pos`` lists.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import MetricRecord

from configs.schema import Config
from strnet.errors import ConfigError


def site_for_node(cfg: Config, node_config: dict[str, Any]) -> tuple[str, str, str]:
    """(site name, role, manifest path) for this node, from its node config and the federation's site list."""
    sites = {s.name: s for s in cfg.federation.sites}
    if "site-id" in node_config:
        name = str(node_config["site-id"])
        if name not in sites:
            raise ConfigError(f"node config site-id={name!r} is not one of federation.sites {sorted(sites)}")
        manifest = str(node_config.get("manifest") or sites[name].manifest)
        return name, sites[name].role, manifest
    if "partition-id" in node_config:
        pid = int(node_config["partition-id"])
        if not 0 <= pid < len(cfg.federation.sites):
            raise ConfigError(
                f"partition-id {pid} has no site: federation.sites lists {len(cfg.federation.sites)} "
                "(run the simulation with num-supernodes equal to the number of sites)"
            )
        site = cfg.federation.sites[pid]
        return site.name, site.role, site.manifest
    raise ConfigError("node config has neither site-id (deployment) nor partition-id (simulation)")


def to_metric_record(values: dict[str, Any]) -> MetricRecord:
    """numpy scalars/arrays -> MetricRecord; a (2, n) histogram travels as ``<name>_neg`` / ``<name>_pos``."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, np.ndarray) and value.ndim == 2:
            out[f"{key}_neg"] = _plain(value[0])
            out[f"{key}_pos"] = _plain(value[1])
        else:
            out[key] = _plain(value)
    return MetricRecord(out)


def from_metric_record(record: MetricRecord) -> dict[str, Any]:
    """The inverse of :func:`to_metric_record` (histograms re-stacked; lists become arrays)."""
    out: dict[str, Any] = {k: (np.asarray(v) if isinstance(v, list) else v) for k, v in record.items()}
    for key in [k[: -len("_neg")] for k in list(out) if k.endswith("_neg")]:
        if f"{key}_pos" in out:
            neg, pos = out.pop(f"{key}_neg"), out.pop(f"{key}_pos")
            out[key] = [neg, pos] if np.shape(neg) != np.shape(pos) else np.stack([neg, pos])
    return out


def _plain(value: Any) -> int | float | list[int] | list[float]:
    arr = np.asarray(value)
    if arr.ndim == 0:
        return int(arr) if np.issubdtype(arr.dtype, np.integer) else float(arr)
    if np.issubdtype(arr.dtype, np.integer):
        return [int(v) for v in arr.ravel()]
    return [float(v) for v in arr.ravel()]
