"""Half-size weight transport: the fp16 wire format (``strnet.protocol.to_wire`` / ``from_wire``), averaging fp16
replies in fp32 on the server, the bytes a round costs, and the ``federation.transport`` key. Whole federations
at each precision run in tests/test_federation.py."""

from __future__ import annotations

import typing

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from configs.schema import FederationConfig, ThresholdConfig, load_config
from server.strategy import SiteFedAvg, build_strategy
from strnet.engine import RecipeSchedule, TrainParams
from strnet.errors import ConfigError
from strnet.model import batchnorm_keys, build_strnet
from strnet.protocol import (
    PROTOCOL_VERSION,
    WIRE_DTYPES,
    Field,
    Key,
    MessageKind,
    from_wire,
    round_nbytes,
    to_wire,
    update_from_wire,
    update_to_wire,
    wire_nbytes,
)

pytestmark = pytest.mark.usefixtures("flower_task_identity")

# fp16 rounds to nearest: relative error <= 2**-11 for normal values; below 2**-14 (subnormal) the absolute error
# is <= 2**-25, half the smallest subnormal step
REL, ABS = 2.0**-11, 2.0**-25


def _model_state() -> dict[str, torch.Tensor]:
    """A real STR-Net state dict (tiny trunk: BatchNorm layers and their integer counters included)."""
    torch.manual_seed(0)
    model = build_strnet(backbone="tiny")
    for name, buffer in model.named_buffers():
        if name.endswith("num_batches_tracked"):
            buffer.fill_(123_457)  # beyond fp16's exact integers (2048): must travel exactly
        elif name.endswith("running_var"):
            buffer.uniform_(0.01, 40.0)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _floating(state: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, v in state.items() if v.is_floating_point()]


def _matrices(state: dict[str, torch.Tensor]) -> list[str]:
    """The floating tensors fp16 narrows: weights of two or more dimensions (vectors travel at fp32)."""
    return [k for k in _floating(state) if state[k].dim() >= 2]


def test_fp16_round_trip_of_a_model_state_dict() -> None:
    state = _model_state()
    wire = to_wire(state, "fp16")
    assert list(wire) == list(state)
    integer = [k for k in state if k not in _floating(state)]
    assert integer and all(k.endswith("num_batches_tracked") for k in integer)
    assert {wire[k].dtype for k in _matrices(state)} == {np.dtype(np.float16)}
    vectors = [k for k in _floating(state) if k not in _matrices(state)]
    assert any(k.endswith("bn.weight") or ".1.weight" in k for k in vectors)  # BatchNorm scales among them
    for key in vectors:  # BatchNorm scales and shifts, running statistics, biases: exactly
        assert wire[key].dtype == np.float32 and np.array_equal(wire[key], state[key].numpy()), key
    back = from_wire(wire, {k: v.dtype for k, v in state.items()})
    for key, original in state.items():
        x = original.numpy()
        assert back[key].dtype == x.dtype and back[key].shape == x.shape, key
        if key in integer:
            np.testing.assert_array_equal(back[key], x)  # exact, and still int64
        else:
            assert np.all(np.abs(back[key] - x) <= REL * np.abs(x) + ABS), key
    model = build_strnet(backbone="tiny")
    model.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()})  # loads as the model's own tensors
    assert int(model.state_dict()[integer[0]]) == 123_457


def test_fp32_transport_sends_the_weights_unchanged() -> None:
    state = _model_state()
    wire = to_wire(state, "fp32")
    for key, value in state.items():
        assert wire[key].dtype == value.numpy().dtype
        np.testing.assert_array_equal(wire[key], value.numpy())


