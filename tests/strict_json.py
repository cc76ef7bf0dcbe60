"""Parse a command's ``--json`` output as RFC 8259 JSON: NaN and Infinity are not JSON, and scripts' parsers
(jq, JavaScript, Go) refuse them, while Python's json module accepts them by default."""

from __future__ import annotations

import json
from typing import Any


def _refuse(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON (RFC 8259): a --json output must say null")


def loads(text: str) -> Any:
    """``json.loads`` that refuses NaN, Infinity and -Infinity."""
    return json.loads(text, parse_constant=_refuse)
