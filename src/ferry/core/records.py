"""The vocabulary of a deploy and a typed record for every file ferry writes.

    current.json    CurrentState      the committed state (consumers read its first four keys)
    history.jsonl   DeployReport      one line per attempt
    journal.json    JournalRecord     the deploy in flight (ferry.core.journal)
    ferry.json      Manifest          beside each staged version
    reason.json     QuarantineReason  beside each quarantined version

Enums are ``StrEnum``: they are written as their plain string values, so the files keep their format.
"""

from __future__ import annotations

import datetime as dt
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


def utc_stamp(moment: dt.datetime | None = None) -> str:
    """Compact UTC, as consumers of current.json already read it: 20251231T025902."""
    return (moment or dt.datetime.now(dt.UTC)).strftime("%Y%m%dT%H%M%S")


def parse_utc_stamp(stamp: str) -> dt.datetime:
    return dt.datetime.strptime(stamp, "%Y%m%dT%H%M%S").replace(tzinfo=dt.UTC)


class Step(StrEnum):
    SNAPSHOT = "snapshot"
    MATERIALIZE = "materialize"
    LOAD = "load"
    READY = "ready"
    SMOKE = "smoke"
    BAKE = "bake"  # optional: the candidate proven on live traffic (shadow or canary) before the commit
    COMMIT = "commit"
    ROLLBACK = "rollback"  # the undo of a failed deploy (the value every file already carries)


TRANSACTION_STEPS = (Step.SNAPSHOT, Step.MATERIALIZE, Step.LOAD, Step.READY, Step.SMOKE, Step.BAKE, Step.COMMIT)
VALIDATION_STEPS = (Step.LOAD, Step.READY, Step.SMOKE)


class Outcome(StrEnum):
    COMMITTED = "committed"
    NOOP = "noop"  # the target was already active and served
    ROLLED_BACK = "rolled_back"
    REJECTED = "rejected"  # refused before anything was touched


class Kind(StrEnum):
    """What an attempt was asked for."""

    DEPLOY = "deploy"  # the version an MLflow alias names
    REVERT = "rollback"  # an earlier version by number (`ferry rollback`); the value is the history's own


Flavor = Literal["onnx", "triton"]  # model.onnx (ferry derives the config), or a Triton model directory
Strategy = Literal["beside", "rolling"]  # the candidate loaded beside the active version, or replica by replica
Via = Literal["cli", "airflow", "mlflow"]  # who runs a deploy: the CLI, the DAG's tasks, the MLflow plugin


class ReleaseMember(BaseModel):
    """One model of a release (ferry.core.release): the version of it the release's entry model pins."""

    model: str
    version: int
    run_id: str = ""
    sha256: str = ""
    config_sha256: str = ""

    @property
    def label(self) -> str:
        return f"{self.model} v{self.version}"


class CurrentState(BaseModel):
    active_version: int
    run_id: str
    alias: str | None
    updated_at_utc: str
    model: str
    previous_version: int | None = None
    sha256: str
    deploy_id: str
    previous_warm_until_utc: str | None = None  # previous_version stays loaded, reachable by nothing, until then
    config_sha256: str | None = None  # of the config the active version runs under (None: written before configs)
    members: list[ReleaseMember] = []  # a release: the exact version of every model the active version pins


class Manifest(BaseModel):
    """``<model>/<N>/ferry.json``: where a staged version came from, so that it can be trusted again."""

    model_config = ConfigDict(extra="allow")

    model: str
    version: int
    run_id: str
    source: str = ""
    sha256: str
    size_bytes: int
    deploy_id: str
    staged_at_utc: str
    runtime: str = "python"
    flavor: Flavor = "onnx"
    config_pbtxt: str = ""  # the config the version runs under, without version policy ("": the model's own)
    config_sha256: str = ""
    files: dict[str, str] = {}  # every staged file (relative path) -> its sha256 (the triton flavor)
    members: list[ReleaseMember] = []  # an entry model: the release it is, fixed at its first staging