def test_a_tensor_beyond_fp16s_range_travels_at_its_own_precision() -> None:
    """|x| > 65504 would become inf in fp16: that tensor goes as fp32, exactly; non-finite values stay visible."""
    big = np.array([[1.0, 70_000.0, -3.0]], np.float32)
    edge = np.array([[65_504.0, -65_504.0]], np.float32)  # fp16's largest finite values: still fp16
    broken = np.array([[np.inf, np.nan, 1.0]], np.float32)  # a diverged site: the server must still see it
    wire = to_wire({"fc.weight": big, "edge": edge, "broken": broken}, "fp16")
    assert wire["fc.weight"].dtype == np.float32
    np.testing.assert_array_equal(wire["fc.weight"], big)
    assert wire["edge"].dtype == np.float16 and np.all(np.isfinite(wire["edge"]))
    assert wire["broken"].dtype == np.float16
    back = from_wire(wire)  # no dtypes given: fp16 comes back as fp32
    assert {v.dtype for v in back.values()} == {np.dtype(np.float32)}
    assert np.isposinf(back["broken"][0, 0]) and np.isnan(back["broken"][0, 1])


def test_from_wire_never_casts_between_integer_and_floating() -> None:
    arrays = {"counter": np.array(5, np.int64), "w": np.ones(3, np.float16)}
    back = from_wire(arrays, {"counter": np.float32, "w": torch.float32})
    assert back["counter"].dtype == np.int64 and back["w"].dtype == np.float32


# ------------------------------------------------------------------------------------------------ averaging


def _site_kwargs(transport: str) -> dict:
    return {
        "train_nodes": {11: "alpha", 22: "beta", 33: "gamma"},
        "quorum": 3,
        "threshold": ThresholdConfig(),
        "schedule": RecipeSchedule(TrainParams()),
        "monitor": "auprc",
        "config_digest": "d1",
        "transport": transport,
    }


def _reply(node: int, arrays: dict[str, np.ndarray], n: int, sent: Message) -> Message:
    info = ConfigRecord({Field.SITE: str(node), Field.ROLE: "train", Field.VERSION: PROTOCOL_VERSION})
    record = RecordDict(
        {
            Key.INFO: info,
            Key.ARRAYS: ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            Key.METRICS: MetricRecord({"num-examples": n}),
        }
    )
    return Message(record, reply_to=sent)


def _sites(state: dict[str, torch.Tensor]) -> list[dict[str, np.ndarray]]:
    """Three sites' trained weights: the global ones moved by different amounts, counters advanced."""
    rng = np.random.default_rng(7)
    out = []
    for step in (10, 20, 30):
        site = {}
        for key, value in state.items():
            x = value.numpy()
            if np.issubdtype(x.dtype, np.floating):
                site[key] = (x + rng.normal(0, 0.05, x.shape)).astype(np.float32)
            else:
                site[key] = x + step
        out.append(site)
    return out


def _one_round(strategy: SiteFedAvg, state: dict[str, torch.Tensor], sites: list[dict[str, np.ndarray]]):
    arrays = ArrayRecord({k: Array(v.numpy()) for k, v in state.items()})
    messages = list(strategy.configure_train(1, arrays, ConfigRecord(), None))  # type: ignore[arg-type]
    dtypes = {k: v.dtype for k, v in state.items()}
    replies = []
    for m, site, n in zip(messages, sites, (10, 30, 60), strict=True):  # what client.app replies
        received = from_wire({k: v.numpy() for k, v in m.content[Key.ARRAYS].items()}, dtypes)
        replies.append(_reply(m.metadata.dst_node_id, update_to_wire(site, received, strategy.transport), n, m))
    new, _ = strategy.aggregate_train(1, replies)
    assert new is not None
    return messages, replies, {k: v.numpy() for k, v in new.items()}


