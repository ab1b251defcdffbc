"""The artifact tree of a bucket and its local cache: what publishing and the API server move between them.

Layout in the bucket (under `<prefix>/artifacts/`) is the local one of docs/reference/artifacts.md. The
commit protocol on the bucket, which keeps every promise of the local one without a rename or a lock:

1. artifact files, then each version's `meta.json` last, are created with `If-None-Match: *` (a version
   directory is complete once its meta.json exists; content-addressed, so an existing object is the same);
2. the history manifest `manifests/<mv>.json` is created likewise;
3. `registry.jsonl` (the whole log, the local record appended) replaces the bucket's with `If-Match` on the
   ETag read before the decision: the commit point. A writer that lost the race starts over from the new log,
   so forward-only and rolled-back checks are always made against the latest history;
4. `manifest.json` is converged on the newest publish/rollback record of the log with `If-Match` (`converge`).
   Every writer and the next one after a crash run this step, so a committed publish always takes effect and
   the pointer never goes back to an older record: it is read before the log, and a swap based on a stale
   read fails its `If-Match`.

A process killed anywhere leaves the previous manifest current (before step 3) or the new one committed and
swapped in by the next writer (after it); readers only ever see a complete manifest whose artifacts exist.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from recsys_core.manifest import (
    MANIFEST_FILE,
    MANIFESTS_DIR,
    META_FILE,
    REGISTRY_FILE,
    current_timeline,
    json_file_bytes,
    parse_registry,
    utc_timestamp,
)
from recsys_core.names import is_valid_name
from recsys_core.object_store import RemoteConflict, RemoteObject, RemoteTree
from recsys_core.storage import write_atomic


def remote_targets(remote: RemoteTree) -> list[tuple[str, str]]:
    """(tenant, surface) folders of the bucket with valid names, sorted (one listing per tenant: cheap
    however many artifact files there are)."""
    return [
        (tenant, surface)
        for tenant in remote.children("")
        if is_valid_name(tenant)
        for surface in remote.children(tenant)
        if is_valid_name(surface)
    ]


def fetch_artifacts(remote: RemoteTree, target: Path, manifest: Mapping[str, Any]) -> None:
    """Download the artifact directories `manifest` points to that the local cache lacks."""
    rel = target.relative_to(remote.local_root).as_posix()
    for uri in (manifest.get("current") or {}).values():
        remote.download_dir(f"{rel}/{uri}", target / uri)


def pull(remote: RemoteTree, target: Path) -> str | None:
    """Refresh the local copy of one target from the bucket: the registry, the history manifests the cache
    lacks, the artifacts of the committed and of the served manifest, then `manifest.json` last. Returns the registry's ETag (None: none)."""
    rel = target.relative_to(remote.local_root).as_posix()
    target.mkdir(parents=True, exist_ok=True)
    log = remote.download_file(f"{rel}/{REGISTRY_FILE}", target / REGISTRY_FILE)
    for path in sorted(remote.listing(f"{rel}/{MANIFESTS_DIR}")):
        local = remote.local_root / path
        if not local.exists():
            remote.download_file(path, local)
    timeline = current_timeline(parse_registry(log.data)[0]) if log else []
    committed = target / MANIFESTS_DIR / f"{timeline[-1]}.json" if timeline else None
    if committed is not None and committed.is_file():  # for the roll-forward of an interrupted publish
        fetch_artifacts(remote, target, json.loads(committed.read_bytes()))
    _install_served(remote, target, remote.get(f"{rel}/{MANIFEST_FILE}"))
    return log.etag if log else None


def _install_served(remote: RemoteTree, target: Path, served: RemoteObject | None) -> None:
    """Make the bucket's manifest.json the local one, after the artifacts it points to are local."""
    if served is None:
        (target / MANIFEST_FILE).unlink(missing_ok=True)
        return
    try:
        manifest = json.loads(served.data)
    except ValueError:  # a malformed pointer is copied as it is: the reader's validation reports it
        manifest = None
    if isinstance(manifest, dict) and isinstance(manifest.get("current"), dict):
        fetch_artifacts(remote, target, manifest)
    write_atomic(target / MANIFEST_FILE, served.data)


