"""``ferry gateway``, ``ferry exporter``, ``ferry metrics``, ``ferry report`` and ``ferry triton up|down|status``:
the commands that run ferry's services and the local Triton. Added to the ``ferry`` command by :func:`register`."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import typer
from rich.markup import escape

from ferry.adapters.cli_support import (
    EXIT_FAILED,
    JsonOption,
    ModelArgument,
    current_settings,
    err,
    fail,
    guarded,
    known_model,
    needs_extra,
    out,
    print_json,
)
from ferry.core.errors import InvalidInput

# The services (and the Triton and MLflow clients behind them) are imported by the command that runs them.


def _port_option(help_text: str) -> int | None:
    return typer.Option(None, help=help_text, min=1, max=65535)


def gateway_command(
    host: str | None = typer.Option(None, help="Address to listen on (default FERRY_GATEWAY_HOST, 127.0.0.1)."),
    port: int | None = _port_option("Port (default FERRY_GATEWAY_PORT, 8080)."),
    grpc_port: int | None = _port_option("KServe v2 gRPC port (default FERRY_GATEWAY_GRPC_PORT; none: HTTP only)."),
) -> None:
    """Serve inference at the version current.json commits (KServe v2 over HTTP and gRPC, and /predict)."""
    try:
        from ferry.adapters.gateway.app import serve
    except ImportError as error:
        needs_extra("gateway", "gateway", error)
    given = current_settings()
    settings = guarded(lambda: given.with_overrides(gateway_host=host or given.gateway.host,
                                                    gateway_port=port or given.gateway.port,
                                                    gateway_grpc_port=grpc_port or given.gateway.grpc_port))
    host, port, grpc_port = settings.gateway.host, settings.gateway.port, settings.gateway.grpc_port
    if grpc_port == port:
        fail(InvalidInput(f"the gRPC port {grpc_port} is the HTTP port", "give --grpc-port another port"))
    grpc = f" and gRPC {host}:{grpc_port}" if grpc_port else ""
    out.print(f"ferry gateway on http://{host}:{port}{grpc} -> Triton {settings.triton.endpoint.url}"
              f"{' (bearer token required)' if settings.gateway.token else ''}")
    guarded(lambda: serve(settings))


def exporter_command(
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(9464, help="Port of the /metrics endpoint.", min=1, max=65535),
) -> None:
    """Serve ferry's metrics (deploys, rollbacks, step times, active version, drift) for Prometheus to scrape."""
    from prometheus_client import CollectorRegistry, start_http_server

    from ferry.core.services import Services
    from ferry.observability.metrics import FerryCollector

    ferry = Services(current_settings())
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FerryCollector(ferry.settings, ferry.fleet))
    try:
        start_http_server(port, addr=host, registry=registry)
    except OSError as error:
        fail(InvalidInput(f"cannot listen on {host}:{port}: {error.strerror}", "choose another --port"))
    out.print(f"ferry metrics on http://{host}:{port}/metrics")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass


def metrics_command(
    textfile: Path | None = typer.Option(None, help="Write them to this file (node_exporter's textfile "
                                            "collector), atomically; default: print them."),
) -> None:
    """ferry's metrics once, in Prometheus' text format."""
    from prometheus_client import CollectorRegistry, generate_latest

    from ferry.core.services import Services
    from ferry.observability.metrics import FerryCollector, write_textfile

    ferry = Services(current_settings())
    collector = FerryCollector(ferry.settings, ferry.fleet)
    if textfile:
        guarded(lambda: write_textfile(textfile, collector))
        return
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    sys.stdout.write(generate_latest(registry).decode())


def report_command(
    model: str = ModelArgument,
    output: Path = typer.Option(Path("ferry-report.png"), "--out", "-o", help="The PNG to write."),
    deploys: int = typer.Option(5, min=1, help="How many of the latest deploys (committed or rolled back) to cover."),
) -> None:
    """A PNG of p95 latency and request rate per version around the recent deploys, each one marked."""
    try:
        import matplotlib  # noqa: F401

        from ferry.observability.report import write_report
    except ImportError as error:
        needs_extra("report", "report", error)
    settings = current_settings()
    model_dir = known_model(settings, model)
    if not settings.prometheus_url:
        fail(InvalidInput("ferry report reads the series from Prometheus, and FERRY_PROMETHEUS_URL is not set",
                           "set it to a Prometheus that scrapes Triton with the rules of ops/prometheus"))
    summary = guarded(lambda: write_report(settings.prometheus_url, model_dir, output, deploys))
    if summary.path is None:
        since = time.strftime("%Y-%m-%d %H:%M", time.gmtime(summary.start))
        err.print(f"[red]no data:[/red] Prometheus at {escape(settings.prometheus_url)} has no latency or traffic "
                  f"of '{model}' since {since} UTC ({summary.deploys} deploys in the history); {output} not written")
        err.print("  hint: check that it scrapes Triton's metrics and loads the rules of ops/prometheus")
        raise typer.Exit(EXIT_FAILED)
    out.print(f"wrote {summary.path}: {summary.deploys} deploys marked, {summary.points} points")


def triton_up(as_json: bool = JsonOption) -> None:
    """Start tritonserver (explicit model control, loopback) and wait until it is ready."""
    from ferry.runtime import server

    settings = current_settings()
    was_running = server.status(settings).ready
    state = guarded(lambda: server.up(settings))
    if as_json:
        print_json({**state.as_dict(), "already_running": was_running})
    elif was_running:
        out.print(f"Triton already running at {state.url} (pid {state.pid})")
    else:
        out.print(f"Triton ready at {state.url} (pid {state.pid}, metrics {state.metrics_url}, log {state.log})")


def triton_down(as_json: bool = JsonOption) -> None:
    """Stop the tritonserver that `ferry triton up` started."""
    from ferry.runtime import server

    stopped = server.down(current_settings())
    if as_json:
        print_json({"stopped": stopped})
    else:
        out.print("Triton stopped" if stopped else "Triton was not running")


def triton_status(as_json: bool = JsonOption) -> None:
    """Whether the local tritonserver runs and is ready."""
    from ferry.runtime import server

    state = server.status(current_settings())
    if as_json:
        print_json(state.as_dict())
    else:
        out.print(f"running: {state.running}  ready: {state.ready}  pid: {state.pid}  url: {state.url}  "
                  f"log: {state.log}")
    if not state.ready:
        raise typer.Exit(EXIT_FAILED)


def register(app: typer.Typer) -> None:
    """Add the commands that run ferry's services and the local Triton to the ``ferry`` command."""
    app.command("gateway")(gateway_command)
    app.command("exporter")(exporter_command)
    app.command("metrics")(metrics_command)
    app.command("report")(report_command)
    triton_app = typer.Typer(help="The local Triton server (from the nvidia-pytriton wheel).", no_args_is_help=True,
                             rich_markup_mode=None)
    triton_app.command("up")(triton_up)
    triton_app.command("down")(triton_down)
    triton_app.command("status")(triton_status)
    app.add_typer(triton_app, name="triton")
