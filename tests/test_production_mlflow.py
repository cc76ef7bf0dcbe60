"""ferry against MLflow as production runs it (docs/design.md, "Real components and how they start"): a tracking
server on PostgreSQL with artifacts on S3 (SeaweedFS), read directly (s3://) or through the server's proxy
(mlflow-artifacts:/). One set of servers per module; one Triton for the module.

The story in both layouts: a deploy, a second version, `ferry rollback`, the write-back (ferry.* tags and
@serving) after each, and `ferry watch --poll` deploying an alias moved on the server. The faults: PostgreSQL
stopped after the download (the commit stands, the write-back warns, `ferry sync` repairs it); S3 stopped, or
answering 500 to the download (FaultyS3Proxy: rejected as retryable, exit 3, nothing staged), or holding other
bytes than were logged; S3 credentials wrong.
Each fault keeps what served before: current.json's bytes and Triton's versions.
And a Triton model directory logged to a run (the triton flavor): listed whole and downloaded file by file."""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from conftest import World, assert_invariants
from ferry.core.current import read_current, read_history
from ferry.core.records import Step
from ferry.core.registry import Registry, RestArtifacts, VersionRef
from ferry.core.runner import deploy
from ferry.core.writeback import read_write_backs
from support.mlflow_server import TrackingServer, register_example, start_tracking
from support.mlflow_sqlite import ferry_tags, serving_version
from support.postgres import PostgresServer, postgres_server  # noqa: F401 - the session fixture
from support.processes import free_port
from support.s3 import FaultyS3Proxy, S3Server, s3_server  # noqa: F401 - the session fixture
from support.watch import Watcher, start_watch, watchers  # noqa: F401 - the fixture

NO_MLFLOW = ("import sys, runpy\nsys.argv = ['ferry', *sys.argv[1:]]\n"
             "try:\n    runpy.run_module('ferry', run_name='__main__')\n"
             "finally:\n    print('mlflow imported:', 'mlflow' in sys.modules)")


