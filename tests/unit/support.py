"""The unit tier's bench: one ferry installation over in-process fakes of Triton and MLflow."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ferry.core.config import Settings
from ferry.core.current import read_current, read_history
from ferry.core.records import DeployReport
from ferry.core.repository import ModelDir
from ferry.core.runner import deploy
from ferry.core.services import Services
from unit.fakes import FakeRegistry, FakeTriton


@dataclass
class Bench:
    """One ferry installation over fakes: a real repository on disk, a fake Triton, a fake MLflow."""

    settings: Settings
    triton: FakeTriton
    registry: FakeRegistry
    model: str = "iris"

    @property
    def ferry(self) -> Services:
        return Services(self.settings, given_replicas=[self.triton], given_registry=self.registry)

    @property
    def model_dir(self) -> ModelDir:
        return ModelDir(self.settings.repository, self.model)

    def deploy(self, alias: str | None = "champion", version: int | None = None, **kwargs: object) -> DeployReport:
        return deploy(self.ferry, self.model, alias=None if version else alias, version=version, **kwargs)

    def check_invariants(self, attempts: int) -> None:
        """docs/design.md's invariants, against the files and the fake Triton."""
        current = read_current(self.model_dir)
        serving = self.triton.ready_versions(self.model)
        if current is None:
            assert serving == []
        else:
            assert (self.model_dir.version_dir(current.active_version) / "model.onnx").is_file()
            assert serving == [current.active_version]
            assert list(self.model_dir.read_config().version_policy.specific.versions) == [current.active_version]
        history = read_history(self.model_dir)
        for record in history:
            if record["outcome"] == "rolled_back":
                assert record["rollback"]["verified"], record["rollback"]
                for folder in map(Path, record["rollback"]["quarantined"]):
                    assert (folder / "reason.json").is_file() and folder.parent == self.model_dir.quarantine_root
        assert not self.model_dir.journal_path.exists()
        assert len(history) == attempts, f"{len(history)} history records for {attempts} attempts"
