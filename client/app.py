"""Flower ClientApp: a hospital node. Only translates Messages into :class:`strnet.site.SiteRunner` calls.

Which site a node plays: a deployed SuperNode names it in its node config (``site-id``, ``manifest``); in
simulation the node with ``partition-id`` i plays ``federation.sites[i]``. The configuration itself always
comes from the server (``config-json`` in every message), so every site trains with exactly the server's
settings. Replies carry weights, a few scalars and count arrays only.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.site import site_for_node, to_metric_record
from configs.schema import config_from_dict
from strnet.site import SiteRunner

app = ClientApp()

CONFIG_KEY = "config"
ARRAYS_KEY = "arrays"
METRICS_KEY = "metrics"
INFO_KEY = "info"
_OPTIMIZER_STATE = "optimizer"
_MAX_RUNNERS = 3
_RUNNERS: dict[tuple[Any, ...], SiteRunner] = {}
_OPTIMIZER_ROUND: dict[tuple[Any, ...], int] = {}


def runner_for(message: Message, context: Context) -> SiteRunner:
    """The node's SiteRunner, built once per (run, node, site, config) and reused across rounds in a process.

    A simulation worker may play several nodes in turn, so a few runners are kept (least recently used
    evicted), and the optimizer state is restored from ``context.state`` whenever it is newer than the
    runner's own (another worker trained this node's site last).
    """
    text = str(message.content[CONFIG_KEY]["config-json"])
    cfg = config_from_dict(json.loads(text))
    name, role, manifest = site_for_node(cfg, dict(context.node_config))
    key = (context.run_id, context.node_id, name, hashlib.sha256(text.encode()).hexdigest())
    runner = _RUNNERS.pop(key, None)
    if runner is None:
        runner = SiteRunner(cfg, name, manifest, role=role)
        _OPTIMIZER_ROUND[key] = 0
    _RUNNERS[key] = runner  # most recently used last
    for old in [k for k in _RUNNERS if k[0] != context.run_id] + list(_RUNNERS)[:-_MAX_RUNNERS]:
        _RUNNERS.pop(old, None)
        _OPTIMIZER_ROUND.pop(old, None)
    if _OPTIMIZER_STATE in context.state:
        saved = context.state[_OPTIMIZER_STATE]
        if int(saved["round"]) > _OPTIMIZER_ROUND.get(key, 0):
            runner.load_optimizer_state(bytes(saved["state"]))
            _OPTIMIZER_ROUND[key] = int(saved["round"])
    return runner


def _reply(message: Message, records: dict[str, Any]) -> Message:
    return Message(RecordDict(records), reply_to=message)


@app.query("site_info")
def site_info(message: Message, context: Context) -> Message:
    """Name, role and counts, so the server can map node ids to sites and pick the training nodes."""
    runner = runner_for(message, context)
    info = runner.info()
    counts = {k: int(v) for k, v in info.items() if k.startswith("n_")}
    return _reply(
        message,
        {INFO_KEY: ConfigRecord({"site": runner.site, "role": runner.role}), METRICS_KEY: MetricRecord(counts)},
    )


@app.train()
def train(message: Message, context: Context) -> Message:
    runner = runner_for(message, context)
    config = message.content[CONFIG_KEY]
    state = message.content[ARRAYS_KEY].to_torch_state_dict()
    new_state, metrics, n = runner.train(state, epochs=int(config["local-epochs"]), round=int(config["server-round"]))
    server_round = int(config["server-round"])
    context.state[_OPTIMIZER_STATE] = ConfigRecord({"state": runner.optimizer_state(), "round": server_round})
    for key, value in _RUNNERS.items():
        if value is runner:
            _OPTIMIZER_ROUND[key] = server_round
    return _reply(
        message,
        {ARRAYS_KEY: ArrayRecord(new_state), METRICS_KEY: to_metric_record({**metrics, "num-examples": n})},
    )


@app.query("val_stats")
def val_stats(message: Message, context: Context) -> Message:
    runner = runner_for(message, context)
    stats = runner.validation_statistics(message.content[ARRAYS_KEY].to_torch_state_dict())
    return _reply(message, {METRICS_KEY: to_metric_record(stats)})


@app.evaluate("frozen")
def evaluate_frozen(message: Message, context: Context) -> Message:
    runner = runner_for(message, context)
    threshold = float(message.content[CONFIG_KEY]["threshold"])
    result = runner.evaluate_frozen(message.content[ARRAYS_KEY].to_torch_state_dict(), threshold)
    return _reply(message, {METRICS_KEY: to_metric_record(result)})
