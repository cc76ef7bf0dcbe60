"""``ferry watch`` (and ``ferry watch register``) and ``ferry sync``: the MLflow loop at the command line.

Added to the ``ferry`` command by :func:`register`; messages and exit codes come from
:mod:`ferry.adapters.cli_support`, as for every other command.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Any

import typer
from rich.markup import escape

from ferry.adapters import cli_support as cli
from ferry.core.errors import Busy, InvalidInput

if TYPE_CHECKING:
    from ferry.core.config import Settings


def watch_command(
    ctx: typer.Context,
    host: str | None = typer.Option(None, help="Address to listen on (default FERRY_WATCH_HOST, 127.0.0.1)."),
    port: int | None = typer.Option(None, help="Port (default FERRY_WATCH_PORT, 8090).", min=1, max=65535),
    poll: str | None = typer.Option(None, "--poll", metavar="DURATION",
                                    help="Also poll MLflow's aliases this often (30s, 2m), for where webhooks "
                                         "cannot reach (default FERRY_WATCH_POLL_S; none: webhooks only)."),
    aliases: str | None = typer.Option(None, help="Comma-separated aliases to act on (default FERRY_WATCH_ALIASES, "
                                                  "else FERRY_DEFAULT_ALIAS)."),
) -> None:
    """Deploy a version when an MLflow alias moves to it: MLflow webhooks at POST /mlflow/webhook, or polling."""
    if ctx.invoked_subcommand is not None:
        return
    try:
        import uvicorn  # noqa: F401

        from ferry.adapters import watch
    except ImportError as error:
        cli.needs_extra("gateway", "watch", error)
    from ferry.core.addresses import check_port, parse_duration

    settings = cli.current_settings()
    host = host or settings.watch.host
    port = cli.guarded(lambda: check_port(port or settings.watch.port, "port"))
    poll_s = cli.guarded(lambda: parse_duration(poll, "--poll")) if poll else settings.watch.poll_s
    watched = cli.guarded(lambda: watch.watched_aliases(settings, aliases))
    cli.guarded(lambda: _check_free(host, port))
    cli.out.print(_banner(settings, host, port, watched, poll_s))
    watch.serve(settings, host, port, watched, poll_s)


def _check_free(host: str, port: int) -> None:
    """Refuse a port in use with ferry's message (uvicorn's would come after the banner, as a log line)."""
    try:
        with socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET):
            pass
    except OSError as error:
        raise InvalidInput(f"cannot listen on {host}:{port}: {error.strerror or error}",
                           "choose another --port (or FERRY_WATCH_PORT)") from None


def _banner(settings: Settings, host: str, port: int, aliases: tuple[str, ...], poll_s: float) -> str:
    from ferry.adapters.watch import WEBHOOK_PATH, secret_path

    via = f"Airflow DAG runs at {settings.airflow.url}" if settings.airflow.url else "ferry's own deploy, here"
    host = f"[{host}]" if ":" in host else host
    secret = secret_path(settings)
    receiving = (f"webhooks at http://{host}:{port}{WEBHOOK_PATH}" if secret.exists()
                 else f"no webhook secret in {secret} yet (run `ferry watch register`)")
    polling = f"polling every {poll_s:g} s" if poll_s > 0 else "not polling"
    return (f"ferry watch on http://{host}:{port}: @{', @'.join(aliases)} of any model -> {via}; "
            f"{receiving}; {polling}; /metrics, /triggers")


def register_command(
    url: str | None = typer.Option(None, help="Where MLflow's server reaches this receiver "
                                              "(default http://FERRY_WATCH_HOST:FERRY_WATCH_PORT/mlflow/webhook)."),
    name: str = typer.Option("ferry", help="The webhook's name in MLflow (one of that name is updated)."),
    new_secret: bool = typer.Option(False, "--new-secret", help="Generate a new secret (a running receiver "
                                                                 "picks it up)."),
    test: bool = typer.Option(False, "--test", help="Have MLflow send its test event to the receiver."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document instead of text."),
) -> None:
    """Create the webhook in MLflow (alias created events, to this receiver) with a generated secret, kept 0600."""
    from ferry.adapters.watch import WEBHOOK_PATH, register_webhook

    settings = cli.current_settings()
    url = url or f"http://{settings.watch.host}:{settings.watch.port}{WEBHOOK_PATH}"
    result = cli.guarded(lambda: register_webhook(settings, url, name, new_secret, test))
    if as_json:
        cli.print_json(vars(result))
        return
    verb = "created" if result.created else "updated"
    cli.out.print(f"webhook '{result.name}' {verb} in MLflow ({result.webhook_id}): model_version_alias.created "
                  f"-> {result.url}")
    cli.out.print(f"secret {'generated into' if result.new_secret else 'kept in'} {result.secret_file} (mode 0600)")
    cli.out.print("the MLflow server needs, in its environment:")
    for line in result.server_settings:
        cli.out.print(f"  {escape(line)}")
    if result.test:
        cli.out.print(f"test event: {escape(result.test)}")
        if not result.test.startswith("delivered"):
            raise typer.Exit(cli.EXIT_UNAVAILABLE)


def sync_command(
    models: list[str] | None = typer.Argument(None, metavar="[MODEL]...",
                                                 help="Models to sync (default: every model in the repository)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document instead of text."),
) -> None:
    """Write to MLflow what current.json and the history say: each version's ferry.* tags and the serving alias."""
    from ferry.core import writeback
    from ferry.core.lock import holding
    from ferry.core.services import Services
    from ferry.core.status import list_models

    settings = cli.current_settings()
    names = [cli.known_model(settings, m).model for m in models] if models else list_models(settings.repository)
    ferry = Services(settings)
    results = []
    for name in names:
        model_dir = ferry.model_dir(name)
        try:
            with holding(model_dir, settings.deploy.lock_wait_s):  # no commit can happen between reading and writing
                results.append(writeback.sync(settings, cli.guarded(lambda: ferry.registry), model_dir))
        except Busy as busy:
            results.append(writeback.SyncResult(model=name, skipped=f"{busy.message}: its own write-back will "
                                                                    "tell MLflow; sync again later"))
        except InvalidInput as damaged:  # current.json or the history cannot be read: nothing to sync from
            results.append(writeback.SyncResult(model=name, skipped=str(damaged)))
    _show_sync(cli, results, as_json, settings.tracking_uri)


