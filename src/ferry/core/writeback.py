"""The outcome of every attempt, written back onto the model version in MLflow.

Called by the runner once an attempt is decided and before its history record is written, so that a
failure here is a warning in the report and the history. It never undoes or blocks a commit.

What MLflow shows afterwards (the tags of each version ferry decided on, and one alias):

    ferry.status          serving | retired | refused
    ferry.deploy_id       the attempt that gave the version this status (for retired: the commit that replaced it)
    ferry.updated_at_utc  when (compact UTC, as in current.json)
    ferry.failed_step     refused only: the step that caught it
    ferry.error           refused only: why, one line of at most ERROR_CHARS characters
    @<serving alias>      the committed version (Settings.serving_alias, "serving" by default)

Every call to MLflow made here has its own short timeout and no retries (Settings.writeback_timeout_s), and
the first one that finds MLflow unreachable ends the write-back: going back to a kept version must stay
fast while MLflow is down. :func:`sync` computes the same state from current.json and the history and
applies what differs, so it repairs a write-back that failed and changes nothing when run again.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import BaseModel, computed_field

from ferry.core.config import Settings
from ferry.core.current import read_current, read_history
from ferry.core.errors import one_line
from ferry.core.mlflow_rest import NOT_FOUND
from ferry.core.records import CurrentState, DeployReport, Outcome
from ferry.core.registry import Registry
from ferry.core.repository import ModelDir

STATUS, DEPLOY_ID, UPDATED_AT = "ferry.status", "ferry.deploy_id", "ferry.updated_at_utc"
FAILED_STEP, ERROR = "ferry.failed_step", "ferry.error"
SERVING, RETIRED, REFUSED = "serving", "retired", "refused"
ERROR_CHARS = 500  # MLflow accepts far longer tag values; the UI shows one line well
_BUDGET_CALLS = 4  # the whole write-back gives up after this many timeouts' worth of time


@dataclass(frozen=True)
class Mark:
    """What one version's ferry.* tags must say."""

    version: int
    status: str
    deploy_id: str
    updated_at_utc: str
    failed_step: str = ""
    error: str = ""

    def tags(self) -> dict[str, str]:
        tags = {STATUS: self.status, DEPLOY_ID: self.deploy_id, UPDATED_AT: self.updated_at_utc}
        if self.status == REFUSED:
            error = one_line(self.error, ERROR_CHARS) or "no reason"
            tags.update({FAILED_STEP: self.failed_step or "unknown", ERROR: error})
        return tags


@dataclass
class Plan:
    """The state to write for one model: the version @serving names (if any) and every version's mark.

    Versions that MLflow still tags serving but that are not ``serving`` are retired by the serving mark's
    deploy (they are looked up, so that a write-back missed earlier is repaired by the next one)."""

    model: str
    serving: Mark | None = None
    marks: list[Mark] = field(default_factory=list)


class SyncResult(BaseModel):
    model: str
    serving_version: int | None = None
    changes: list[str] = []
    warnings: list[str] = []
    unavailable: bool = False  # MLflow did not answer: worth running again
    refused: list[str] = []  # what MLflow would not take ("v9", "@serving"): it has no such model or version
    skipped: str = ""  # why the model was not synced at all (a deploy holds it)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def in_sync(self) -> bool:
        return not (self.unavailable or self.refused or self.skipped)


# ---------------------------------------------------------------- what to write


def plan_for_report(report: DeployReport) -> Plan:
    """The marks one decided attempt implies (nothing for a rejected one: no version was touched)."""
    plan = Plan(report.model)
    if report.outcome in (Outcome.COMMITTED, Outcome.NOOP) and report.current is not None:
        current = report.current
        plan.serving = _serving(current)
        if report.previous_version is not None and report.previous_version != current.active_version:
            plan.marks.append(Mark(report.previous_version, RETIRED, current.deploy_id, current.updated_at_utc))
    elif report.outcome == Outcome.ROLLED_BACK and report.version is not None \
            and report.version != report.previous_version:  # the restored version is still the committed one
        plan.marks.append(Mark(report.version, REFUSED, report.deploy_id, report.finished_at_utc,
                               report.failed_step or "", report.error or ""))
    return plan


