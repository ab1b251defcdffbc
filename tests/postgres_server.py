"""A throwaway PostgreSQL server for the tests (the `postgres_server` and `postgres_url` fixtures of
conftest.py).

The server is started from the PostgreSQL server binaries (Debian's `postgresql` package); without them
the tests that need it fail, they are not skipped. As root, initdb refuses to run, so the cluster belongs
to the `postgres` user.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

# Characters that must be escaped in a URL, to show the password reaches the server intact.
PASSWORD = "s3cret:/@%x"


@dataclass(frozen=True)
class PostgresServer:
    """A running server with a user `recsys` (password PASSWORD) that owns the databases it creates."""

    binaries: Path
    cluster: Path
    port: int

    def create_database(self, name: str) -> str:
        """A new database `name` owned by `recsys`: its URL."""
        self.psql(f"CREATE DATABASE {name} OWNER recsys")
        return f"postgresql://recsys:{urllib.parse.quote(PASSWORD, safe='')}@127.0.0.1:{self.port}/{name}"

    def psql(self, statement: str) -> None:
        _as_postgres(
            self.binaries / "psql", "-h", self.cluster, "-p", str(self.port), "-d", "postgres",
            "-v", "ON_ERROR_STOP=1", "-c", statement,
        )  # fmt: skip


@contextmanager
def running_server() -> Iterator[PostgresServer]:
    binaries = _server_binaries()
    # Not under pytest's temporary folder, which only its owner may enter.
    cluster = Path(tempfile.mkdtemp(prefix="recsys-postgres-"))
    shutil.chown(cluster, "postgres")
    port = _free_port()
    _as_postgres(binaries / "initdb", "-D", cluster, "--auth=scram-sha-256", "--auth-local=trust")
    options = f"-p {port} -k {cluster} -c listen_addresses=127.0.0.1"
    # The server's log goes to a file: on the captured output it would hold the pipe open forever.
    _as_postgres(
        binaries / "pg_ctl", "-D", cluster, "-o", options, "-l", cluster / "server.log", "-w", "start"
    )
    try:
        server = PostgresServer(binaries, cluster, port)
        server.psql(f"CREATE USER recsys PASSWORD '{PASSWORD}'")
        yield server
    finally:
        _as_postgres(binaries / "pg_ctl", "-D", cluster, "-m", "fast", "stop")
        shutil.rmtree(cluster)


def _server_binaries() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    if not found:
        pytest.fail(
            "PostgreSQL server binaries not found under /usr/lib/postgresql: install Debian's postgresql "
            "package (apt-get install postgresql; .ci/run does)"
        )
    return found[-1].parent


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _as_postgres(*command: str | Path) -> None:
    done = subprocess.run(
        ["runuser", "-u", "postgres", "--", *map(str, command)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, f"{command[0]} failed: {done.stdout}{done.stderr}"