def _sync_state(result: Any, tracking_uri: str) -> str:
    """What one model's sync came to, for its line: only a model whose every write MLflow took is in sync."""
    if result.skipped:
        return f"skipped: {result.skipped}"
    if result.unavailable:
        return "NOT in sync: MLflow did not answer (run `ferry sync` again once it does)"
    if result.refused:
        return (f"NOT in sync: MLflow at {tracking_uri} does not have {', '.join(result.refused)} of "
                f"'{result.model}' (is MLFLOW_TRACKING_URI the registry these versions came from?)")
    return f"{len(result.changes)} change(s)" if result.changes else "already in sync"


def sync_exit_code(results: list[Any]) -> int:
    """3 when MLflow did not answer (retry later), 1 when it would not take a write, 2 when a deploy held a
    model (nothing was changed there), else 0."""
    if any(r.unavailable for r in results):
        return 3
    if any(r.refused for r in results):
        return 1
    return 2 if any(r.skipped for r in results) else 0


def _show_sync(cli: Any, results: list[Any], as_json: bool, tracking_uri: str) -> None:
    if as_json:
        cli.print_json([r.model_dump(mode="json") for r in results])
    else:
        for r in results:
            serving = f"v{r.serving_version}" if r.serving_version is not None else "nothing"
            cli.out.print(f"{r.model}: {serving} serving; {escape(_sync_state(r, tracking_uri))}")
            for change in r.changes:
                cli.out.print(f"  {escape(change)}")
            for warning in r.warnings:
                cli.err.print(f"[yellow]warning:[/yellow] {escape(warning)}")
        if not results:
            cli.out.print("no models to sync")
    raise typer.Exit(sync_exit_code(results))


def register(app: typer.Typer) -> None:
    """Add ``watch`` (with ``watch register``) and ``sync`` to the ``ferry`` command."""
    watch_app = typer.Typer(help="Deploy when an MLflow alias moves (webhooks or polling).", rich_markup_mode=None,
                            invoke_without_command=True, no_args_is_help=False)
    watch_app.callback(invoke_without_command=True)(watch_command)
    watch_app.command("register")(register_command)
    app.add_typer(watch_app, name="watch")
    app.command("sync")(sync_command)
