"""Prometheus: the config, rules and their promtool unit tests, and the real Prometheus scraping a real Triton."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import ROOT, World, _free_port_block

PROMETHEUS = ROOT / "ops" / "prometheus"
DASHBOARDS = sorted((ROOT / "ops" / "grafana" / "dashboards").glob("*.json"))
RULES = sorted(PROMETHEUS.glob("rules/*.yml"))
RULE_TESTS = sorted(PROMETHEUS.glob("tests/*.yml"))


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args", [
    ["check", "config", "prometheus.yml", "prometheus-fleet.yml"],
    ["check", "rules", *map(str, RULES)],
    ["test", "rules", *map(str, RULE_TESTS)],
], ids=["check-config", "check-rules", "test-rules"])
def test_promtool_accepts_the_config_and_the_rules_and_their_unit_tests_pass(args: list[str]) -> None:
    result = promtool(*args)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_unit_tested_firing_and_not_firing() -> None:
    alerts = {rule["alert"] for path in RULES for group in yaml.safe_load(path.read_text())["groups"]
              for rule in group["rules"] if "alert" in rule}
    firing, quiet = set(), set()
    for path in RULE_TESTS:
        for test in yaml.safe_load(path.read_text())["tests"]:
            for case in test.get("alert_rule_test", []):
                (firing if case["exp_alerts"] else quiet).add(case["alertname"])
    assert alerts and alerts == firing == quiet, f"alerts {alerts}, tested firing {firing}, quiet {quiet}"


def _dashboard_queries() -> list[str]:
    """Every PromQL expression of every dashboard: panel targets and annotations, $model set to iris."""
    queries = []
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        queries += [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
        queries += [a["expr"] for a in dashboard["annotations"]["list"]]
    return [q.replace("$model", "iris") for q in queries]


def _metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (ours are simple: no strings but label values)."""
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", expr)  # label matchers, ranges
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\b\d+(\.\d+)?(e-?\d+)?\b", "", expr)  # numbers, 1e6 included
    words = {m.group() for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr)
             if not expr[m.end():].lstrip().startswith("(")}  # a name followed by ( is a function
    return words - {"and", "or", "unless", "bool", "offset"}


def test_dashboards_are_valid_and_provisionable() -> None:
    assert DASHBOARDS
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        assert dashboard["uid"] and dashboard["title"]
        ids = [panel["id"] for panel in dashboard["panels"]]
        assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids"
        for panel in dashboard["panels"]:
            assert panel["targets"] and panel["datasource"]["uid"] == "${datasource}", panel["title"]
    assert {"p95", "p99"} <= {w for q in _dashboard_queries() for w in re.findall(r"p9[59]", q)}


def _start(command: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT)


def _query(prometheus: str, expr: str) -> list[dict]:
    url = f"{prometheus}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    with urllib.request.urlopen(url, timeout=5) as reply:
        return json.loads(reply.read())["data"]["result"]


def _wait(what: str, check, timeout_s: float = 60.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if result := check():
                return result
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}")


@pytest.fixture
def prometheus(world: World, tmp_path: Path):
    """A real Prometheus scraping this world's Triton and `ferry exporter` every second, with ferry's rules."""
    exporter_port, prometheus_port = _free_port_block(1), _free_port_block(1)
    triton_metrics = urllib.parse.urlsplit(world.settings.triton.metrics_url).netloc
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(path) for path in RULES],
        "scrape_configs": [
            {"job_name": "triton", "static_configs": [{"targets": [triton_metrics]}]},
            {"job_name": "ferry", "scrape_interval": "300ms", "scrape_timeout": "300ms",  # many scrapes, on threads
             "static_configs": [{"targets": [f"127.0.0.1:{exporter_port}"]}]},
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    exporter = subprocess.Popen([sys.executable, "-m", "ferry", "exporter", "--port", str(exporter_port)],
                                env={**os.environ, **world.env()}, stdout=subprocess.DEVNULL)
    process = _start(["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                      f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prometheus_port}"],
                     tmp_path / "prometheus.log")
    url = f"http://127.0.0.1:{prometheus_port}"
    try:
        _wait("Prometheus to be ready", lambda: urllib.request.urlopen(f"{url}/-/ready", timeout=2).status == 200)
        yield url
    finally:
        for child in (process, exporter):
            child.terminate()
            child.wait(timeout=10)


def test_prometheus_sees_p95_per_version_and_alerts_on_a_rolled_back_deploy(world: World, prometheus: str) -> None:
    world.register()
    assert world.deploy().outcome == "committed"
    stop = threading.Event()
    traffic = threading.Thread(target=_traffic, args=(world, stop))
    traffic.start()
    try:
        _check_prometheus(world, prometheus)
    finally:
        stop.set()
        traffic.join()


def _traffic(world: World, stop: threading.Event) -> None:
    """About 100 requests a second to the active version, so that every scrape sees some."""
    triton, sample = world.ferry.triton, {"X": np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32)}
    while not stop.wait(0.01):
        triton.infer("iris", 1, sample, {"X": "FP32"})


