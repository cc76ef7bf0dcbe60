"""Retire a model: nothing committed any more, Triton serves nothing of it; its files and its history stay.

The commit point of a retirement is the removal of ``current.json``, as the commit of a deploy is its
write: from then on the gateway answers 404 for the model, ``ferry reconcile`` keeps it unloaded, and
``ferry status`` shows nothing active. Every Triton replica is told afterwards; one that cannot be is
drift for ``ferry reconcile`` to repair, never a reason to put ``current.json`` back.

What is kept: the version directories and ``config.pbtxt`` (as for any version a commit retired, so a
later deploy or ``ferry rollback --to N`` needs no download), the quarantine, the history (whose last
committed record already holds the retired ``current.json`` as its ``current``), and the retired file
itself, with who retired it and when, under ``.ferry/<model>/retired/``.
"""

from __future__ import annotations

from pydantic import BaseModel

from ferry.core.current import read_current
from ferry.core.errors import FerryError, InvalidInput
from ferry.core.front import store_name
from ferry.core.fsutil import atomic_write, fsync_dir
from ferry.core.journal import read_journal, unfinished_error
from ferry.core.lock import current_user, holding
from ferry.core.placement import retire as retire_from
from ferry.core.placement import serving_problems, unload_members, wait_serving
from ferry.core.records import CurrentState, utc_stamp
from ferry.core.release import MemberKey, release_of, stale_stores
from ferry.core.repository import ModelDir
from ferry.core.services import Services
from ferry.core.triton import Triton

RETIRED_DIR = "retired"


class RetiredRecord(BaseModel):
    """``.ferry/<model>/retired/<UTC>-v<N>.json``: the current.json a retirement removed, and by whom."""

    current: CurrentState
    retired_by: str
    retired_at_utc: str


class Retired(BaseModel):
    """What a retirement did."""

    model: str
    version: int | None  # the version that was committed (None: nothing was)
    kept_at: str | None = None  # where the retired current.json is kept
    replicas: dict[str, list[int]] = {}  # what each replica serves of the model afterwards (nothing, once verified)
    verified: bool = False
    warnings: list[str] = []


def retire(ferry: Services, model: str) -> Retired:
    """Remove the model's current.json (kept under ``retired/``) and unload the model from every replica.

    Idempotent: a model with nothing committed is only unloaded (if Triton serves any of it), and a
    model the repository does not know is left alone. Refused while a deploy of the model is running
    or unfinished (``ferry recover`` decides what is committed first).
    """
    model_dir = ferry.model_dir(model)
    if not model_dir.exists():
        return Retired(model=model, version=None, verified=True)
    with holding(model_dir, ferry.settings.deploy.lock_wait_s):
        journal = read_journal(model_dir)
        if journal is not None:
            raise unfinished_error(model_dir, journal)
        current = read_current(model_dir)  # a damaged file is refused: restore it first, then retire
        if current is None and (releases := release_of(model_dir, model)):
            raise InvalidInput(f"'{model}' is a member of the release {releases}, which serves it",
                               "retire the release's entry model first (its members go with it)")
        kept = _keep(model_dir, current) if current is not None else None
        if current is not None:
            model_dir.current_path.unlink()
            fsync_dir(model_dir.state_dir)
        retired = Retired(model=model, version=current.active_version if current else None, kept_at=kept)
        _unload(ferry, retired, stale_stores(model_dir, model, current.members, []) if current else [])
        return retired


def _keep(model_dir: ModelDir, current: CurrentState) -> str:
    stamp = utc_stamp()
    folder = model_dir.state_dir / RETIRED_DIR
    folder.mkdir(exist_ok=True)
    path = folder / f"{stamp}-v{current.active_version}.json"
    suffix = 1
    while path.exists():
        suffix += 1
        path = folder / f"{stamp}-v{current.active_version}-{suffix}.json"
    record = RetiredRecord(current=current, retired_by=current_user(), retired_at_utc=stamp)
    atomic_write(path, record.model_dump_json(indent=2).encode())
    return str(path)


def _unload(ferry: Services, retired: Retired, members: list[MemberKey]) -> None:
    """After the commit point: no replica serves the model any more (nor the member stores of its release
    that nothing else pins), or the warnings say how to repair it."""
    model = retired.model
    try:
        fleet = ferry.fleet()
    except FerryError as error:
        retired.warnings.append(f"nothing is committed for '{model}' any more, but its replicas are unknown: {error} "
                                f"(run `ferry reconcile {model}`)")
        return
    def unload(triton: Triton) -> None:
        stores = [store_name(model, v) for v in triton.placement(model).store] if members else []
        retire_from(triton, model)
        unload_members(triton, members, stores)

    unloaded = fleet.settled(unload)
    _, states = wait_serving(fleet, model, [])
    # A refused unload matters only where the model still serves (Triton refuses to unload a model it never had).
    states.update({url: error for url, error in unloaded.items() if isinstance(error, FerryError) and states[url]})
    retired.replicas = {url: state for url, state in states.items() if not isinstance(state, FerryError)}
    problems = serving_problems(states, [])
    retired.verified = not problems
    retired.warnings += [f"nothing is committed for '{model}' any more, but {problem} (run `ferry reconcile {model}`)"
                         for problem in problems]
