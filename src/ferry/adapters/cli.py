"""The ``ferry`` command line: a thin adapter over the core.

Exit codes: 0 done; 1 a deploy ran and was rolled back (or status found drift); 2 bad input, nothing
changed; 3 a dependency (MLflow, Triton, Prometheus) could not be reached, nothing changed: retry later.
"""

from __future__ import annotations

import math
import signal
import time
from typing import TYPE_CHECKING, NoReturn

import typer
from rich.markup import escape

from ferry.adapters import cli_mlflow, cli_rollout, cli_services, cli_versions
from ferry.adapters.cli_support import (
    EXIT_FAILED,
    EXIT_UNAVAILABLE,
    JsonOption,
    ModelArgument,
    current_settings,
    deploy_events,
    err,
    explain_rollback,
    fail,
    finish_deploy,
    guarded,
    known_model,
    out,
    print_json,
    print_success,
    stop_after_the_pass,
)

# Each command imports the core it runs inside its own body: `ferry --help` imports none of it, `ferry history`
# no Triton client, `ferry status` no MLflow and no transaction (tests/unit/test_cli_imports.py; docs/benchmarks.md,
# "A cold command line").
if TYPE_CHECKING:
    from ferry.core.config import Settings
    from ferry.core.reconcile import Reconciled
    from ferry.core.records import RolloutPlan, Strategy
    from ferry.core.status import ModelStatus, ReplicaStatus
    from ferry.core.target import Target

# Plain click help: rich's panels show a <bool> metavar on every flag and {MODEL} in the usage line.
app = typer.Typer(help="Move model versions from the MLflow Model Registry into Triton, safely.",
                  no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None)


def _run_deploy(settings: Settings, model: str, target: Target, as_json: bool) -> NoReturn:
    from ferry.core.runner import Runner
    from ferry.core.services import Services

    ferry = Services(settings)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a stopped deploy rolls back, as on Ctrl-C
    runner = guarded(lambda: Runner(ferry, model, on_event=deploy_events(as_json)))
    if target.strategy == "rolling" and not as_json:
        err.print("rolling: each batch of replicas swaps to the candidate in turn; until the commit, the swapped "
                  "replicas answer as the candidate (through the gateways and directly)", style="yellow")
    report = guarded(lambda: runner.deploy(target))
    finish_deploy(report, as_json)


StrategyOption = typer.Option("beside", "--strategy", metavar="beside|rolling",
                              help="beside: the candidate loads beside the active version on every replica; "
                              "rolling: replica batch by batch, never both on one (a model that fits once).")
BatchOption = typer.Option("1", "--batch", metavar="N|P%", help="Rolling: replicas per batch (1, 2, 25%).")


@app.command("deploy")
def deploy_command(
    model: str = ModelArgument,
    alias: str = typer.Option(..., "--alias", "-a", help="MLflow alias naming the version to deploy."),
    shadow: str | None = typer.Option(None, "--shadow", metavar="DURATION",
                                      help="Bake in shadow mode this long (5m): copies of live requests go to the "
                                      "candidate, its answers are compared, clients see only the active version's."),
    canary: float | None = typer.Option(None, "--canary", metavar="PERCENT",
                                        help="Bake in canary mode: the candidate answers this share of requests."),
    bake: str | None = typer.Option(None, "--bake", metavar="DURATION",
                                    help="How long a canary bakes (5m); with --strategy rolling, each batch."),
    mirror: float = typer.Option(100.0, "--mirror", metavar="PERCENT", help="Shadow: the share of requests copied."),
    gate_failures: int | None = typer.Option(None, "--gate-failures", min=1,
                                             help="Failed gate evaluations in a row that roll back at once."),
    allow_signature_change: bool = typer.Option(
        False, "--allow-signature-change",
        help="Deploy a version whose inputs or outputs differ from the active version's (it breaks their clients)."),
    strategy: str = StrategyOption,
    batch: str = BatchOption,
    as_json: bool = JsonOption,
) -> None:
    """Deploy the version an MLflow alias points at: load, ready, smoke, [bake,] then commit or roll back."""
    from ferry.core.repository import check_name
    from ferry.core.target import Target

    guarded(lambda: check_name("model name", model))  # bad names are refused before anything starts
    plan = guarded(lambda: _rollout_plan(shadow, canary, bake, mirror, rolling=strategy == "rolling"))
    target = guarded(lambda: Target.of_alias(alias, rollout=plan, allow_signature_change=allow_signature_change,
                                             strategy=_strategy(strategy), batch=batch))
    settings = current_settings()
    if gate_failures is not None:
        settings = settings.with_overrides(gate_failures=gate_failures)
    _run_deploy(settings, model, target, as_json)


