"""An audit log of everything a site sends: one JSON line per reply, its structure and its plain values.

A hospital can turn it on for its node (``STRNET_MESSAGE_AUDIT=/var/log/strnet/sent.jsonl``) and read what
left: every record of every reply, with array names, shapes and dtypes (never array contents), metric names
and values, and every string. :func:`violations` checks such a log against the rules the README states —
model arrays shaped like the model, statistics whose shapes never depend on how many images a site has
(checked by comparing two logs), scalar metrics, and no string that holds a path, a file name or an id.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context, Message

from strnet.protocol import Key, MessageKind, split_part
from strnet.released import WITHHELD, UnregisteredStatistic, group

AUDIT_ENV = "STRNET_MESSAGE_AUDIT"
# strings a reply may legitimately hold: site names, roles, and nothing shaped like a file
_FILE_LIKE = re.compile(r"[/\\]|\.(jpe?g|png|dcm|dicom|csv|xlsx|tiff?)\b", re.IGNORECASE)


def describe(message: Message) -> list[dict[str, Any]]:
    """The structure and plain values of a reply (array contents are never written): one entry, or one per part
    of a batch reply, logged as a reply of the part's own kind (with the batch reply's info record)."""
    content = message.content
    kind = message.metadata.message_type
    entries: dict[str, dict[str, Any]] = {}

    def entry(name: str) -> tuple[dict[str, Any], str]:
        part = split_part(name) if kind == MessageKind.BATCH else None
        own, record = part if part is not None else (kind, name)
        return entries.setdefault(own, {"message_type": own, "arrays": {}, "metrics": {}, "strings": {}}), record

    for name, array_record in content.array_records.items():
        out, record = entry(name)
        out["arrays"][record] = {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in array_record.items()}
    for name, metric_record in content.metric_records.items():
        out, record = entry(name)
        out["metrics"][record] = {k: v for k, v in metric_record.items()}
    for name, config_record in content.config_records.items():
        strings = {k: v if isinstance(v, str | int | float | bool) else repr(v) for k, v in config_record.items()}
        if kind == MessageKind.BATCH and split_part(name) is None:  # the batch reply's own info: on every part
            for out in entries.values():
                out["strings"][name] = strings
            continue
        out, record = entry(name)
        out["strings"][record] = strings
    return list(entries.values()) or [{"message_type": kind, "arrays": {}, "metrics": {}, "strings": {}}]


def audit_mod(message: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """Flower mod: append every reply's :func:`describe` to the file named by ``STRNET_MESSAGE_AUDIT``."""
    reply = call_next(message, context)
    target = os.environ.get(AUDIT_ENV)
    if target and not reply.has_error():
        path = Path(target)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.writelines(json.dumps(entry, default=str) + "\n" for entry in describe(reply))
    return reply


def read_log(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def shapes(entries: Iterable[dict[str, Any]]) -> dict[tuple[str, str, str], tuple[int, ...]]:
    """(message type, record, array) -> shape, for comparing two runs of different sizes."""
    return {
        (e["message_type"], record, key): tuple(spec["shape"])
        for e in entries
        for record, arrays in e["arrays"].items()
        for key, spec in arrays.items()
    }


def violations(
    entries: Iterable[dict[str, Any]], *, model_shapes: Mapping[str, tuple[int, ...]], forbidden: Iterable[str]
) -> list[str]:
    """Every way a logged reply breaks the rules: unknown or mis-shaped model arrays, non-scalar metrics, and
    strings that look like a file or contain one of ``forbidden`` (paths, file stems, patient ids)."""
    tokens = {t for t in forbidden if len(t) >= 3}
    problems = []
    for i, e in enumerate(entries):
        where = f"reply {i} ({e['message_type']})"
        for key, spec in e["arrays"].get(Key.ARRAYS, {}).items():
            if key not in model_shapes:
                problems.append(f"{where}: array {key!r} is not a model tensor")
            elif tuple(spec["shape"]) != tuple(model_shapes[key]):
                problems.append(f"{where}: array {key!r} has shape {spec['shape']}, the model's is {model_shapes[key]}")
        for record, metrics in e["metrics"].items():
            for key, value in metrics.items():
                if not isinstance(value, int | float) or isinstance(value, bool):
                    problems.append(f"{where}: metric {record}.{key} is not a scalar ({type(value).__name__})")
        for record, strings in e["strings"].items():
            for key, value in strings.items():
                text = str(value)
                if _FILE_LIKE.search(text) or any(t in text for t in tokens):
                    problems.append(f"{where}: {record}.{key} holds {text[:80]!r}")
    return problems


def unregistered(entries: Iterable[dict[str, Any]]) -> list[str]:
    """Every array or metric a logged reply carried that :data:`strnet.released.REGISTRY` does not list."""
    found = []
    for e in entries:
        records = {**e["arrays"], **e["metrics"]}
        for record, values in records.items():
            if record == WITHHELD:
                continue
            try:
                group(e["message_type"], dict.fromkeys(values), record)
            except UnregisteredStatistic as exc:
                found.append(f"{record}: {exc}")
    return found
