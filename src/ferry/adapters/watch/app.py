"""The HTTP face of the watcher: ``POST /mlflow/webhook``, ``/healthz``, ``/triggers``, ``/metrics``."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from ferry.adapters.watch.delivery import HTTP_STATUS, WEBHOOK_PATH
from ferry.adapters.watch.logs import log, shown
from ferry.adapters.watch.service import Watch
from ferry.core.config import Settings
from ferry.core.errors import DeliveryRefused

MAX_BODY_BYTES = 64 * 1024  # MLflow's registry events are a few hundred bytes
BODY_TIMEOUT_S = 10.0


async def _read_body(request: Request) -> bytes:
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise DeliveryRefused("too_large", f"the body is {int(length)} bytes; at most {MAX_BODY_BYTES} are accepted")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(BODY_TIMEOUT_S):
            async for chunk in request.stream():
                size += len(chunk)
                if size > MAX_BODY_BYTES:
                    raise DeliveryRefused("too_large", f"the body is over {MAX_BODY_BYTES} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise DeliveryRefused("slow_body", f"the body did not arrive within {BODY_TIMEOUT_S:.0f} s") from None
    return b"".join(chunks)


def build_app(watch: Watch) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        watch.start()
        yield
        await asyncio.to_thread(watch.stop)

    app = FastAPI(title="ferry watch", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

    @app.post(WEBHOOK_PATH)
    async def webhook(request: Request) -> Response:
        try:
            body = await _read_body(request)
        except DeliveryRefused as refusal:
            watch.metrics.deliveries.labels(refusal.result).inc()
            return JSONResponse({"error": refusal.message}, status_code=HTTP_STATUS[refusal.result])
        status, answer = watch.handle(request.headers, body)
        return JSONResponse(answer, status_code=status)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok", "via": watch.via, "aliases": list(watch.aliases),
                "webhook_secret": bool(watch.secret.get()), "poll_s": watch.poller.interval_s if watch.poller else 0}

    @app.get("/triggers")
    async def triggers() -> list[dict[str, Any]]:
        return watch.triggers()

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(watch.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    _error_handlers(app)
    return app


def _error_handlers(app: FastAPI) -> None:
    """Every answer that is not a success is ``{"error": "..."}``, and hostile input never gets a 5xx."""

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        path = shown(request.url.path, 200)
        message = {404: f"ferry watch serves no '{path}'",
                   405: f"'{path}' does not take {shown(request.method, 20)}"}.get(error.status_code,
                                                                                 str(error.detail))
        return JSONResponse({"error": message}, status_code=error.status_code, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": f"the request is not valid: {str(error.errors())[:300]}"}, status_code=400)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:  # the app must answer anything
        log.exception("unexpected error on %s", shown(request.url.path, 200))
        return JSONResponse({"error": f"the request could not be handled: {type(error).__name__}"}, status_code=400)


def serve(settings: Settings, host: str, port: int, aliases: tuple[str, ...], poll_s: float) -> None:
    """Run ``ferry watch`` until interrupted."""
    import uvicorn

    from ferry.adapters.watch.connections import server_options

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    log.setLevel(logging.INFO)
    watch = Watch(settings, aliases=aliases, poll_s=poll_s)
    uvicorn.run(build_app(watch), host=host, port=port, **server_options())
