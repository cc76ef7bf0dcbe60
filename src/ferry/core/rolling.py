"""A rolling deploy, for a model that fits only once per replica: batch by batch, the replicas swap versions.

For each batch in turn: rollout.json tells the gateways to send the batch no new requests (drain) and ferry
waits until none is in flight to it; each replica of the batch unloads its front and the active version's
store, loads the candidate's store (never two versions of the model at once), proves it (ready, smoke) and
loads its front pointing at the candidate; rollout.json then lists the batch as swapped (the gateways send
it requests again, answered by the candidate). The journal names every replica swapped, so that the undo
(and ``ferry recover``) swaps exactly those back, batch by batch, from the files on disk. The commit comes
after the last batch, like any commit.

It is an announced exception to "production reaches only the committed version": while it runs, the
swapped replicas answer as the candidate, to the gateways' clients and to direct clients alike.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable

from ferry.core import rollout
from ferry.core.errors import InvalidInput, StepFailed, TritonError
from ferry.core.fleet import Fleet
from ferry.core.front import front_config, front_files, store_config, store_name
from ferry.core.journal import Journal
from ferry.core.model_config import from_pbtxt, model_config_pb2, to_override_json
from ferry.core.records import Candidate, RolloutPlan, RolloutState, Snapshot, Step, Strategy, utc_stamp
from ferry.core.release_staging import ReleaseRefused
from ferry.core.repository import ModelDir
from ferry.core.services import Services
from ferry.core.triton import Triton

DRAIN_POLL_S = 0.05
DRAIN_NOTICE_S = 0.2  # a gateway notices a drain written for another model within 0.1 s (its throttled scan)
Prove = Callable[[Triton], None]


def check_can_roll(snapshot: Snapshot, batch: str) -> None:
    """Refuse a rolling deploy with nothing to roll from, or a fleet that would have nothing left serving."""
    if snapshot.active_version is None:
        raise InvalidInput(f"'{snapshot.model}' has no active version to roll from",
                           "deploy its first version beside nothing (leave out --strategy rolling)")
    if snapshot.current is not None and snapshot.current.members:
        raise InvalidInput(f"'{snapshot.model}' is a release, and a release is switched beside what serves, never "
                           "replica by replica (a replica would answer with another release than its neighbour)",
                           "deploy it without --strategy rolling")
    batches(snapshot.replica_urls or [], batch)


def check_candidate(strategy: Strategy, candidate: Candidate) -> Candidate:
    """The candidate materialize produced, refused (as rejected: the version is not at fault) if it is a release
    and the deploy asked to roll."""
    if strategy == "rolling" and candidate.members:
        raise ReleaseRefused(f"v{candidate.version} of '{candidate.model}' is a release, which is switched beside "
                             "what serves, never replica by replica (a replica would answer with another release "
                             "than its neighbour)", "deploy it without --strategy rolling")
    return candidate


def batches(urls: list[str], batch: str) -> list[list[str]]:
    """The replicas in batches of ``batch`` ("1", "2", "25%"); refused when no replica would be left serving."""
    size = batch_size(len(urls), batch)
    if len(urls) < 2 or size >= len(urls):
        where = "a fleet of one" if len(urls) < 2 else f"a batch of {size} of {len(urls)} replicas"
        raise InvalidInput(f"a rolling deploy needs replicas left serving while a batch swaps; {where} leaves none "
                           "(there is nowhere to move the traffic)",
                           "give --batch fewer than the replicas, or deploy beside the active version (the default)")
    ordered = sorted(urls)
    return [ordered[i:i + size] for i in range(0, len(ordered), size)]


def batch_size(replicas: int, batch: str) -> int:
    """How many replicas one batch holds: a number, or a share of the fleet (at least one replica)."""
    text = batch.strip()
    try:
        if text.endswith("%"):
            share = float(text[:-1])
            size = max(1, math.floor(replicas * share / 100)) if 0 < share <= 100 else 0
        else:
            size = int(text)
    except ValueError:
        size = 0
    if size < 1:
        raise InvalidInput(f"--batch {batch!r} is not a number of replicas or a share of them", "give 1, 2 or 25%")
    return size


def roll(ferry: Services, journal: Journal, candidate: Candidate, prove: Prove,
         bake: Callable[[int], None] | None = None) -> None:
    """Swap every replica to the candidate, batch by batch, each batch proven by ``prove`` (ready and smoke on
    the replica) before it is admitted again, then judged on its live traffic by ``bake`` (given the batch's
    number) before the next batch starts."""
    record = journal.record
    snapshot = record.snapshot
    assert snapshot is not None and snapshot.active_version is not None, "a rolling deploy replaces an active version"
    model_dir = ferry.model_dir(snapshot.model)
    fleet = ferry.fleet(snapshot.replica_urls)
    config = from_pbtxt(candidate.config_pbtxt)
    model_dir.ensure_store_link(candidate.version)
    swapped = list(record.swapped)
    for number, batch in enumerate(batches(fleet.urls, record.batch), start=1):
        todo = [url for url in batch if url not in swapped]
        if not todo:
            continue  # swapped before a crash: `ferry recover` undoes, a retried step goes on
        publish(model_dir, snapshot, candidate.version, draining=todo, swapped=swapped)
        wait_drained(ferry, todo)
        journal.update(swapped=swapped + todo)  # before they act: a crash mid-swap is undone on them too
        try:
            Fleet([_replica(fleet, url) for url in todo]).each_step(
                lambda triton: _swap_forward(triton, snapshot.model, candidate.version, config, prove))
        except StepFailed as failure:
            raise StepFailed(failure.step, f"batch {number}: {failure.message}", failure.hint, candidate.version,
                             failure.retryable, failure.detail,
                             replica=failure.replica or (todo[0] if len(todo) == 1 else None)) from failure
        swapped += todo
        publish(model_dir, snapshot, candidate.version, draining=[], swapped=swapped)
        if bake is not None:
            bake(number)


def _swap_forward(triton: Triton, model: str, version: int, config: model_config_pb2.ModelConfig,
                  prove: Prove) -> None:
    try:
        swap_to(triton, model, version, config, prove)
    except TritonError as error:
        raise StepFailed(Step.LOAD, f"Triton could not load v{version}: {error.message}",
                         error.hint or "if it ran out of memory, the replica's other models may need the room",
                         version, error.retryable, error.detail) from error


def swap_back(ferry: Services, snapshot: Snapshot, swapped: list[str], batch: str,
              candidate: int | None = None) -> list[str]:
    """Put the replicas a rolling deploy swapped back on the active version, batch by batch, drained first;
    what could not be put back, one line per replica. While a replica not swapped serves, every swapped one
    is drained at once (the candidate answers nothing after the decision); when all were, batch by batch
    (capacity first). rollout.json keeps listing them as swapped until they are back, so that a gateway counts
    what they still answer (``candidate``'s requests in flight) as the candidate's."""
    active = snapshot.active_version
    assert active is not None
    model_dir = ferry.model_dir(snapshot.model)
    config = model_dir.version_config(active, snapshot.config_text)
    assert config is not None, "the active version's config is recorded"
    fleet = ferry.fleet(snapshot.replica_urls)
    model_dir.ensure_store_link(active)
    problems = []
    left = [url for url in fleet.urls if url in swapped]
    at_once = len(left) < len(fleet.urls)
    size = batch_size(len(fleet.urls), batch) if left else 1
    for start in range(0, len(left), size):
        todo, still = left[start:start + size], left[start + size:]
        publish(model_dir, snapshot, candidate, draining=todo + still if at_once else todo, swapped=todo + still)
        wait_drained(ferry, todo)
        for url in todo:
            try:
                swap_to(_replica(fleet, url), snapshot.model, active, config, lambda triton: None)
            except (StepFailed, TritonError) as error:
                problems.append(f"replica {url} could not be put back on v{active}: {error}")
    return problems


def swap_to(triton: Triton, model: str, version: int, config: model_config_pb2.ModelConfig, prove: Prove) -> None:
    """On one replica: nothing of the model but ``version`` loaded, proven, and its front serving it. The front
    goes first (no client reaches a store being unloaded), then every other version's store."""
    where = triton.placement(model)
    if where.front == [version] and where.store == [version]:
        return  # already swapped (a retried step, or a recover)
    with contextlib.suppress(TritonError):  # Triton refuses to unload a model it does not have
        triton.unload(model)
    for old in where.store:
        if old != version:
            triton.unload(store_name(model, old))
    _wait_unloaded(triton, model, version)
    triton.load(store_name(model, version), to_override_json(store_config(config, model, version)))
    prove(triton)
    triton.load(model, to_override_json(front_config(config, model, version)), front_files(model, version))


def _wait_unloaded(triton: Triton, model: str, keep: int, timeout_s: float = 30.0) -> None:
    """Until the other versions' stores are gone (Triton unloads once the requests in flight are done)."""
    deadline = time.monotonic() + timeout_s
    while [v for v in triton.placement(model).store if v != keep] and time.monotonic() < deadline:
        time.sleep(DRAIN_POLL_S)


def publish(model_dir: ModelDir, snapshot: Snapshot, candidate: int | None, draining: list[str],
            swapped: list[str]) -> None:
    """rollout.json as the gateways read it: which replicas to leave alone, which answer as the candidate."""
    active = snapshot.active_version
    assert active is not None
    state = RolloutState(model=snapshot.model, deploy_id=snapshot.deploy_id, active_version=active,
                         candidate_version=candidate if candidate is not None else active,
                         plan=RolloutPlan(mode="rolling", bake_s=0.0), started_at_utc=utc_stamp(),
                         draining=draining, swapped=swapped)
    rollout.write_rollout(model_dir, state)


def wait_drained(ferry: Services, replicas: list[str]) -> None:
    """Until no gateway has a request in flight to ``replicas`` (at most FERRY_DRAIN_TIMEOUT_S; at once when no
    gateway answers: then no gateway sends them anything)."""
    time.sleep(DRAIN_NOTICE_S)
    deadline = time.monotonic() + ferry.settings.deploy.drain_timeout_s
    while time.monotonic() < deadline:
        busy = rollout.in_flight(ferry.settings, replicas)
        if not busy:
            return
        time.sleep(DRAIN_POLL_S)


def _replica(fleet: Fleet, url: str) -> Triton:
    return next(replica for replica in fleet.replicas if replica.url == url)