def plan_from_state(model: str, current: CurrentState | None, history: list[dict[str, Any]]) -> Plan:
    """The marks current.json and the history imply: the committed version serves; every other version
    ferry decided on is retired (it served, and a later commit replaced it) or refused (its last attempt
    was rolled back)."""
    plan = Plan(model, serving=_serving(current) if current else None)
    decided = [r for r in history if r.get("outcome") in (Outcome.COMMITTED, Outcome.ROLLED_BACK)
               and isinstance(r.get("version"), int)]
    last: dict[int, int] = {}
    for index, record in enumerate(decided):
        last[record["version"]] = index
    for version, index in sorted(last.items()):
        if current is not None and version == current.active_version:
            continue
        record = decided[index]
        if record["outcome"] == Outcome.ROLLED_BACK:
            plan.marks.append(Mark(version, REFUSED, str(record.get("deploy_id") or ""),
                                   str(record.get("finished_at_utc") or ""), str(record.get("failed_step") or ""),
                                   str(record.get("error") or "")))
        elif (mark := _retired_by(version, decided[index + 1:], current)) is not None:
            plan.marks.append(mark)
    return plan


def _serving(current: CurrentState) -> Mark:
    return Mark(current.active_version, SERVING, current.deploy_id, current.updated_at_utc)


def _retired_by(version: int, later: list[dict[str, Any]], current: CurrentState | None) -> Mark | None:
    """The commit that replaced ``version`` (the first later commit of another version)."""
    for record in later:
        if record["outcome"] == Outcome.COMMITTED and record["version"] != version:
            stamp = (record.get("current") or {}).get("updated_at_utc") or record.get("finished_at_utc") or ""
            return Mark(version, RETIRED, str(record.get("deploy_id") or ""), str(stamp))
    if current is not None:
        return Mark(version, RETIRED, current.deploy_id, current.updated_at_utc)
    return None


# ---------------------------------------------------------------- MLflow, with short timeouts


class _Refused(Exception):
    """MLflow answered that the model or version does not exist (or the request is invalid)."""


class _Down(Exception):
    """MLflow did not answer (in time), or failed: nothing more is tried."""


class _Mlflow(Protocol):
    def aliases(self, model: str) -> dict[str, int]: ...
    def tags(self, model: str, version: int) -> dict[str, str]: ...
    def tagged_serving(self, model: str) -> list[int]: ...
    def set_tag(self, model: str, version: int, key: str, value: str) -> None: ...
    def delete_tag(self, model: str, version: int, key: str) -> None: ...
    def set_alias(self, model: str, alias: str, version: int) -> None: ...


def _classify(what: str, error: Exception) -> Exception:
    if getattr(error, "error_code", "") in NOT_FOUND:
        return _Refused(f"{what}: {one_line(str(error), 300)}")
    return _Down(f"{what}: {type(error).__name__}: {one_line(str(error), 300)}")


def _serving_filter(model: str) -> str:
    return f"name='{model}' and tags.`{STATUS}`='{SERVING}'"