def test_fp16_replies_are_averaged_in_fp32() -> None:
    """The sites reply fp16 updates on the fp16 weights they got; the server's result == numpy's weighted average
    of (fp32 weights sent + each site's fp16-rounded update), summed in float64 and rounded once to fp32 (rtol
    2**-23, and 1e-15 absolute where values cancel to ~0); and it is within the rounding of the weights sent
    (|g − fp16(g)|) plus the fp16 rounding of the updates (2**-11 of their weighted mean size, + 2**-25) of
    averaging the sites' original fp32 weights."""
    state, weights = _model_state(), np.array([10.0, 30.0, 60.0])
    sites = _sites(state)
    messages, replies, out = _one_round(SiteFedAvg(**_site_kwargs("fp16")), state, sites)
    # both directions: weights as fp16, vectors as fp32, integer counters exactly
    for record in [m.content[Key.ARRAYS] for m in messages] + [r.content[Key.ARRAYS] for r in replies]:
        assert {np.dtype(record[k].dtype) for k in _matrices(state)} == {np.dtype(np.float16)}
        assert {np.dtype(record[k].dtype) for k in _floating(state) if k not in _matrices(state)} == {
            np.dtype(np.float32)
        }
        assert np.dtype(record["backbone.blocks.0.1.num_batches_tracked"].dtype) == np.int64
    for key, value in state.items():
        x = value.numpy()
        assert out[key].dtype == x.dtype, key  # the global record stays fp32 (int64 counters)
        stacked = np.stack([s[key] for s in sites]).astype(np.float64)
        if key not in _floating(state):
            assert out[key] == round(np.average(stacked, axis=0, weights=weights))
            continue
        if key not in _matrices(state):  # values at fp32 both ways: the plain weighted average
            oracle = np.average(stacked, axis=0, weights=weights).astype(np.float32)
            np.testing.assert_allclose(out[key], oracle, rtol=2.0**-23, atol=1e-15, err_msg=key)
            continue
        sent = x.astype(np.float16).astype(np.float32)
        updates = [(s[key] - sent).astype(np.float16).astype(np.float32) for s in sites]
        rebuilt = np.stack([x + u for u in updates]).astype(np.float64)
        oracle = np.average(rebuilt, axis=0, weights=weights).astype(np.float32)
        np.testing.assert_allclose(out[key], oracle, rtol=2.0**-23, atol=1e-15, err_msg=key)
        exact = np.average(stacked, axis=0, weights=weights)
        size = np.average(np.abs(stacked - sent), axis=0, weights=weights)
        bound = np.abs(x - sent) + REL * size + ABS + 2.0**-23 * np.abs(exact)
        assert np.all(np.abs(out[key] - exact) <= bound), key


def test_a_small_update_to_a_weight_near_one_survives_fp16() -> None:
    """A weight of 1 moved by 3e-4 in a round: as an fp16 value it rounds back to 1 (steps of 2**-10); as an
    fp16 update it arrives to 2**-11 of itself. A BatchNorm scale (a vector) never loses it: it travels at fp32."""
    global_fp32 = {"conv.weight": np.array([[1.0], [1.5], [-2.0]], np.float32)}
    dtypes = {"conv.weight": np.float32}
    received = from_wire(to_wire(global_fp32, "fp16"), dtypes)
    trained = {"conv.weight": received["conv.weight"] + np.float32(3e-4)}
    assert np.all(from_wire(to_wire(trained, "fp16"), dtypes)["conv.weight"] == received["conv.weight"])
    wire = update_to_wire(trained, received, "fp16")
    assert wire["conv.weight"].dtype == np.float16
    back = update_from_wire(wire, global_fp32, dtypes)["conv.weight"]
    np.testing.assert_allclose(back - global_fp32["conv.weight"], 3e-4, rtol=2.0**-10)
    scale = {"bn.weight": np.array([1.0, 1.5, -2.0], np.float32) + np.float32(3e-4)}
    assert to_wire(scale, "fp16")["bn.weight"].dtype == np.float32
    sent = update_to_wire(scale, {"bn.weight": np.ones(3, np.float32)}, "fp16")["bn.weight"]
    assert sent.dtype == np.float32 and np.array_equal(sent, scale["bn.weight"])  # the value, exactly
    # fp32 transport, an overflowing update and an integer counter travel as values
    assert update_to_wire(trained, received, "fp32")["conv.weight"].dtype == np.float32
    huge = {"v": np.array([[1e6]], np.float32)}
    assert update_to_wire(huge, {"v": np.array([[0.0]], np.float32)}, "fp16")["v"].dtype == np.float32
    counter = {"n": np.array(5, np.int64)}
    assert update_to_wire(counter, {"n": np.array(4, np.int64)}, "fp16")["n"] == 5


