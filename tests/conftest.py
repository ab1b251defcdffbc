"""Shared fixtures: a temporary RECSYS layout, a writer for raw landing files, a PostgreSQL server, an
S3-compatible object store."""

from __future__ import annotations

import datetime as dt
import gzip
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from postgres_server import PostgresServer, running_server

from benchmarks.seaweedfs import S3Server
from benchmarks.seaweedfs import running_server as running_s3_server

RawContent = bytes | str | Iterable[bytes | str | dict]


def write_raw(root: Path, day: dt.date, name: str, content: RawContent, *, newline: bytes = b"\n") -> Path:
    """Write one landing file `<root>/dt=<day>/<name>`.

    `content` is written as is when it is bytes or str; a list is joined line by line (dicts as JSON,
    str as UTF-8, bytes untouched), each line followed by `newline`. A name ending in `.gz` is gzipped.
    """
    if isinstance(content, bytes):
        data = content
    elif isinstance(content, str):
        data = content.encode("utf-8")
    else:
        parts = []
        for line in content:
            if isinstance(line, dict):
                line = json.dumps(line)
            parts.append((line.encode("utf-8") if isinstance(line, str) else line) + newline)
        data = b"".join(parts)
    folder = root / f"dt={day.isoformat()}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(gzip.compress(data, mtime=0) if name.endswith(".gz") else data)
    return path


@dataclass(frozen=True)
class Layout:
    """A RECSYS_HOME with its default roots, as `load_settings` derives them."""

    home: Path
    raw_root: Path
    lake_root: Path
    artifact_root: Path
    dagster_home: Path


@pytest.fixture(name="write_raw", scope="session")
def write_raw_fixture() -> Callable[..., Path]:
    return write_raw


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    home = tmp_path / "recsys"
    roots = Layout(home, home / "raw", home / "lake", home / "artifacts", home / "dagster")
    for path in (roots.raw_root, roots.lake_root, roots.artifact_root, roots.dagster_home):
        path.mkdir(parents=True)
    return roots


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh RECSYS_HOME for `recsys` commands run in-process: partitions from 12 days before
    yesterday on, every other recsys variable unset."""
    return use_home(monkeypatch, tmp_path / "home")


def use_home(monkeypatch: pytest.MonkeyPatch, home: Path) -> Path:
    """Point in-process `recsys` commands at `home`: partitions from 12 days before yesterday on, every
    other recsys variable unset."""
    monkeypatch.setenv("RECSYS_HOME", str(home))
    yesterday = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)
    monkeypatch.setenv("RECSYS_START_DATE", (yesterday - dt.timedelta(days=12)).isoformat())
    for var in (
        "RECSYS_CONFIG",
        "DAGSTER_HOME",
        "RECSYS_RAW_ROOT",
        "RECSYS_LAKE_ROOT",
        "RECSYS_ARTIFACT_ROOT",
        "RECSYS_UI_URL",
    ):
        monkeypatch.delenv(var, raising=False)
    return home


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A throwaway PostgreSQL server for the session (tests/postgres_server.py)."""
    with running_server() as server:
        yield server


@pytest.fixture(scope="session")
def postgres_url(postgres_server: PostgresServer) -> str:
    """The URL of a database `recsys` owned by user `recsys` on the session's PostgreSQL server."""
    return postgres_server.create_database("recsys")


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A throwaway SeaweedFS S3 server for the session (benchmarks/seaweedfs.py)."""
    with running_s3_server() as server:
        yield server


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """RECSYS_STORAGE_URL and the AWS_* variables pointing at a new bucket (set in this process too)."""
    env = s3_server.environ(s3_server.new_bucket(), "team/recsys")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env
