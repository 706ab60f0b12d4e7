"""Flower ClientApp: a hospital node. Only translates Messages into :class:`strnet.site.SiteRunner` calls.

Which site a node plays: a deployed SuperNode names it in its node config (``site-id``, ``manifest``); in
simulation the node with ``partition-id`` i plays ``federation.sites[i]``. The run's configuration comes from
the server once, in the site-info query, and is kept in the node's ``context.state`` with the site's optimizer
state and last round (the only state a node keeps between messages; its preprocessed cases are cached
in-process by :func:`strnet.site.site_cases`). Replies carry weights, a few scalars and count arrays only.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.audit import audit_mod
from client.kept import KeptState, load_run_config, save_run_config
from client.released import released_mod
from client.sanitize import public_reason, sanitize_errors_mod
from client.site import site_for_node
from configs.schema import Config, config_from_dict
from strnet.calibration import Platt, PlattStats
from strnet.engine import resolve_device
from strnet.errors import ConfigError
from strnet.model import batchnorm_keys
from strnet.npy import array_numpy, arrays_numpy
from strnet.ood import FeatureGaussian
from strnet.protocol import (
    PROTOCOL_VERSION,
    WEIGHT,
    Field,
    Key,
    MessageKind,
    ProtocolError,
    check_version,
    config_digest,
    encode,
    encode_splits,
    from_wire,
    part_name,
    part_records,
    update_to_wire,
)
from strnet.released import StatisticsPrivacy
from strnet.site import SiteRunner, load_optimizer_state
from strnet.tscore import BranchData, branch_keys, branch_sums, validate_then_train

# failures leave the site as kind + generic reason (client.sanitize); STRNET_MESSAGE_AUDIT logs every reply, after
# privacy.statistics protected its statistics (client.released)
app = ClientApp(mods=[sanitize_errors_mod, audit_mod, released_mod(lambda context: _statistics_policy(context))])

log = logging.getLogger("strnet.site")

RUN_STATE = "strnet.run"  # ConfigRecord: config-json, config-digest
OPTIMIZER_STATE = "strnet.optimizer"  # ConfigRecord: state (bytes), server-round
BN_STATE = "strnet.batchnorm"  # FedBN: ArrayRecord of this site's BatchNorm tensors, one per round (…round-<r>)
BN_LATEST = f"{BN_STATE}.latest"
TSCORE_DATA = "strnet.tscore-data"  # ArrayRecord: frozen T-score branch inputs of the kept model (train, val)
TSCORE_DIGEST = "strnet.tscore-digest"  # ConfigRecord: model-digest they came from
PRIVACY_STATE = "strnet.privacy"  # ConfigRecord: state (JSON) of this site's DP accountant, the whole run
VAL_LOGITS = "strnet.val-logits"  # ArrayRecord: the kept model's validation logits and labels, for calibration
VAL_LOGITS_DIGEST = "strnet.val-logits-digest"  # ConfigRecord: model-digest of the weights they came from


def _config(message: Message, context: Context) -> Config:
    """The run's configuration: taken from a site-info query, else the copy this node kept from it."""
    instruction = message.content[Key.CONFIG]
    check_version(instruction.get(Field.VERSION), "server")
    node_cache = context.node_config.get("cache-dir")  # a deployed node's own folder (site.yaml)
    if Field.CONFIG_JSON in instruction:
        text = str(instruction[Field.CONFIG_JSON])
        _keep_config(context, text, str(instruction.get(Field.FEDERATION_ID, "")))
        if node_cache:
            save_run_config(str(node_cache), config_digest(text), text, str(instruction.get(Field.FEDERATION_ID, "")))
    elif RUN_STATE not in context.state and node_cache and Field.CONFIG_DIGEST in instruction:
        # this node was restarted mid-run: it takes the run up again from what it kept of the site-info query
        found = load_run_config(str(node_cache), str(instruction[Field.CONFIG_DIGEST]))
        if found is not None:
            _keep_config(context, *found)
    kept = context.state.get(RUN_STATE)
    if kept is None:
        raise ConfigError("this node has no configuration for the run: the server's site-info query never reached it")
    if instruction.get(Field.CONFIG_DIGEST, kept[Field.CONFIG_DIGEST]) != kept[Field.CONFIG_DIGEST]:
        raise ConfigError("the server's configuration digest differs from the one this node received")
    return config_from_dict(json.loads(str(kept[Field.CONFIG_JSON])))


