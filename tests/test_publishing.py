"""Publishing layer: artifact directories, manifests, registry, rollback, gc and their safety properties.

Everything runs on real files under tmp_path. Crash safety is tested by running publish in a child
process that SIGKILLs itself at a chosen step (the child patches `os.replace` / `os.write` / the registry
append; the product code has no test hooks), then checking what the parent finds on disk.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from recsys_core import manifest, storage
from recsys_core.manifest import ManifestError, UnsafePathError
from recsys_dagster.publishing import protocol as publishing
from recsys_dagster.publishing.gc import gc
from recsys_dagster.publishing.protocol import PublishError
from recsys_dagster.transform.artifact_dir import write_artifact_dir

PROJECT_ROOT = Path(__file__).resolve().parents[1]
T, S = "demo", "home"
D1, D2, D3, D4 = (dt.date(2026, 11, 20) + dt.timedelta(days=i) for i in range(4))
FILE_OF = {"popularity": "items.parquet", "cooc": "neighbors.parquet"}


def _frame(kind: str, items: int, salt: int) -> pl.DataFrame:
    if kind == "popularity":
        return pl.DataFrame(
            {
                "rank": pl.Series(range(1, items + 1), dtype=pl.Int32),
                "item_id": [f"i{n}" for n in range(items)],
                "score": [float(items - n + salt) for n in range(items)],
                "events": [items - n for n in range(items)],
            }
        )
    return pl.DataFrame(
        {
            "item_id": [f"i{n}" for n in range(items)],
            "rank": pl.Series([1] * items, dtype=pl.Int32),
            "neighbor_id": [f"i{(n + 1) % items}" for n in range(items)],
            "score": [0.5 + salt] * items,
            "count": [3] * items,
        }
    )


def build(
    root: Path,
    day: dt.date,
    *,
    tenant: str = T,
    surface: str = S,
    items: int = 5,
    salt: int = 0,
    kinds: tuple[str, ...] = ("popularity", "cooc"),
) -> dict[str, Path]:
    """Write one artifact version per kind as the builders do; returns kind -> version directory."""
    target = manifest.target_dir(root, tenant, surface)
    window = {"days": 30, "start": (day - dt.timedelta(days=29)).isoformat(), "end": day.isoformat()}
    built = {}
    for kind in kinds:
        meta = {
            "tenant": tenant,
            "surface": surface,
            "as_of": day.isoformat(),
            "window": window,
            "params": {"salt": salt},
            "inputs": {},
            "run_id": "test",
        }
        _, built[kind] = write_artifact_dir(target, kind, meta, {FILE_OF[kind]: _frame(kind, items, salt)})
    return built


def pub(root: Path, day: dt.date, artifacts: dict[str, Path], **kwargs) -> publishing.PublishOutcome:
    return publishing.publish(root, T, S, day, artifacts, **kwargs)


def registry_ok(root: Path, tenant: str = T, surface: str = S) -> list[dict]:
    """Registry parses and its seq runs 1, 2, 3, ... without gaps or repeats."""
    records = manifest.read_registry(root, tenant, surface)
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    return records


def without_time(doc: dict) -> dict:
    return {k: v for k, v in doc.items() if k != "updated_at"}


def set_age(path: Path, seconds: float) -> None:
    """Make `path` and everything under it look `seconds` old."""
    stamp = time.time() - seconds
    for folder, _dirs, names in os.walk(path):
        for name in names:
            os.utime(os.path.join(folder, name), (stamp, stamp))
        os.utime(folder, (stamp, stamp))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "artifacts"


# ----------------------------------------------------------------------------- artifact directories


def test_write_artifact_dir_is_deterministic_and_verifies(root: Path, tmp_path: Path) -> None:
    first = build(root, D1, kinds=("popularity",))["popularity"]
    # Same content from a differently chunked frame, into another root: same bytes, same version.
    frame = _frame("popularity", 5, 0)
    chunked = pl.concat([frame.slice(0, 2), frame.slice(2)], rechunk=False)
    assert chunked.n_chunks() == 2
    meta = manifest.read_meta(first)
    stable = {k: v for k, v in meta.items() if k not in ("version", "files", "rows", "format", "kind")}
    other_target = manifest.target_dir(tmp_path / "other", T, S)
    version, again = write_artifact_dir(other_target, "popularity", stable, {"items.parquet": chunked})
    assert version == first.name
    assert (again / "items.parquet").read_bytes() == (first / "items.parquet").read_bytes()

    # Rebuilding in place reuses the directory and leaves no temp dir behind.
    assert build(root, D1, kinds=("popularity",))["popularity"] == first
    assert sorted(p.name for p in first.parent.iterdir()) == [first.name]

    assert manifest.verify_artifact(first, required_nonempty=True) == []
    assert meta["version"] == first.name == manifest.artifact_version(meta)
    assert meta["rows"] == {"items.parquet": 5} and meta["format"] == 1 and meta["kind"] == "popularity"
    assert meta["files"]["items.parquet"] == storage.file_sha256(first / "items.parquet")
    # Volatile fields do not change the version; content does.
    assert manifest.artifact_version({**meta, "built_at": "x", "run_id": "y"}) == first.name
    assert build(root, D1, kinds=("popularity",), salt=1)["popularity"] != first


def test_write_artifact_dir_replaces_a_corrupt_existing_directory(root: Path) -> None:
    good = build(root, D1, kinds=("popularity",))["popularity"]
    (good / "items.parquet").write_bytes(b"garbage")
    assert manifest.verify_artifact(good, True)
    assert build(root, D1, kinds=("popularity",))["popularity"] == good
    assert manifest.verify_artifact(good, True) == []


# ------------------------------------------------------------------------------------ publish


def test_publish_writes_v1_manifest_history_and_registry(root: Path) -> None:
    arts = build(root, D1)
    out = pub(
        root, D1, arts, run_id="run-1", checks_summary={"canonical_events": {"days": 30, "passed": True}}
    )
    assert out.action == "publish" and out.previous is None
    target = root / T / S
    current = manifest.read_current(root, T, S)
    assert current is not None
    assert current["v"] == 1 and current["tenant"] == T and current["surface"] == S
    assert current["current"] == {kind: f"{kind}/{path.name}" for kind, path in arts.items()}
    assert current["as_of"] == D1.isoformat() and current["run_id"] == "run-1"
    assert current["published_by"] == "pipeline"
    assert (
        current["manifest_version"]
        == out.manifest_version
        == manifest.manifest_version(T, S, D1, {kind: path.name for kind, path in arts.items()})
    )
    assert current["artifacts"]["popularity"]["rows"] == 5
    assert current["artifacts"]["cooc"]["window"]["end"] == D1.isoformat()
    assert current["checks"] == {
        "canonical_events": {"days": 30, "passed": True},
        "artifacts": {"passed": True},
    }
    dt.datetime.strptime(current["updated_at"], "%Y-%m-%dT%H:%M:%SZ")
    for kind, uri in current["current"].items():
        assert manifest.resolve_uri(root, T, S, uri) == arts[kind]
    stored = json.loads((target / "manifests" / f"{out.manifest_version}.json").read_text())
    assert without_time(stored) == without_time(current)

    [record] = registry_ok(root)
    assert record["action"] == "publish" and record["manifest_version"] == out.manifest_version
    assert record["previous"] is None and record["as_of"] == D1.isoformat() and record["run_id"] == "run-1"
    assert manifest.list_targets(root) == [(T, S)]
    [state] = publishing.status(root)
    assert state["manifest_version"] == out.manifest_version and state["as_of"] == D1.isoformat()
    assert state["artifacts"]["popularity"] == {"version": arts["popularity"].name, "rows": 5}
    assert 0 <= state["age_seconds"] < 60


def test_republish_is_a_noop_with_the_same_manifest_version(root: Path) -> None:
    first = pub(root, D1, build(root, D1))
    before = (root / T / S / "manifest.json").read_bytes()
    again = pub(root, D1, build(root, D1))
    assert again.action == "noop" and again.manifest_version == first.manifest_version
    assert (root / T / S / "manifest.json").read_bytes() == before
    assert [r["action"] for r in registry_ok(root)] == ["publish", "noop"]


def test_current_only_moves_forward_and_backfills_are_history_only(root: Path) -> None:
    newer = pub(root, D2, build(root, D2))
    older = pub(root, D1, build(root, D1))
    assert older.action == "history_only" and older.previous == newer.manifest_version
    assert manifest.read_current(root, T, S)["manifest_version"] == newer.manifest_version
    assert (root / T / S / "manifests" / f"{older.manifest_version}.json").is_file()
    # Same day, new content (e.g. new parameters) does move current.
    rebuilt = pub(root, D2, build(root, D2, salt=1))
    assert rebuilt.action == "publish"
    assert [r["action"] for r in registry_ok(root)] == ["publish", "history_only", "publish"]


def test_refused_on_gate_problems(root: Path) -> None:
    first = pub(root, D1, build(root, D1))
    out = pub(
        root, D2, build(root, D2), gate_problems=["canonical_events 2026-11-21: blocking check(s) failed"]
    )
    assert out.action == "refused" and "blocking check" in out.message
    assert manifest.read_current(root, T, S)["manifest_version"] == first.manifest_version
    assert not (root / T / S / "manifests" / f"{out.manifest_version}.json").exists()
    last = registry_ok(root)[-1]
    assert last["action"] == "refused" and "blocking check" in last["reason"]


def _tamper_byte(path: Path) -> None:
    data = bytearray((path / "items.parquet").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / "items.parquet").write_bytes(bytes(data))


def _wrong_name(path: Path) -> None:
    path.rename(path.parent / ("0" * 64))


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (_tamper_byte, "sha256 mismatch"),
        (lambda p: (p / "meta.json").unlink(), "meta.json: missing"),
        (lambda p: (p / "meta.json").write_text("{not json"), "not readable JSON"),
        (lambda p: (p / "items.parquet").unlink(), "listed file items.parquet missing"),
        (_wrong_name, "directory name is not the artifact version"),
    ],
    ids=["tampered-byte", "no-meta", "bad-meta", "missing-file", "wrong-dir-name"],
)
def test_refused_on_a_corrupt_artifact_and_current_untouched(root: Path, damage, expected: str) -> None:
    first = pub(root, D1, build(root, D1))
    before = (root / T / S / "manifest.json").read_bytes()
    arts = build(root, D2)
    damage(arts["popularity"])
    if damage is _wrong_name:
        arts["popularity"] = arts["popularity"].parent / ("0" * 64)
    out = pub(root, D2, arts)
    assert out.action == "refused" and any(expected in p for p in out.problems), out.problems
    assert out.previous == first.manifest_version
    assert (root / T / S / "manifest.json").read_bytes() == before
    assert not (root / T / S / "manifests" / f"{out.manifest_version}.json").exists()
    assert registry_ok(root)[-1]["action"] == "refused"


def test_refused_when_rows_do_not_match_or_required_artifact_is_empty(root: Path) -> None:
    empty = build(root, D1, items=0)
    out = pub(root, D1, empty)
    assert out.action == "refused" and any("required artifact is empty" in p for p in out.problems)
    # cooc may be empty; popularity may not be missing.
    assert pub(root, D1, {"cooc": empty["cooc"]}).action == "refused"
    assert manifest.read_current(root, T, S) is None
    # A meta.json whose row count lies (and whose version is recomputed to match) is still caught.
    arts = build(root, D2)
    meta = manifest.read_meta(arts["popularity"])
    meta["rows"]["items.parquet"] = 6
    meta["version"] = manifest.artifact_version(meta)
    fake = arts["popularity"].parent / meta["version"]
    arts["popularity"].rename(fake)
    (fake / "meta.json").write_text(json.dumps(meta))
    out = pub(root, D2, {**arts, "popularity": fake})
    assert out.action == "refused" and any("has 5 rows, meta.json says 6" in p for p in out.problems)


def test_unreadable_manifest_json_is_restored_from_the_registry(root: Path) -> None:
    first = pub(root, D1, build(root, D1))
    (root / T / S / "manifest.json").write_text('{"v": 1, "tenant"')
    with pytest.raises(ManifestError, match="not readable JSON"):
        manifest.read_current(root, T, S)
    assert pub(root, D1, build(root, D1)).action == "noop"
    assert manifest.read_current(root, T, S)["manifest_version"] == first.manifest_version


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.update(v=2), "unsupported manifest format"),
        (lambda m: m.update(tenant="other"), "tenant is 'other'"),
        (lambda m: m["current"].update(popularity="../../../etc"), "normalised relative path"),
        (lambda m: m["current"].update(popularity="/etc"), "normalised relative path"),
        (lambda m: m.update(as_of="2026-13-01"), "not an ISO date"),
        (lambda m: m.update(current=[]), "non-empty object"),
        (lambda m: m["artifacts"]["popularity"].update(version="f" * 64), "expected popularity/<version>"),
    ],
)
def test_read_current_rejects_malformed_manifests(root: Path, edit, message: str) -> None:
    pub(root, D1, build(root, D1))
    path = root / T / S / "manifest.json"
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match=message):
        manifest.read_current(root, T, S)


# ------------------------------------------------------------------------------------ crash safety

CRASHING_PUBLISHER = r"""
import datetime as dt, json, os, signal, sys
from pathlib import Path
from recsys_dagster.publishing import protocol as publishing

