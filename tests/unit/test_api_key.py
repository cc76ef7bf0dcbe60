"""The model-control key `ferry triton up` gives Triton: one per repository, so that replicas started with their
own FERRY_HOME on a shared repository (the README's fleet) and every controller deploying to them agree."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ferry.core.config import Settings
from ferry.runtime import server


def _host(tmp_path: Path, name: str, **overrides: object) -> Settings:
    """One host's settings: its own FERRY_HOME, the shared repository."""
    settings = Settings(home=tmp_path / name, repository=tmp_path / "shared-repository", tracking_uri="fake://")
    return settings.with_overrides(**overrides)


def test_replicas_on_a_shared_repository_share_one_key_and_the_controller_reads_it(tmp_path: Path) -> None:
    keys = [server._api_key(_host(tmp_path, f"replica-{i}")) for i in range(3)]
    assert len(set(keys)) == 1 and len(keys[0]) >= 24
    key_file = tmp_path / "shared-repository" / ".ferry" / "triton-api-key"
    assert key_file.read_text().strip() == keys[0]
    assert key_file.stat().st_mode & 0o777 == 0o600, "readable by its owner only"
    assert _host(tmp_path, "controller").model_control_key() == keys[0]
    assert not list(key_file.parent.glob(".triton-api-key.*")), "no draft left behind"


def test_replicas_started_at_the_same_moment_agree(tmp_path: Path) -> None:
    path = tmp_path / "repository" / ".ferry" / "triton-api-key"
    with ThreadPoolExecutor(8) as pool:
        kept = list(pool.map(lambda i: server._publish_key(path, f"key-{i}"), range(32)))
    assert len(set(kept)) == 1 and kept[0] == path.read_text().strip()


def test_ferry_triton_api_key_wins_and_is_not_written(tmp_path: Path) -> None:
    settings = _host(tmp_path, "replica-0", triton_api_key="operator-key")
    assert server._api_key(settings) == "operator-key" == settings.model_control_key()
    assert not settings.triton_api_key_file.exists()


def test_a_key_kept_in_ferry_home_by_an_earlier_triton_up_becomes_the_repositorys(tmp_path: Path) -> None:
    """Its server may still run with it: the repository's key must be that one, not a new one."""
    settings = _host(tmp_path, "replica-0")
    (settings.triton_dir).mkdir(parents=True)
    (settings.triton_dir / "api-key").write_text("earlier-key\n")
    assert settings.model_control_key() == "earlier-key", "read where an earlier `ferry triton up` kept it"
    assert server._api_key(settings) == "earlier-key"
    assert _host(tmp_path, "replica-1").model_control_key() == "earlier-key"
