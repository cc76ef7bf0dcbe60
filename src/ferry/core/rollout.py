"""The bake: a candidate proven on live traffic between smoke and commit, and the gate that judges it.

``rollout.json`` tells every gateway what to do with the candidate (mirror a share of the requests to
it in ``shadow`` mode, or let it answer a share of them in ``canary`` mode). The gate reads what the
gateways counted (their ``/metrics``, summed over every gateway in FERRY_GATEWAYS, or Prometheus)
since the bake started, and compares the candidate with the active version:

- at least ``gate_min_requests`` candidate requests, else it waits; at the end of the bake, too little
  traffic fails closed (inconclusive);
- error ratio at most max(active's + ``gate_error_margin``, ``gate_max_error_ratio``);
- p95 latency at most ``gate_latency_factor`` x the active's + ``gate_latency_slack_ms``;
- shadow: output agreement at least ``gate_min_agreement``.

``gate_failures`` consecutive failed evaluations end the bake at once: the deploy is rolled back.
"""

from __future__ import annotations

import json
import os
import re
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ferry.core.config import Settings
from ferry.core.errors import InvalidInput, StepFailed
from ferry.core.fsutil import atomic_write
from ferry.core.records import GateEvaluation, GateFigures, RolloutPlan, RolloutState, Step, utc_stamp
from ferry.core.repository import ModelDir

# The gateway's role label of the candidate's requests (rolling: those answered by a swapped replica).
ROLES = {"shadow": "shadow", "canary": "candidate", "rolling": "candidate"}
METRIC_TIMEOUT_S = 5.0
Counts = dict[tuple[str, str, str], "Tally"]  # (version, role, kind) -> tally


def check_plan(plan: RolloutPlan) -> RolloutPlan:
    if plan.bake_s <= 0:
        raise InvalidInput(f"a bake of {plan.bake_s:g} s proves nothing", "give --bake (or --shadow) a duration")
    if plan.mode == "canary" and not 0 < plan.canary_percent <= 50:
        raise InvalidInput(f"a canary of {plan.canary_percent:g}% is not a canary", "give --canary 1 to 50 (percent)")
    if plan.mode == "shadow" and not 0 < plan.mirror_percent <= 100:
        raise InvalidInput(f"--mirror {plan.mirror_percent:g} is not a share of requests", "give 1 to 100 (percent)")
    return plan


# ---------------------------------------------------------------- rollout.json


def write_rollout(model_dir: ModelDir, state: RolloutState) -> None:
    atomic_write(model_dir.rollout_path, state.model_dump_json(indent=1).encode())


def read_rollout(model_dir: ModelDir) -> RolloutState | None:
    try:
        return RolloutState.model_validate_json(model_dir.rollout_path.read_text())
    except FileNotFoundError:
        return None


def remove_rollout(model_dir: ModelDir) -> bool:
    """Remove rollout.json (durably: no gateway may route to the candidate after a decision); True if it existed."""
    try:
        os.unlink(model_dir.rollout_path)
    except FileNotFoundError:
        return False
    return True


def request_control(model_dir: ModelDir, action: str, who: str) -> None:
    """`ferry rollout promote|abort`: tell the process that runs the bake (it looks every 0.2 s)."""
    atomic_write(model_dir.rollout_control_path, json.dumps({"action": action, "by": who}).encode())


def take_control(model_dir: ModelDir) -> dict[str, Any] | None:
    try:
        control = json.loads(model_dir.rollout_control_path.read_text())
    except (FileNotFoundError, ValueError):
        return None
    model_dir.rollout_control_path.unlink(missing_ok=True)
    return control if isinstance(control, dict) else None


# ---------------------------------------------------------------- figures


@dataclass
class Tally:
    value: float = 0.0
    buckets: dict[float, float] = field(default_factory=dict)  # histogram: upper bound -> cumulative count


def read_counts(settings: Settings, model: str) -> Counts:
    """The gateways' counters for ``model``, summed over every gateway (cumulative since each started)."""
    counts: Counts = {}
    for url in gateway_urls(settings):
        try:
            with urllib.request.urlopen(f"{url.rstrip('/')}/metrics", timeout=METRIC_TIMEOUT_S) as reply:
                text = reply.read().decode()
        except OSError:
            continue  # a gateway that is down serves nothing: its share is in the others' counts
        _add_samples(counts, text, model)
    return counts


def gateway_urls(settings: Settings) -> list[str]:
    listed = [u.strip() for u in settings.bake.gateways.split(",") if u.strip()]
    return listed or [f"http://{settings.gateway.host}:{settings.gateway.port}"]


SAMPLE = re.compile(r'^(?P<name>ferry_gateway_[a-z_]+)\{(?P<labels>[^}]*)\} (?P<value>\S+)')
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def _add_samples(counts: Counts, text: str, model: str) -> None:
    """The gateway's samples of ``model`` (Prometheus' text format, the few lines the gate reads)."""
    for line in text.splitlines():
        if not (match := SAMPLE.match(line)):
            continue
        labels = dict(LABEL.findall(match["labels"]))
        if labels.get("model") != model:
            continue
        name, value = match["name"], float(match["value"])
        key = (labels.get("version", ""), labels.get("role", "active"))
        if name == "ferry_gateway_requests_total":
            kind = "errors" if labels.get("code", "").startswith("5") else "ok"
            counts.setdefault((*key, kind), Tally()).value += value
        elif name == "ferry_gateway_request_seconds_bucket" and "le" in labels:
            tally = counts.setdefault((*key, "latency"), Tally())
            bound = float(labels["le"])
            tally.buckets[bound] = tally.buckets.get(bound, 0.0) + value
        elif name == "ferry_gateway_shadow_comparisons_total":
            counts.setdefault((key[0], "shadow", labels.get("result", "")), Tally()).value += value


