"""A fleet of replicas over fakes: all prove the candidate or none serves it; reconcile per replica; DNS."""

from __future__ import annotations

import numpy as np
import pytest

from ferry.core.addresses import Endpoint, ReplicaSource, parse_replica_sources
from ferry.core.current import read_current
from ferry.core.errors import TritonError
from ferry.core.fleet import resolve_replicas
from ferry.core.reconcile import reconcile
from ferry.core.records import Outcome
from ferry.core.services import Services
from unit.fakes import FakeTriton
from unit.support import Bench


class RefusesToServeOnly(FakeTriton):
    """A replica that loads the candidate beside the active version but refuses to repoint its front to it."""

    refuse = True

    def load(self, model: str, config_json: str, files: dict[str, bytes] | None = None) -> None:
        if self.refuse and model == "iris" and '"2"' in config_json:
            raise TritonError(f"Triton refused loading '{model}': out of memory (fake)")
        super().load(model, config_json, files)


@pytest.fixture
def replicas(bench: Bench) -> list[FakeTriton]:
    return [bench.triton] + [FakeTriton(bench.settings.repository, url=f"http://replica-{i}:8000") for i in (1, 2)]


def _ferry(bench: Bench, replicas: list[FakeTriton]) -> Services:
    return Services(bench.settings, given_replicas=replicas, given_registry=bench.registry)


def _deploy(bench: Bench, replicas: list[FakeTriton], **kwargs: object):
    from ferry.core.runner import deploy

    return deploy(_ferry(bench, replicas), "iris", alias="champion", **kwargs)


def test_every_replica_loads_proves_and_serves_the_new_version(bench: Bench, replicas: list[FakeTriton]) -> None:
    bench.registry.add("iris", "champion")
    assert _deploy(bench, replicas).outcome == Outcome.COMMITTED
    bench.registry.add("iris", "champion")
    report = _deploy(bench, replicas)
    assert report.outcome == Outcome.COMMITTED
    assert all(r.ready_versions("iris") == [2] for r in replicas)
    # The candidate into its own store beside v1's; at the commit its store as it is, the front repointed, v1 unloaded.
    assert all(r.loads[-3:] == [("iris.versions.2", [2]), ("iris.versions.2", [2]), ("iris", [2])]
               and r.unloads[-1:] == ["iris.versions.1"] for r in replicas)


@pytest.mark.parametrize("fault", ["load", "smoke"])
def test_a_candidate_failing_on_one_replica_is_rolled_back_on_all(bench: Bench, replicas: list[FakeTriton],
                                                                  fault: str) -> None:
    bench.registry.add("iris", "champion")
    _deploy(bench, replicas)
    bench.registry.add("iris", "champion")
    if fault == "load":
        replicas[2].fail_load[2] = "bad graph on this replica only"
    else:
        replicas[2].wrong_outputs[2] = {"Y": np.zeros((2, 3), dtype=np.float32)}
    report = _deploy(bench, replicas)
    assert (report.outcome, report.failed_step, report.failed_replica) == (Outcome.ROLLED_BACK, fault,
                                                                           "http://replica-2:8000")
    assert report.rollback.verified and report.rollback.replicas == {r.url: [1] for r in replicas}
    assert all(r.ready_versions("iris") == [1] for r in replicas)
    assert read_current(bench.model_dir).active_version == 1


def test_an_unreachable_replica_rejects_the_deploy_before_anything(bench: Bench, replicas: list[FakeTriton]) -> None:
    bench.registry.add("iris", "champion")
    _deploy(bench, replicas)
    bench.registry.add("iris", "champion")
    replicas[1].unreachable = True
    loads = [len(r.loads) for r in replicas]
    report = _deploy(bench, replicas)
    assert report.outcome == Outcome.REJECTED and "on replica http://replica-1:8000" in report.error
    assert report.retryable and [len(r.loads) for r in replicas] == loads


def test_a_replica_that_cannot_pin_after_the_commit_is_drift_not_a_rollback(bench: Bench,
                                                                              replicas: list[FakeTriton]) -> None:
    bench.registry.add("iris", "champion")
    _deploy(bench, replicas)
    bench.registry.add("iris", "champion")
    replicas[1] = RefusesToServeOnly(bench.settings.repository, url=replicas[1].url, models=replicas[1].models)
    report = _deploy(bench, replicas)
    assert report.outcome == Outcome.COMMITTED and read_current(bench.model_dir).active_version == 2
    assert any("replica http://replica-1:8000" in w and "ferry reconcile" in w for w in report.warnings)
    assert replicas[1].placement("iris").store == [1, 2], "still holding both: drift"
    replicas[1].refuse = False
    result = reconcile(_ferry(bench, replicas), "iris")
    assert result.action == "loaded" and result.replicas == {r.url: [2] for r in replicas}


def test_reconcile_brings_a_restarted_replica_back_and_leaves_the_others(bench: Bench,
                                                                        replicas: list[FakeTriton]) -> None:
    bench.registry.add("iris", "champion")
    _deploy(bench, replicas)
    replicas[0].models.clear()  # restarted: explicit mode serves nothing
    loads = [len(r.loads) for r in replicas]
    result = reconcile(_ferry(bench, replicas), "iris")
    assert result.action == "loaded" and "all 3 replicas serve v1" in result.detail
    assert [len(r.loads) for r in replicas] == [loads[0] + 2, loads[1], loads[2]], "its store and front only"
    assert reconcile(_ferry(bench, replicas), "iris").action == "in place"


def test_a_model_triton_serves_without_ferrys_state_is_refused_with_a_pointer_to_adopt(bench: Bench) -> None:
    bench.registry.add("iris", "champion")
    bench.triton.models["iris"] = {7: "READY"}  # deployed by another tool
    report = bench.deploy()
    assert report.outcome == Outcome.REJECTED and "Triton serves v7 of 'iris'" in report.error
    assert "ferry adopt iris" in report.hint and bench.triton.ready_versions("iris") == [7]


def test_replica_lists_and_dns_names_resolve_each_replica_once() -> None:
    sources = parse_replica_sources("http://a:8000, http://b:8000,http://a:8000, dns+http://localhost:8000")
    assert sources == (ReplicaSource(Endpoint("a", 8000)), ReplicaSource(Endpoint("b", 8000)),
                       ReplicaSource(Endpoint("localhost", 8000), dns=True))
    resolved = resolve_replicas(sources)
    assert resolved[:2] == [Endpoint("a", 8000), Endpoint("b", 8000)]
    assert resolved[2:] in ([Endpoint("127.0.0.1", 8000)], [Endpoint("::1", 8000)]), "localhost counts once"
