"""Packaging: an API-only install (`recsys[serving]`) serves published artifacts without any pipeline library.

The layering itself (no upward import, no Dagster in the core or the server) is checked by `lint-imports`
in `make test`; this test installs the distribution the way an API-only deployment does, from the pinned
lock file into a fresh virtual environment, and serves over HTTP from it.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import polars as pl

from recsys_core.manifest import target_dir
from recsys_dagster.publishing.protocol import publish
from recsys_dagster.transform.artifact_dir import write_artifact_dir

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PIPELINE_LIBRARIES = ("dagster", "duckdb", "polars", "pandera", "implicit", "optuna")


def _uv() -> str:
    local = PROJECT_ROOT / ".tools" / "bin" / "uv"
    found = str(local) if local.is_file() else shutil.which("uv")
    assert found, "uv is needed to build an API-only environment (make installs it into .tools/)"
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _publish_popularity(artifact_root: Path) -> str:
    day = dt.date(2026, 11, 20)
    frame = pl.DataFrame(
        {
            "rank": pl.Series([1, 2], dtype=pl.Int32),
            "item_id": ["i1", "i2"],
            "score": [2.0, 1.0],
            "events": [2, 1],
        }
    )
    meta = {"tenant": "demo", "surface": "home", "as_of": day.isoformat(), "window": None, "params": {}}
    _, path = write_artifact_dir(
        target_dir(artifact_root, "demo", "home"), "popularity", meta, {"items.parquet": frame}
    )
    outcome = publish(artifact_root, "demo", "home", day, {"popularity": path})
    assert outcome.action == "publish", outcome.message
    return outcome.manifest_version


def test_api_only_install_serves_without_pipeline_libraries(tmp_path: Path) -> None:
    uv = _uv()
    requirements = tmp_path / "requirements.txt"
    exported = subprocess.run(
        [uv, "export", "--frozen", "--no-dev", "--extra", "serving", "--no-hashes", "--no-emit-project"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    requirements.write_text(exported.stdout)
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    subprocess.run([uv, "venv", "--quiet", "--python", sys.executable, str(venv)], check=True, env=env)
    python = str(venv / "bin" / "python")
    install = [uv, "pip", "install", "--quiet", "--python", python]
    subprocess.run([*install, "-r", str(requirements)], check=True, env=env)
    subprocess.run([*install, "--no-deps", str(PROJECT_ROOT)], check=True, env=env)

    probe = "import importlib.util, sys; print([m for m in sys.argv[1:] if importlib.util.find_spec(m)])"
    present = subprocess.run(
        [python, "-c", probe, *PIPELINE_LIBRARIES], capture_output=True, text=True, check=True, env=env
    )
    assert present.stdout.strip() == "[]", f"pipeline libraries in an API-only install: {present.stdout}"

    home = tmp_path / "home"
    version = _publish_popularity(home / "artifacts")
    port = _free_port()
    server = subprocess.Popen(
        [str(venv / "bin" / "recsys"), "serve", "--port", str(port)],
        env={**env, "RECSYS_HOME": str(home)},
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        body = _get_when_up(f"http://127.0.0.1:{port}/v1/popular?tenant=demo&surface=home&k=2", server)
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert b'"i1"' in body and version.encode() in body


def _get_when_up(url: str, server: subprocess.Popen) -> bytes:
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.read()
        except OSError:
            if server.poll() is not None:
                raise AssertionError(f"the server exited: {server.stderr.read().decode()[-2000:]}") from None
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
