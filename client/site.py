"""Which site a node plays: its node config (a deployed SuperNode) or its simulation partition."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from configs.schema import Config
from strnet.errors import ConfigError


@dataclass(frozen=True)
class NodeSite:
    """The site a node plays, and what its hospital set for it in ``site.yaml`` (None: the run config's value)."""

    name: str
    role: str
    manifest: str
    cache_dir: str | None = None
    device: str | None = None
    threads: int | None = None


def site_for_node(cfg: Config, node_config: dict[str, Any]) -> NodeSite:
    """This node's site, from its node config and the federation's site list."""
    sites = {s.name: s for s in cfg.federation.sites}
    if "site-id" in node_config:
        name = str(node_config["site-id"])
        if name not in sites:
            raise ConfigError(f"node config site-id={name!r} is not one of federation.sites {sorted(sites)}")
        threads = node_config.get("threads")
        if threads is not None and (isinstance(threads, bool) or int(threads) < 1):
            raise ConfigError(f"node config threads={threads!r} must be a whole number >= 1")
        return NodeSite(
            name,
            sites[name].role,
            str(node_config.get("manifest") or sites[name].manifest),
            cache_dir=str(node_config["cache-dir"]) if node_config.get("cache-dir") else None,
            device=str(node_config["device"]) if node_config.get("device") else None,
            threads=int(threads) if threads is not None else None,
        )
    if "partition-id" in node_config:
        pid = int(node_config["partition-id"])
        if not 0 <= pid < len(cfg.federation.sites):
            raise ConfigError(
                f"partition-id {pid} has no site: federation.sites lists {len(cfg.federation.sites)} "
                "(run the simulation with num-supernodes equal to the number of sites)"
            )
        site = cfg.federation.sites[pid]
        return NodeSite(site.name, site.role, site.manifest)
    raise ConfigError("node config has neither site-id (deployment) nor partition-id (simulation)")
