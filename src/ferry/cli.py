"""The ``ferry`` command line: a thin adapter over the core."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from ferry.config import Settings, load_settings
from ferry.deploy import DeployReport, Ferry, deploy
from ferry.errors import FerryError
from ferry.live import live_figures
from ferry.recover import reconcile, recover
from ferry.repository import ModelDir
from ferry.runtime import server
from ferry.state import read_current, read_history
from ferry.status import list_models, model_status

app = typer.Typer(help="Move model versions from the MLflow Model Registry into Triton, safely.", no_args_is_help=True)
triton_app = typer.Typer(help="The local Triton server (from the nvidia-pytriton wheel).", no_args_is_help=True)
app.add_typer(triton_app, name="triton")
# Piped output (CI logs, scripts) is not squeezed into 80 columns.
_WIDTH = None if sys.stdout.isatty() else 200
out = Console(soft_wrap=True, width=_WIDTH)
err = Console(stderr=True, soft_wrap=True, width=_WIDTH)

EXIT_FAILED = 1  # the deploy ran and was rolled back
EXIT_REJECTED = 2  # bad input or an unreachable dependency: nothing was changed

JsonOption = typer.Option(False, "--json", help="Print one JSON document instead of text.")


def _settings() -> Settings:
    try:
        return load_settings()
    except FerryError as error:
        _fail(error)


def _fail(error: FerryError, code: int = EXIT_REJECTED) -> None:
    err.print(f"[red]error:[/red] {error.message}", highlight=False)
    if error.hint:
        err.print(f"  hint: {error.hint}", highlight=False)
    raise typer.Exit(code)


def _print_json(data: object) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _show_step(step: str, status: str, seconds: float, detail: str) -> None:
    if status == "start":
        return
    mark = "[green]✓[/green]" if status == "ok" else "[red]✗[/red]"
    out.print(f"  {mark} {step:<12} {seconds:7.3f} s  {detail}", highlight=False)


def _print_success(report: DeployReport) -> None:
    if report.outcome == "noop":
        out.print(f"{report.model}: v{report.version} is already active, nothing to do")
        return
    was = f"v{report.previous_version}" if report.previous_version else "nothing"
    out.print(f"[green]committed[/green] {report.model} v{report.version} (was {was}) in {sum(report.steps.values()):.2f} s")
    for warning in report.warnings:
        err.print(f"[yellow]warning:[/yellow] {warning}", highlight=False)


def _explain_rollback(report: DeployReport) -> None:
    rollback = report.rollback
    if not (rollback and rollback.verified):
        state = "ROLLBACK NOT VERIFIED: check `ferry status`"
    elif report.previous_version is None:
        state = "nothing was active before, so nothing serves now"
    else:
        state = f"v{report.previous_version} still active and serving"
    quarantined = ", ".join(rollback.quarantined) if rollback and rollback.quarantined else "nothing"
    err.print(f"[red]failed at {report.failed_step}:[/red] {report.error} ({state}; quarantined: {quarantined})",
              highlight=False)
    for problem in rollback.problems if rollback else []:
        err.print(f"  rollback problem: {problem}", highlight=False)


def _finish(report: DeployReport, as_json: bool) -> None:
    """Print the outcome (JSON on stdout for scripts; the reason of a failure always on stderr) and exit."""
    if as_json:
        _print_json(report.model_dump(mode="json"))
    elif report.ok:
        _print_success(report)
    if report.outcome == "rolled_back":
        _explain_rollback(report)
        raise typer.Exit(EXIT_FAILED)
    if report.outcome == "rejected":
        _fail(FerryError(report.error or "rejected", report.hint or ""))


def _run_deploy(model: str, alias: Optional[str], version: Optional[int], as_json: bool) -> None:
    ferry = Ferry(_settings())
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a stopped deploy rolls back, as on Ctrl-C
    try:
        report = deploy(ferry, model, alias=alias, version=version, on_event=None if as_json else _show_step)
    except FerryError as error:
        _fail(error)
    _finish(report, as_json)


@app.command("deploy")
def deploy_command(
    model: str = typer.Argument(..., help="Registered model name (also the Triton model name)."),
    alias: str = typer.Option(..., "--alias", "-a", help="MLflow alias naming the version to deploy."),
    as_json: bool = JsonOption,
) -> None:
    """Deploy the version an MLflow alias points at: load, ready, smoke, then commit or roll back."""
    _run_deploy(model, alias, None, as_json)


@app.command("rollback")
def rollback_command(
    model: str = typer.Argument(...),
    to: Optional[int] = typer.Option(None, "--to", help="Version to go back to (default: the previous one)."),
    as_json: bool = JsonOption,
) -> None:
    """Go back to an earlier good version, through the same validation chain."""
    settings = _settings()
    if to is None:
        try:
            current = read_current(ModelDir(settings.repository, model))
        except FerryError as error:
            _fail(error)
        if current is None or current.previous_version is None:
            _fail(FerryError(f"'{model}' has no previous version recorded in current.json", "give one with --to VERSION"))
        to = current.previous_version
    _run_deploy(model, None, to, as_json)


@app.command("recover")
def recover_command(model: str = typer.Argument(...), as_json: bool = JsonOption) -> None:
    """Finish or undo a deploy whose process stopped (killed, crashed), from its journal."""
    ferry = Ferry(_settings())
    try:
        report = recover(ferry, model)
    except FerryError as error:
        _fail(error)
    if report is None:
        if as_json:
            _print_json(None)
        else:
            out.print(f"{model}: no unfinished deploy, nothing to recover")
        return
    if as_json:
        _print_json(report.model_dump(mode="json"))
    else:
        out.print(f"{model}: deploy {report.deploy_id or '(before its snapshot)'} ({report.target}) was unfinished")
        if report.outcome == "rolled_back":
            _explain_rollback(report)
        elif report.ok:
            _print_success(report)
        else:
            out.print(f"  {report.error}", highlight=False)
    if report.rollback is not None and not report.rollback.verified:
        raise typer.Exit(EXIT_FAILED)


@app.command("reconcile")
def reconcile_command(
    models: Optional[list[str]] = typer.Argument(None, help="Models to reconcile (default: every committed model)."),
    as_json: bool = JsonOption,
) -> None:
    """Make Triton serve exactly what current.json commits (after a Triton restart, or on a new replica)."""
    settings = _settings()
    ferry = Ferry(settings)
    try:
        names = [ModelDir(settings.repository, m).model for m in models] if models else list_models(settings.repository)
    except FerryError as error:
        _fail(error)
    results = [reconcile(ferry, name) for name in names]
    if as_json:
        _print_json([r.model_dump(mode="json") for r in results])
    else:
        for r in results:
            colour = "green" if r.ok else "red"
            version = f"v{r.active_version}" if r.active_version is not None else "-"
            out.print(f"  [{colour}]{r.action:<9}[/{colour}] {r.model} {version}  {r.detail}", highlight=False)
    if not all(r.ok for r in results):
        raise typer.Exit(EXIT_FAILED)


@app.command("gateway")
def gateway_command(
    host: Optional[str] = typer.Option(None, help="Address to listen on (default FERRY_GATEWAY_HOST, 127.0.0.1)."),
    port: Optional[int] = typer.Option(None, help="Port (default FERRY_GATEWAY_PORT, 8080)."),
) -> None:
    """Serve inference at the version current.json commits (KServe v2 and a simple JSON /predict)."""
    import uvicorn

    from ferry.gateway import Gateway

    settings = _settings()
    host, port = host or settings.gateway_host, port or settings.gateway_port
    out.print(f"ferry gateway on http://{host}:{port} -> Triton {settings.triton_url}"
              f"{' (bearer token required)' if settings.gateway_token else ''}")
    uvicorn.run(Gateway(settings, token=settings.gateway_token), host=host, port=port, log_level="warning",
                access_log=False, loop="uvloop", http="httptools", proxy_headers=False, server_header=False)


@app.command("exporter")
def exporter_command(
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(9464, help="Port of the /metrics endpoint."),
) -> None:
    """Serve ferry's metrics (deploys, rollbacks, step times, active version, drift) for Prometheus to scrape."""
    import time

    from prometheus_client import CollectorRegistry, start_http_server

    from ferry.metrics import FerryCollector

    ferry = Ferry(_settings())
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FerryCollector(ferry.settings, ferry.triton))
    start_http_server(port, addr=host, registry=registry)
    out.print(f"ferry metrics on http://{host}:{port}/metrics")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass


