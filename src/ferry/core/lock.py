"""The model's lock: one deploy step (or recover, reconcile, adopt, retire, sync) acts on a model at a time."""

from __future__ import annotations

import getpass
import socket
from collections.abc import Iterator
from contextlib import contextmanager

from filelock import FileLock, Timeout

from ferry.core.errors import Busy
from ferry.core.repository import ModelDir


def current_user() -> str:
    return f"{getpass.getuser()}@{socket.gethostname()}"


@contextmanager
def holding(model_dir: ModelDir, wait_s: float = 0.0) -> Iterator[None]:
    """The model's lock: one deploy step (or recover, or reconcile) acts on a model at a time."""
    model_dir.state_dir.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(str(model_dir.lock_path), timeout=wait_s):
            yield
    except Timeout:
        raise Busy(f"another deploy of '{model_dir.model}' is running (it holds {model_dir.lock_path})",
                   f"wait for it (see `ferry history {model_dir.model}`), or set FERRY_LOCK_WAIT_S to queue "
                   "behind it") from None
