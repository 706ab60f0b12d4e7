"""Run a config's federation as a local ``flwr run .`` simulation, one SuperNode per configured site.

The config is resolved here (relative manifest, cache and tracking paths made absolute, because the
ServerApp and ClientApps run from Flower's own working directories) and handed to Flower as one YAML file
through the flat run config — the same schema `strnet train` reads.

    python -m simulations.federate --config cpu --out runs/real/federated
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import yaml

from configs import Config, load_config
from simulations.flower_sim import REPO, local_superlink


def absolute_config(cfg: Config, output_dir: Path | None = None) -> Config:
    """Copy of ``cfg`` with every path absolute (against the current directory)."""
    sites = tuple(dataclasses.replace(s, manifest=str(Path(s.manifest).resolve())) for s in cfg.federation.sites)
    uri = cfg.tracking.uri or f"sqlite:///{Path('mlflow.db').resolve()}"
    return dataclasses.replace(
        cfg,
        output_dir=str((output_dir or Path(cfg.output_dir)).resolve()),
        data=dataclasses.replace(cfg.data, cache_dir=str(Path(cfg.data.cache_dir).resolve())),
        tracking=dataclasses.replace(cfg.tracking, uri=uri),
        federation=dataclasses.replace(cfg.federation, sites=sites),
    )


def run_federated(cfg: Config, workdir: Path, *, timeout: float = 3600, stream: bool = True) -> int:
    """Write the resolved config, start a local SuperLink, ``flwr run .``, stop everything; returns the exit code."""
    if not cfg.federation.sites:
        raise ValueError("federation.sites is empty: nothing to federate")
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = (workdir / "federated.yaml").resolve()
    config_path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    with local_superlink(workdir / "flower") as link:
        run = link.run(
            REPO, f'config="{config_path}"', num_supernodes=len(cfg.federation.sites), timeout=timeout, stream=stream
        )
    return run.returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="preset name or YAML path with federation.sites")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", required=True, help="output folder of the federated run")
    args = parser.parse_args(argv)
    out = Path(args.out)
    cfg = absolute_config(load_config(args.config, args.set), output_dir=out)
    print(json.dumps([dataclasses.asdict(s) for s in cfg.federation.sites], indent=1))
    return run_federated(cfg, out)


if __name__ == "__main__":
    raise SystemExit(main())
