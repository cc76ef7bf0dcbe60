"""What the ferry command imports to answer a command that only reads files, or asks Triton what it serves
(docs/design.md, Layers: the CLI is a thin adapter; docs/benchmarks.md, "A cold command line"). Each command
runs in a new interpreter, as a user's shell starts it, and reports its sys.modules and its exit code."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

# Modules a file-reading command has no use for; each costs from 0.1 s (onnx) to over 2 s (mlflow) to import.
NEVER = ("mlflow", "onnx", "onnxruntime")
# What `ferry status` has no use for either: it reads files and Triton's repository index (one POST by
# http.client), and no model config. tritonclient brings numpy and gevent (0.1 s), its grpc package gRPC.
NOT_FOR_STATUS = (*NEVER, "tritonclient", "numpy", "grpc", "gevent", "geventhttpclient", "google")
# What `ferry --help` has no use for: no settings, no repository, no records.
NOT_FOR_HELP = (*NOT_FOR_STATUS, "pydantic", "filelock", "prometheus_client")
HELP_CORE = ("ferry.core.repository", "ferry.core.records", "ferry.core.runner", "ferry.core.services")

_PROBE = """
import json, sys
from ferry.adapters.cli import main
sys.argv = ["ferry", *json.loads(sys.argv[1])]
code = 0
try:
    main()
except SystemExit as exit:
    code = exit.code or 0
print(json.dumps({"code": code, "modules": sorted(sys.modules)}), file=sys.stderr)
"""


@dataclass
class Answer:
    code: int
    modules: set[str]
    stdout: str
    stderr: str

    def loaded(self, packages: tuple[str, ...]) -> list[str]:
        return sorted(m for m in self.modules if m.split(".")[0] in packages)


def _run(argv: list[str], repository: Path, **env: str) -> Answer:
    done = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(argv)], capture_output=True, text=True,
                          timeout=60, env={"FERRY_REPOSITORY": str(repository), "PATH": "/usr/bin:/bin", **env})
    *said, last = done.stderr.strip().splitlines()
    report = json.loads(last)
    assert "ferry.adapters.cli" in report["modules"], "the probe did not run ferry's command"
    return Answer(report["code"], set(report["modules"]), done.stdout, "\n".join(said))


def _committed(repository: Path, model: str) -> None:
    """A model directory and the current.json a deploy leaves, so that status reads it and asks for live figures."""
    (repository / model).mkdir(parents=True)
    state = repository / ".ferry" / model
    state.mkdir(parents=True)
    (state / "current.json").write_text(json.dumps({
        "active_version": 3, "run_id": "0123456789abcdef", "alias": "champion", "updated_at_utc": "20261202T000000",
        "model": model, "previous_version": 2, "sha256": "0" * 64, "deploy_id": "d1"}))


def _closed_port() -> int:
    """A loopback port nothing listens on (the kernel's pick, released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("argv", [["--help"], ["history", "m"], ["history", "m", "--json"]])
def test_a_file_reading_command_imports_no_mlflow_and_no_onnx(argv: list[str], tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    answer = _run(argv, tmp_path)
    assert answer.code == 0, answer.stderr
    loaded = answer.loaded(NOT_FOR_STATUS)
    assert not loaded, f"`ferry {' '.join(argv)}` imported {loaded[:5]}: import them inside the command that uses them"
    assert "ferry.core.triton" not in answer.modules, "a command that reads files has no use for Triton's API"


def test_help_imports_no_settings_repository_or_transaction(tmp_path: Path) -> None:
    answer = _run(["--help"], tmp_path)
    assert answer.code == 0 and "deploy" in answer.stdout and "status" in answer.stdout, answer.stdout
    loaded = answer.loaded(NOT_FOR_HELP) + sorted(m for m in answer.modules if m in HELP_CORE)
    assert not loaded, f"`ferry --help` imported {loaded[:5]}: each command imports the core it runs in its body"


@pytest.mark.parametrize("argv", [["status"], ["status", "m"], ["status", "m", "--json"]])
def test_status_against_no_triton_answers_and_imports_no_triton_client(argv: list[str], tmp_path: Path) -> None:
    _committed(tmp_path, "m")
    url = f"http://127.0.0.1:{_closed_port()}"
    answer = _run(argv, tmp_path, FERRY_TRITON_URL=url)
    assert answer.code == 3, f"a replica that did not answer is exit 3 (ask again later): {answer.stderr}"
    assert f"Triton at {url} is not reachable (the repository index)" in answer.stderr + answer.stdout
    if "--json" in argv:
        [status] = json.loads(answer.stdout)
        assert status["current"]["active_version"] == 3 and status["drift"] == "unknown"
        assert "Connection refused" in status["replicas"][0]["error"]
    else:
        assert "v3" in answer.stdout and "unreachable" in answer.stdout and "unknown" in answer.stdout
    assert "Traceback" not in answer.stderr
    loaded = answer.loaded(NOT_FOR_STATUS)
    assert not loaded, f"`ferry {' '.join(argv)}` imported {loaded[:5]}: status asks Triton by http.client"


def test_status_names_something_that_is_not_triton(tmp_path: Path, not_triton: str) -> None:
    _committed(tmp_path, "m")
    answer = _run(["status", "m"], tmp_path, FERRY_TRITON_URL=not_triton)
    port = not_triton.rsplit(":", 1)[1]
    assert answer.code == 3 and "unknown" in answer.stdout, answer.stdout
    assert f"something at 127.0.0.1:{port} answers HTTP (status 501) but is not Triton" in answer.stderr
    assert "<html" not in answer.stderr.lower() and "Traceback" not in answer.stderr
    assert not answer.loaded(NOT_FOR_STATUS)


_SAME_CONFIG_CLASS = """
import json, sys
from ferry.core.model_config import Signature, TensorSpec, build_config, from_pbtxt, to_pbtxt
before = sorted(m for m in sys.modules if m.startswith(("tritonclient", "grpc", "numpy")))
spec = TensorSpec("x", "FP32", (-1, 4))
config = build_config("m", Signature((spec,), (spec,)), "onnxruntime")
loaded = sorted(m for m in sys.modules if m.startswith(("tritonclient", "grpc", "numpy")))
import tritonclient.grpc
from tritonclient.grpc import model_config_pb2
print(json.dumps({"before": before, "loaded": loaded, "same": type(config) is model_config_pb2.ModelConfig,
                  "round_trip": from_pbtxt(to_pbtxt(config)) == config}))
"""


def test_a_config_loads_tritons_generated_module_alone_and_it_is_the_one_tritonclient_uses() -> None:
    done = subprocess.run([sys.executable, "-c", _SAME_CONFIG_CLASS], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert found["before"] == [], "model_config_pb2 is loaded at the first use of a config, not on import"
    assert found["loaded"] == ["tritonclient.grpc.model_config_pb2"], "a config needs neither gRPC nor numpy"
    assert found["same"] and found["round_trip"], "one ModelConfig class, whichever module imported it first"