def _statistics_policy(context: Context) -> StatisticsPrivacy | None:
    """The run's ``privacy.statistics``, once the node knows the run (None before the site-info query)."""
    kept = context.state.get(RUN_STATE)
    if kept is None:
        return None
    return config_from_dict(json.loads(str(kept[Field.CONFIG_JSON]))).privacy.statistics


def _keep_config(context: Context, config_json: str, federation_id: str) -> None:
    context.state[RUN_STATE] = ConfigRecord(
        {
            Field.CONFIG_JSON: config_json,
            Field.CONFIG_DIGEST: config_digest(config_json),
            Field.FEDERATION_ID: federation_id,
        }
    )


# The sites this process has served, newest last: a ClientApp process (a simulation actor, a SuperNode's app
# process) answers many messages of a run, and building the site each time rebuilt the model and re-hashed
# every image for the cache keys. Every entry point loads the weights it is asked about into the model, so a
# kept site carries nothing from one message into the next but its cases.
_SITES: dict[tuple[str, ...], SiteRunner] = {}
_KEEP_SITES = 4


def runner_for(message: Message, context: Context) -> SiteRunner:
    """This node's site, with what its hospital set in ``site.yaml`` (cache, device, threads) over the run's."""
    cfg = _config(message, context)
    node = site_for_node(cfg, dict(context.node_config))
    if node.cache_dir is not None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, cache_dir=node.cache_dir))
    if node.threads is not None:
        torch.set_num_threads(node.threads)
    device = resolve_device(node.device) if node.device is not None else None
    try:
        stat = Path(node.manifest).stat()
        stamp = f"{stat.st_mtime_ns}:{stat.st_size}"
    except OSError:
        stamp = "missing"  # SiteRunner names the file and the problem
    key = (config_digest(json.dumps(cfg.to_dict(), sort_keys=True)), node.name, str(node.manifest), stamp, str(device))
    runner = _SITES.pop(key, None)
    if runner is None:
        runner = SiteRunner(cfg, node.name, node.manifest, role=node.role, device=device)
    _SITES[key] = runner
    while len(_SITES) > _KEEP_SITES:
        _SITES.pop(next(iter(_SITES)))
    return runner


def _kept(context: Context, runner: SiteRunner) -> KeptState | None:
    """This site's state on disk for the federation (what survives a resume), if the server named one."""
    run = context.state.get(RUN_STATE)
    federation_id = str(run.get(Field.FEDERATION_ID, "")) if run is not None else ""
    return KeptState(runner.cfg.data.cache_dir, federation_id, runner.site) if federation_id else None


def _optimizer_state(
    context: Context, runner: SiteRunner, store: KeptState | None, server_round: int
) -> dict[str, Any] | None:
    """The AdamW state this site kept after the previous round: from this process's site, else from the site's disk
    (a restarted node, a resumed federation, a simulation actor that did not serve the last round).

    Not from ``context.state``: Flower's simulation carries a node's context to its ClientApp and back with every
    message, and AdamW's moments are twice the model (90 MB for the demo's ResNet-18), which cost the demo
    federation 35 s over its 145 exchanges, most of them the T-score refit's small ones. A node without a
    federation id to key the disk by (an older server) still keeps it there."""
    if store is None:
        kept = context.state.get(OPTIMIZER_STATE)
        return load_optimizer_state(bytes(kept["state"]), runner.device, runner.site) if kept is not None else None
    if server_round < 2:
        return None
    cached = runner.kept_optimizer.get((store.federation_id, server_round - 1))
    if cached is not None:
        return cached
    data = store.optimizer(server_round - 1)
    return load_optimizer_state(data, runner.device, runner.site) if data is not None else None