class QuarantineReason(BaseModel):
    """``reason.json`` beside a quarantined version."""

    deploy_id: str
    model: str
    version: int | None = None
    failed_step: str
    error: str
    hint: str = ""
    detail: str = ""  # the full text behind the one-line error (Triton's own message, with its stack)
    failed_at_utc: str


class Snapshot(BaseModel):
    """What was committed and served when the deploy started: what a rollback restores."""

    model: str
    deploy_id: str
    started_at_utc: str
    current: CurrentState | None
    config_text: str | None
    triton_ready: list[int]  # the versions any replica served
    replicas: dict[str, list[int]] = {}  # each replica (its URL) and the versions it served: the deploy's fleet
    stores: dict[str, list[int]] = {}  # each replica and the versions its store held (served, warm or candidate)

    @property
    def active_version(self) -> int | None:
        return self.current.active_version if self.current else None

    @property
    def replica_urls(self) -> list[str] | None:
        """The replicas this deploy acts on (None in a journal written before fleets: resolve them again)."""
        return list(self.replicas) or None


class Candidate(BaseModel):
    model: str
    version: int
    run_id: str
    alias: str | None
    sha256: str
    size_bytes: int
    config_pbtxt: str  # the model's config (without version policy) the candidate runs under
    already_active: bool = False
    reused: bool = False  # the version directory was staged by an earlier deploy and verified again
    revalidate: bool = False  # the active version, which Triton did not serve: proven and pinned again
    warm: bool = False  # the previous version, still loaded on every replica: served again without a load
    rolled: bool = False  # swapped in replica by replica (a rolling deploy): each replica holds it alone
    members: list[ReleaseMember] = []  # a release: the versions of the models it pins, loaded and proven with it


class Failure(BaseModel):
    """A step's failure as the journal keeps it, so that an interrupted rollback is redone with its reason."""

    step: str
    message: str
    hint: str = ""
    detail: str = ""
    version: int | None = None
    replica: str | None = None
    rejected: bool = False  # the target could not be resolved: nothing was touched, nothing to undo
    retryable: bool = False  # ... because a dependency did not answer


RolloutMode = Literal["shadow", "canary", "rolling"]  # rolling: replicas swap to the candidate batch by batch


class RolloutPlan(BaseModel):
    """A bake asked for: live traffic proves the candidate before the commit."""

    mode: RolloutMode
    bake_s: float  # how long the gate watches before the commit
    canary_percent: float = 0.0  # canary: the share of requests the candidate answers
    mirror_percent: float = 100.0  # shadow: the share of requests copied to the candidate


class RolloutState(BaseModel):
    """``.ferry/<model>/rollout.json``: what the gateways do with the candidate while a deploy bakes, or while
    a rolling deploy swaps the replicas batch by batch. Written atomically; the commit writes current.json
    before removing it, a rollback removes it first (a rolling one once every replica is back)."""

    format: Literal[1] = 1
    model: str
    deploy_id: str
    active_version: int
    candidate_version: int
    plan: RolloutPlan
    started_at_utc: str
    draining: list[str] = []  # rolling: replicas (URLs) the gateways send no new request to, while they swap
    swapped: list[str] = []  # rolling: replicas whose front serves the candidate