@app.command("metrics")
def metrics_command(
    textfile: Optional[str] = typer.Option(None, help="Write them to this file (node_exporter's textfile "
                                           "collector), atomically; default: print them."),
) -> None:
    """ferry's metrics once, in Prometheus' text format."""
    from prometheus_client import CollectorRegistry, generate_latest

    from ferry.metrics import FerryCollector, write_textfile

    ferry = Ferry(_settings())
    collector = FerryCollector(ferry.settings, ferry.triton)
    if textfile:
        write_textfile(Path(textfile), collector)
        return
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    sys.stdout.write(generate_latest(registry).decode())


@app.command("report")
def report_command(
    model: str = typer.Argument(...),
    output: Path = typer.Option(Path("ferry-report.png"), "--out", "-o", help="The PNG to write."),
    deploys: int = typer.Option(5, help="How many of the latest deploys (committed or rolled back) to cover."),
) -> None:
    """A PNG of p95 latency and request rate per version around the recent deploys, each one marked."""
    from ferry.report import write_report

    settings = _settings()
    if not settings.prometheus_url:
        _fail(FerryError("ferry report reads the series from Prometheus, and FERRY_PROMETHEUS_URL is not set",
                         "set it to a Prometheus that scrapes Triton with the rules of ops/prometheus"))
    try:
        summary = write_report(settings.prometheus_url, ModelDir(settings.repository, model), output, deploys)
    except FerryError as error:
        _fail(error)
    out.print(f"wrote {summary.path}: {summary.deploys} deploys marked, {summary.points} points")