def _reply(message: Message, runner: SiteRunner, **records: ArrayRecord | MetricRecord | ConfigRecord) -> Message:
    info = ConfigRecord({Field.SITE: runner.site, Field.ROLE: runner.role, Field.VERSION: PROTOCOL_VERSION})
    return Message(RecordDict({Key.INFO: info, **records}), reply_to=message)


def _arrays(values: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in values.items()})


def _weights_record(
    state: dict[str, torch.Tensor], received: dict[str, torch.Tensor], runner: SiteRunner
) -> ArrayRecord:
    """Trained weights for a reply at the run's ``federation.transport`` precision: under fp16, as the update on
    the weights received (strnet.protocol.update_to_wire)."""
    wire = update_to_wire(state, received, runner.cfg.federation.transport)
    return ArrayRecord({k: Array(v) for k, v in wire.items()})


def _weights(
    message: Message, context: Context | None = None, runner: SiteRunner | None = None
) -> dict[str, torch.Tensor]:
    """The message's weights, floating ones back in the dtype of this site's model (fp16 on the wire in training
    rounds; :func:`strnet.protocol.from_wire`); under FedBN a message without the BatchNorm tensors is completed
    with this site's own, from the round the instruction names (the round it trained last, if none)."""
    own = {k: v.dtype for k, v in runner.model.state_dict().items()} if runner is not None else None
    arrays = from_wire(arrays_numpy(message.content[Key.ARRAYS]), own)
    weights = {k: torch.from_numpy(v) for k, v in arrays.items()}
    if context is None or runner is None or runner.cfg.federation.strategy != "fedbn":
        return weights
    missing = batchnorm_keys(runner.model) - set(weights)
    if not missing:
        return weights
    instruction = message.content[Key.CONFIG]
    server_round = int(instruction.get(Field.SERVER_ROUND, -1))
    before = message.metadata.message_type == MessageKind.TRAIN
    if before:  # round r trains (and validates) from the tensors of the latest round before r, even when it is
        # sent again after this site trained it once already (a new learning rate)
        earlier = [r for r in (_bn_round(k) for k in context.state.array_records) if r is not None and r < server_round]
        kept = context.state.get(_bn_key(max(earlier))) if earlier else None
    else:
        kept = context.state.get(_bn_key(server_round)) or context.state.get(BN_LATEST)
    if kept is not None:
        return weights | {k: torch.from_numpy(v) for k, v in arrays_numpy(kept).items()}
    # a resumed federation: this run has not trained yet; training continues from the round before
    store = _kept(context, runner)
    on_disk = store.batchnorm(server_round, before=before) if store else None
    if on_disk is None:
        raise ConfigError(f"site {runner.site}: FedBN weights without BatchNorm tensors, and none kept at this site")
    return weights | on_disk


def _model(message: Message, context: Context, runner: SiteRunner) -> dict[str, torch.Tensor]:
    """The weights of a message after training: the whole model it names by ``model-digest`` when it carries
    none, the kept ``base-digest`` model overlaid with the tensors it carries, or what it carries; kept under its
    digest when the message says ``keep-model`` (server.replies.ModelShipping sends the final model once)."""
    instruction = message.content[Key.CONFIG]
    digest = instruction.get(Field.MODEL_DIGEST)
    sent = _weights(message, None, runner) if Key.ARRAYS in message.content else {}
    base = instruction.get(Field.BASE_DIGEST)
    if base is not None:
        weights = _held_model(context, runner, str(base)) | sent
    elif not sent and digest is not None:
        weights = _held_model(context, runner, str(digest))
    else:
        weights = sent
    if instruction.get(Field.KEEP_MODEL):
        if digest is None:
            raise ConfigError(f"site {runner.site}: asked to keep a model without its digest")
        runner.held_models[str(digest)] = weights
        _keep_two_latest(runner.held_models)
        store = _kept(context, runner)
        if store is not None:  # the final model: training is over, its AdamW states go (client.kept)
            store.save_model(str(digest), weights)
            store.drop_optimizer_states()
            for key in [k for k in runner.kept_optimizer if k[0] == store.federation_id]:
                del runner.kept_optimizer[key]
    return weights


