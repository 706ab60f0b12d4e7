"""A site's failure reaches the server as its kind and a generic reason; the detail stays in the site's log."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from client.app import app as client_app
from client.sanitize import SiteFailure, public_reason
from configs.schema import load_config
from strnet.errors import DataError
from strnet.protocol import PROTOCOL_VERSION, Field, Key, MessageKind

pytestmark = pytest.mark.usefixtures("flower_task_identity")

SECRET = "/data/pacs/N12/knee.csv"  # Mendeley-style stem N12 is a patient id


def site_info(version: int = PROTOCOL_VERSION) -> tuple[Message, Context]:
    sites = [{"name": "hospital", "role": "train", "manifest": "unused.csv"}]
    cfg = load_config("demo", [f"federation.sites={json.dumps(sites)}", "federation.quorum=1"])
    record = ConfigRecord({Field.VERSION: version, Field.CONFIG_JSON: json.dumps(cfg.to_dict())})
    message = Message(RecordDict({Key.CONFIG: record}), message_type=MessageKind.SITE_INFO, dst_node_id=7)
    context = Context(
        run_id=1, node_id=7, node_config={"site-id": "hospital", "manifest": SECRET}, state=RecordDict(), run_config={}
    )
    return message, context


def test_a_data_error_leaves_the_site_without_its_path(caplog: pytest.LogCaptureFixture) -> None:
    message, context = site_info()
    with caplog.at_level(logging.ERROR, logger="strnet.site"), pytest.raises(SiteFailure) as info:
        client_app(message, context)
    text = str(info.value)
    assert text.startswith("DataError: a data problem at this site") and "site's log" in text
    assert "N12" not in text and "pacs" not in text
    assert SECRET in caplog.text  # the full detail stays at the site


def test_protocol_mismatches_keep_their_text() -> None:
    message, context = site_info(version=PROTOCOL_VERSION - 1)
    with pytest.raises(SiteFailure, match=rf"ProtocolError: .*protocol version {PROTOCOL_VERSION - 1}"):
        client_app(message, context)


def test_public_reasons_are_generic_per_kind() -> None:
    assert public_reason(DataError(Path("/x/OS7.jpg"), "truncated")) == (
        "DataError: a data problem at this site (its manifest or an image); the details are in the site's log"
    )
    assert "OS7" not in public_reason(KeyError("/x/OS7.jpg"))
    assert public_reason(KeyError("/x/OS7.jpg")).startswith("KeyError: an unexpected error")
