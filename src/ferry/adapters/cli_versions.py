"""``ferry diff MODEL A B``: how two versions' configs differ, and whether the change would break clients."""

from __future__ import annotations

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
    app.command("diff")(diff_command)