def _keep_two_latest(kept: dict) -> None:
    """A site keeps its two latest AdamW states (a round sent again starts from the one before the latest) and
    its two latest final models, in the order they came."""
    while len(kept) > 2:
        kept.pop(next(iter(kept)))


def _held_model(context: Context, runner: SiteRunner, digest: str) -> dict[str, torch.Tensor]:
    held = runner.held_models.get(digest)
    if held is None:
        store = _kept(context, runner)
        held = store.model(digest) if store is not None else None
    if held is None:
        raise ConfigError(f"site {runner.site}: no model {digest} kept here (the first message about it carries it)")
    return dict(held)


def _bn_key(server_round: int) -> str:
    return f"{BN_STATE}.round-{server_round}"


def _bn_round(key: str) -> int | None:
    prefix = f"{BN_STATE}.round-"
    return int(key[len(prefix) :]) if key.startswith(prefix) else None


Records = dict[str, ArrayRecord | MetricRecord | ConfigRecord]
Answer = Callable[[Message, Context], tuple[SiteRunner, Records]]
_ANSWERS: dict[str, Answer] = {}  # the queries a BATCH message may carry: kind -> what answers it


def _answers(kind: str) -> Callable[[Answer], Answer]:
    """Registers a query's answer both as the ClientApp's handler of its own message and as a part of a
    BATCH message (:func:`batch`), so the two cannot drift."""

    def register(answer: Answer) -> Answer:
        def handler(message: Message, context: Context) -> Message:
            runner, records = answer(message, context)
            return _reply(message, runner, **records)

        handler.__name__ = handler.__qualname__ = answer.__name__
        handler.__doc__ = answer.__doc__
        app.query(MessageKind.action(kind))(handler)
        _ANSWERS[kind] = answer
        return answer

    return register


@dataclasses.dataclass(frozen=True)
class _Part:
    """One query of a BATCH message, shaped like the Message its handler reads (its records and its type)."""

    content: RecordDict
    metadata: SimpleNamespace


@app.query(MessageKind.action(MessageKind.BATCH))
def batch(message: Message, context: Context) -> Message:
    """Several after-training queries in one message, answered in order in one reply: each part's records come
    back under ``<kind>/<record>``. A part that fails sends its public reason only (client.sanitize) and the
    other parts still answer; ``privacy.statistics`` protects each part's statistics as its own message kind's
    (client.released)."""
    runner = runner_for(message, context)
    kinds = [str(k) for k in message.content[Key.CONFIG].get(Field.PARTS, [])]
    records: Records = {}
    for kind in kinds:
        try:
            answer = _ANSWERS.get(kind)
            if answer is None:
                raise ProtocolError(runner.site, f"a batch part of kind {kind!r}, which this version does not answer")
            request = _Part(RecordDict(part_records(message.content, kind)), SimpleNamespace(message_type=kind))
            _, out = answer(request, context)  # type: ignore[arg-type]
        except Exception as exc:
            log.exception("%s part of a batch failed at this site", kind)
            out = {Key.ERROR: ConfigRecord({Field.REASON: public_reason(exc)})}
        records |= {part_name(kind, k): v for k, v in out.items()}
    return _reply(message, runner, **records)


