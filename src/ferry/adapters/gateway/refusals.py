"""How the gateway's protocols answer a refusal: the HTTP status of each kind of error (gRPC maps from it)."""

from __future__ import annotations

from ferry.adapters.inference.routing import Route, UnknownModel
from ferry.core.errors import (
    BackendDown,
    BadRequest,
    BodyTimeout,
    FerryError,
    GatewayError,
    NotServed,
    TooLarge,
    Unauthorized,
    UnsupportedEncoding,
)

HTTP_STATUS: dict[type[FerryError], int] = {
    BadRequest: 400, Unauthorized: 401, NotServed: 404, UnknownModel: 404, BodyTimeout: 408, TooLarge: 413,
    UnsupportedEncoding: 415, BackendDown: 503,
}


def status_of(error: FerryError) -> int:
    """The HTTP status a gateway request that failed with ``error`` answers."""
    for kind in type(error).__mro__:
        if kind in HTTP_STATUS:
            return HTTP_STATUS[kind]
    return 503  # the repository's files could not be read


def route_of(error: FerryError) -> Route | None:
    """The committed route a refusal was checked against, if it got that far."""
    route = error.route if isinstance(error, GatewayError) else None
    return route if isinstance(route, Route) else None
