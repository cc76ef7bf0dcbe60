"""The gateway checks each request against the config of the version it routes to: the committed version's
(from its manifest, so from the first request after the commit on) and a baking candidate's own."""

from __future__ import annotations

from pathlib import Path

import pytest

from ferry.adapters.inference.routing import Router
from ferry.core.current import write_current
from ferry.core.front import disk_config
from ferry.core.model_config import from_pbtxt, to_pbtxt
from ferry.core.records import CurrentState, Manifest, RolloutPlan, RolloutState, utc_stamp
from ferry.core.repository import MANIFEST, ModelDir
from ferry.core.rollout import write_rollout

UNBATCHED = """
input { name: "X" data_type: TYPE_FP32 dims: [-1, 4] }
output { name: "Y" data_type: TYPE_FP32 dims: [-1, 3] }
"""
BATCHED = """
max_batch_size: 8
input { name: "X" data_type: TYPE_FP32 dims: [4] }
output { name: "Y" data_type: TYPE_FP32 dims: [3] }
dynamic_batching {}
"""


def _stage(model_dir: ModelDir, version: int, config: str) -> None:
    folder = model_dir.version_dir(version)
    folder.mkdir(parents=True)
    manifest = Manifest(model=model_dir.model, version=version, run_id="r", sha256="s", size_bytes=1,
                        deploy_id="d", staged_at_utc=utc_stamp(), flavor="triton", config_pbtxt=config)
    (folder / MANIFEST).write_text(manifest.model_dump_json())


def _commit(model_dir: ModelDir, version: int, write_config: bool) -> None:
    write_current(model_dir, CurrentState(active_version=version, run_id="r", alias=None, updated_at_utc=utc_stamp(),
                                          model=model_dir.model, sha256="s", deploy_id=f"d{version}"))
    if write_config:
        config = model_dir.read_manifest(version)
        assert config is not None
        model_dir.write_config(disk_config(from_pbtxt(config.config_pbtxt), [version]))


@pytest.fixture
def model_dir(tmp_path: Path) -> ModelDir:
    """v1 unbatched committed, v2 batched staged."""
    model_dir = ModelDir(tmp_path, "m")
    model_dir.ensure()
    _stage(model_dir, 1, UNBATCHED)
    _stage(model_dir, 2, BATCHED)
    _commit(model_dir, 1, write_config=True)
    return model_dir


def test_the_first_request_after_a_commit_is_checked_against_the_new_versions_config(tmp_path: Path,
                                                                                      model_dir: ModelDir) -> None:
    router = Router(tmp_path)
    assert router.route("m").max_batch_size == 0
    _commit(model_dir, 2, write_config=False)  # config.pbtxt follows only once every front is repointed
    route = router.route("m")
    assert (route.version, route.max_batch_size, route.upstream) == (2, 8, "m.versions.2")
    assert to_pbtxt(from_pbtxt(model_dir.read_config_text() or "")).count("max_batch_size") == 0


def test_a_baking_candidate_is_checked_against_its_own_config(tmp_path: Path, model_dir: ModelDir) -> None:
    write_rollout(model_dir, RolloutState(model="m", deploy_id="d", active_version=1, candidate_version=2,
                                          plan=RolloutPlan(mode="canary", bake_s=5, canary_percent=10),
                                          started_at_utc=utc_stamp()))
    router = Router(tmp_path)
    bake = router.bake(router.route("m"))
    assert bake is not None and bake.active.max_batch_size == 0
    assert (bake.candidate.version, bake.candidate.max_batch_size) == (2, 8)
