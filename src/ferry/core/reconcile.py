"""Make Triton serve exactly what current.json commits: after a Triton restart, on a new replica, or periodically."""

from __future__ import annotations

from pydantic import BaseModel

from ferry.core.current import read_current
from ferry.core.errors import Busy, FerryError, InvalidInput
from ferry.core.journal import read_journal
from ferry.core.repository import ModelDir
from ferry.core.runner import holding
from ferry.core.steps import Ferry, pin, wait_serving


class Reconciled(BaseModel):
    model: str
    active_version: int | None
    action: str  # "in place" | "loaded" | "unloaded" | "skipped" | "failed"
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.action in ("in place", "loaded", "unloaded")


def reconcile(ferry: Ferry, model: str) -> Reconciled:
    """Make Triton serve exactly the committed version of ``model`` (after a restart, or on a new replica).

    Touches Triton only when it differs, so it is cheap and safe to run periodically.
    A model with an unfinished deploy is skipped: `ferry recover` decides what is committed.
    """
    model_dir = ferry.model_dir(model)
    try:
        with holding(model_dir):
            if (journal := read_journal(model_dir)) is not None:
                return Reconciled(model=model, active_version=None, action="skipped",
                                  detail=f"deploy {journal.deploy_id} is unfinished: run `ferry recover {model}` first")
            return _reconcile(ferry, model_dir)
    except Busy:
        return Reconciled(model=model, active_version=None, action="skipped", detail="a deploy is running")
    except FerryError as error:
        return Reconciled(model=model, active_version=None, action="failed", detail=str(error))


def _reconcile(ferry: Ferry, model_dir: ModelDir) -> Reconciled:
    current = read_current(model_dir)
    wanted = [current.active_version] if current else []
    serving = ferry.triton.ready_versions(model_dir.model)
    version = current.active_version if current else None
    if serving == wanted and (current is None or _pinned(model_dir, current.active_version)):
        return Reconciled(model=model_dir.model, active_version=version, action="in place")
    if current is None:
        ferry.triton.unload(model_dir.model)
        verified, serving = wait_serving(ferry, model_dir.model, [])
        return _result(model_dir, None, "unloaded", verified, serving)
    if not (model_dir.version_dir(version) / "model.onnx").is_file():
        raise InvalidInput(f"current.json names v{version}, but {model_dir.version_dir(version)} has no model.onnx",
                           f"restore that directory, or `ferry rollback {model_dir.model} --to` a version that "
                           "has its files")
    config_text = model_dir.read_config_text()
    if config_text is None:
        raise InvalidInput(f"{model_dir.config_path} is missing", "restore it, or deploy the version again")
    pin(ferry, model_dir, config_text, version)
    verified, serving = wait_serving(ferry, model_dir.model, wanted, timeout_s=ferry.settings.ready_timeout_s)
    return _result(model_dir, version, "loaded", verified, serving)


def _pinned(model_dir: ModelDir, version: int) -> bool:
    config = model_dir.read_config()
    return config is not None and list(config.version_policy.specific.versions) == [version]


def _result(model_dir: ModelDir, version: int | None, action: str, verified: bool, serving: list[int]) -> Reconciled:
    if not verified:
        return Reconciled(model=model_dir.model, active_version=version, action="failed",
                          detail=f"Triton serves {serving or 'nothing'} instead; see its log")
    return Reconciled(model=model_dir.model, active_version=version, action=action,
                      detail=f"Triton serves {serving or 'nothing'}")