@app.query(MessageKind.action(MessageKind.SITE_INFO))
def site_info(message: Message, context: Context) -> Message:
    """Name, role and counts, so the server can map node ids to sites and pick the training nodes."""
    runner = runner_for(message, context)
    return _reply(message, runner, **{Key.METRICS: MetricRecord(runner.info())})


@app.train()
def train(message: Message, context: Context) -> Message:
    """Local epochs from the sent weights; when the instruction says ``validate``, their validation counts first
    (the previous round's average, scored in the same exchange: :class:`server.strategy.SiteFedAvg`)."""
    runner = runner_for(message, context)
    instruction = message.content[Key.CONFIG]
    server_round = int(instruction[Field.SERVER_ROUND])
    keep = runner.cfg.federation.keep_optimizer_state
    store = _kept(context, runner)
    optimizer_state = _optimizer_state(context, runner, store, server_round) if keep else None
    weights = _weights(message, context, runner)
    validation = (
        {Key.STATS: _arrays(encode(runner.validation_counts(weights)))} if instruction.get(Field.VALIDATE) else {}
    )
    new_state, metrics, n, optimizer, privacy = runner.train(
        weights,
        lr=float(instruction[Field.LEARNING_RATE]),
        server_round=server_round,
        optimizer_state=optimizer_state,
        proximal_mu=float(instruction.get(Field.PROXIMAL_MU, 0.0)),
        privacy_state=_privacy_state(context, store),
    )
    if privacy is not None:  # the accountant outlives the round, the run (on disk) and never leaves the site
        context.state[PRIVACY_STATE] = ConfigRecord({"state": json.dumps(privacy)})
        if store is not None:
            store.save_privacy(privacy)
    if keep:  # AdamW moments are local state: they stay at the site, never in a reply
        if store is not None:  # this process and the site's disk (see _optimizer_state)
            runner.kept_optimizer[(store.federation_id, server_round)] = optimizer
            _keep_two_latest(runner.kept_optimizer)
            store.save_optimizer(optimizer, server_round)
        else:
            buf = io.BytesIO()
            torch.save(optimizer, buf)
            context.state[OPTIMIZER_STATE] = ConfigRecord({"state": buf.getvalue(), Field.SERVER_ROUND: server_round})
    if runner.cfg.federation.strategy == "fedbn":  # BatchNorm tensors stay here (FedBN)
        local = batchnorm_keys(runner.model)
        kept = ArrayRecord({k: v for k, v in new_state.items() if k in local})
        context.state[_bn_key(server_round)] = kept
        context.state[BN_LATEST] = kept
        if store is not None:
            store.save_batchnorm({k: v for k, v in new_state.items() if k in local}, server_round)
        new_state = {k: v for k, v in new_state.items() if k not in local}
    return _reply(
        message,
        runner,
        **{Key.ARRAYS: _weights_record(new_state, weights, runner), Key.METRICS: MetricRecord({**metrics, WEIGHT: n})},
        **validation,
    )


def _privacy_state(context: Context, store: KeptState | None) -> dict | None:
    """This site's DP accountant so far: from the node state, else (a restarted node, a resumed run) its disk."""
    kept = context.state.get(PRIVACY_STATE)
    if kept is not None:
        return json.loads(str(kept["state"]))
    return store.privacy() if store is not None else None


@app.query(MessageKind.action(MessageKind.BATCHNORM))
def batchnorm(message: Message, context: Context) -> Message:
    """FedBN, once after training: this site's BatchNorm tensors of the kept round and its training-case count."""
    runner = runner_for(message, context)
    server_round = int(message.content[Key.CONFIG][Field.SERVER_ROUND])
    kept = context.state.get(_bn_key(server_round))
    store = _kept(context, runner)
    if kept is not None:
        tensors = arrays_numpy(kept)
    else:  # a resumed federation: the round was trained by the run before
        on_disk = store.batchnorm(server_round) if store is not None else None
        tensors = arrays_numpy(on_disk or {})
    if not tensors:
        raise ConfigError(f"site {runner.site}: no BatchNorm tensors kept for round {server_round}")
    values = tensors | {WEIGHT: np.array([len(runner.splits["train"])], np.int64)}
    return _reply(message, runner, **{Key.STATS: _arrays(values)})


