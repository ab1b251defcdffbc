"""Garbage collection of artifact versions: `recsys gc`.

Deletes only what no kept manifest references, under each target's publishing lock, and never touches
manifests/ or the registry (docs/how-to/rollback.md).
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from recsys_core import artifact_sync
from recsys_core.manifest import (
    MANIFEST_FILE,
    MANIFESTS_DIR,
    META_FILE,
    ManifestError,
    current_timeline,
    list_targets,
    read_manifest,
    target_dir,
)
from recsys_core.names import UnsafePathError
from recsys_core.object_store import RemoteTree, remote_tree
from recsys_core.storage import fsync_dir
from recsys_dagster.publishing.protocol import read_records, target_lock


@dataclass
class GcReport:
    """Result of `gc`: what is (or would be) deleted, with sizes in bytes, and what was kept."""

    to_delete: list[tuple[Path, int]] = field(default_factory=list)
    deleted: list[tuple[Path, int]] = field(default_factory=list)
    kept: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def bytes_to_delete(self) -> int:
        """Total size of everything selected for deletion."""
        return sum(size for _, size in self.to_delete)


def _size_and_newest(path: Path) -> tuple[int, float]:
    """Total bytes under `path` and the newest mtime in it (a dir still being filled counts as fresh)."""
    info = path.lstat()
    total, newest = info.st_size if not path.is_dir() else 0, info.st_mtime
    if path.is_dir() and not path.is_symlink():
        for folder, _dirs, names in os.walk(path):
            newest = max(newest, os.lstat(folder).st_mtime)
            for name in names:
                item = os.lstat(os.path.join(folder, name))
                total += item.st_size
                newest = max(newest, item.st_mtime)
    return total, newest


def _kept_refs(target: Path, tenant: str, surface: str, keep: int) -> set[tuple[str, str]]:
    """(kind, version) pairs referenced by the current manifest and the `keep` most recent current ones."""
    current = (
        read_manifest(target / MANIFEST_FILE, base=target, tenant=tenant, surface=surface)
        if (target / MANIFEST_FILE).exists()
        else None
    )
    recent: list[str] = []
    for mv in reversed(current_timeline(read_records(target))):
        if len(recent) >= keep:
            break
        if mv not in recent:
            recent.append(mv)
    manifests = [current] if current else []
    for mv in recent:
        if current and mv == current["manifest_version"]:
            continue
        path = target / MANIFESTS_DIR / f"{mv}.json"
        if not path.exists():
            raise ManifestError(f"manifest {mv} named in the registry is missing from {MANIFESTS_DIR}/")
        manifests.append(read_manifest(path, base=target, tenant=tenant, surface=surface))
    return {(kind, item["version"]) for m in manifests for kind, item in m["artifacts"].items()}


def gc(
    artifact_root: Path,
    keep: int,
    *,
    apply: bool = False,
    min_age_seconds: int = 3600,
    now: float | dt.datetime | None = None,
) -> GcReport:
    """Select (and with `apply=True` delete) artifact versions no kept manifest references.

    Kept per tenant/surface: everything the current manifest references, everything the `keep` most
    recently current manifests (registry order of publish/rollback records) reference, and anything
    modified less than `min_age_seconds` ago (a running build may be about to publish it). Leftover
    temp entries (dot names) older than `min_age_seconds` go too. manifests/ and the registry are never
    touched. A target whose manifests cannot be read is skipped and reported in `errors`: deleting
    without knowing the references could break a kept manifest.
    """
    if keep < 0:
        raise ValueError("keep must be >= 0")
    if now is None:
        now_ts = time.time()
    elif isinstance(now, dt.datetime):
        now_ts = now.timestamp()
    else:
        now_ts = float(now)
    report = GcReport()
    remote = remote_tree(artifact_root)
    if remote is not None:
        artifact_sync.pull_all(remote)
    for tenant, surface in list_targets(artifact_root):
        target = target_dir(artifact_root, tenant, surface)
        # Under the lock so no publish or rollback can start referencing a version while it is deleted.
        with target_lock(target):
            try:
                refs = _kept_refs(target, tenant, surface, keep)
            except (ManifestError, UnsafePathError) as exc:
                report.errors.append(f"{tenant}/{surface}: {exc}; nothing deleted there")
                continue
            selected: list[tuple[Path, int]] = []
            for entry in sorted(os.scandir(target), key=lambda e: e.name):
                is_dir = entry.is_dir(follow_symlinks=False)
                if entry.name.startswith(".") and ".tmp-" in entry.name and not is_dir:
                    size, newest = _size_and_newest(Path(entry.path))  # torn write_atomic temp file
                    if now_ts - newest >= min_age_seconds:
                        selected.append((Path(entry.path), size))
                    continue
                if not is_dir or entry.name.startswith(".") or entry.name == MANIFESTS_DIR:
                    continue
                for version in sorted(os.scandir(entry.path), key=lambda e: e.name):
                    path = Path(version.path)
                    if not version.is_dir(follow_symlinks=False) and not version.name.startswith("."):
                        continue
                    size, newest = _size_and_newest(path)
                    fresh = now_ts - newest < min_age_seconds
                    if not version.name.startswith(".") and ((entry.name, version.name) in refs or fresh):
                        report.kept += 1
                    elif not fresh:
                        selected.append((path, size))
            history_dir = target / MANIFESTS_DIR
            history_entries = (
                sorted(os.scandir(history_dir), key=lambda e: e.name) if history_dir.is_dir() else []
            )
            for entry in history_entries:
                if (
                    entry.name.startswith(".")
                    and ".tmp-" in entry.name
                    and entry.is_file(follow_symlinks=False)
                ):
                    size, newest = _size_and_newest(Path(entry.path))
                    if now_ts - newest >= min_age_seconds:
                        selected.append((Path(entry.path), size))
            report.to_delete.extend(selected)
            if apply:
                for path, size in selected:
                    _remove(path)
                    report.deleted.append((path, size))
            if remote is not None:
                _bucket_gc(remote, target, refs, now_ts - min_age_seconds, apply, report)
    return report


def _bucket_gc(
    remote: RemoteTree, target: Path, refs: set[tuple[str, str]], cutoff: float, apply: bool, report: GcReport
) -> None:
    """The same selection on the bucket's copy of a target: version prefixes no kept manifest references
    and none of whose objects is newer than `cutoff` (a publisher may be uploading it). Reported under
    their `s3://` names; the objects of a version are deleted meta.json first, so that a version cut short
    by a crash reads as incomplete (and is downloaded again or deleted by the next gc), never as whole."""
    rel = target.relative_to(remote.local_root).as_posix()
    versions: dict[tuple[str, str], list[tuple[str, int, float]]] = {}
    for path, meta in remote.listing(rel).items():
        parts = path.split("/")
        if len(parts) >= 5 and parts[2] != MANIFESTS_DIR:
            versions.setdefault((parts[2], parts[3]), []).append(
                (path, int(meta["size"]), meta["last_modified"].timestamp())
            )
    for (kind, version), objects in sorted(versions.items()):
        if (kind, version) in refs or max(modified for _, _, modified in objects) > cutoff:
            continue
        size = sum(item_size for _, item_size, _ in objects)
        where = Path(remote.url(f"{rel}/{kind}/{version}"))
        report.to_delete.append((where, size))
        if apply:
            keys = [key for key, _, _ in objects]
            remote.delete([key for key in keys if key.endswith(f"/{META_FILE}")])
            remote.delete([key for key in keys if not key.endswith(f"/{META_FILE}")])
            report.deleted.append((where, size))


def _remove(path: Path) -> None:
    """Delete a file or directory; a version directory is first renamed to a dot name so that a crash
    mid-delete never leaves a partial directory under a version name (the next gc finishes it)."""
    if path.is_dir() and not path.is_symlink():
        if not path.name.startswith("."):
            doomed = path.parent / f".deleting-{path.name}-{uuid.uuid4().hex[:8]}"
            os.rename(path, doomed)
            fsync_dir(path.parent)
            path = doomed
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