def _strategy(name: str) -> Strategy:
    from ferry.core.errors import InvalidInput

    if name not in ("beside", "rolling"):
        raise InvalidInput(f"--strategy {name!r} is not a strategy", "give --strategy beside or --strategy rolling")
    return "rolling" if name == "rolling" else "beside"


def _rollout_plan(shadow: str | None, canary: float | None, bake: str | None, mirror: float,
                  rolling: bool = False) -> RolloutPlan | None:
    from ferry.core.addresses import parse_duration
    from ferry.core.errors import InvalidInput
    from ferry.core.records import RolloutPlan

    if shadow is not None and canary is not None:
        raise InvalidInput("--shadow and --canary are two ways to bake: choose one")
    if shadow is not None:
        return RolloutPlan(mode="shadow", bake_s=parse_duration(shadow, "--shadow"), mirror_percent=mirror)
    if canary is not None:
        if bake is None:
            raise InvalidInput("--canary needs --bake DURATION: how long the candidate takes its share")
        return RolloutPlan(mode="canary", bake_s=parse_duration(bake, "--bake"), canary_percent=canary)
    if bake is not None and rolling:  # each batch, once swapped, is the candidate's share
        return RolloutPlan(mode="rolling", bake_s=parse_duration(bake, "--bake"))
    if bake is not None:
        raise InvalidInput("--bake goes with --canary PERCENT or --strategy rolling (or bake in shadow with --shadow "
                           "DURATION)")
    return None


@app.command("rollback")
def rollback_command(
    model: str = ModelArgument,
    to: int | None = typer.Option(None, "--to", help="Version to go back to (default: the previous one)."),
    force: bool = typer.Option(False, "--force", help="Go back to a version even if its last deploy failed."),
    strategy: str = StrategyOption,
    batch: str = BatchOption,
    as_json: bool = JsonOption,
) -> None:
    """Go back to an earlier version, through the same validation chain (no MLflow needed if its files are kept)."""
    from ferry.core.current import read_current
    from ferry.core.errors import InvalidInput
    from ferry.core.target import Target

    settings = current_settings()
    model_dir = known_model(settings, model)
    if to is None:
        current = guarded(lambda: read_current(model_dir))
        if current is None or current.previous_version is None:
            fail(InvalidInput(f"'{model}' has no previous version recorded in current.json",
                               "give one with --to VERSION (see `ferry history`)"))
        to = current.previous_version
    target = guarded(lambda: Target.of_version(to, force=force, strategy=_strategy(strategy), batch=batch))
    _run_deploy(settings, model, target, as_json)


@app.command("recover")
def recover_command(model: str = ModelArgument, as_json: bool = JsonOption) -> None:
    """Finish or undo a deploy whose process stopped (killed, crashed), from its journal."""
    from ferry.core.records import Outcome
    from ferry.core.runner import Runner
    from ferry.core.services import Services

    settings = current_settings()
    known_model(settings, model)
    report = guarded(lambda: Runner(Services(settings), model).recover())
    if report is None:
        if as_json:
            print_json(None)
        else:
            out.print(f"{model}: no unfinished deploy, nothing to recover")
        return
    if as_json:
        print_json(report.model_dump(mode="json"))
    else:
        out.print(f"{model}: deploy {report.deploy_id or '(before its snapshot)'} ({report.target}) was unfinished")
        if report.outcome == Outcome.ROLLED_BACK:
            explain_rollback(report)
        elif report.ok:
            print_success(report)
        else:
            out.print(f"  {escape(report.error or '')}")
    if report.rollback is not None and not report.rollback.verified:
        raise typer.Exit(EXIT_FAILED)