def test_fp32_transport_averages_the_sites_weights_exactly() -> None:
    state = _model_state()
    sites = _sites(state)
    _, _, out = _one_round(SiteFedAvg(**_site_kwargs("fp32")), state, sites)
    for key in _floating(state):
        stacked = np.stack([s[key] for s in sites]).astype(np.float64)
        oracle = np.average(stacked, axis=0, weights=[10.0, 30.0, 60.0]).astype(np.float32)
        np.testing.assert_allclose(out[key], oracle, rtol=2.0**-23, atol=1e-15, err_msg=key)


@pytest.mark.parametrize(
    "fed",
    [
        FederationConfig(strategy="fedavgm", server_lr=0.5, server_momentum=0.9),
        FederationConfig(strategy="fedadam", server_lr=0.01),
    ],
    ids=["fedavgm", "fedadam"],
)
def test_server_optimizer_state_stays_fp32_under_fp16_transport(fed: FederationConfig) -> None:
    """Flower's FedAvgM (last global record, momentum) and FedAdam (last global, m_t, v_t) keep their state from
    the fp32 record and the fp32 average: never at the wire's precision."""
    state = _model_state()
    strategy = build_strategy(fed, **_site_kwargs("fp16"))
    assert strategy.transport == "fp16"  # build_strategy passes federation.transport on
    _, _, out = _one_round(strategy, state, _sites(state))
    keys = list(state)
    parts: dict[str, dict[str, object]] = {"current_arrays": dict(strategy.current_arrays.items())}  # type: ignore[attr-defined]
    if fed.strategy == "fedavgm":
        parts["momentum_vector"] = dict(zip(keys, strategy.momentum_vector, strict=True))  # type: ignore[attr-defined]
    else:
        parts |= {"m_t": strategy.m_t, "v_t": strategy.v_t}  # type: ignore[attr-defined]
    for name, part in parts.items():
        for key in _floating(state):
            value = part[key]
            dtype = np.dtype(value.dtype) if isinstance(value, Array) else np.asarray(value).dtype
            assert dtype == np.float32, (name, key)
    assert all(out[k].dtype == np.float32 for k in _floating(state))


# ------------------------------------------------------------------------------------------------ bytes


def test_fp16_halves_the_bytes_of_every_weight_matrix() -> None:
    state = _model_state()
    floating = {k: state[k] for k in _matrices(state)}
    integer = {k: v for k, v in state.items() if not v.is_floating_point()}
    assert wire_nbytes(to_wire(floating, "fp16")) * 2 == wire_nbytes(to_wire(floating, "fp32"))
    assert wire_nbytes(to_wire(integer, "fp16")) == wire_nbytes(to_wire(integer, "fp32")) == 8 * len(integer)
    fp32, fp16 = round_nbytes(state, "fp32"), round_nbytes(state, "fp16")
    assert fp32["from_site"] == sum(v.numel() * v.element_size() for v in state.values())
    assert fp16["from_site"] == fp32["from_site"] - wire_nbytes(to_wire(floating, "fp16"))
    assert fp16["to_site"] == fp16["from_site"] and fp16["total"] == 2 * fp16["from_site"]  # one exchange a round
    # FedBN: the BatchNorm tensors stay at the sites
    bn = batchnorm_keys(build_strnet(backbone="tiny"))
    shared = {k: v for k, v in state.items() if k not in bn}
    assert round_nbytes(state, "fp16", local_keys=bn)["from_site"] == wire_nbytes(to_wire(shared, "fp16"))


