"""Which site a node plays: its node config (a deployed SuperNode) or its simulation partition."""

from __future__ import annotations

from typing import Any

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
