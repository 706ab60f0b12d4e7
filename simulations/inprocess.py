"""A federation in this process, without a SuperLink or Ray: for tests and for diagnosing the federation.

``InProcessGrid`` delivers Messages to the real ClientApp; node 100+i plays partition i with a persistent
``context.state``, as a SuperNode keeps it. The command line runs a config's federation on a site layout
chosen to separate the federation's own effect from the data's:

    python -m simulations.inprocess --config cpu --layout one-site --rounds 10 --out runs/diagnose/one-site
    python -m simulations.inprocess --config cpu --layout iid --rounds 12 --out runs/diagnose/iid

``one-site``: every training site's cases at one site (must reproduce the centralized learning curve exactly);
``iid``: the same cases split at random by patient over two sites; ``sites``: the config's own sites (external
sites are kept in every layout). Each run
is tracked like any other (tag ``layout``), so its ``history/val_screening_auprc`` lines up with the
centralized run's in MLflow.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pandas as pd
from flwr.app import Context, Error, Message, RecordDict

from client.app import app as client_app
from strnet.protocol import Field, Key, MessageKind, part_records


class InProcessGrid:
    """The part of Flower's Grid the ServerApp uses, answering with the ClientApp in this process."""

    def __init__(
        self,
        n_nodes: int,
        fail: Callable[[Message, int], bool] | None = None,
        tamper: Callable[[Message, int], Message] | None = None,
    ) -> None:
        self.contexts = {
            100 + i: Context(
                run_id=1, node_id=100 + i, node_config={"partition-id": i}, state=RecordDict(), run_config={}
            )
            for i in range(n_nodes)
        }
        self.fail = fail
        self.tamper = tamper
        self.sent: list[tuple[int, Message]] = []

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def kinds(self) -> list[tuple[int, str]]:
        """(node, kind) of every query sent, a batch message's parts each under its own kind."""
        return [(node, kind) for node, kind, _, _ in self.parts()]

    def parts(self) -> list[tuple[int, str, RecordDict, int]]:
        """(node, kind, records, message index) of every query sent: a message, or each part of a batch."""
        out = []
        for i, (node, msg) in enumerate(self.sent):
            kind = msg.metadata.message_type
            if kind != MessageKind.BATCH:
                out.append((node, kind, msg.content, i))
                continue
            for part in msg.content[Key.CONFIG][Field.PARTS]:
                out.append((node, str(part), RecordDict(part_records(msg.content, str(part))), i))
        return out

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            self.sent.append((node, msg))
            if self.fail is not None and self.fail(msg, node):
                replies.append(Message(Error(code=1, reason="injected failure"), reply_to=msg))
                continue
            try:
                reply = client_app(msg, self.contexts[node])
            except Exception as exc:  # what a SuperNode does: an error reply, not a crash
                reply = Message(Error(code=2, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
            replies.append(self.tamper(reply, node) if self.tamper is not None else reply)
        return replies


def stamp_task_identity() -> None:
    """Messages are stamped with the process's run/node/task ids, which a SuperLink/SuperNode sets."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def layout_sites(train_manifests: list[str], layout: str, out: Path, seed: int) -> list[dict[str, str]]:
    """Training sites for a diagnostic layout (manifests written into ``out``)."""
    df = pd.concat([pd.read_csv(m, keep_default_na=False) for m in train_manifests], ignore_index=True)
    out.mkdir(parents=True, exist_ok=True)
    if layout == "one-site":
        parts = {"all": df}
    else:  # iid: patients (or images without a patient id) assigned to two sites by a seeded coin
        key = df["patient_id"].astype(str).where(df["patient_id"].astype(str) != "", df["path"].astype(str))
        ids = sorted(set(key))
        coin = dict(zip(ids, np.random.default_rng(seed).integers(0, 2, len(ids)), strict=True))
        parts = {f"mix{i}": df[key.map(coin) == i] for i in (0, 1)}
    sites = []
    for name, part in parts.items():
        path = out / f"{name}.csv"
        part.assign(site=name).to_csv(path, index=False)
        sites.append({"name": name, "role": "train", "manifest": str(path.resolve())})
    return sites


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="preset name or YAML path with federation.sites")
    parser.add_argument("--layout", choices=["one-site", "iid", "sites"], default="sites", help="site layout")
    parser.add_argument("--rounds", type=int, default=0, help="rounds (default: the config's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--out", required=True, help="output folder of the run")
    args = parser.parse_args(argv)

    from configs.schema import load_config
    from server.federation import run_federated
    from server.tracking import Tracker
    from strnet.cases import external_sites, training_manifests

    out = Path(args.out)
    cfg = load_config(args.config, args.set)
    overrides = [*args.set, f"output_dir={json.dumps(str(out))}"]
    if args.layout != "sites":
        sites = layout_sites(training_manifests(cfg), args.layout, out / "sites", cfg.seed)
        external = [{"name": e.name, "role": e.role, "manifest": e.manifest} for e in external_sites(cfg)]
        overrides += [f"federation.sites={json.dumps(sites + external)}", f"federation.quorum={len(sites)}"]
    if args.rounds:
        overrides.append(f"federation.rounds={args.rounds}")
    cfg = load_config(args.config, overrides)
    stamp_task_identity()
    tracker = Tracker(uri=cfg.tracking.uri, experiment=cfg.tracking.experiment, enabled=cfg.tracking.enabled)
    grid = InProcessGrid(len(cfg.federation.sites))
    result = run_federated(grid, cfg, tracker=tracker, tags={"layout": args.layout})  # type: ignore[arg-type]
    for row in result.history:
        print(
            f"round {row['step']:.0f}: pooled val AUROC {row['val_screening_auroc']:.4f} "
            f"AUPRC {row['val_screening_auprc']:.4f} lr {row['lr']:.3g}"
        )
    print(result.describe())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