def _platt(message: Message) -> Platt:
    instruction = message.content[Key.CONFIG]
    return Platt(float(instruction.get(Field.PLATT_A, 1.0)), float(instruction.get(Field.PLATT_B, 0.0)))


@_answers(MessageKind.VAL_STATS)
def val_stats(message: Message, context: Context) -> tuple[SiteRunner, Records]:
    runner = runner_for(message, context)
    # a round's average (FedBN: completed with this site's BatchNorm), or the final model, named by digest
    model_message = Field.MODEL_DIGEST in message.content[Key.CONFIG]
    weights = _model(message, context, runner) if model_message else _weights(message, context, runner)
    counts = runner.validation_counts(weights, _platt(message))
    return runner, {Key.STATS: _arrays(encode(counts))}


@_answers(MessageKind.CALIBRATE)
def calibrate(message: Message, context: Context) -> tuple[SiteRunner, Records]:
    """One Newton step's statistics. The first step is about the whole model (sent, or kept here); the site
    keeps the validation logits in its node state (never in a reply) and later steps name the model by digest."""
    runner = runner_for(message, context)
    instruction = message.content[Key.CONFIG]
    digest = str(instruction[Field.MODEL_DIGEST])
    kept = context.state.get(VAL_LOGITS_DIGEST)
    if Key.ARRAYS in message.content or kept is None or kept[Field.MODEL_DIGEST] != digest:
        try:
            weights = _model(message, context, runner)
        except ConfigError as exc:
            raise ConfigError(f"site {runner.site}: no validation logits of model {digest} ({exc})") from exc
        logits, labels = runner.validation_logits(weights)
        context.state[VAL_LOGITS] = _arrays({"logits": logits, "labels": labels})
        context.state[VAL_LOGITS_DIGEST] = ConfigRecord({Field.MODEL_DIGEST: digest})
    record = context.state[VAL_LOGITS]
    targets = (float(instruction[Field.TARGET_NEG]), float(instruction[Field.TARGET_POS]))
    logits, labels = array_numpy(record["logits"]), array_numpy(record["labels"])
    stats = PlattStats.from_logits(logits, labels, _platt(message), targets)
    return runner, {Key.STATS: _arrays(encode(stats))}


@_answers(MessageKind.BN_STATISTICS)
def bn_statistics(message: Message, context: Context) -> tuple[SiteRunner, Records]:
    """Each BatchNorm layer's input mean and variance over this site's training images under the model the
    message carries, and the image count (never an image's activations): FedBN once after training,
    ``federation.batchnorm: pooled`` before every round."""
    runner = runner_for(message, context)
    stats, n = runner.batchnorm_statistics(_model(message, context, runner))
    return runner, {Key.STATS: _arrays(stats | {"n": np.array([n], np.int64)})}


@_answers(MessageKind.OOD_MOMENTS)
def ood_moments(message: Message, context: Context) -> tuple[SiteRunner, Records]:
    """Sums of neck features and of their outer products over this site's training knees (never the features)."""
    runner = runner_for(message, context)
    m = runner.ood_moments(_model(message, context, runner))
    values = {"n": np.array([m.n], np.int64), "sum": m.sum, "sum_outer": m.sum_outer}
    return runner, {Key.STATS: _arrays(values)}


