"""Publishing on an S3-compatible store (a real SeaweedFS server): the bucket is the system of record and
each "machine" below is a separate local cache (its own RECSYS_HOME) sharing one bucket.

The promises of local publishing hold on the bucket: the pointer only moves forward, history and rollback
work from any machine, two publishers racing lose no update (conditional writes instead of a lock), and a
publisher killed in the middle leaves the previous manifest current and servable.
"""

from __future__ import annotations

import datetime as dt
import json
import signal
import subprocess
import sys
import threading
from pathlib import Path

import obstore
import pytest
from test_publishing import D1, D2, D3, D4, S, T, build, pub, registry_ok

from benchmarks.seaweedfs import S3Server
from recsys_core import manifest
from recsys_dagster.publishing import protocol as publishing
from recsys_dagster.publishing.gc import gc

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def machine(tmp_path: Path, name: str) -> Path:
    """The artifact tree of one machine's cache (the bucket's `<prefix>/artifacts/`)."""
    return tmp_path / name / "artifacts"


def bucket_json(s3_server: S3Server, env: dict[str, str], relative: str) -> dict:
    bucket, _, prefix = env["RECSYS_STORAGE_URL"].removeprefix("s3://").partition("/")
    data = obstore.get(s3_server.store(bucket), f"{prefix}/artifacts/{T}/{S}/{relative}").bytes()
    return json.loads(bytes(data))


def bucket_keys(s3_server: S3Server, env: dict[str, str]) -> list[str]:
    bucket, _, prefix = env["RECSYS_STORAGE_URL"].removeprefix("s3://").partition("/")
    return [key.removeprefix(f"{prefix}/artifacts/") for key in s3_server.keys(bucket, f"{prefix}/artifacts")]


def test_publish_history_rollback_and_gc_across_machines(
    tmp_path: Path, s3_server: S3Server, s3_env: dict[str, str]
) -> None:
    a, b, c = (machine(tmp_path, name) for name in "abc")
    first = pub(a, D1, build(a, D1))
    assert first.action == "publish"
    # Machine B has never seen D1: it learns the current manifest from the bucket and publishes forward.
    second = pub(b, D2, build(b, D2, salt=1))
    assert (second.action, second.previous) == ("publish", first.manifest_version)
    assert bucket_json(s3_server, s3_env, "manifest.json")["manifest_version"] == second.manifest_version
    # Forward-only against the bucket's state: A's stale cache does not let it move the pointer back.
    assert pub(a, D1, build(a, D1, salt=2)).action == "history_only"
    keys = bucket_keys(s3_server, s3_env)
    assert f"{T}/{S}/manifests/{second.manifest_version}.json" in keys
    assert any(key.startswith(f"{T}/{S}/popularity/") and key.endswith("/items.parquet") for key in keys)

    # A third machine with an empty cache: status and history from the bucket, then a rollback.
    (status,) = publishing.status(c)
    assert (status["manifest_version"], status["as_of"]) == (second.manifest_version, D2.isoformat())
    assert [r["action"] for r in publishing.history(c, T, S)] == ["publish", "publish", "history_only"]
    back = publishing.rollback(c, T, S, steps=1, reason="bad model", actor="ops")
    assert (back.previous, back.manifest_version) == (second.manifest_version, first.manifest_version)
    served = bucket_json(s3_server, s3_env, "manifest.json")
    assert served["manifest_version"] == first.manifest_version
    assert manifest.read_current(a, T, S) is not None  # A's cache is refreshed on its next operation
    assert pub(a, D3, build(a, D3, salt=3)).previous == first.manifest_version
    records = registry_ok(c)
    assert [r["action"] for r in records] == ["publish", "publish", "history_only", "rollback"]
    assert [r["action"] for r in publishing.history(c, T, S)][-1] == "publish"

    # gc on the bucket keeps what the current and the last kept manifests reference, deletes the rest.
    report = gc(c, keep=1, apply=True, min_age_seconds=0)
    assert not report.errors and report.deleted
    assert all(str(path).startswith("s3:/") or not path.exists() for path, _ in report.deleted)
    current = bucket_json(s3_server, s3_env, "manifest.json")
    keys = bucket_keys(s3_server, s3_env)
    for kind, uri in current["current"].items():
        assert f"{T}/{S}/{uri}/meta.json" in keys, kind
    left = {key.split("/")[3] for key in keys if key.split("/")[2] in ("popularity", "cooc")}
    assert left == {item["version"] for item in current["artifacts"].values()}
    # What gc removed from the bucket cannot be rolled back to, and saying so changes nothing.
    with pytest.raises(publishing.PublishError, match="missing or invalid"):
        publishing.rollback(
            machine(tmp_path, "d"), T, S, to_version=second.manifest_version, reason="r", actor="o"
        )


