"""What an attempt deploys, as the CLI, the DAG, ``ferry watch`` and the plugin ask for it."""

from __future__ import annotations

from dataclasses import dataclass

from ferry.core.errors import InvalidInput
from ferry.core.records import Kind, RolloutPlan, Strategy
from ferry.core.repository import check_name
from ferry.core.rolling import batch_size
from ferry.core.rollout import check_plan


@dataclass(frozen=True)
class Target:
    """What an attempt deploys: the version an alias names, or an earlier version by number."""

    kind: Kind
    alias: str | None = None
    version: int | None = None
    force: bool = False  # revert to a version even though its last deploy failed
    rollout: RolloutPlan | None = None  # bake the candidate on live traffic before the commit
    allow_signature_change: bool = False  # deploy a candidate whose inputs or outputs differ from the active's
    strategy: Strategy = "beside"  # rolling: replica by replica, for a model that fits only once per replica
    batch: str = "1"  # rolling: replicas per batch ("2", "25%")

    @classmethod
    def of_alias(cls, alias: str, rollout: RolloutPlan | None = None, allow_signature_change: bool = False,
                 strategy: Strategy = "beside", batch: str = "1") -> Target:
        check_strategy(strategy, batch)
        if strategy == "rolling" and rollout is not None:
            rollout = _per_batch(rollout)
        return cls(Kind.DEPLOY, alias=check_name("alias", alias), rollout=rollout and check_plan(rollout),
                   allow_signature_change=allow_signature_change, strategy=strategy, batch=batch)

    @classmethod
    def of_version(cls, version: int, force: bool = False, rollout: RolloutPlan | None = None,
                   strategy: Strategy = "beside", batch: str = "1") -> Target:
        if version < 1:
            raise InvalidInput(f"version {version} is not a model version", "versions are numbered from 1")
        check_strategy(strategy, batch)
        return cls(Kind.REVERT, version=version, force=force, rollout=rollout and check_plan(rollout),
                   strategy=strategy, batch=batch)

    @property
    def label(self) -> str:
        return f"@{self.alias}" if self.alias is not None else f"v{self.version}"


def check_strategy(strategy: Strategy, batch: str) -> None:
    """A batch is a rolling deploy's: refused with any other strategy, and refused unless it reads as one,
    before anything runs (how many replicas it leaves serving is checked once they are known)."""
    if strategy != "rolling" and batch != "1":
        raise InvalidInput(f"--batch {batch!r} applies to rolling deploys only", "add --strategy rolling, or leave out "
                           "--batch (a deploy beside the active version loads on every replica at once)")
    batch_size(1, batch)


def _per_batch(plan: RolloutPlan) -> RolloutPlan:
    """A rolling deploy bakes each batch once it is swapped: the batch is the candidate's share of the traffic."""
    if plan.mode == "shadow":
        raise InvalidInput("a rolling deploy bakes each batch on the traffic it answers, not on copies",
                           "give --bake DURATION with --strategy rolling (no --shadow)")
    return RolloutPlan(mode="rolling", bake_s=plan.bake_s)