def push(remote: RemoteTree, target: Path, registry_etag: str | None, pulled_registry: bytes | None) -> None:
    """Commit what a publish or rollback did in the local copy of one target (steps 1-4 of the module doc).

    Raises `RemoteConflict` when the bucket's registry changed since `pull`: nothing was committed, and the
    caller starts over.
    """
    rel = target.relative_to(remote.local_root).as_posix()
    local_log = (target / REGISTRY_FILE).read_bytes() if (target / REGISTRY_FILE).exists() else None
    if local_log is None or local_log == pulled_registry:
        return
    in_bucket = remote.listing(f"{rel}/{MANIFESTS_DIR}")
    for history in sorted((target / MANIFESTS_DIR).glob("*.json")):
        key = f"{rel}/{MANIFESTS_DIR}/{history.name}"
        if key in in_bucket:
            continue
        for uri in json.loads(history.read_bytes())["current"].values():
            if remote.etag(f"{rel}/{uri}/{META_FILE}") is None:
                remote.upload_dir(target / uri, f"{rel}/{uri}", last=META_FILE)
        remote.create(key, history.read_bytes())
    remote.swap(f"{rel}/{REGISTRY_FILE}", local_log, registry_etag)
    converge(remote, target)


def converge(remote: RemoteTree, target: Path) -> None:
    """Swap the bucket's manifest.json to the newest publish/rollback record of its registry (step 4), then
    copy it to the local cache. The pointer is read before the log: a pointer written after our read by a
    newer commit fails our `If-Match`, and a commit after our read of the log swaps after us."""
    rel = target.relative_to(remote.local_root).as_posix()
    while True:
        served = remote.get(f"{rel}/{MANIFEST_FILE}")
        log = remote.get(f"{rel}/{REGISTRY_FILE}")
        timeline = current_timeline(parse_registry(log.data)[0]) if log else []
        if not timeline:
            break
        try:
            served_version = json.loads(served.data).get("manifest_version") if served else None
        except ValueError:
            served_version = None
        if served_version == timeline[-1]:
            break
        history = remote.get(f"{rel}/{MANIFESTS_DIR}/{timeline[-1]}.json")
        if history is None:  # a committed record names its history manifest, created before it
            raise FileNotFoundError(f"{rel}: {MANIFESTS_DIR}/{timeline[-1]}.json missing from the bucket")
        swapped = {**json.loads(history.data), "updated_at": utc_timestamp()}
        try:
            remote.swap(f"{rel}/{MANIFEST_FILE}", json_file_bytes(swapped), served.etag if served else None)
        except RemoteConflict:
            continue
    _install_served(remote, target, remote.get(f"{rel}/{MANIFEST_FILE}"))


def follow(remote: RemoteTree, seen: dict[tuple[str, str], str]) -> None:
    """The API server's poll of the bucket: for each target whose manifest.json has an ETag other than the
    one in `seen` (a HEAD request each), download the artifacts it points to, then the manifest itself into
    the local cache, where the server's own poller loads it as it does any local publish."""
    for tenant, surface in remote_targets(remote):
        rel = f"{tenant}/{surface}"
        etag = remote.etag(f"{rel}/{MANIFEST_FILE}")
        if etag is None or seen.get((tenant, surface)) == etag:
            continue
        served = remote.get(f"{rel}/{MANIFEST_FILE}")
        if served is not None:
            _install_served(remote, remote.local_root / tenant / surface, served)
            seen[(tenant, surface)] = served.etag


def pull_all(remote: RemoteTree) -> list[tuple[str, str]]:
    """Refresh the local copy of every target in the bucket (for status, history and gc); the targets."""
    targets = remote_targets(remote)
    for tenant, surface in targets:
        pull(remote, remote.local_root / tenant / surface)
    return targets