@app.command("adopt")
def adopt_command(
    model: str = ModelArgument,
    dry_run: bool = typer.Option(False, "--dry-run", help="Show what adoption would do, and change nothing."),
    version: int | None = typer.Option(None, "--version", min=1, help="The version to adopt when Triton serves "
                                       "none (default: the one the other tool's current.json names)."),
    as_json: bool = JsonOption,
) -> None:
    """Take over a model another tool deployed, checked against MLflow, without reloading anything."""
    from ferry.core.adopt import adopt, plan_adoption
    from ferry.core.services import Services

    settings = current_settings()
    known_model(settings, model)
    ferry = Services(settings)
    plan = guarded(lambda: plan_adoption(ferry, model, version) if dry_run else adopt(ferry, model, version))
    if as_json:
        print_json(plan.model_dump(mode="json"))
        return
    out.print(f"{model}: {'would adopt' if dry_run else 'adopted'} v{plan.active_version}")
    for action in plan.actions:
        out.print(f"  {'would: ' if dry_run else ''}{escape(action)}")


@app.command("reconcile")
def reconcile_command(
    models: list[str] | None = typer.Argument(None, metavar="MODEL...",
                                              help="Models to reconcile (default: every committed model)."),
    every: str | None = typer.Option(None, "--every", metavar="DURATION",
                                     help="Keep reconciling at this interval (30s, 5m): for a sidecar or a timer."),
    as_json: bool = JsonOption,
) -> None:
    """Make every Triton replica serve exactly what current.json commits (after a restart, or on a new replica)."""
    from ferry.core.addresses import parse_duration
    from ferry.core.reconcile import reconcile
    from ferry.core.services import Services
    from ferry.core.status import list_models

    settings = current_settings()
    interval = guarded(lambda: parse_duration(every, "--every")) if every else None
    for name in models or []:
        known_model(settings, name)
    ferry = Services(settings)
    stopping = stop_after_the_pass() if interval is not None else None
    while True:
        names = models or list_models(settings.repository)
        results = [reconcile(ferry, name) for name in names]
        # Kept running, it says only what it changed or could not fix: a sidecar's log is not a heartbeat.
        shown = [r for r in results if interval is None or r.action != "in place"]
        if shown or interval is None:
            _print_reconciled(shown, as_json)
        if interval is None:
            if not all(r.ok for r in results):
                raise typer.Exit(EXIT_FAILED)
            return
        deadline = time.monotonic() + interval
        while time.monotonic() < deadline:
            if stopping is not None and stopping.is_set():
                return
            time.sleep(0.1)


def _print_reconciled(results: list[Reconciled], as_json: bool) -> None:
    if as_json:
        print_json([r.model_dump(mode="json") for r in results])
        return
    for r in results:
        colour = "green" if r.ok else "red"
        version = f"v{r.active_version}" if r.active_version is not None else "-"
        out.print(f"  [{colour}]{r.action:<9}[/{colour}] {r.model} {version}  {escape(r.detail)}")


@app.command("status")
def status_command(
    model: str | None = typer.Argument(None, metavar="[MODEL]", help="One model (default: every model)."),
    as_json: bool = JsonOption,
) -> None:
    """The committed version (current.json), the versions Triton serves, and any drift between them."""
    from ferry.core.services import Services
    from ferry.core.status import list_models, model_status, replica_indexes
    from ferry.observability.live import live_figures

    settings = current_settings()
    models = [known_model(settings, model).model] if model else list_models(settings.repository)
    fleet = guarded(Services(settings).fleet)
    indexes = replica_indexes(fleet)
    reports = [model_status(settings.repository, fleet, name, indexes) for name in models]
    for report in reports:
        if report.current is not None:
            report.live = live_figures(settings, report.model, report.current.active_version)
    if as_json:
        print_json([r.model_dump(mode="json") for r in reports])
    else:
        _print_status_table(reports, settings)
    raise typer.Exit(_status_exit_code(reports))


