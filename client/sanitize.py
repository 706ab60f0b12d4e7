"""What a site's failure tells the coordinator: its kind and a generic reason, never a path or an id.

An exception inside the ClientApp travels to the server as the error reply's reason, which Flower builds
from the exception's text. Ours name files (``DataError(path, ...)``), and Mendeley-style file stems are
patient ids, so the text stays in the site's own log and the reply carries only the exception's kind and a
fixed sentence. Protocol mismatches are the exception: their text is version numbers only, and the
coordinator needs it to tell a site to upgrade.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from flwr.app import Context, Message

from strnet.errors import ConfigError, DataError, SiteError
from strnet.protocol import ProtocolError

log = logging.getLogger("strnet.site")

GENERIC_REASONS: dict[type[BaseException], str] = {
    DataError: "a data problem at this site (its manifest or an image)",
    ConfigError: "a configuration problem at this site",
    SiteError: "this site could not use the server's message",
    MemoryError: "this site ran out of memory",
}
SAFE_TO_SEND = (ProtocolError,)


class SiteFailure(RuntimeError):
    """The only exception that leaves a site: kind and generic reason."""


def public_reason(exc: BaseException) -> str:
    if isinstance(exc, SAFE_TO_SEND):
        return f"{type(exc).__name__}: {exc}"
    reason = next((text for kind, text in GENERIC_REASONS.items() if isinstance(exc, kind)), "an unexpected error")
    return f"{type(exc).__name__}: {reason}; the details are in the site's log"


def sanitize_errors_mod(
    message: Message, context: Context, call_next: Callable[[Message, Context], Message]
) -> Message:
    """Flower mod: log a failure in full here, and let only :func:`public_reason` of it leave the site."""
    try:
        return call_next(message, context)
    except Exception as exc:
        log.exception("%s message failed at this site", message.metadata.message_type)
        raise SiteFailure(public_reason(exc)) from None