def dump_counts(counts: Counts) -> list[dict[str, Any]]:
    """Counts as JSON (kept in the journal, so that a bake spread over processes measures from its start)."""
    return [{"key": list(key), "value": tally.value, "buckets": [[b, c] for b, c in tally.buckets.items()]}
            for key, tally in counts.items()]


def load_counts(entries: list[dict[str, Any]]) -> Counts:
    return {tuple(e["key"]): Tally(e["value"], {float(b): c for b, c in e["buckets"]}) for e in entries}


def figures(now: Counts, start: Counts, version: int, role: str) -> GateFigures:
    """What ``version`` in ``role`` did between the two readings."""
    def delta(kind: str) -> float:
        key = (str(version), role, kind)
        return now.get(key, Tally()).value - start.get(key, Tally()).value

    ok, errors = delta("ok"), delta("errors")
    return GateFigures(requests=int(ok + errors), errors=int(errors),
                       p95_s=_p95(now.get((str(version), role, "latency")), start.get((str(version), role, "latency"))),
                       agreed=int(delta("agree")) if role == "shadow" else 0,
                       disagreed=int(delta("disagree")) if role == "shadow" else 0)


def _p95(now: Tally | None, start: Tally | None) -> float | None:
    if now is None:
        return None
    base = start.buckets if start else {}
    buckets = sorted((bound, count - base.get(bound, 0.0)) for bound, count in now.buckets.items())
    total = buckets[-1][1] if buckets else 0.0
    if total <= 0:
        return None
    previous_bound, previous_count = 0.0, 0.0
    for bound, count in buckets:  # linear inside the bucket, as Prometheus' histogram_quantile does
        if count >= 0.95 * total:
            if bound == float("inf"):
                return previous_bound
            share = (0.95 * total - previous_count) / max(count - previous_count, 1e-9)
            return previous_bound + (bound - previous_bound) * share
        previous_bound, previous_count = bound, count
    return previous_bound


# ---------------------------------------------------------------- the gate


def evaluate(settings: Settings, active: GateFigures, candidate: GateFigures, elapsed_s: float,
             shadow: bool) -> GateEvaluation:
    reasons = []
    if candidate.requests < settings.bake.min_requests:
        reasons.append(f"{candidate.requests} candidate requests so far, the gate needs {settings.bake.min_requests}")
        return GateEvaluation(at_utc=utc_stamp(), elapsed_s=round(elapsed_s, 2), verdict="waiting", reasons=reasons,
                              active=active, candidate=candidate)
    allowed = max(active.error_ratio + settings.bake.error_margin, settings.bake.max_error_ratio)
    if candidate.error_ratio > allowed:
        reasons.append(f"error ratio {candidate.error_ratio:.2%} over {allowed:.2%} "
                       f"(active {active.error_ratio:.2%})")
    if candidate.p95_s is not None and active.p95_s is not None:
        limit = settings.bake.latency_factor * active.p95_s + settings.bake.latency_slack_ms / 1000
        if candidate.p95_s > limit:
            reasons.append(f"p95 {candidate.p95_s * 1000:.1f} ms over {limit * 1000:.1f} ms "
                           f"(active {active.p95_s * 1000:.1f} ms)")
    agreement = candidate.agreement
    if shadow and agreement is not None and agreement < settings.bake.min_agreement:
        reasons.append(f"outputs agree with the active version's {agreement:.1%} of the time, "
                       f"under {settings.bake.min_agreement:.0%}")
    return GateEvaluation(at_utc=utc_stamp(), elapsed_s=round(elapsed_s, 2), verdict="fail" if reasons else "pass",
                          reasons=reasons, active=active, candidate=candidate)


def failing_streak(evaluations: Iterable[GateEvaluation]) -> int:
    streak = 0
    for evaluation in evaluations:
        streak = streak + 1 if evaluation.verdict == "fail" else 0
    return streak


def decide(evaluations: list[GateEvaluation], failures_needed: int, version: int, ended: bool) -> StepFailed | None:
    """The bake's failure, if the gate decided one: ``failures_needed`` failed evaluations in a row, a failed
    last evaluation, or too little traffic by the end (fail closed). None: go on (or, once ended, commit)."""
    last = evaluations[-1]
    if last.verdict == "fail" and (ended or failing_streak(evaluations) >= failures_needed):
        return StepFailed(Step.BAKE, f"the gate failed for v{version}: {'; '.join(last.reasons)}",
                          "see the figures in reason.json; fix the version and deploy again", version=version,
                          detail=last.model_dump_json())
    if ended and last.verdict == "waiting":
        return StepFailed(Step.BAKE, f"inconclusive: {last.reasons[0]} by the end of the bake, so v{version} "
                          "is not committed (the gate fails closed)",
                          "bake longer, or when there is traffic; or lower FERRY_GATE_MIN_REQUESTS", version=version,
                          detail=last.model_dump_json())
    return None



def in_flight(settings: Settings, replicas: list[str]) -> int | None:
    """Requests the gateways have sent to ``replicas`` and not yet seen answered (their
    ``ferry_gateway_in_flight`` gauge, summed); None when a gateway did not answer (nothing to wait for:
    a gateway that is down sends nothing)."""
    wanted, total = set(replicas), 0
    for url in gateway_urls(settings):
        try:
            with urllib.request.urlopen(f"{url.rstrip('/')}/metrics", timeout=METRIC_TIMEOUT_S) as reply:
                text = reply.read().decode()
        except OSError:
            return None
        for line in text.splitlines():
            match = SAMPLE.match(line)
            if match and match["name"] == "ferry_gateway_in_flight" \
                    and dict(LABEL.findall(match["labels"])).get("replica") in wanted:
                total += int(float(match["value"]))
    return total
