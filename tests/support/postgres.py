"""A real PostgreSQL for tests: Debian's postgresql binaries, a data directory of its own, a loopback port.

``postgres_server`` is session-scoped: under pytest-xdist each worker starts its own server (its own data
directory under that worker's basetemp, its own free port), so no lock or sharing between workers is needed.
initdb refuses to run as root: when the tests run as uid 0 every server command runs as the ``postgres``
system user (``runuser``), which then owns the data directory. Authentication is ``trust`` on loopback only.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from support.processes import free_port


def _installed_bin() -> Path:
    """The newest major version Debian installed (15 on Debian 12), unless FERRY_PG_BIN names another."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    return found[-1].parent if found else Path("/usr/lib/postgresql/15/bin")


PG_BIN = Path(os.environ.get("FERRY_PG_BIN") or _installed_bin())
SUPERUSER = "postgres"
COMMAND_TIMEOUT_S = 60.0


def _as_owner(argv: list[str]) -> list[str]:
    """Run as root -> run as the postgres system user (initdb and postgres refuse uid 0)."""
    if os.geteuid() != 0:
        return argv
    return ["runuser", "-u", SUPERUSER, "--", *argv]


def _run(argv: list[str], what: str) -> None:
    done = subprocess.run(_as_owner(argv), capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {done.returncode}): {done.stderr.strip() or done.stdout.strip()}")


def _binary(name: str) -> str:
    path = PG_BIN / name
    if not path.exists():
        raise RuntimeError(f"{path} not found: install Debian's postgresql package (scripts/install_debian.sh)")
    return str(path)


@dataclass
class PostgresServer:
    """One PostgreSQL cluster: ``root`` holds its data directory, socket and log."""

    root: Path
    port: int = 0

    @property
    def data(self) -> Path:
        return self.root / "data"

    def url(self, dbname: str) -> str:
        return f"postgresql+psycopg2://{SUPERUSER}@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, name: str) -> None:
        _run([_binary("createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", SUPERUSER, name],
             f"createdb {name}")

    def start(self) -> PostgresServer:
        """A new cluster on a free port; started again after ``stop``, the same cluster on the same port."""
        if not self.data.exists():
            self._init()
        if not self.port:
            self.port = free_port()
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.root} -c fsync=off"
        _run([_binary("pg_ctl"), "-D", str(self.data), "-l", str(self.root / "postgres.log"), "-o", options,
              "-w", "-t", "30", "start"], f"pg_ctl start (log: {self.root / 'postgres.log'})")
        return self

    def _init(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.root, SUPERUSER, SUPERUSER)
            self._open_parents()
        _run([_binary("initdb"), "-D", str(self.data), "-U", SUPERUSER, "--auth=trust", "-E", "UTF8",
              "--no-sync"], "initdb")

    def running(self) -> bool:
        done = subprocess.run(_as_owner([_binary("pg_ctl"), "-D", str(self.data), "status"]), capture_output=True,
                              timeout=COMMAND_TIMEOUT_S, check=False)
        return done.returncode == 0

    def stop(self) -> None:
        """A fast shutdown (open sessions are ended): clients see their connections refused from then on."""
        if self.data.exists() and self.running():
            _run([_binary("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "-t", "30", "stop"], "pg_ctl stop")

    def _open_parents(self) -> None:
        """The postgres user must traverse pytest's tmp directories (created 0700 for root)."""
        for parent in self.root.parents:
            if parent == Path("/tmp") or parent == Path("/"):
                break
            parent.chmod(parent.stat().st_mode | 0o011)


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    server = PostgresServer(tmp_path_factory.mktemp("postgres")).start()
    try:
        yield server
    finally:
        server.stop()