def test_two_concurrent_publishers_lose_no_update(tmp_path: Path, s3_env: dict[str, str]) -> None:
    days = {"a": [D1, D3], "b": [D2, D4]}
    roots = {name: machine(tmp_path, name) for name in days}
    built = {
        name: {day: build(roots[name], day, salt=i) for i, day in enumerate(days[name])} for name in days
    }
    start = threading.Barrier(len(days))
    outcomes: dict[str, list[publishing.PublishOutcome]] = {name: [] for name in days}
    errors: list[BaseException] = []

    def publisher(name: str) -> None:
        try:
            start.wait()
            for day, artifacts in built[name].items():
                outcomes[name].append(pub(roots[name], day, artifacts))
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=publisher, args=(name,)) for name in days]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    records = registry_ok(roots["a"] if publishing.history(roots["a"], T, S) else roots["b"])
    # Every publish call left exactly its record: none was overwritten by the other publisher's.
    assert len(records) == 4
    assert sorted((r["as_of"], r["action"]) for r in records) == sorted(
        (o_day.isoformat(), o.action)
        for name in days
        for o_day, o in zip(days[name], outcomes[name], strict=True)
    )
    # Forward-only held across both: D4 (the newest day) is current, and each record's `previous` is what
    # was current when it was decided.
    (status,) = publishing.status(machine(tmp_path, "c"))
    assert status["as_of"] == D4.isoformat()
    current = None
    for record in records:
        assert record["previous"] == current
        if record["action"] == "publish":
            current = record["manifest_version"]
    assert status["manifest_version"] == current


KILLER = """
import os, signal, sys, datetime as dt
from pathlib import Path
sys.path.insert(0, {tests!r})
from recsys_core import object_store
from test_publishing import build, pub
root, day, point = Path(sys.argv[1]), dt.date.fromisoformat(sys.argv[2]), sys.argv[3]
swap = object_store.RemoteTree.swap
def dying_swap(self, relative, data, expected_etag):
    if relative.endswith(point):
        os.kill(os.getpid(), signal.SIGKILL)
    return swap(self, relative, data, expected_etag)
object_store.RemoteTree.swap = dying_swap
pub(root, day, build(root, day, salt=7))
"""


def publish_and_die(root: Path, day: dt.date, point: str) -> None:
    """Publish `day` in a child process that SIGKILLs itself when it is about to swap `point`."""
    script = KILLER.format(tests=str(PROJECT_ROOT / "tests"))
    done = subprocess.run([sys.executable, "-c", script, str(root), day.isoformat(), point], check=False)
    assert done.returncode == -signal.SIGKILL


def test_publisher_killed_mid_publish_leaves_previous_manifest_current(
    tmp_path: Path, s3_server: S3Server, s3_env: dict[str, str]
) -> None:
    a, b = machine(tmp_path, "a"), machine(tmp_path, "b")
    first = pub(a, D1, build(a, D1))
    # Killed before its commit point (the registry): all artifacts are uploaded, nothing changed.
    publish_and_die(b, D2, "registry.jsonl")
    assert bucket_json(s3_server, s3_env, "manifest.json")["manifest_version"] == first.manifest_version
    (status,) = publishing.status(machine(tmp_path, "c"))
    assert status["manifest_version"] == first.manifest_version
    assert [r["action"] for r in publishing.history(machine(tmp_path, "c"), T, S)] == ["publish"]

    # Killed after its commit, before swapping the pointer: the previous manifest is still the one served
    # (complete, artifacts in the bucket), and the next writer finishes the committed publish first.
    publish_and_die(b, D2, "manifest.json")
    served = bucket_json(s3_server, s3_env, "manifest.json")
    assert served["manifest_version"] == first.manifest_version
    viewer = machine(tmp_path, "d")
    publishing.status(viewer)
    folder = manifest.target_dir(viewer, T, S)
    for uri in served["current"].values():
        assert manifest.verify_artifact(folder / uri, False) == []
    committed = publishing.history(viewer, T, S)[-1]
    assert committed["action"] == "publish" and committed["as_of"] == D2.isoformat()
    after = pub(a, D3, build(a, D3, salt=9))
    assert (after.action, after.previous) == ("publish", committed["manifest_version"])
    assert bucket_json(s3_server, s3_env, "manifest.json")["manifest_version"] == after.manifest_version
    registry_ok(a)
