"""Reading a site's reply: error replies, protocol version and malformed records become a SiteError naming it."""

from __future__ import annotations

import numpy as np
from flwr.app import Message, RecordDict

from strnet.errors import SiteError
from strnet.protocol import Field, Key, check_version


def reply_content(msg: Message, site: str) -> RecordDict:
    """The reply's records once it is known to be no error and to speak this protocol version."""
    if msg.has_error():
        raise SiteError(site, f"error reply (code {msg.error.code}): {msg.error.reason}")
    content = msg.content
    if Key.INFO not in content.config_records:
        raise SiteError(site, f"malformed reply: no {Key.INFO!r} record (an older or foreign ClientApp?)")
    check_version(content.config_records[Key.INFO].get(Field.VERSION), site)
    return content


def stats_arrays(content: RecordDict, site: str) -> dict[str, np.ndarray]:
    if Key.STATS not in content.array_records:
        raise SiteError(site, f"malformed reply: no {Key.STATS!r} arrays")
    return {k: v.numpy() for k, v in content.array_records[Key.STATS].items()}
