"""The unit tier: the core's logic over in-process fakes of Triton and MLflow (unit/fakes.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ferry.core.config import Settings
from unit.fakes import FakeRegistry, FakeTriton
from unit.support import Bench


@pytest.fixture
def bench(tmp_path: Path) -> Bench:
    settings = Settings(home=tmp_path, repository=tmp_path / "repository", tracking_uri="fake://mlflow",
                        ready_timeout_s=0.2)
    return Bench(settings, FakeTriton(settings.repository), FakeRegistry(tmp_path / "mlflow"))