class _RestMlflow:
    """A tracking server over its REST API, each call with an explicit timeout and no retries (MLflow's
    client takes both from process-wide variables, which the deploys in this process also read)."""

    def __init__(self, tracking_uri: str, timeout_s: float) -> None:
        from mlflow.utils.credentials import get_default_host_creds

        self.uri = tracking_uri
        self.creds = get_default_host_creds(tracking_uri)
        self.timeout_s = timeout_s

    def _call(self, method: str, endpoint: str, what: str, **body: Any) -> dict[str, Any]:
        from mlflow.utils.rest_utils import http_request, verify_rest_response

        payload = {"params": body} if method == "GET" else {"json": body}
        try:
            response = http_request(self.creds, f"/api/2.0/mlflow/{endpoint}", method, max_retries=0,
                                    backoff_factor=0, timeout=self.timeout_s, **payload)
            return verify_rest_response(response, endpoint).json()
        except Exception as error:
            raise _classify(what, error) from None

    def aliases(self, model: str) -> dict[str, int]:
        found = self._call("GET", "registered-models/get", f"reading '{model}'", name=model)
        return {a["alias"]: int(a["version"]) for a in found.get("registered_model", {}).get("aliases", [])}

    def tags(self, model: str, version: int) -> dict[str, str]:
        found = self._call("GET", "model-versions/get", f"reading v{version}", name=model, version=str(version))
        return {t["key"]: t.get("value", "") for t in found.get("model_version", {}).get("tags", [])}

    def tagged_serving(self, model: str) -> list[int]:
        found = self._call("GET", "model-versions/search", "searching versions tagged serving",
                           filter=_serving_filter(model), max_results=100)
        return [int(v["version"]) for v in found.get("model_versions", [])]

    def set_tag(self, model: str, version: int, key: str, value: str) -> None:
        self._call("POST", "model-versions/set-tag", f"tagging v{version}", name=model, version=str(version),
                   key=key, value=value)

    def delete_tag(self, model: str, version: int, key: str) -> None:
        self._call("DELETE", "model-versions/delete-tag", f"untagging v{version}", name=model, version=str(version),
                   key=key)

    def set_alias(self, model: str, alias: str, version: int) -> None:
        self._call("POST", "registered-models/alias", f"setting @{alias}", name=model, alias=alias,
                   version=str(version))


class _ClientMlflow:
    """An MLflow the client reaches without a server (sqlite, a file store), or an in-process fake of it."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def _call(self, what: str, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return getattr(self.client, method)(*args, **kwargs)
        except Exception as error:
            raise _classify(what, error) from None

    def aliases(self, model: str) -> dict[str, int]:
        found = self._call(f"reading '{model}'", "get_registered_model", model)
        return {alias: int(version) for alias, version in (found.aliases or {}).items()}

    def tags(self, model: str, version: int) -> dict[str, str]:
        return dict(self._call(f"reading v{version}", "get_model_version", model, str(version)).tags or {})

    def tagged_serving(self, model: str) -> list[int]:
        found = self._call("searching versions tagged serving", "search_model_versions",
                           filter_string=_serving_filter(model), max_results=100)
        return [int(v.version) for v in found]

    def set_tag(self, model: str, version: int, key: str, value: str) -> None:
        self._call(f"tagging v{version}", "set_model_version_tag", model, str(version), key, value)

    def delete_tag(self, model: str, version: int, key: str) -> None:
        self._call(f"untagging v{version}", "delete_model_version_tag", model, str(version), key)

    def set_alias(self, model: str, alias: str, version: int) -> None:
        self._call(f"setting @{alias}", "set_registered_model_alias", model, alias, str(version))


def _connect(settings: Settings, registry: Registry) -> _Mlflow | None:
    """The MLflow the registry reads, for writing; None for a registry that is not MLflow's (a unit-test fake)."""
    uri = getattr(registry, "tracking_uri", "") or settings.tracking_uri
    if uri.startswith(("http://", "https://")):
        return _RestMlflow(uri, settings.writeback_timeout_s)
    client = getattr(registry, "client", None)
    return _ClientMlflow(client) if client is not None else None


# ---------------------------------------------------------------- applying a plan