class GateFigures(BaseModel):
    """What one version did under live traffic since the bake started (summed over every gateway)."""

    requests: int = 0
    errors: int = 0  # answers with status >= 500
    p95_s: float | None = None
    agreed: int = 0  # shadow: outputs that agreed with the active version's
    disagreed: int = 0

    @property
    def error_ratio(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def agreement(self) -> float | None:
        compared = self.agreed + self.disagreed
        return self.agreed / compared if compared else None


class GateEvaluation(BaseModel):
    at_utc: str
    elapsed_s: float
    verdict: Literal["pass", "fail", "waiting"]  # waiting: too little traffic yet to judge
    reasons: list[str]  # why it failed, or what it waits for
    active: GateFigures
    candidate: GateFigures


class RollbackReport(BaseModel):
    actions: list[str]
    quarantined: list[str]
    verified: bool  # every replica serves exactly the active version again
    serving: list[int]  # the versions served (by any replica)
    problems: list[str]
    replicas: dict[str, list[int]] = {}  # what each replica serves afterwards


class DeployReport(BaseModel):
    """One attempt, as the history keeps it and the adapters show it."""

    deploy_id: str
    model: str
    kind: Kind
    target: str
    outcome: Outcome
    version: int | None = None
    previous_version: int | None = None
    run_id: str | None = None
    failed_step: str | None = None
    failed_replica: str | None = None  # in a fleet, the replica the step failed on
    error: str | None = None  # one line
    hint: str | None = None
    detail: str | None = None  # the full text behind the error, when it had more than one line
    retryable: bool = False  # rejected because a dependency (MLflow, Triton) did not answer: worth retrying
    steps: dict[str, float] = {}
    rollback: RollbackReport | None = None
    current: CurrentState | None = None
    warnings: list[str] = []
    who: str = ""
    started_at_utc: str = ""
    finished_at_utc: str = ""
    recovered_by: str | None = None  # who finished or undid it with `ferry recover`, after its process stopped
    gate: list[GateEvaluation] = []  # the bake's gate evaluations, when a bake was asked for
    config_sha256: str | None = None  # of the config the candidate runs under
    config_changed: bool = False  # the candidate's config differs from the one served before (ferry diff shows how)
    strategy: Strategy = "beside"  # rolling: the swapped replicas answered as the candidate before the commit
    members: list[ReleaseMember] = []  # a release: every member's version, committed or undone with it

    @property
    def ok(self) -> bool:
        return self.outcome in (Outcome.COMMITTED, Outcome.NOOP)


class Owner(BaseModel):
    via: Via  # "cli": one process holds the model's lock throughout; "airflow": one task at a time
    host: str  # host and pid: the process of the step in progress (an Airflow task runs one step)
    pid: int


class JournalRecord(BaseModel):
    """``journal.json``: present exactly while a deploy is unfinished. Format 1 (files without
    ``format`` were written by the same code before the field existed)."""

    format: Literal[1] = 1
    deploy_id: str = ""
    model: str
    kind: Kind
    target: str
    alias: str | None = None
    version: int | None = None
    who: str
    owner: Owner
    started_at_utc: str
    step: Step = Step.SNAPSHOT
    steps: dict[str, float] = {}
    snapshot: Snapshot | None = None
    candidate: Candidate | None = None
    failure: Failure | None = None
    rollout: RolloutPlan | None = None  # a bake asked for
    allow_signature_change: bool = False  # a candidate whose inputs or outputs differ from the active's may deploy
    strategy: Strategy = "beside"
    batch: str = "1"  # rolling: replicas per batch ("2", "25%")
    swapped: list[str] = []  # rolling: the replicas swapped to the candidate (or being swapped), in order
    gate: list[GateEvaluation] = []  # each evaluation of the bake's gate
    gate_baseline: list[dict[str, Any]] = []  # the gateways' counters when the bake started (rollout.dump_counts)
    bake_started_unix: float | None = None


class WriteBackRecord(BaseModel):
    """One line of ``writeback.jsonl``: what MLflow was told of a decided attempt.

    The attempt's history record is written first, so that its end does not wait for MLflow; then the
    write-back runs (the model still held) and leaves this line. A decided attempt with no line here was
    not written back (its process stopped in between): ``ferry sync`` repairs that, and leaves a line too."""

    deploy_id: str  # the attempt told of (for a sync: the commit current.json names, or "")
    model: str
    by: Literal["deploy", "sync"] = "deploy"
    at_utc: str
    seconds: float
    told: bool  # MLflow holds the outcome; False: see the warnings
    warnings: list[str] = []