@_answers(MessageKind.OOD_DISTANCES)
def ood_distances(message: Message, context: Context) -> tuple[SiteRunner, Records]:
    """A histogram of this site's validation knees' distances under the pooled Gaussian the server sent."""
    runner = runner_for(message, context)
    instruction, sent = message.content[Key.CONFIG], message.content[Key.STATS]
    gaussian = FeatureGaussian(
        array_numpy(sent["mean"]),
        array_numpy(sent["covariance"]),
        float(instruction[Field.SHRINKAGE]),
        int(instruction[Field.N_CASES]),
    )
    hist = runner.ood_histogram(_model(message, context, runner), gaussian)
    return runner, {Key.STATS: _arrays({"hist": hist})}


def _branch_data(message: Message, context: Context, runner: SiteRunner) -> tuple[BranchData, BranchData]:
    """This site's frozen T-score branch inputs (train, val) for the kept model: computed when the message carries
    the whole model, kept in node state, and reused while later messages carry only the branch."""
    digest = str(message.content[Key.CONFIG][Field.MODEL_DIGEST])
    weights = _model(message, context, runner)
    if set(weights) != set(branch_keys(runner.model)):
        runner.model.load_state_dict(weights)
        data = {
            split: BranchData.of(runner.model, runner.splits[split], runner.cfg.preprocess, runner.cache, runner.device)
            for split in ("train", "val")
        }
        context.state[TSCORE_DATA] = _arrays(
            {f"{s}.{k}": getattr(d, k).numpy() for s, d in data.items() for k in ("routed", "tabular", "target")}
        )
        context.state[TSCORE_DIGEST] = ConfigRecord({Field.MODEL_DIGEST: digest})
    kept = context.state.get(TSCORE_DIGEST)
    if kept is None or kept[Field.MODEL_DIGEST] != digest:
        raise ConfigError(f"site {runner.site}: no T-score branch inputs of model {digest} (the first step carries it)")
    runner.model.load_state_dict(weights, strict=False)
    record = context.state[TSCORE_DATA]
    train, val = (
        BranchData(*(torch.from_numpy(array_numpy(record[f"{s}.{k}"])) for k in ("routed", "tabular", "target")))
        for s in ("train", "val")
    )
    return train, val


@_answers(MessageKind.TSCORE_VAL)
def tscore_val(message: Message, context: Context) -> tuple[SiteRunner, Records]:
    runner = runner_for(message, context)
    runner.model.cpu()
    _, val = _branch_data(message, context, runner)
    return runner, {Key.STATS: _arrays({"sums": branch_sums(runner.model, val)})}


@_answers(MessageKind.TSCORE_TRAIN)
def tscore_train(message: Message, context: Context) -> tuple[SiteRunner, Records]:
    """The sent branch's validation sums, then local full-batch steps on it; replies both, and the number of
    T-score cases trained on (0: none). One exchange per refit round (:func:`strnet.tscore.refit`)."""
    runner = runner_for(message, context)
    runner.model.cpu()
    train, val = _branch_data(message, context, runner)
    ts = runner.cfg.tscore
    steps = int(message.content[Key.CONFIG][Field.STEPS])
    sums = validate_then_train(runner.model, train, val, steps, ts.lr, ts.weight_decay)
    state = runner.model.state_dict()
    values = {k: state[k].detach().numpy() for k in branch_keys(runner.model)}
    counts = {WEIGHT: np.array([len(train)], np.int64), "sums": sums}
    return runner, {Key.STATS: _arrays(values | counts)}


@app.evaluate(MessageKind.action(MessageKind.FROZEN))
def evaluate_frozen(message: Message, context: Context) -> Message:
    runner = runner_for(message, context)
    threshold = float(message.content[Key.CONFIG][Field.THRESHOLD])
    counts = runner.evaluate_frozen(_model(message, context, runner), threshold, _platt(message))
    store = _kept(context, runner)
    if store is not None:  # the run's last message: its final model goes (client.kept)
        store.drop_models()
        runner.held_models.clear()
    return _reply(message, runner, **{Key.STATS: _arrays(encode_splits(counts))})
