"""The watcher's one logger, which writes every message with its control characters escaped.

Names, aliases, event types and error texts come from requests: a newline in one must not write a line of
its own into the log, and NUL or terminal escapes must not reach it raw.
"""

from __future__ import annotations

import logging

log = logging.getLogger("ferry.watch")


def _escape(char: str) -> str:
    return char.encode("unicode_escape").decode("ascii")


def shown(value: object, limit: int = 128) -> str:
    """``value`` as one printable line, backslashes and non-printable characters escaped, at most ``limit``."""
    text = value if isinstance(value, str) else repr(value)
    escaped = "".join(c if c.isprintable() and c != "\\" else _escape(c) for c in text[:limit])
    return escaped + ("..." if len(text) > limit else "")


class EscapedMessages(logging.Filter):
    """Escapes whatever a message still holds that is not printable (a value logged without ``shown``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            return True  # logging reports the bad format itself
        if not message.isprintable():
            record.msg, record.args = "".join(c if c.isprintable() else _escape(c) for c in message), None
        return True


if not any(isinstance(f, EscapedMessages) for f in log.filters):
    log.addFilter(EscapedMessages())
