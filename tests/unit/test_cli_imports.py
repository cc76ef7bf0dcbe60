"""What the ferry command imports to answer a command that only reads files (docs/design.md, Layers: the CLI is a
thin adapter). Each command runs in a new interpreter, as a user's shell starts it, and reports its sys.modules."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

# Modules a file-reading command has no use for; each costs from 0.1 s (onnx) to over 2 s (mlflow) to import.
NEVER = ("mlflow", "onnx", "onnxruntime")

_PROBE = """
import json, sys
from ferry.adapters.cli import main
sys.argv = ["ferry", *json.loads(sys.argv[1])]
try:
    main()
except SystemExit:
    pass
print(json.dumps(sorted(sys.modules)), file=sys.stderr)
"""


def _imported(argv: list[str], repository: Path) -> set[str]:
    done = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(argv)], capture_output=True, text=True,
                          timeout=60, env={"FERRY_REPOSITORY": str(repository), "PATH": "/usr/bin:/bin"})
    return set(json.loads(done.stderr.strip().splitlines()[-1]))


@pytest.mark.parametrize("argv", [["--help"], ["history", "m"], ["history", "m", "--json"]])
def test_a_file_reading_command_imports_no_mlflow_and_no_onnx(argv: list[str], tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    modules = _imported(argv, tmp_path)
    assert "ferry.adapters.cli" in modules, "the probe did not run ferry's command"
    loaded = sorted(m for m in modules if m.split(".")[0] in NEVER)
    assert not loaded, f"`ferry {' '.join(argv)}` imported {loaded[:5]}: import them inside the command that uses them"
