"""What every ferry command shares: the consoles, the exit codes, and turning a FerryError into a one-line
message with its hint and exit code (the table in docs/operations.md)."""

from __future__ import annotations

import json
import math
import signal
import sys
import threading
from collections.abc import Callable
from typing import NoReturn, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from ferry.core.config import Settings, load_settings
from ferry.core.errors import FerryError, InvalidInput, NoSuchModel, unreachable
from ferry.core.repository import ModelDir
from ferry.core.status import list_models

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
    return guarded(load_settings)


def known_model(settings: Settings, model: str) -> ModelDir:
    """The model's directory; NoSuchModel when the repository has nothing of it."""
    model_dir = guarded(lambda: ModelDir(settings.repository, model))
    if not model_dir.exists():
        known = ", ".join(list_models(settings.repository)) or "none"
        fail(NoSuchModel(f"no model '{model}' in {settings.repository}", f"models there: {known}"))
    return model_dir


def needs_extra(extra: str, command: str, error: ImportError) -> NoReturn:
    fail(InvalidInput(f"`ferry {command}` needs what the '{extra}' extra installs ({error.name} is missing)",
                       f"pip install 'ferry[{extra}]'"))


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