def test_the_message_the_server_sends_is_half_size() -> None:
    """Measured on the ArrayRecord that goes out (Flower's own count adds a small header per array)."""
    state = _model_state()
    arrays = ArrayRecord({k: Array(v.numpy()) for k, v in state.items()})
    sizes = {}
    for transport in ("fp16", "fp32"):
        strategy = SiteFedAvg(**_site_kwargs(transport))
        sent = next(iter(strategy.configure_train(1, arrays, ConfigRecord(), None)))  # type: ignore[arg-type]
        record = sent.content[Key.ARRAYS]
        sizes[transport] = wire_nbytes({k: v.numpy() for k, v in record.items()})
        assert sent.metadata.message_type == MessageKind.TRAIN
        assert record.count_bytes() >= sizes[transport]
    assert sizes["fp16"] == round_nbytes(state, "fp16")["from_site"]
    assert sizes["fp32"] == round_nbytes(state, "fp32")["from_site"]
    assert sizes["fp16"] < 0.51 * sizes["fp32"]
    assert {np.dtype(v.dtype) for v in arrays.values() if v.dtype != "int64"} == {np.dtype(np.float32)}  # kept fp32


# ------------------------------------------------------------------------------------------------ config


def test_the_transport_key_validates() -> None:
    assert load_config("demo").federation.transport == "fp16"
    assert load_config("demo", ["federation.transport=fp32"]).federation.transport == "fp32"
    with pytest.raises(ConfigError, match=r"federation\.transport.*'bf16'.*fp16"):
        load_config("demo", ["federation.transport=bf16"])
    allowed = typing.get_args(typing.get_type_hints(FederationConfig)["transport"])
    assert set(allowed) == set(WIRE_DTYPES)  # the schema and the wire format name the same precisions
    with pytest.raises(ValueError, match=r"federation\.transport"):
        to_wire({"w": np.ones(2, np.float32)}, "int8")


def test_model_shipping_sends_a_model_once_and_then_what_differs_from_it() -> None:
    from server.replies import ModelShipping

    rng = np.random.default_rng(0)
    kept = {"backbone": rng.normal(size=(64, 64)).astype(np.float32), "branch": np.ones(4, np.float32)}
    model = ArrayRecord({k: Array(v) for k, v in kept.items()})
    refitted = ArrayRecord({"backbone": model["backbone"], "branch": Array(np.zeros(4, np.float32))})
    other = ArrayRecord({k: Array(np.zeros_like(v)) for k, v in kept.items()})
    shipping = ModelShipping()
    sent, fields = shipping.pack(7, model)
    assert sent is model and fields[Field.KEEP_MODEL] and Field.BASE_DIGEST not in fields
    shipping.delivered(7, model)
    assert shipping.pack(7, model) == (None, {Field.MODEL_DIGEST: fields[Field.MODEL_DIGEST]})
    assert shipping.pack(8, model)[0] is model  # another node keeps nothing yet
    sent, fields = shipping.pack(7, refitted)
    assert sent is not None and list(sent.keys()) == ["branch"]
    assert fields[Field.BASE_DIGEST] == shipping.digest(model) and fields[Field.KEEP_MODEL]
    assert fields[Field.MODEL_DIGEST] == shipping.digest(refitted) != shipping.digest(model)
    assert shipping.pack(7, other)[0] is other  # differs everywhere: whole


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
def test_vectors_at_full_precision_cost_under_half_a_percent_of_the_bytes(backbone: str) -> None:
    """BatchNorm scales, shifts, running statistics and biases travel at fp32: the real backbones' fp16 messages
    stay within 0.5 % of half the fp32 bytes."""
    state = build_strnet(backbone=backbone).state_dict()
    fp16, fp32 = round_nbytes(state, "fp16")["from_site"], round_nbytes(state, "fp32")["from_site"]
    assert 0.5 < fp16 / fp32 < 0.505
