"""``ferry history MODEL``: every attempt, and ``ferry diff MODEL A B``: how two versions' configs differ, and
whether the change would break clients."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer
from rich.markup import escape

from ferry.adapters.cli_support import (
    JsonOption,
    ModelArgument,
    current_settings,
    guarded,
    known_model,
    out,
    print_json,
)

if TYPE_CHECKING:
    from ferry.core.records import DeployReport


def _attempted(report: DeployReport) -> str:
    """The history table's version column: the version, a config change, a release's members."""
    from ferry.core.release import labels

    if not report.version:
        return "-"
    return f"v{report.version}" + (" +config" if report.config_changed else "") + \
        (f" ({labels(report.members)})" if report.members else "")


def history_command(
    model: str = ModelArgument,
    limit: int = typer.Option(20, "--limit", "-n", min=0, help="How many of the latest attempts to show."),
    as_json: bool = JsonOption,
) -> None:
    """Every deploy attempt of a model: who, when, what, the step timings and the outcome."""
    from rich.table import Table

    from ferry.core.current import read_attempts, read_history
    from ferry.core.errors import one_line
    from ferry.core.records import Outcome

    settings = current_settings()
    if as_json:
        print_json(read_history(known_model(settings, model), limit))  # the records as written
        return
    attempts = read_attempts(known_model(settings, model), limit)
    table = Table("started (UTC)", "who", "target", "version", "outcome", "failed step", "seconds", "error")
    colours = {Outcome.COMMITTED: "green", Outcome.NOOP: "dim", Outcome.ROLLED_BACK: "red", Outcome.REJECTED: "yellow"}
    for r in attempts:
        colour = colours[r.outcome]
        table.add_row(
            r.started_at_utc, r.who, r.target, _attempted(r),
            f"[{colour}]{r.outcome}[/{colour}]", r.failed_step or "-", f"{sum(r.steps.values()):.2f}",
            escape(one_line(r.error, 80)),
        )
    out.print(table)


def diff_command(
    model: str = ModelArgument,
    first: int = typer.Argument(..., metavar="A", min=1, help="A version (the one serving, say)."),
    second: int = typer.Argument(..., metavar="B", min=1, help="Another version (a candidate, say)."),
    as_json: bool = JsonOption,
) -> None:
    """The change between two versions' configs (each version carries its own), and what of it breaks clients."""
    from ferry.core.status import config_diff

    change = guarded(lambda: config_diff(known_model(current_settings(), model), first, second))
    if as_json:
        print_json(change.model_dump(mode="json"))
        return
    if not change.diff:
        out.print(f"v{first} and v{second} of {model} run under the same config ({change.sha256[0][:12]})")
        return
    styles = {"+": "green", "-": "red", "@": "cyan"}
    for line in change.diff:
        style = styles.get(line[:1]) if not line.startswith(("+++", "---")) else "bold"
        out.print(escape(line), style=style)
    for problem in change.signature_changes:
        out.print(f"breaks clients: {escape(problem)} (deploying it needs --allow-signature-change)", style="red")
    if not change.signature_changes:
        out.print(f"compatible: v{second} keeps the inputs and outputs of v{first}, so clients are not affected "
                  "(the configs are shown as Triton reads them, normalized)")


def register(app: typer.Typer) -> None:
    app.command("history")(history_command)
    app.command("diff")(diff_command)