def _check_prometheus(world: World, prometheus: str) -> None:

    p95 = _wait("the p95 recording rule over the traffic", lambda: [  # NaN until a scrape saw requests
        r for r in _query(prometheus, 'model_version:triton_request_latency_seconds:p95{model="iris",version="1"}')
        if r["value"][1] != "NaN"])
    assert 1e-5 < float(p95[0]["value"][1]) < 1.0, f"an implausible p95: {p95}"
    rate = _wait("the request rate rule", lambda: [
        r for r in _query(prometheus, 'model_version:triton_requests:rate1m{model="iris"}')
        if float(r["value"][1]) > 0])
    assert rate[0]["metric"]["version"] == "1"
    active = _wait("ferry's active version", lambda: _query(prometheus, 'ferry_active_version{model="iris"}'))
    assert active[0]["value"][1] == "1"
    assert _query(prometheus, 'ferry_drift{model="iris"}')[0]["value"][1] == "0"
    assert not _query(prometheus, 'ALERTS{alertname="FerryDeployRolledBack"}')
    for extra, source in (({}, "triton (since load)"), ({"FERRY_PROMETHEUS_URL": prometheus}, "prometheus (5m)")):
        status = world.cli("status", "iris", "--json", **extra)
        assert status.returncode == 0, status.stderr
        live = json.loads(status.stdout)[0]["live"]
        assert live["source"] == source and 0 < live["p95_ms"] < 1000 and live["failure_ratio"] == 0, live

    world.register("golden-mismatch")
    assert world.deploy().outcome == "rolled_back"
    firing = _wait("FerryDeployRolledBack to fire", lambda: _query(
        prometheus, 'ALERTS{alertname="FerryDeployRolledBack",alertstate="firing"}'))
    assert firing[0]["metric"]["model"] == "iris"
    # Smoke inferences run in the model's store (Triton reports them there); production latency never counts them,
    # so a quiet model's p95 cannot be a deploy's cold smoke request.
    assert _wait("the store's own series",
                 lambda: _query(prometheus, 'nv_inference_request_success{model=~"iris[.]versions[.][0-9]+"}'))
    assert not _query(prometheus, '{__name__=~"model_version:.*",model=~"iris[.]versions.*"}')
    expected = {("committed", None, "1"), ("rolled_back", "smoke", "1")}  # an empty label is no label in Prometheus
    report = world.cli("report", "iris", "--out", str(world.settings.home / "report.png"),
                       FERRY_PROMETHEUS_URL=prometheus)
    assert report.returncode == 0, report.stderr
    assert "2 deploys marked" in report.stdout
    assert (world.settings.home / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    without = world.cli("report", "iris")
    assert without.returncode == 2 and "FERRY_PROMETHEUS_URL is not set" in without.stderr
    for expr in _dashboard_queries():  # Prometheus parses each one (a bad one is an HTTP 400)
        _query(prometheus, expr)
    with urllib.request.urlopen(f"{prometheus}/api/v1/label/__name__/values", timeout=5) as reply:
        scraped = set(json.loads(reply.read())["data"])  # from the real scrapes, and the recording rules over them
    named = {name for expr in _dashboard_queries() for name in _metric_names(expr)}
    assert named and named <= scraped, f"panels name metrics no scrape has: {sorted(named - scraped)}"
    _wait("ferry_deploys_total to count both deploys", lambda: expected == {
        (d["metric"]["outcome"], d["metric"].get("failed_step"), d["value"][1])
        for d in _query(prometheus, 'ferry_deploys_total{model="iris"}')}, timeout_s=20)
    # prometheus_client serves each scrape on a new thread: every one must answer and see Triton. Prometheus'
    # own scrapes may time out on a loaded machine (300 ms): nearly all must succeed here, and every one of 50
    # in a row does in tests/test_user_path.py.
    scrapes = _wait("50 scrapes of the exporter", lambda: [
        r for r in _query(prometheus, 'count_over_time(up{job="ferry"}[5m])') if float(r["value"][1]) >= 50])
    assert float(_query(prometheus, 'avg_over_time(up{job="ferry"}[5m])')[0]["value"][1]) > 0.95, scrapes
    assert _query(prometheus, 'min_over_time(ferry_triton_reachable[5m])')[0]["value"][1] == "1"
