"""The pipeline end to end on an S3-compatible store (a real SeaweedFS server), through the CLI and HTTP.

Every command runs in its own process with its own RECSYS_HOME, as on separate machines that share only the
bucket: events land from one, the pipeline runs on another, operators look and roll back from a third, and
the API server on a fourth answers from the bucket and follows each publish and rollback.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from test_serving_limits import free_port

from benchmarks.seaweedfs import S3Server

RECSYS = [sys.executable, "-m", "recsys_cli.cli"]
QUERY = {"tenant": "demo", "surface": "home"}


def days_ago(n: int) -> str:
    return (dt.datetime.now(dt.UTC).date() - dt.timedelta(days=n)).isoformat()


def wait_until(check: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_pipeline_on_s3_through_the_cli_and_the_server(
    tmp_path: Path, s3_server: S3Server, s3_env: dict[str, str]
) -> None:
    first, third, fourth = days_ago(4), days_ago(2), days_ago(1)
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("RECSYS_", "DAGSTER_"))}
    base = clean | s3_env | {"RECSYS_START_DATE": first, "RECSYS_SERVE_POLL_SECONDS": "0.3"}

    def recsys(machine: str, *args: str) -> str:
        done = subprocess.run(
            [*RECSYS, *args],
            env=base | {"RECSYS_HOME": str(tmp_path / machine)},
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    bucket, _, prefix = s3_env["RECSYS_STORAGE_URL"].removeprefix("s3://").partition("/")

    def keys(tree: str) -> list[str]:
        return [key.removeprefix(f"{prefix}/{tree}/") for key in s3_server.keys(bucket, f"{prefix}/{tree}")]

    def bucket_manifest() -> str:
        import json

        import obstore

        data = obstore.get(s3_server.store(bucket), f"{prefix}/artifacts/demo/home/manifest.json").bytes()
        return str(json.loads(bytes(data))["manifest_version"])

    generate = ["generate", "--events-per-day", "2000", "--users", "200"]
    assert f"into {s3_env['RECSYS_STORAGE_URL']}" in recsys(
        "lander", *generate, "--end", third, "--days", "3"
    )
    assert any(key.startswith(f"dt={third}/") for key in keys("raw"))
    assert not (tmp_path / "worker").exists()

    recsys("worker", "run", "--start", first, "--end", third, "--quiet")
    lake = keys("lake")
    assert any(key.startswith(f"canonical_events/dt={third}/") for key in lake)
    assert any(key.startswith("item_daily/") for key in lake)
    published = bucket_manifest()

    port = free_port()
    server_env = base | {"RECSYS_HOME": str(tmp_path / "server")}
    server = subprocess.Popen(
        [*RECSYS, "serve", "--port", str(port)],
        env=server_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"

    def served() -> str | None:
        try:
            response = httpx.get(f"{url}/v1/manifest", params=QUERY, timeout=5)
        except httpx.TransportError:
            return None
        return str(response.json()["manifest_version"]) if response.status_code == 200 else None

    try:
        wait_until(lambda: served() == published, "the server to answer from the bucket")
        popular = httpx.get(f"{url}/v1/popular", params={**QUERY, "k": 5}, timeout=5)
        assert popular.status_code == 200 and popular.json()["items"]

        # Another day lands and is published from the worker: the server follows the bucket's manifest.
        recsys("lander", *generate, "--end", fourth, "--days", "1")
        recsys("worker", "run", "--start", fourth, "--quiet")
        newer = bucket_manifest()
        assert newer != published
        wait_until(lambda: served() == newer, "the server to load the new publish")

        # Operators on a machine with an empty cache: status, history, rollback and gc against the bucket.
        status = recsys("ops", "status", "--start", first, "--end", fourth)
        assert f"storage {s3_env['RECSYS_STORAGE_URL']}" in status
        assert newer[:12] in status and f"{fourth}       2,000" in status
        history = recsys("ops", "history", "--tenant", "demo", "--surface", "home")
        assert history.count(" publish ") == 2
        recsys(
            "ops", "rollback", "--tenant", "demo", "--surface", "home", "--steps", "1", "--reason", "check"
        )
        assert bucket_manifest() == published
        wait_until(lambda: served() == published, "the server to follow the rollback")
        dry_run = recsys("ops", "gc", "--keep", "1", "--min-age-hours", "0")
        assert "would delete" in dry_run and "kept" in dry_run
    finally:
        server.terminate()
        server.wait(30)