def _status_exit_code(reports: list[ModelStatus]) -> int:
    """1 for a problem status found (drift, a damaged current.json, an unfinished deploy); else 3 when a
    replica did not answer (what it serves is not known: ask again later); else 0."""
    from ferry.core.status import UNKNOWN

    if any((r.drift and r.drift != UNKNOWN) or r.current_error or r.in_flight for r in reports):
        return EXIT_FAILED
    if any(x.error for r in reports for x in r.replicas):
        return EXIT_UNAVAILABLE
    return EXIT_FAILED if any(r.drift for r in reports) else 0


def _p95(report: ModelStatus) -> str:
    live = report.live
    if live is None or live.error:
        return "-"
    if live.p95_ms is None or math.isnan(live.p95_ms):
        return "no traffic"
    return f"{live.p95_ms:.2f} ms"


def _replica_serves(replica: ReplicaStatus, replicas: int) -> str:
    serves = "[red]unreachable[/red]" if replica.error else ", ".join(f"v{v}" for v in replica.serving) or "nothing"
    loaded = [f"v{v}" for v in replica.held if v not in replica.serving]
    if loaded and not replica.error:  # in the store, reached by no client: a warm previous version or a candidate
        serves += f" (also loaded: {', '.join(loaded)})"
    return f"{escape(replica.url)}: {serves}" if replicas > 1 else serves


def _active(report: ModelStatus) -> str:
    """The status table's active column: the version (with a release's members), or why there is none."""
    from ferry.core.release import labels

    if report.current is not None:
        members = report.current.members
        return f"v{report.current.active_version}" + (f" ({labels(members)})" if members else "")
    if report.member_of:
        return f"member of {report.member_of}"
    return (report.current_error and "[red]unreadable[/red]") or "none"


def _print_status_table(reports: list[ModelStatus], settings: Settings) -> None:
    from rich.table import Table

    from ferry.core.status import UNKNOWN

    if not reports:
        out.print(f"no models in {settings.repository}")
        return
    table = Table("model", "active", "alias", "run", "config", "updated (UTC)", "Triton serves", "drift",
                  "quarantined", "p95", "failures")
    for r in reports:
        current = r.current
        serving = "; ".join(_replica_serves(replica, len(r.replicas)) for replica in r.replicas)
        drift = {None: "none", UNKNOWN: "[yellow]unknown[/yellow]"}.get(r.drift, f"[red]{escape(r.drift or '')}[/red]")
        table.add_row(
            r.model,
            _active(r),
            (current.alias or "-") if current else "-",
            current.run_id[:8] if current else "-",
            (current.config_sha256 or "-")[:12] if current else "-",
            current.updated_at_utc if current else "-",
            serving,
            drift,
            str(len(r.quarantined)),
            _p95(r),
            f"{r.live.failure_ratio:.2%}" if r.live and r.live.failure_ratio is not None else "-",
        )
    out.print(table)
    sources = {r.live.source for r in reports if r.live and r.live.p95_ms is not None}
    if sources:
        out.print(f"p95 and failures from {', '.join(sorted(sources))}", style="dim")
    for r in reports:
        unreachable = [f"replica {x.url}: {x.error}" if len(r.replicas) > 1 else x.error
                       for x in r.replicas if x.error]
        for problem in (r.current_error, *unreachable, r.in_flight, r.live and r.live.error):
            if problem:
                err.print(f"[red]{r.model}:[/red] {escape(problem)}")


cli_mlflow.register(app)  # ferry watch, ferry sync
cli_rollout.register(app)  # ferry rollout status|promote|abort
cli_versions.register(app)  # ferry history, ferry diff
cli_services.register(app)  # ferry gateway, exporter, metrics, report, triton


def main() -> None:
    app()