@app.command("status")
def status_command(model: Optional[str] = typer.Argument(None), as_json: bool = JsonOption) -> None:
    """The committed version (current.json), the versions Triton serves, and any drift between them."""
    settings = _settings()
    ferry = Ferry(settings)
    try:
        models = [ModelDir(settings.repository, model).model] if model else list_models(settings.repository)
    except FerryError as error:
        _fail(error)
    reports = [model_status(settings.repository, ferry.triton, name) for name in models]
    for report in reports:
        if report.current is not None:
            report.live = live_figures(settings, report.model, report.current.active_version)
    if as_json:
        _print_json([r.model_dump(mode="json") for r in reports])
    else:
        _print_status_table(reports, settings)
    if any(r.drift or r.current_error or r.triton_error or r.in_flight for r in reports):
        raise typer.Exit(EXIT_FAILED)


def _print_status_table(reports: list, settings: Settings) -> None:
    if not reports:
        out.print(f"no models in {settings.repository}")
        return
    table = Table("model", "active", "alias", "run", "updated (UTC)", "Triton serves", "drift", "quarantined",
                  "p95", "failures")
    for r in reports:
        current = r.current
        serving = r.triton_error and "[red]unreachable[/red]" or ", ".join(f"v{v}" for v in r.serving) or "nothing"
        table.add_row(
            r.model,
            f"v{current.active_version}" if current else (r.current_error and "[red]unreadable[/red]" or "none"),
            current.alias or "-" if current else "-",
            current.run_id[:8] if current else "-",
            current.updated_at_utc if current else "-",
            serving,
            f"[red]{r.drift}[/red]" if r.drift else "none",
            str(len(r.quarantined)),
            f"{r.live.p95_ms:.2f} ms" if r.live and r.live.p95_ms is not None else "-",
            f"{r.live.failure_ratio:.2%}" if r.live and r.live.failure_ratio is not None else "-",
        )
    out.print(table)
    sources = {r.live.source for r in reports if r.live and r.live.p95_ms is not None}
    if sources:
        out.print(f"p95 and failures from {', '.join(sorted(sources))}", style="dim")
    for r in reports:
        for problem in (r.current_error, r.triton_error, r.in_flight, r.live and r.live.error):
            if problem:
                err.print(f"[red]{r.model}:[/red] {problem}", highlight=False)


@app.command("history")
def history_command(
    model: str = typer.Argument(...),
    limit: int = typer.Option(20, "--limit", "-n", help="How many of the latest attempts to show."),
    as_json: bool = JsonOption,
) -> None:
    """Every deploy attempt of a model: who, when, what, the step timings and the outcome."""
    settings = _settings()
    try:
        records = read_history(ModelDir(settings.repository, model), limit)
    except FerryError as error:
        _fail(error)
    if as_json:
        _print_json(records)
        return
    table = Table("started (UTC)", "who", "target", "version", "outcome", "failed step", "seconds", "error")
    for r in records:
        colour = {"committed": "green", "noop": "dim", "rolled_back": "red", "rejected": "yellow"}.get(r["outcome"], "")
        table.add_row(
            r.get("started_at_utc", ""), r.get("who", ""), r.get("target", ""),
            f"v{r['version']}" if r.get("version") else "-", f"[{colour}]{r['outcome']}[/{colour}]",
            r.get("failed_step") or "-", f"{sum(r.get('steps', {}).values()):.2f}", (r.get("error") or "")[:80],
        )
    out.print(table)


@triton_app.command("up")
def triton_up(as_json: bool = JsonOption) -> None:
    """Start tritonserver (explicit model control, loopback) and wait until it is ready."""
    settings = _settings()
    try:
        state = server.up(settings)
    except FerryError as error:
        _fail(error)
    if as_json:
        _print_json(state.as_dict())
    else:
        out.print(f"Triton ready at {state.url} (pid {state.pid}, metrics {state.metrics_url}, log {state.log})")


@triton_app.command("down")
def triton_down() -> None:
    """Stop the tritonserver that `ferry triton up` started."""
    stopped = server.down(_settings())
    out.print("Triton stopped" if stopped else "Triton was not running")


@triton_app.command("status")
def triton_status(as_json: bool = JsonOption) -> None:
    """Whether the local tritonserver runs and is ready."""
    state = server.status(_settings())
    if as_json:
        _print_json(state.as_dict())
    else:
        out.print(f"running: {state.running}  ready: {state.ready}  pid: {state.pid}  url: {state.url}  log: {state.log}")
    if not state.ready:
        raise typer.Exit(EXIT_FAILED)


def main() -> None:
    app()