point, root, artifacts, day = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
real_replace, real_append, real_write = os.replace, publishing._append_record, os.write
replaces = 0

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def replace(src, dst, *args, **kwargs):
    # Publish renames twice: manifests/<mv>.json, then manifest.json.
    global replaces
    replaces += 1
    if point == "before_swap" and replaces == 2:
        die()
    real_replace(src, dst, *args, **kwargs)
    if (point == "after_history_write" and replaces == 1) or (point == "after_swap" and replaces == 2):
        die()

def append(*args, **kwargs):
    record = real_append(*args, **kwargs)
    if point == "after_registry_append":
        die()
    return record

def write(fd, data):
    if point == "torn_registry_write" and b'"action"' in bytes(data):
        real_write(fd, bytes(data)[: len(data) // 2])
        die()
    return real_write(fd, data)

os.replace, os.write, publishing._append_record = replace, write, append
publishing.publish(root, "demo", "home", dt.date.fromisoformat(day), {k: Path(v) for k, v in artifacts.items()})
sys.exit(3)  # the kill point was never reached
"""


def publish_killed_at(point: str, root: Path, artifacts: dict[str, Path], day: dt.date) -> None:
    """Publish `artifacts` as of `day` in a child process that is SIGKILLed at `point`."""
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            CRASHING_PUBLISHER,
            point,
            str(root),
            json.dumps({k: str(p) for k, p in artifacts.items()}),
            day.isoformat(),
        ],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr


@pytest.mark.parametrize(
    ("point", "survivor"),
    [
        ("after_history_write", "old"),
        ("torn_registry_write", "old"),
        ("after_registry_append", "old"),
        ("before_swap", "old"),
        ("after_swap", "new"),
    ],
)
def test_a_publish_killed_at_any_step_leaves_a_consistent_tree(root: Path, point: str, survivor: str) -> None:
    old = pub(root, D1, build(root, D1))
    arts = build(root, D2)
    new_mv = manifest.manifest_version(T, S, D2, {k: p.name for k, p in arts.items()})
    publish_killed_at(point, root, arts, D2)

    current = manifest.read_current(root, T, S)  # loads and passes validation
    expected_mv = old.manifest_version if survivor == "old" else new_mv
    assert current["manifest_version"] == expected_mv
    stored = manifest.read_manifest(root / T / S / "manifests" / f"{expected_mv}.json", base=root / T / S)
    assert without_time(current) == without_time(stored)
    records = registry_ok(root)  # a torn last line is tolerated
    assert records[0]["action"] == "publish"

    again = pub(root, D2, arts)
    assert again.action in ("publish", "noop")
    assert manifest.read_current(root, T, S)["manifest_version"] == new_mv
    records = registry_ok(root)
    assert [r["manifest_version"] for r in records if r["action"] == "publish"] == [
        old.manifest_version,
        new_mv,
    ]
    data = (root / T / S / "registry.jsonl").read_bytes()
    assert manifest.parse_registry(data)[1] == len(data)  # no torn tail left behind
    assert pub(root, D3, build(root, D3)).action == "publish"


def test_registry_tolerates_a_torn_last_line_but_not_mid_file_corruption(root: Path) -> None:
    pub(root, D1, build(root, D1))
    path = root / T / S / "registry.jsonl"
    with open(path, "ab") as handle:
        handle.write(b'{"seq":2,"at":"2026-11-')
    assert len(registry_ok(root)) == 1
    assert pub(root, D2, build(root, D2)).action == "publish"  # cuts the torn tail, then appends
    assert [r["seq"] for r in registry_ok(root)] == [1, 2]
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(lines[0] + b"garbage\n" + lines[1])
    with pytest.raises(ManifestError, match="line 2 is corrupt"):
        manifest.read_registry(root, T, S)


# ------------------------------------------------------------------------------------- concurrency


CONCURRENT_PUBLISHER = r"""
import datetime as dt, json, sys, time
from pathlib import Path
from recsys_dagster.publishing import protocol as publishing

root, jobs, ready, go = Path(sys.argv[1]), json.loads(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
ready.touch()
while not go.exists():  # start line: both processes are imported and publish at the same moment
    time.sleep(0.002)
for day, arts in jobs:
    out = publishing.publish(root, "demo", "home", dt.date.fromisoformat(day), {k: Path(v) for k, v in arts.items()})
    assert out.action in ("publish", "history_only"), out
"""


def test_concurrent_publishers_lose_no_update(root: Path, tmp_path: Path) -> None:
    days = [D1 + dt.timedelta(days=n) for n in range(40)]
    jobs = [
        (d.isoformat(), {k: str(p) for k, p in build(root, d, kinds=("popularity",)).items()}) for d in days
    ]
    go = tmp_path / "go"
    # Two separate processes (not threads: flock must serialise real processes), days interleaved so
    # both move current forward and both also lose races (history_only).
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                CONCURRENT_PUBLISHER,
                str(root),
                json.dumps(jobs[i::2]),
                str(tmp_path / f"ready{i}"),
                str(go),
            ],
            cwd=PROJECT_ROOT,
        )
        for i in range(2)
    ]
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"ready{i}").exists() for i in range(2)) and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()
    assert [proc.wait(60) for proc in procs] == [0, 0]
    records = registry_ok(root)
    assert len(records) == 40
    expected = {
        manifest.manifest_version(T, S, d, {"popularity": Path(a["popularity"]).name}) for d, a in jobs
    }
    assert {r["manifest_version"] for r in records} == expected
    assert len(list((root / T / S / "manifests").glob("*.json"))) == 40
    current = manifest.read_current(root, T, S)
    assert current["as_of"] == days[-1].isoformat()
    # Every publish saw the previous publish's result: the chain of current versions is unbroken.
    chain = [r for r in records if r["action"] == "publish"]
    for before, after in itertools.pairwise(chain):
        assert after["previous"] == before["manifest_version"]
        assert after["as_of"] >= before["as_of"]
    assert chain[-1]["manifest_version"] == current["manifest_version"]


# ----------------------------------------------------------------------------------------- rollback


def test_rollback_after_a_crashed_publish_moves_what_is_served(root: Path) -> None:
    """A publish killed between its registry record and its swap: the rollback undoes the served manifest."""
    a, b = (pub(root, day, build(root, day)).manifest_version for day in (D1, D2))
    arts = build(root, D3)
    publish_killed_at("after_registry_append", root, arts, D3)
    assert manifest.read_current(root, T, S)["manifest_version"] == b

    out = publishing.rollback(root, T, S, steps=1, reason="b is bad", actor="alice")
    assert (out.previous, out.manifest_version) == (b, a)
    assert manifest.read_current(root, T, S)["manifest_version"] == a
    record = registry_ok(root)[-1]
    assert (record["from"], record["to"]) == (b, a)


def test_rollback_by_version_and_steps_and_refusal_to_republish(root: Path) -> None:
    a, b, c = (pub(root, day, build(root, day)).manifest_version for day in (D1, D2, D3))

    out = publishing.rollback(root, T, S, steps=1, reason="bad cooc", actor="alice")
    assert (out.action, out.previous, out.manifest_version) == ("rollback", c, b)
    current = manifest.read_current(root, T, S)
    assert current["manifest_version"] == b and current["as_of"] == D2.isoformat()
    record = registry_ok(root)[-1]
    assert record["action"] == "rollback" and record["actor"] == "alice" and record["reason"] == "bad cooc"
    assert (record["from"], record["to"], record["previous"], record["manifest_version"]) == (c, b, c, b)

    # Rolled back away from C: the next step goes to A, not back to C.
    assert publishing.rollback(root, T, S, steps=1, reason="also bad", actor="alice").manifest_version == a
    assert publishing.rollback(root, T, S, to_version=c, reason="was fine", actor="bob").manifest_version == c
    assert publishing.rollback(root, T, S, to_version=b, reason="no, bad", actor="bob").manifest_version == b

    # The pipeline re-publishing C's day must not silently undo the rollback...
    again = pub(root, D3, build(root, D3))
    assert again.action == "refused" and again.manifest_version == c
    assert f"manifest version {c} was rolled back on" in again.message and "(no, bad)" in again.message
    assert f"recsys rollback --to {c}" in again.message
    assert manifest.read_current(root, T, S)["manifest_version"] == b
    # ...while a newer day publishes normally.
    newer = pub(root, D4, build(root, D4))
    assert newer.action == "publish" and newer.previous == b
    assert [r["action"] for r in publishing.history(root, T, S)] == [
        "publish",
        "publish",
        "publish",
        "rollback",
        "rollback",
        "rollback",
        "rollback",
        "refused",
        "publish",
    ]


def test_rollback_errors_are_clear_and_change_nothing(root: Path) -> None:
    with pytest.raises(PublishError, match="nothing published yet"):
        publishing.rollback(root, T, S, steps=1, reason="r", actor="a")
    a = pub(root, D1, build(root, D1)).manifest_version
    with pytest.raises(PublishError, match="nothing to roll back to"):
        publishing.rollback(root, T, S, steps=1, reason="r", actor="a")
    pub(root, D2, build(root, D2))
    before = (root / T / S / "registry.jsonl").read_bytes()
    cases = [
        ({"steps": 2}, "out of range"),
        ({"steps": 0}, "positive integer"),
        ({"to_version": "f" * 64}, "unknown manifest version"),
        ({"to_version": "../manifest"}, "unknown manifest version"),
        ({}, "exactly one"),
        ({"steps": 1, "to_version": a}, "exactly one"),
    ]
    for kwargs, message in cases:
        with pytest.raises(PublishError, match=message):
            publishing.rollback(root, T, S, reason="r", actor="a", **kwargs)
    with pytest.raises(PublishError, match="reason and an actor"):
        publishing.rollback(root, T, S, steps=1, reason=" ", actor="a")
    assert (root / T / S / "registry.jsonl").read_bytes() == before


def test_rollback_to_a_version_whose_artifacts_were_collected_fails_clearly(root: Path) -> None:
    a = pub(root, D1, build(root, D1)).manifest_version
    pub(root, D2, build(root, D2))
    c = pub(root, D3, build(root, D3)).manifest_version
    report = gc(root, keep=1, apply=True, min_age_seconds=0)
    assert len(report.deleted) == 4  # A's and B's two artifacts
    before = (root / T / S / "registry.jsonl").read_bytes()
    with pytest.raises(PublishError, match=r"cannot roll back to .*artifacts are missing"):
        publishing.rollback(root, T, S, to_version=a, reason="r", actor="a")
    assert manifest.read_current(root, T, S)["manifest_version"] == c
    assert (root / T / S / "registry.jsonl").read_bytes() == before


# ---------------------------------------------------------------------------------------------- gc


def test_gc_keeps_referenced_and_fresh_versions(root: Path) -> None:
    published = [build(root, day) for day in (D1, D2, D3)]
    for day, arts in zip((D1, D2, D3), published, strict=True):
        pub(root, day, arts)
    stray = build(root, D4, salt=7, kinds=("popularity",))["popularity"]  # built, never published
    fresh = build(root, D4, salt=8, kinds=("popularity",))[
        "popularity"
    ]  # built a moment ago, maybe about to be published
    target = root / T / S
    old_tmp = target / "popularity" / ".tmp-deadbeef"
    old_tmp.mkdir()
    (old_tmp / "items.parquet").write_bytes(b"partial")
    new_tmp = target / "cooc" / ".tmp-cafe"
    new_tmp.mkdir()
    for kind in ("popularity", "cooc"):
        for version in (target / kind).iterdir():
            if version not in (fresh, new_tmp):
                set_age(version, 7200)
    snapshot = sorted(str(p) for p in target.rglob("*"))

    dry = gc(root, keep=2)
    expected = {published[0]["popularity"], published[0]["cooc"], stray, old_tmp}
    assert {path for path, _ in dry.to_delete} == expected
    assert all(size > 0 for _, size in dry.to_delete) and dry.bytes_to_delete > 0
    assert dry.deleted == [] and dry.errors == []
    assert dry.kept == 5  # B and C (two kinds each) and the fresh build
    assert sorted(str(p) for p in target.rglob("*")) == snapshot

    applied = gc(root, keep=2, apply=True)
    assert {path for path, _ in applied.deleted} == expected
    assert not any(path.exists() for path in expected)
    assert fresh.exists() and new_tmp.exists()
    assert len(list((target / "manifests").glob("*.json"))) == 3
    assert len(registry_ok(root)) == 3
    current = manifest.read_current(root, T, S)
    for uri in current["current"].values():
        assert manifest.verify_artifact(manifest.resolve_uri(root, T, S, uri), True) == []

    # keep=0 still keeps what the current manifest references.
    gc(root, keep=0, apply=True)
    assert not published[1]["popularity"].exists() and published[2]["popularity"].exists()
    with pytest.raises(ValueError, match="keep"):
        gc(root, keep=-1)


# ---------------------------------------------------------------------------------- path safety

BAD_NAMES = ["..", ".", "../x", "a/b", "", "x" * 65, "a\x00b", "a b", "name\n", "ü"]


@pytest.mark.parametrize("bad", BAD_NAMES)
@pytest.mark.parametrize("which", ["tenant", "surface"])
def test_unsafe_tenant_and_surface_names_are_refused(tmp_path: Path, bad: str, which: str) -> None:
    root = tmp_path / "artifacts"
    names = {"tenant": T, "surface": S, which: bad}
    with pytest.raises(UnsafePathError, match=f"invalid {which} name"):
        manifest.target_dir(root, names["tenant"], names["surface"])
    with pytest.raises(UnsafePathError):
        publishing.publish(root, names["tenant"], names["surface"], D1, {})
    with pytest.raises(UnsafePathError):
        manifest.read_current(root, names["tenant"], names["surface"])
    with pytest.raises(UnsafePathError):
        publishing.rollback(root, names["tenant"], names["surface"], steps=1, reason="r", actor="a")
    assert list(tmp_path.iterdir()) == []  # nothing written anywhere


def test_symlinks_and_escaping_uris_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "artifacts"
    outside = tmp_path / "outside"
    outside.mkdir()
    arts = build(root, D1)
    root.joinpath("evil").symlink_to(outside, target_is_directory=True)
    root.joinpath("alias").symlink_to(root / T, target_is_directory=True)
    for tenant in ("evil", "alias"):
        with pytest.raises(UnsafePathError, match="refused"):
            publishing.publish(root, tenant, S, D1, arts)
        with pytest.raises(UnsafePathError):
            manifest.read_current(root, tenant, S)
        with pytest.raises(UnsafePathError):
            write_artifact_dir(
                manifest.target_dir(root, tenant, S), "popularity", {}, {"x.parquet": pl.DataFrame()}
            )
    assert list(outside.iterdir()) == []
    with pytest.raises(UnsafePathError):
        publishing.publish(root, T, S, D1, {"../x": arts["popularity"]})
    for uri in ("../../outside", "/etc", "popularity/../../../outside", "popularity/./x", ""):
        with pytest.raises(UnsafePathError):
            manifest.resolve_uri(root, T, S, uri)
    # Artifacts of another tenant cannot be smuggled into this one's manifest.
    other = build(root, D1, tenant="other")
    out = publishing.publish(root, T, S, D1, {**arts, "popularity": other["popularity"]})
    assert out.action == "refused" and "is not a version directory" in out.problems[0]
    assert manifest.list_targets(root) == [(T, S)]
