"""One model's directory in the Triton model repository, and ferry's state for it.

    <repository>/<model>/config.pbtxt               the model's config; its version policy names what is loaded
    <repository>/<model>/<N>/                       a staged version (model.onnx, model.py, smoke.json, ferry.json)
    <repository>/<model>.versions.<N> -> <model>    the link through which Triton loads version N's store
    <repository>/.ferry/<model>/current.json        the committed state, read by the gateway, operators and rollbacks
    <repository>/.ferry/<model>/history.jsonl       one line per deploy attempt
    <repository>/.ferry/<model>/staging/            versions being written, renamed into place when complete
    <repository>/.ferry/<model>/quarantine/         failed versions, <N>.failed_<UTC>/ with reason.json
    <repository>/.ferry/<model>/journal.json        the deploy in flight, step by step (ferry.journal)
    <repository>/.ferry/<model>/deploy.lock         held by the process running a deploy step

Triton serves the directory under several names (:mod:`ferry.core.front`): ``<model>``, a front that
clients call, and ``<model>.versions.<N>``, the store of each loaded version, under that version's config
(kept in its manifest). ferry's state, staging
included, stays out of the model directory: when anything in it but config.pbtxt and the version
folders changes, Triton's next load re-creates every loaded version, so a candidate's load would
re-create the active version's instance. It stays inside the repository so that staging and
quarantining are atomic renames. Triton takes any directory whose name starts with digits for a
version; nothing else does.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from pydantic import ValidationError

from ferry.core.errors import InvalidInput
from ferry.core.front import STORE_SUFFIX, legacy_store_name, parse_store_name, store_name
from ferry.core.fsutil import atomic_write, flush_in_background, fsync_dir, fsync_tree
from ferry.core.model_config import from_pbtxt, model_config_pb2, to_pbtxt, with_versions
from ferry.core.records import Manifest, QuarantineReason, utc_stamp

STATE_DIR = ".ferry"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
MANIFEST = "ferry.json"


def check_name(kind: str, value: str) -> str:
    if not NAME_PATTERN.fullmatch(value) or ".." in value:  # fullmatch: "$" would let a final newline through
        raise InvalidInput(
            f"{kind} {value!r} is not a valid name",
            "use letters, digits, '_', '-' and '.', starting with a letter or digit, no '..'",
        )
    return value


def check_model_name(value: str) -> str:
    check_name("model name", value)
    if value.endswith(STORE_SUFFIX) or parse_store_name(value) is not None:
        raise InvalidInput(f"model name {value!r} ends like the name of a model's version store "
                           f"('{STORE_SUFFIX}' or '{STORE_SUFFIX}.<N>')", f"name the model without {STORE_SUFFIX!r}")
    return value


class ModelDir:
    def __init__(self, repository: Path, model: str) -> None:
        self.model = check_model_name(model)
        self.path = repository / model
        self.repository = repository
        self.state_dir = repository / STATE_DIR / model

    @property
    def config_path(self) -> Path:
        return self.path / "config.pbtxt"

    @property
    def current_path(self) -> Path:
        return self.state_dir / "current.json"

    @property
    def history_path(self) -> Path:
        return self.state_dir / "history.jsonl"

    @property
    def writeback_path(self) -> Path:
        """What MLflow was told of each decided attempt (records.WriteBackRecord), one line each."""
        return self.state_dir / "writeback.jsonl"

    @property
    def quarantine_root(self) -> Path:
        return self.state_dir / "quarantine"

    @property
    def journal_path(self) -> Path:
        """The journal of the deploy in flight (:mod:`ferry.journal`)."""
        return self.state_dir / "journal.json"

    @property
    def rollout_path(self) -> Path:
        """What the gateways do with a baking candidate (ferry.core.rollout); present only during a bake."""
        return self.state_dir / "rollout.json"

    @property
    def rollout_control_path(self) -> Path:
        """`ferry rollout promote|abort` leave their request here for the process that runs the bake."""
        return self.state_dir / "rollout-control.json"

    @property
    def lock_path(self) -> Path:
        return self.state_dir / "deploy.lock"

    def version_dir(self, version: int) -> Path:
        return self.path / str(version)

    def ensure(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self.state_dir.mkdir(parents=True, exist_ok=True)

    def store_link(self, version: int) -> Path:
        return self.repository / store_name(self.model, version)

    def ensure_store_link(self, version: int) -> None:
        """The link ``<model>.versions.<N> -> <model>`` through which Triton loads version N's store (relative,
        so that the repository can be mounted anywhere)."""
        link = self.store_link(version)
        if link.is_symlink() and os.readlink(link) == self.model:
            return
        if link.exists() or link.is_symlink():
            raise InvalidInput(f"{link} exists and is not ferry's link to {self.model}/",
                               f"move it out of the repository: ferry serves {self.model} v{version} under that name")
        os.symlink(self.model, link)
        fsync_dir(self.repository)

    def drop_store_links(self, keep: list[int]) -> None:
        """Remove the links of the stores no longer loaded (and the one link earlier releases of ferry made)."""
        for link in [*self.repository.glob(f"{self.model}{STORE_SUFFIX}.*"), self.legacy_store_link]:
            parsed = parse_store_name(link.name)
            mine = link == self.legacy_store_link or (parsed is not None and parsed[0] == self.model)
            if mine and link.is_symlink() and os.readlink(link) == self.model \
                    and (parsed is None or parsed[1] not in keep):
                link.unlink()

    @property
    def legacy_store_link(self) -> Path:
        """``<model>.versions``: the one store of every version that earlier releases of ferry loaded."""
        return self.repository / legacy_store_name(self.model)

    def version_config(self, version: int, fallback: str | None = None) -> model_config_pb2.ModelConfig | None:
        """The config version ``version`` runs under: the one its manifest records, else ``fallback`` (the
        model's config.pbtxt, for versions staged by earlier releases of ferry), without a version policy."""
        manifest = self.read_manifest(version)
        text = manifest.config_pbtxt if manifest is not None and manifest.config_pbtxt else fallback
        if text is None:
            return None
        try:
            return with_versions(from_pbtxt(text), [])
        except Exception as error:  # protobuf's text parser raises its own ParseError
            raise InvalidInput(f"the config of {self.model} v{version} is not a valid Triton config: {error}",
                               f"restore {self.version_dir(version)}/{MANIFEST}, or deploy another version") from None

    def read_config_text(self) -> str | None:
        try:
            return self.config_path.read_text()
        except FileNotFoundError:
            return None

    def read_config(self) -> model_config_pb2.ModelConfig | None:
        text = self.read_config_text()
        if text is None:
            return None
        try:
            return from_pbtxt(text)
        except Exception as error:  # protobuf's text parser raises its own ParseError
            raise InvalidInput(f"{self.config_path} is not a valid Triton config: {error}",
                               "fix or restore the file") from None

    def write_config(self, config: model_config_pb2.ModelConfig) -> None:
        atomic_write(self.config_path, to_pbtxt(config).encode())

    def restore_config_text(self, text: str | None) -> None:
        if text is None:
            self.config_path.unlink(missing_ok=True)
        elif self.read_config_text() != text:
            atomic_write(self.config_path, text.encode())

    def read_manifest(self, version: int) -> Manifest | None:
        """The manifest ferry wrote when it staged ``version``; None if there is none or it is damaged."""
        try:
            return Manifest.model_validate_json((self.version_dir(version) / MANIFEST).read_text())
        except (FileNotFoundError, NotADirectoryError, ValidationError):
            return None

    def exists(self) -> bool:
        """Whether the repository holds anything of this model (its directory or ferry's state for it)."""
        return self.path.exists() or self.state_dir.exists()

    @property
    def staging_root(self) -> Path:
        return self.state_dir / "staging"

    def new_staging_dir(self, version: int, deploy_id: str) -> Path:
        """An empty staging folder for this deploy (a retried materialize starts it over)."""
        staging = self.staging_root / f"v{version}-{deploy_id}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        return staging

    def publish_version(self, staging: Path, version: int) -> Path:
        """Make a fully written staging directory version ``version`` with one atomic rename.

        Its files reach the disk in the background, while Triton loads them from the page cache: the
        commit makes them durable before current.json names them (:meth:`make_durable`), and a version
        that is never committed is quarantined, whatever a machine crash left of it."""
        target = self.version_dir(version)
        os.rename(staging, target)  # fails if the target exists: a version is never overwritten
        fsync_dir(self.path)
        flush_in_background(target)
        return target

    def make_durable(self, version: int) -> None:
        """Wait until the files of ``version`` are on disk (at once if they are already)."""
        fsync_tree(self.version_dir(version))

    def quarantine(self, folder: Path, reason: QuarantineReason) -> Path:
        """Move a failed version's folder (staged or live) to quarantine/<version>.failed_<UTC>/ with reason.json."""
        version = reason.version
        self.quarantine_root.mkdir(exist_ok=True)
        target = self.quarantine_root / f"{version}.failed_{utc_stamp()}"
        suffix = 1
        while target.exists():
            suffix += 1
            target = self.quarantine_root / f"{version}.failed_{utc_stamp()}-{suffix}"
        os.rename(folder, target)
        atomic_write(target / "reason.json", reason.model_dump_json(indent=2).encode())
        fsync_dir(folder.parent)
        return target

    def prune_quarantine(self, keep: int) -> list[Path]:
        """Keep the files of the ``keep`` newest quarantined versions; of older ones keep only the evidence.

        A pruned folder keeps reason.json and the manifest (what failed, why, from which run, its
        sha256), so no failure is ever forgotten; the model files, the bulk of the disk use, go.
        """
        folders = sorted(self.quarantine_root.glob("*.failed_*"), key=_quarantined_at)
        pruned = []
        for folder in folders[:-keep] if keep > 0 else []:
            leftovers = [p for p in folder.iterdir() if p.name not in ("reason.json", MANIFEST)]
            for path in leftovers:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
            if leftovers:
                pruned.append(folder)
        return pruned

    def staging_dirs(self, deploy_id: str) -> dict[Path, int]:
        """The staging folders a deploy left, with the version each was for (``<model>/.staging`` is where
        earlier releases staged: a deploy they left is still found there)."""
        found: dict[Path, int] = {}
        for root in (self.staging_root, self.path / ".staging"):
            if root.exists():
                found |= {path: int(path.name[1:].split("-", 1)[0]) for path in root.glob(f"v*-{deploy_id}")}
        return found

    def discard_staging(self, staging: Path) -> None:
        shutil.rmtree(staging, ignore_errors=True)


def _quarantined_at(folder: Path) -> int:
    """When a folder was quarantined: its reason.json is written right after the move (ns, unlike the name)."""
    try:
        return (folder / "reason.json").stat().st_mtime_ns
    except FileNotFoundError:
        return 0