@pytest.fixture(scope="module", params=["s3", "proxy"])
def tracking(request: pytest.FixtureRequest, postgres_server: PostgresServer,  # noqa: F811
             s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrackingServer]:  # noqa: F811
    server = start_tracking(tmp_path_factory.mktemp("mlflow"), postgres_server, s3_server, request.param)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def client_env(tracking: TrackingServer, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The tracking server's client variables, also set in this process (for deploys run in it)."""
    env = tracking.client_env()
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


def _world(settings, tracking: TrackingServer, name: str) -> World:
    return World(settings.with_overrides(tracking_uri=tracking.url), model=f"{name}_{tracking.layout}")


def _only_direct(tracking: TrackingServer) -> None:
    if tracking.layout != "s3":
        pytest.skip("only the direct layout reads S3 with the client's own endpoint and credentials")


def _deployed(world: World, env: dict[str, str], *args: str) -> None:
    done = world.cli(*(args or ("deploy", world.model, "--alias", "champion")), **env)
    assert done.returncode == 0, done.stdout + done.stderr


def _assert_mlflow_shows(tracking: TrackingServer, world: World, serving: int, retired: list[int]) -> None:
    """The write-back of the last commit: @serving and the tags of the serving and the replaced versions."""
    current = read_current(world.model_dir)
    assert current is not None and current.active_version == serving
    assert serving_version(tracking, world.model) == serving
    assert ferry_tags(tracking, world.model, serving) == {
        "ferry.status": "serving", "ferry.deploy_id": current.deploy_id, "ferry.updated_at_utc": current.updated_at_utc}
    for version in retired:
        tags = ferry_tags(tracking, world.model, version)
        assert (tags["ferry.status"], tags["ferry.deploy_id"]) == ("retired", current.deploy_id), tags


def _assert_kept(world: World, before: bytes | None, failed) -> str:
    """A failed attempt changed nothing: current.json's bytes are the same; its one-line reason on stderr."""
    assert failed.returncode != 0, failed.stdout
    assert world.current_bytes() == before, "current.json changed on a failed deploy"
    reason = next((line for line in failed.stderr.splitlines() if line.startswith(("failed at", "error:"))), "")
    assert reason, f"no one-line reason on stderr: {failed.stderr}"
    return reason


# ---------------------------------------------------------------- the story


def test_deploy_from_the_server_without_importing_mlflow(triton_settings, tracking: TrackingServer) -> None:
    world = _world(triton_settings, tracking, "prod")
    register_example(tracking, world.model, "champion")
    result = world.cli("deploy", world.model, "--alias", "champion", program=[sys.executable, "-c", NO_MLFLOW],
                       **tracking.client_env())
    assert result.returncode == 0, result.stdout + result.stderr
    assert "mlflow imported: False" in result.stdout, "resolve, download and write-back: REST only"
    _assert_mlflow_shows(tracking, world, serving=1, retired=[])
    assert_invariants(world, 1)


def test_a_second_version_then_rollback_written_back_to_mlflow(triton_settings, tracking: TrackingServer,
                                                               client_env: dict[str, str]) -> None:
    world = _world(triton_settings, tracking, "story")
    first = register_example(tracking, world.model, "champion")
    _deployed(world, client_env)
    _assert_mlflow_shows(tracking, world, first, retired=[])
    assert_invariants(world, 1)

    second = register_example(tracking, world.model, "champion")
    _deployed(world, client_env)
    _assert_mlflow_shows(tracking, world, second, retired=[first])
    assert_invariants(world, 2)

    _deployed(world, client_env, "rollback", world.model)
    assert read_history(world.model_dir)[-1]["kind"] == "rollback"
    _assert_mlflow_shows(tracking, world, first, retired=[second])
    assert_invariants(world, 3)
    synced = world.cli("sync", world.model, **client_env)
    assert synced.returncode == 0 and "already in sync" in synced.stdout, synced.stdout + synced.stderr


@pytest.mark.parametrize("via", ["poll", "webhook"])
def test_watch_deploys_an_alias_moved_on_the_server(triton_settings, tracking: TrackingServer,
                                                    client_env: dict[str, str], watchers: list[Watcher],  # noqa: F811
                                                    via: str) -> None:
    world = _world(triton_settings, tracking, f"watched_{via}")
    alias = f"watched_{tracking.layout}"  # only the model of the test under way carries it when the alias moves
    port = free_port()
    polling = ["--poll", "1s"] if via == "poll" else []
    watchers.append(watcher := start_watch(world, "--aliases", alias, *polling, port=port,
                                           name=f"watch-{world.model}"))
    hook = _webhook_to(world, tracking, f"http://127.0.0.1:{port}/mlflow/webhook", client_env) if via == "webhook" \
        else None
    try:
        first = register_example(tracking, world.model, alias)
        [deployed] = watcher.wait_done(1)
        assert (deployed["source"], deployed["version"], deployed["outcome"]) == (via, first, "committed"), deployed
        second = register_example(tracking, world.model, alias)  # the alias moves on the server
        moved = watcher.wait_done(2)[-1]
        assert (moved["source"], moved["version"], moved["outcome"]) == (via, second, "committed"), moved
    finally:
        watcher.stop()
        if hook:
            tracking.client().delete_webhook(hook)
    _assert_mlflow_shows(tracking, world, second, retired=[first])
    assert_invariants(world, 2)


def _webhook_to(world: World, tracking: TrackingServer, url: str, env: dict[str, str]) -> str:
    """`ferry watch register`: the server's webhook to the receiver at ``url``; its id."""
    registered = world.cli("watch", "register", "--url", url, "--test", **env)
    assert registered.returncode == 0 and "test event: delivered: HTTP 200" in registered.stdout, \
        registered.stdout + registered.stderr
    [hook] = [h for h in tracking.client().list_webhooks() if h.name == "ferry"]
    return str(hook.webhook_id)


# ---------------------------------------------------------------- faults


def test_postgres_stopped_after_the_download_the_commit_stands_and_sync_repairs_it(
        triton_settings, tracking: TrackingServer, client_env: dict[str, str],
        postgres_server: PostgresServer) -> None:  # noqa: F811
    world = _world(triton_settings, tracking, "pgdown")
    first = register_example(tracking, world.model, "champion")
    assert world.deploy().outcome == "committed"
    second = register_example(tracking, world.model, "champion")

    def stop_postgres_after_the_download(step: str, status: str, seconds: float, detail: str) -> None:
        """The fault injector: the runner's own event hook, once materialize has read every artifact."""
        if step == Step.MATERIALIZE and status == "ok":
            postgres_server.stop()

    try:
        report = deploy(world.ferry, world.model, alias="champion", on_event=stop_postgres_after_the_download)
    finally:
        postgres_server.start()
    assert (report.outcome, report.version) == ("committed", second), report.error
    [warning] = report.warnings
    assert "was not told of the outcome" in warning and f"ferry sync {world.model}" in warning, warning
    assert read_history(world.model_dir)[-1]["outcome"] == "committed", "the attempt's record comes first"
    [told] = [r for r in read_write_backs(world.model_dir) if r.deploy_id == report.deploy_id]
    assert not told.told and told.warnings == [warning]
    assert serving_version(tracking, world.model) == first, "MLflow still shows the state before the commit"

    synced = world.cli("sync", world.model, **client_env)
    assert synced.returncode == 0, synced.stdout + synced.stderr
    _assert_mlflow_shows(tracking, world, second, retired=[first])
    assert_invariants(world, 2)


def test_s3_stopped_keeps_the_previous_state_and_a_retry_commits(triton_settings, tracking: TrackingServer,
                                                                  client_env: dict[str, str],
                                                                  s3_server: S3Server) -> None:  # noqa: F811
    world = _world(triton_settings, tracking, "s3down")
    register_example(tracking, world.model, "champion")
    _deployed(world, client_env)
    second = register_example(tracking, world.model, "champion")
    before = world.current_bytes()
    s3_server.stop()
    try:
        failed = world.cli("deploy", world.model, "--alias", "champion", **client_env)
    finally:
        s3_server.start()
    reason = _assert_kept(world, before, failed)
    said = "S3 at" if tracking.layout == "s3" else "the server's artifact proxy: its store may not answer"
    assert said in reason, reason
    assert_invariants(world, 2)
    _expect_retryable(world, failed, reason, second, tracking)
    _deployed(world, client_env)  # S3 is back: the retry commits
    assert read_current(world.model_dir).active_version == second
    assert_invariants(world, 3)


@pytest.mark.parametrize(("fault", "said"), [
    ("500", "failed while downloading model.onnx of s3://.*: ClientError: An error occurred \\(InternalError\\)"),
    ("cut", "failed while downloading model.onnx of s3://.*: IncompleteReadError: 100 read, but total bytes"),
])
def test_s3_failing_the_download_keeps_the_previous_state(triton_settings, tracking: TrackingServer,
                                                          client_env: dict[str, str], s3_server: S3Server,  # noqa: F811
                                                          fault: str, said: str) -> None:
    """HTTP 500 to the object's GET (the listing answered), or its body cut after 100 bytes."""
    _only_direct(tracking)
    world = _world(triton_settings, tracking, f"s3{fault}")
    proxy = FaultyS3Proxy(s3_server).start()
    env = {**client_env, **proxy.env()}  # ferry reads S3 through the fault injector
    try:
        register_example(tracking, world.model, "champion")
        _deployed(world, env)  # relayed untouched: the proxy itself changes nothing
        second = register_example(tracking, world.model, "champion")
        before = world.current_bytes()
        proxy.fail_downloads = fault == "500"
        proxy.cut_downloads_after = 100 if fault == "cut" else None
        failed = world.cli("deploy", world.model, "--alias", "champion", **env)
    finally:
        proxy.stop()
    reason = _assert_kept(world, before, failed)
    assert proxy.failed >= 1, "the download never reached the fault injector"
    assert re.search(said, reason), reason
    assert_invariants(world, 2)
    _expect_retryable(world, failed, reason, second, tracking)


def _expect_retryable(world: World, failed, reason: str, version: int, tracking: TrackingServer) -> None:
    """An object store that did not answer is worth retrying: rejected with exit 3 (the DAG retries), nothing
    staged or quarantined, and the version not tagged refused in MLflow (it did nothing wrong)."""
    assert failed.returncode == 3, f"S3 did not answer: worth retrying (exit 3), got {failed.returncode}: {reason}"
    assert reason.startswith("error:"), f"rejected, not rolled back: {reason}"
    record = next(r for r in read_history(world.model_dir) if r["outcome"] == "rejected")
    assert record["retryable"], record
    quarantine = world.model_dir.quarantine_root
    assert not quarantine.exists() or not any(quarantine.iterdir()), f"a partial download was kept in {quarantine}"
    assert "ferry.status" not in ferry_tags(tracking, world.model, version)


def _another_model() -> bytes:
    """A valid ONNX model with the example's signature and other numbers (trained on shuffled labels)."""
    import train_model
    from sklearn.datasets import load_iris

    features, labels = load_iris(return_X_y=True)
    features = features.astype(np.float32)
    shuffled = np.random.default_rng(0).permutation(labels)
    return train_model._to_onnx(train_model._classifier(0, shuffled, features), features).SerializeToString()


@pytest.mark.parametrize(("replacement", "step", "said"), [
    ("garbage", "materialize", "not a valid ONNX model"),
    ("another model", "smoke", "differs from the golden output"),
])
def test_an_object_replaced_in_the_bucket_after_registering_is_refused(
        triton_settings, tracking: TrackingServer, client_env: dict[str, str], s3_server: S3Server,  # noqa: F811
        replacement: str, step: str, said: str) -> None:
    world = _world(triton_settings, tracking, f"tampered_{replacement.replace(' ', '_')}")
    register_example(tracking, world.model, "champion")
    _deployed(world, client_env)
    second = register_example(tracking, world.model, "champion")
    key = tracking.artifact_key(world.model, second, "model.onnx")
    bucket = s3_server.client()
    logged = bucket.get_object(Bucket=s3_server.bucket, Key=key)["Body"].read()
    forged = os.urandom(len(logged)) if replacement == "garbage" else _another_model()
    bucket.put_object(Bucket=s3_server.bucket, Key=key, Body=forged)
    before = world.current_bytes()
    failed = world.cli("deploy", world.model, "--alias", "champion", **client_env)
    reason = _assert_kept(world, before, failed)
    assert failed.returncode == 1 and reason.startswith(f"failed at {step}") and said in reason, reason
    assert ferry_tags(tracking, world.model, second)["ferry.failed_step"] == step
    assert_invariants(world, 2)


def test_wrong_credentials_name_the_variable(triton_settings, tracking: TrackingServer,
                                             client_env: dict[str, str]) -> None:
    _only_direct(tracking)
    world = _world(triton_settings, tracking, "badcreds")
    register_example(tracking, world.model, "champion")
    wrong_secret = world.cli("deploy", world.model, "--alias", "champion",
                             **{**client_env, "AWS_SECRET_ACCESS_KEY": "not-the-secret"})
    assert "AWS_SECRET_ACCESS_KEY" in _assert_kept(world, None, wrong_secret)
    wrong_key = world.cli("deploy", world.model, "--alias", "champion",
                          **{**client_env, "AWS_ACCESS_KEY_ID": "nobody"})
    assert "AWS_ACCESS_KEY_ID" in _assert_kept(world, None, wrong_key)
    # ferry's setup, not the version, is at fault: refused (exit 2), nothing staged or quarantined, not "refused"
    assert (wrong_secret.returncode, wrong_key.returncode) == (2, 2), wrong_key.stderr
    assert [r["outcome"] for r in read_history(world.model_dir)] == ["rejected", "rejected"]
    assert not world.model_dir.quarantine_root.exists() and not world.model_dir.version_dir(1).exists()
    assert_invariants(world, 2)


def test_missing_credentials_name_the_variable(triton_settings, tracking: TrackingServer) -> None:
    _only_direct(tracking)
    world = _world(triton_settings, tracking, "nocreds")
    register_example(tracking, world.model, "champion")
    env = {k: v for k, v in tracking.client_env().items() if k != "AWS_SECRET_ACCESS_KEY"}
    result = world.cli("deploy", world.model, "--alias", "champion", AWS_SECRET_ACCESS_KEY="", **env)
    assert result.returncode == 2, result.stderr
    assert "AWS_SECRET_ACCESS_KEY" in result.stdout + result.stderr
    assert not Path(world.model_dir.current_path).exists()


# ---------------------------------------------------------------- a model directory (the triton flavor)


def test_a_nested_model_directory_is_listed_and_downloaded_as_logged(tracking: TrackingServer,
                                                                     client_env: dict[str, str],
                                                                     tmp_path: Path) -> None:
    """A Triton model directory logged to a run: ferry's REST reader lists it whole (S3's prefix listing, or the
    proxy's one folder at a time) and downloads each file, in parallel, with its bytes and sha256."""
    files = {"triton/m/config.pbtxt": b'name: "m"\nbackend: "python"\n', "triton/m/1/model.py": b"import numpy\n",
             "triton/m/1/sub/data.bin": os.urandom(70_000)}
    logged = tmp_path / "logged"
    for name, data in files.items():
        (logged / name).parent.mkdir(parents=True, exist_ok=True)
        (logged / name).write_bytes(data)
    client = tracking.client()
    run_id = client.create_run(client.create_experiment(f"tree-{secrets.token_hex(4)}")).info.run_id
    client.log_artifacts(run_id, str(logged))
    client.log_text(run_id, "flavors: {}\n", "MLmodel")
    ref = VersionRef(f"tree_{tracking.layout}", 1, run_id, f"runs:/{run_id}", None, f"runs:/{run_id}")
    artifacts = Registry(tracking.url).artifacts(ref)
    assert isinstance(artifacts, RestArtifacts), "a tracking server is read through its REST API"

    assert artifacts.tree("triton") == {name: len(data) for name, data in files.items()}
    assert artifacts.tree() == {**artifacts.tree("triton"), "MLmodel": len("flavors: {}\n")}
    staging = tmp_path / "staging"
    with ThreadPoolExecutor(len(files)) as pool:
        paths = dict(zip(files, pool.map(lambda name: artifacts.download(name, staging), files), strict=True))
    for name, path in paths.items():
        assert path == staging / name and not path.is_symlink() and path.read_bytes() == files[name], name
        assert artifacts.sha256(name, path) == hashlib.sha256(files[name]).hexdigest(), name
