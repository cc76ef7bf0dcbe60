"""What every ferry command shares: the consoles, the exit codes, and turning a FerryError into a one-line
message with its hint and exit code (the table in docs/operations.md); and what the commands that run the
transaction (deploy, rollback, recover) print of it."""

from __future__ import annotations

import json
import math
import signal
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from ferry.core.errors import FerryError, InvalidInput, NoSuchModel, unreachable

if TYPE_CHECKING:  # imported where used: `ferry --help` reads no settings and no repository
    from ferry.core.config import Settings
    from ferry.core.records import DeployReport
    from ferry.core.repository import ModelDir

# Piped output (CI logs, scripts) is not squeezed into 80 columns.
_WIDTH = None if sys.stdout.isatty() else 200
out = Console(soft_wrap=True, width=_WIDTH, highlight=False)
err = Console(stderr=True, soft_wrap=True, width=_WIDTH, highlight=False)

EXIT_FAILED = 1  # the deploy ran and was rolled back; or status found a problem
EXIT_REJECTED = 2  # bad input: nothing was changed
EXIT_UNAVAILABLE = 3  # a dependency did not answer: nothing was changed, worth retrying
JsonOption = typer.Option(False, "--json", help="Print one JSON document instead of text.")
ModelArgument = typer.Argument(..., metavar="MODEL", help="The model's name (in MLflow and in Triton).")
T = TypeVar("T")


def fail(error: FerryError) -> NoReturn:
    err.print(f"[red]error:[/red] {escape(error.message)}")
    if error.hint:
        err.print(f"  hint: {escape(error.hint)}")
    raise typer.Exit(EXIT_UNAVAILABLE if unreachable(error) else EXIT_REJECTED)


def guarded(action: Callable[[], T]) -> T:
    """Run ``action``; a FerryError it raises ends the command with its message, hint and exit code."""
    try:
        return action()
    except FerryError as error:
        fail(error)


def current_settings() -> Settings:
    from ferry.core.config import load_settings

    return guarded(load_settings)


def known_model(settings: Settings, model: str) -> ModelDir:
    """The model's directory; NoSuchModel when the repository has nothing of it."""
    from ferry.core.repository import ModelDir

    model_dir = guarded(lambda: ModelDir(settings.repository, model))
    if not model_dir.exists():
        from ferry.core.status import list_models

        known = ", ".join(list_models(settings.repository)) or "none"
        fail(NoSuchModel(f"no model '{model}' in {settings.repository}", f"models there: {known}"))
    return model_dir


def needs_extra(extra: str, command: str, error: ImportError) -> NoReturn:
    fail(InvalidInput(f"`ferry {command}` needs what the '{extra}' extra installs ({error.name} is missing)",
                       f"pip install 'ferry[{extra}]'"))


# What the commands that run the transaction (deploy, rollback, recover) print as it goes and when it ends.


def deploy_events(as_json: bool) -> Callable[[str, str, float, str], None]:
    from ferry.core.events import RECORDED

    def on_event(step: str, status: str, seconds: float, detail: str) -> None:
        if step == RECORDED:  # decided and recorded: a late Ctrl-C must not turn it into exit 130
            for stop in (signal.SIGINT, signal.SIGTERM):
                signal.signal(stop, signal.SIG_IGN)
        elif not as_json:
            _show_step(step, status, seconds, detail)

    return on_event


def _show_step(step: str, status: str, seconds: float, detail: str) -> None:
    from ferry.core.baking import GATE

    if status == "start":
        return
    mark = {"ok": "[green]✓[/green]", "pass": "[green]✓[/green]", "waiting": "[dim]…[/dim]"}.get(status, "[red]✗[/red]")
    if step == GATE:
        step = f"gate {status}"
    out.print(f"  {mark} {step:<12} {seconds:7.3f} s  {escape(detail.splitlines()[0] if detail else '')}")


def print_success(report: DeployReport) -> None:
    from ferry.core.records import Outcome

    if report.outcome == Outcome.NOOP:
        out.print(f"{report.model}: {escape(report.warnings[0]) if report.warnings else 'nothing to do'}")
        return
    was = f"v{report.previous_version}" if report.previous_version else "nothing"
    out.print(f"[green]committed[/green] {report.model} v{report.version} (was {was}) "
              f"in {sum(report.steps.values()):.2f} s")
    for warning in report.warnings:
        err.print(f"[yellow]warning:[/yellow] {escape(warning)}")


def explain_rollback(report: DeployReport) -> None:
    from ferry.core.summary import failure_reason

    err.print(f"[red]{escape(failure_reason(report, with_problems=False))}[/red]")
    if report.hint:
        err.print(f"  hint: {escape(report.hint)}")
    for problem in report.rollback.problems if report.rollback else []:
        err.print(f"  rollback problem: {escape(problem)}")


def finish_deploy(report: DeployReport, as_json: bool) -> NoReturn:
    """Print the outcome (JSON on stdout for scripts; the reason of a failure always on stderr) and exit."""
    from ferry.core.records import Outcome

    if as_json:
        print_json(report.model_dump(mode="json"))
    elif report.ok:
        print_success(report)
    if report.outcome == Outcome.ROLLED_BACK:
        explain_rollback(report)
        raise typer.Exit(EXIT_FAILED)
    if report.outcome == Outcome.REJECTED:
        err.print(f"[red]error:[/red] {escape(report.error or 'rejected')}")
        if report.hint:
            err.print(f"  hint: {escape(report.hint)}")
        raise typer.Exit(EXIT_UNAVAILABLE if report.retryable else EXIT_REJECTED)
    raise typer.Exit(0)


def _finite(data: object) -> object:
    """``data`` with every NaN or infinity as None: neither is JSON (RFC 8259), and scripts' parsers refuse them."""
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, dict):
        return {key: _finite(value) for key, value in data.items()}
    if isinstance(data, list | tuple):
        return [_finite(value) for value in data]
    return data


def print_json(data: object) -> None:
    sys.stdout.write(json.dumps(_finite(data), indent=2, default=str, allow_nan=False) + "\n")


def stop_after_the_pass() -> threading.Event:
    """SIGINT or SIGTERM ends ``reconcile --every`` once the pass under way is done, so that no load is cut
    off half way (a second signal stops it at once)."""
    stopping = threading.Event()

    def stop(signum: int, _frame: object) -> None:
        if stopping.is_set():
            raise KeyboardInterrupt
        stopping.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)
    return stopping
