"""``ferry rollout status|promote|abort``: a deploy's bake on live traffic, seen and decided by an operator."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer
from rich.markup import escape

from ferry.adapters.cli_support import (
    JsonOption,
    ModelArgument,
    current_settings,
    fail,
    guarded,
    known_model,
    out,
    print_json,
)
from ferry.core.errors import InvalidInput

if TYPE_CHECKING:
    from ferry.core.records import RolloutState
    from ferry.core.repository import ModelDir

CONTROL_POLL_S = 0.2  # how often a baking deploy looks for `ferry rollout promote|abort` (ferry.core.runner)



def read_rollout(model_dir: ModelDir) -> RolloutState | None:
    """rollout.json of the model (:func:`ferry.core.rollout.read_rollout`), imported when a command reads it."""
    from ferry.core.rollout import read_rollout

    return read_rollout(model_dir)


def rollout_status(model: str = ModelArgument, as_json: bool = JsonOption) -> None:
    """The bake in progress: mode, elapsed, the gate's evaluations so far."""
    from ferry.core.journal import read_journal

    settings = current_settings()
    model_dir = known_model(settings, model)
    state = guarded(lambda: read_rollout(model_dir))
    journal = guarded(lambda: read_journal(model_dir))
    gate = journal.record.gate if journal is not None else []
    if as_json:
        print_json({"rollout": state and state.model_dump(mode="json"),
                     "gate": [g.model_dump(mode="json") for g in gate]})
        return
    if state is None:
        out.print(f"{model}: no bake in progress")
        return
    plan = state.plan
    share = (f"{plan.canary_percent:g}% canary" if plan.mode == "canary"
             else f"shadow, {plan.mirror_percent:g}% mirrored")
    out.print(f"{model}: v{state.candidate_version} bakes beside v{state.active_version} ({share}) since "
              f"{state.started_at_utc} UTC, for {plan.bake_s:g} s; deploy {state.deploy_id}")
    for evaluation in gate:
        out.print(f"  {evaluation.elapsed_s:7.1f} s  {evaluation.verdict:<7} {escape('; '.join(evaluation.reasons))}")


def rollout_promote(model: str = ModelArgument) -> None:
    """Commit the baking candidate now."""
    _control(model, "promote")


def rollout_abort(model: str = ModelArgument) -> None:
    """Roll the baking candidate back now."""
    _control(model, "abort")


def _control(model: str, action: str) -> None:
    from ferry.core.lock import current_user
    from ferry.core.rollout import request_control

    settings = current_settings()
    model_dir = known_model(settings, model)
    if guarded(lambda: read_rollout(model_dir)) is None:
        fail(InvalidInput(f"'{model}' has no bake in progress", f"see `ferry status {model}`"))
    request_control(model_dir, action, current_user())
    out.print(f"{model}: {action} asked; the deploying process acts on it within {CONTROL_POLL_S:g} s "
              "(an Airflow DAG's bake sensor, at its next look)")


def register(app: typer.Typer) -> None:
    """Add ``rollout status|promote|abort`` to the ``ferry`` command."""
    rollout_app = typer.Typer(help="A deploy that bakes on live traffic (ferry deploy --shadow | --canary).",
                              no_args_is_help=True, rich_markup_mode=None)
    rollout_app.command("status")(rollout_status)
    rollout_app.command("promote")(rollout_promote)
    rollout_app.command("abort")(rollout_abort)
    app.add_typer(rollout_app, name="rollout")
