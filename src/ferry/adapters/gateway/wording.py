"""Triton's own words and codes for the refusals its clients check, each followed by ferry's hint.

NVIDIA's clients and examples test that an unknown model's message starts with ``Request for unknown model`` and
that a malformed version string is refused with ``failed to get model version from specified version string``
(gRPC ``INVALID_ARGUMENT``). Measured with Triton 2.51, HTTP and gRPC alike:

- an unknown model: 404 / NOT_FOUND ``Request for unknown model: 'm' is not found``; a version it does not serve:
  ``Request for unknown model: 'm' version 2 is not found``; readiness of either: HTTP 400, gRPC ``ready: false``;
  statistics: 400 / INVALID_ARGUMENT ``requested model 'm' is not available`` and ``requested model version is
  not available for model 'm'``;
- a version string: read as C's ``stol`` reads it over gRPC (leading blanks and sign, then digits; what follows
  is ignored: ``1x`` is version 1); no number, or one beyond 64 bits: 400 / INVALID_ARGUMENT ``failed to get model
  version from specified version string 'x' (details: stol), version should be an integral value > 0``; below
  zero: ``invalid model version specified '-1' , version should be an integral value > 0``. Triton's HTTP paths
  take digits only (its answer to ``/versions/x`` is a bare 404 ``Not Found``); the gateway answers a version
  segment that is not digits with the version-string refusal, which names what was wrong.
"""

from __future__ import annotations

import re

from ferry.adapters.inference.routing import Route
from ferry.core.errors import BadRequest, FerryError, NotServed

INT64_MAX = 2**63 - 1
_STOL = re.compile(r"[ \t\n\v\f\r]*([+-]?[0-9]+)")
_SHOWN = 100  # characters of a client's string echoed back


class UnknownModelError(NotServed):
    """Nothing is committed for the model (Triton: an unknown model)."""

    def __init__(self, model: str, why: FerryError) -> None:
        self.model = model
        hint = f"{why.message}: {why.hint}" if why.hint else why.message
        super().__init__(f"Request for unknown model: '{model[:_SHOWN]}' is not found", hint)

    def for_stats(self) -> BadRequest:
        return BadRequest(f"requested model '{self.model[:_SHOWN]}' is not available", self.hint)


class UnknownVersionError(NotServed):
    """The client named a version that is not the committed one (Triton: a version it does not serve)."""

    def __init__(self, model: str, version: int, route: Route) -> None:
        self.model = model
        super().__init__(f"Request for unknown model: '{model}' version {version} is not found",
                         f"the gateway serves the committed version, v{route.version}: name version {route.version}, "
                         "or none", route)  # the answer names the committed version

    def for_stats(self) -> BadRequest:
        return BadRequest(f"requested model version is not available for model '{self.model}'", self.hint,
                          self.route)


def version_number(text: str, path: bool) -> int | None:
    """The version a client named (None: none), or the 400 Triton answers. ``path``: an HTTP path segment, which
    must be digits; else (gRPC) read as ``stol`` does."""
    if not text:
        return None
    match = None if path and not (text.isascii() and text.isdigit()) else _STOL.match(text)
    if match is None or not -INT64_MAX - 1 <= int(match.group(1)) <= INT64_MAX:
        raise BadRequest(f"failed to get model version from specified version string '{text[:_SHOWN]}' "
                         "(details: stol), version should be an integral value > 0",
                         "name the committed version as a number, or no version")
    number = int(match.group(1))
    if number < 0:
        raise BadRequest(f"invalid model version specified '{text[:_SHOWN]}' , version should be an integral "
                         "value > 0", "name the committed version as a number, or no version")
    return number
