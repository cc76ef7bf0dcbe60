"""Adoption over fakes: another tool's marker file, in whatever shape it wrote it, never blocks an adoption that
what Triton serves decides; when nothing serves, the marker's usual keys or ``--version`` say what to adopt."""

from __future__ import annotations

import json
import shutil

import pytest

from ferry.core.adopt import adopt, plan_adoption
from ferry.core.current import read_current
from ferry.core.errors import InvalidInput
from ferry.core.model_config import build_config, read_onnx_signature, to_override_json, to_pbtxt, with_versions
from unit.support import Bench

OLDTOOL_MARKER = {"version": 2, "deployed_by": "oldtool"}


def _legacy(bench: Bench, marker: object | None, serve: bool = True) -> None:
    """Versions 1 and 2 of MLflow copied into the repository by hand, v2 served (or nothing), and the other
    tool's ``<model>/current.json`` (``marker``: a JSON value, raw text, or None for no file)."""
    for _ in (1, 2):
        bench.registry.add("iris")
    model_dir = bench.model_dir
    for version in (1, 2):
        target = model_dir.version_dir(version)
        target.mkdir(parents=True)
        shutil.copyfile(bench.registry.root / "iris" / str(version) / "model.onnx", target / "model.onnx")
    config = with_versions(build_config("iris", read_onnx_signature(model_dir.version_dir(2) / "model.onnx"),
                                        "python"), [2])
    model_dir.config_path.write_text(to_pbtxt(config))
    if marker is not None:
        text = marker if isinstance(marker, str) else json.dumps(marker)
        (model_dir.path / "current.json").write_text(text)
    if serve:
        bench.triton.load("iris", to_override_json(config))


@pytest.mark.parametrize("marker", [OLDTOOL_MARKER, {"deployed_by": "oldtool"}, "v2 by oldtool, not JSON", [2]])
def test_a_served_version_decides_and_the_old_marker_is_only_moved_aside(bench: Bench, marker: object) -> None:
    _legacy(bench, marker)
    written = (bench.model_dir.path / "current.json").read_bytes()
    plan = adopt(bench.ferry, "iris")
    assert plan.active_version == 2 and read_current(bench.model_dir).active_version == 2
    assert not (bench.model_dir.path / "current.json").exists()
    kept = bench.model_dir.state_dir / "adopted" / "current.json"
    assert kept.read_bytes() == written, "the other tool's file is kept as it was"
    assert bench.triton.loads == [("iris", [2])], "adoption loads nothing"


@pytest.mark.parametrize("marker", [{"active_version": 2}, {"version": 2, "deployed_by": "oldtool"},
                                    {"model_version": "2"}, {"version": True, "model_version": 2}])
def test_when_nothing_serves_the_markers_usual_keys_name_the_version(bench: Bench, marker: dict) -> None:
    _legacy(bench, marker, serve=False)
    assert plan_adoption(bench.ferry, "iris").active_version == 2


@pytest.mark.parametrize("marker", [{"deployed_by": "oldtool"}, {"version": "latest"}, "not JSON", None])
def test_when_nothing_serves_and_no_version_is_named_the_refusal_says_what_to_pass(bench: Bench,
                                                                                     marker: object) -> None:
    _legacy(bench, marker, serve=False)
    with pytest.raises(InvalidInput) as refused:
        plan_adoption(bench.ferry, "iris")
    assert "--version N" in refused.value.hint
    if isinstance(marker, dict):
        assert "active_version, version, model_version" in refused.value.message
    assert read_current(bench.model_dir) is None
    adopted = adopt(bench.ferry, "iris", version=2)
    assert adopted.active_version == 2 and read_current(bench.model_dir).active_version == 2


def test_a_version_given_against_what_serves_is_refused(bench: Bench) -> None:
    _legacy(bench, OLDTOOL_MARKER)
    with pytest.raises(InvalidInput, match=r"--version 1 was given, but Triton serves v2"):
        adopt(bench.ferry, "iris", version=1)
    assert read_current(bench.model_dir) is None and (bench.model_dir.path / "current.json").exists()
