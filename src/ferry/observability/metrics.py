"""ferry's Prometheus metrics, computed at each scrape from the files that are the truth.

Deploys run as one-shot processes (the CLI, Airflow tasks) on any host, so counters kept in their
memory would vanish with them, and a Pushgateway would keep only the last push. The history
(append-only, one line per attempt) already counts every deploy; ``current.json`` names the active
version; Triton says what it serves. So the exporter reads those: its counters survive restarts and
are the same on every replica. History files are read incrementally (only the lines added since the
last scrape).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.registry import Collector

from ferry.core.config import Settings
from ferry.core.current import read_current
from ferry.core.errors import FerryError, InvalidInput
from ferry.core.fleet import Fleet
from ferry.core.records import TRANSACTION_STEPS, Step, parse_utc_stamp
from ferry.core.release import missing_members
from ferry.core.repository import ModelDir
from ferry.core.status import list_models, replica_indexes
from ferry.core.triton import RepositoryIndex, placement


@dataclass
class _HistoryTally:
    """What one model's history.jsonl has said so far, and how far it was read."""

    inode: int = 0
    offset: int = 0
    deploys: Counter = field(default_factory=Counter)  # (outcome, failed_step) -> count
    rollbacks: Counter = field(default_factory=Counter)  # verified ("true" | "false") -> count
    step_sum: Counter = field(default_factory=Counter)  # step -> seconds
    step_count: Counter = field(default_factory=Counter)  # step -> count
    last_at: dict[str, float] = field(default_factory=dict)  # outcome -> UNIX time of the latest
    last_gate_failure: float = 0.0  # UNIX time of the latest deploy a bake's gate rolled back (0: none)

    def add(self, record: dict) -> None:
        outcome = record.get("outcome", "unknown")
        self.deploys[(outcome, record.get("failed_step") or "")] += 1
        if record.get("rollback") is not None:
            self.rollbacks["true" if record["rollback"].get("verified") else "false"] += 1
        for step, seconds in (record.get("steps") or {}).items():
            self.step_sum[step] += seconds
            self.step_count[step] += 1
        finished = record.get("finished_at_utc") or record.get("started_at_utc")
        if finished:
            at = parse_utc_stamp(finished).timestamp()
            self.last_at[outcome] = max(self.last_at.get(outcome, 0.0), at)
            if record.get("failed_step") == Step.BAKE:
                self.last_gate_failure = max(self.last_gate_failure, at)


class FerryCollector(Collector):
    """``fleet``: how to find the replicas at each scrape (a DNS name may list other pods each time)."""

    def __init__(self, settings: Settings, fleet: Callable[[], Fleet] | None = None) -> None:
        self.settings = settings
        self.fleet = fleet
        self._tallies: dict[str, _HistoryTally] = {}

    def _tally(self, model_dir: ModelDir) -> _HistoryTally:
        tally = self._tallies.setdefault(model_dir.model, _HistoryTally())
        try:
            stat = os.stat(model_dir.history_path)
        except FileNotFoundError:
            return tally
        if stat.st_ino != tally.inode or stat.st_size < tally.offset:  # replaced or truncated: count again
            tally = self._tallies[model_dir.model] = _HistoryTally(inode=stat.st_ino)
        with open(model_dir.history_path, "rb") as history:
            history.seek(tally.offset)
            data = history.read()
        complete = data[: data.rfind(b"\n") + 1]  # a line still being written is read next time
        for line in complete.splitlines():
            try:
                tally.add(json.loads(line))
            except ValueError:  # an empty or damaged line: `ferry history` shows the file as it is
                continue
        tally.offset += len(complete)
        return tally

    def _indexes(self) -> dict[str, RepositoryIndex | FerryError]:
        """Each replica's repository index (or its error), one call per replica per scrape."""
        if self.fleet is None:
            return {}
        try:
            return replica_indexes(self.fleet())
        except FerryError:  # the replicas' DNS name does not resolve: no replica to report
            return {}

    def collect(self) -> Iterator[Metric]:
        deploys = CounterMetricFamily("ferry_deploys", "Deploy attempts by outcome and failed step",
                                      labels=["model", "outcome", "failed_step"])
        rollbacks = CounterMetricFamily("ferry_rollbacks", "Automatic rollbacks, by whether the restored "
                                        "state was verified in Triton", labels=["model", "verified"])
        steps = SummaryMetricFamily("ferry_deploy_step_seconds", "Time spent in each deploy step",
                                    labels=["model", "step"])
        last = GaugeMetricFamily("ferry_last_deploy_timestamp_seconds", "When the latest attempt of each outcome "
                                 "ended (UNIX time)", labels=["model", "outcome"])
        active = GaugeMetricFamily("ferry_active_version", "The version current.json commits", labels=["model"])
        drift = GaugeMetricFamily("ferry_drift", "1 when a replica serves other versions than current.json "
                                  "commits", labels=["model", "replica"])
        triton_up = GaugeMetricFamily("ferry_triton_reachable", "1 when the replica answered the exporter's last "
                                      "query", labels=["replica"])
        baking = GaugeMetricFamily("ferry_bake_in_progress", "1 while a deploy bakes its candidate on live traffic",
                                   labels=["model"])
        gate_failed = GaugeMetricFamily("ferry_last_gate_failure_timestamp_seconds", "When a bake's gate last "
                                        "rolled a deploy back (UNIX time; 0: never)", labels=["model"])
        members = GaugeMetricFamily("ferry_release_member", "1 for each member version a committed release pins "
                                    "(its entry model, the member, its version)", labels=["model", "member", "version"])
        indexes = self._indexes()
        for model in list_models(self.settings.repository):
            model_dir = ModelDir(self.settings.repository, model)
            tally = self._tally(model_dir)
            for (outcome, failed_step), n in tally.deploys.items():
                deploys.add_metric([model, outcome, failed_step], n)
            for verified in ("true", "false"):  # both from the start, so that increase() sees the first one
                rollbacks.add_metric([model, verified], tally.rollbacks[verified])
            for step in [s for s in (*TRANSACTION_STEPS, Step.ROLLBACK) if tally.step_count[s]]:
                steps.add_metric([model, step], tally.step_count[step], tally.step_sum[step])
            for outcome, at in tally.last_at.items():
                last.add_metric([model, outcome], at)
            baking.add_metric([model], float(model_dir.rollout_path.exists()))
            gate_failed.add_metric([model], tally.last_gate_failure)
            try:
                current = read_current(model_dir)
            except FerryError:
                current = None
            if current is not None:
                active.add_metric([model], current.active_version)
            pinned = current.members if current else []
            for member in pinned:
                members.add_metric([model, member.model, str(member.version)], 1.0)
            committed = [current.active_version] if current else []
            for replica, index in indexes.items():
                if not isinstance(index, FerryError):  # a release drifts too when a replica lacks a member store
                    astray = placement(index, model).serving != committed or bool(missing_members(index, pinned))
                    drift.add_metric([model, replica], float(astray))
        for replica, index in indexes.items():
            triton_up.add_metric([replica], float(not isinstance(index, FerryError)))
        yield from (deploys, rollbacks, steps, last, active, drift, triton_up, baking, gate_failed, members)


def write_textfile(path: Path, collector: FerryCollector) -> None:
    """The metrics in the text format, for node_exporter's textfile collector (written atomically)."""
    from prometheus_client import CollectorRegistry, write_to_textfile

    if not path.parent.is_dir():
        raise InvalidInput(f"cannot write {path}: the folder {path.parent} does not exist",
                           "create it (node_exporter reads the folder named by --collector.textfile.directory)")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    write_to_textfile(str(path), registry)