@dataclass
class _Writer:
    mlflow: _Mlflow
    model: str
    deadline: float
    changes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)

    def _check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise _Down("MLflow answers too slowly: the write-back ran out of time")

    def mark(self, mark: Mark) -> None:
        """Make v<mark.version>'s ferry.* tags say ``mark``, touching only what differs."""
        self._check_time()
        try:
            now = self.mlflow.tags(self.model, mark.version)
            wanted = mark.tags()
            for key, value in wanted.items():
                if now.get(key) != value:
                    self._check_time()
                    self.mlflow.set_tag(self.model, mark.version, key, value)
            for key in (FAILED_STEP, ERROR):
                if key in now and key not in wanted:
                    self.mlflow.delete_tag(self.model, mark.version, key)
        except _Refused as refused:
            self.refused.append(f"v{mark.version}")
            self.warnings.append(f"MLflow refused the outcome of {self.model} v{mark.version}: {refused}")
            return
        if now.get(STATUS) != mark.status or now.get(DEPLOY_ID) != mark.deploy_id:
            self.changes.append(f"v{mark.version}: {STATUS} {now.get(STATUS) or '(none)'} -> {mark.status}")

    def serve(self, mark: Mark, alias: str, explicit: Iterable[int]) -> None:
        """Tag the serving version, point @alias at it, retire every other version still tagged serving."""
        self.mark(mark)
        try:
            before = self.mlflow.aliases(self.model).get(alias)
            if before != mark.version:
                self._check_time()
                self.mlflow.set_alias(self.model, alias, mark.version)
                self.changes.append(f"@{alias}: {f'v{before}' if before else '(none)'} -> v{mark.version}")
        except _Refused as refused:
            self.refused.append(f"@{alias}")
            self.warnings.append(f"MLflow refused @{alias} of {self.model}: {refused}")
            return
        try:
            stale = set(self.mlflow.tagged_serving(self.model)) - {mark.version} - set(explicit)
        except _Refused:
            return  # a store that cannot search by tag: only the versions named in the plan are retired
        for version in sorted(stale):
            self.mark(Mark(version, RETIRED, mark.deploy_id, mark.updated_at_utc))


def _apply(settings: Settings, registry: Registry, plan: Plan) -> SyncResult:
    result = SyncResult(model=plan.model, serving_version=plan.serving.version if plan.serving else None)
    if not plan.serving and not plan.marks:
        return result
    try:
        mlflow = _connect(settings, registry)
        if mlflow is None:
            return result
        writer = _Writer(mlflow, plan.model, time.monotonic() + _BUDGET_CALLS * settings.writeback_timeout_s)
        try:
            if plan.serving is not None:
                writer.serve(plan.serving, settings.serving_alias, [m.version for m in plan.marks])
            for mark in plan.marks:
                writer.mark(mark)
        finally:
            result.changes, result.warnings, result.refused = writer.changes, writer.warnings, writer.refused
    except _Down as down:
        result.unavailable = True
        result.warnings.append(f"MLflow at {_uri(settings, registry)} was not told of the outcome: {down} "
                               f"(run `ferry sync {plan.model}` once it answers)")
    except Exception as error:  # a write-back must never break the record of a decided attempt
        result.unavailable = True
        result.warnings.append(f"MLflow was not told of the outcome: unexpected {type(error).__name__}: "
                               f"{one_line(str(error), 300)} (run `ferry sync {plan.model}`)")
    return result


def _uri(settings: Settings, registry: Registry) -> str:
    return getattr(registry, "tracking_uri", "") or settings.tracking_uri


# ---------------------------------------------------------------- entry points


def write_back(settings: Settings, registry: Registry, report: DeployReport) -> list[str]:
    """Tag the version and move the serving alias; the warnings, if MLflow could not be told."""
    if not settings.serving_alias or report.outcome == Outcome.REJECTED:
        return []
    return _apply(settings, registry, plan_for_report(report)).warnings


def sync(settings: Settings, registry: Registry, model_dir: ModelDir) -> SyncResult:
    """Write to MLflow what current.json and the history say (the caller holds the model's lock, so that
    no commit happens in between); only what differs is written, so running it again changes nothing."""
    if not settings.serving_alias:
        return SyncResult(model=model_dir.model, warnings=["FERRY_SERVING_ALIAS is empty: write-back is off"])
    plan = plan_from_state(model_dir.model, read_current(model_dir), read_history(model_dir))
    return _apply(settings, registry, plan)
