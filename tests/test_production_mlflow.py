"""ferry against MLflow as production runs it (docs/design.md, "Real components and how they start"): a tracking
server on PostgreSQL with artifacts on S3 (SeaweedFS), read directly (s3://) or through the server's proxy
(mlflow-artifacts:/). One set of servers per module; one Triton for the module."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import World, assert_invariants, make_settings
from ferry.runtime import server as triton
from support.mlflow_server import TrackingServer, register_example, start_tracking
from support.postgres import PostgresServer, postgres_server  # noqa: F401 - the session fixture
from support.s3 import S3Server, s3_server  # noqa: F401 - the session fixture

NO_MLFLOW = ("import sys, runpy\nsys.argv = ['ferry', *sys.argv[1:]]\n"
             "try:\n    runpy.run_module('ferry', run_name='__main__')\n"
             "finally:\n    print('mlflow imported:', 'mlflow' in sys.modules)")


@pytest.fixture(scope="module")
def triton_settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    settings = make_settings(tmp_path_factory.mktemp("ferry"))
    triton.up(settings)
    try:
        yield settings
    finally:
        triton.down(settings, grace_s=0)


@pytest.fixture(scope="module", params=["s3", "proxy"])
def tracking(request: pytest.FixtureRequest, postgres_server: PostgresServer,  # noqa: F811
             s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrackingServer]:  # noqa: F811
    server = start_tracking(tmp_path_factory.mktemp("mlflow"), postgres_server, s3_server, request.param)
    try:
        yield server
    finally:
        server.stop()


def _world(settings, tracking: TrackingServer, name: str) -> World:
    return World(settings.with_overrides(tracking_uri=tracking.url), model=f"{name}_{tracking.layout}")


def test_deploy_from_the_server_without_importing_mlflow(triton_settings, tracking: TrackingServer) -> None:
    world = _world(triton_settings, tracking, "prod")
    register_example(tracking, world.model, "champion")
    result = world.cli("deploy", world.model, "--alias", "champion", program=[sys.executable, "-c", NO_MLFLOW],
                       FERRY_SERVING_ALIAS="", **tracking.client_env())
    assert result.returncode == 0, result.stdout + result.stderr
    assert "mlflow imported: False" in result.stdout
    assert_invariants(world, 1)


def test_missing_credentials_name_the_variable(triton_settings, tracking: TrackingServer) -> None:
    if tracking.layout != "s3":
        pytest.skip("only the direct layout reads S3 with the client's credentials")
    world = _world(triton_settings, tracking, "nocreds")
    register_example(tracking, world.model, "champion")
    env = {k: v for k, v in tracking.client_env().items() if k != "AWS_SECRET_ACCESS_KEY"}
    result = world.cli("deploy", world.model, "--alias", "champion", AWS_SECRET_ACCESS_KEY="", **env)
    assert result.returncode != 0
    assert "AWS_SECRET_ACCESS_KEY" in result.stdout + result.stderr
    assert not Path(world.model_dir.current_path).exists()
