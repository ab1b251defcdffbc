"""The publishing protocol of one tenant and surface: publish, rollback, history and status.

Implements the publishing protocol of `docs/reference/artifacts.md`. The reading side (validation, paths,
hashing) is `recsys_core.manifest`; like it, this module imports no Dagster so the CLI and tests can use
it directly.

Durability model: the registry is the log and its record is the commit point. Under the target's lock a
publish writes `manifests/<mv>.json`, appends and fsyncs its registry record, and only then swaps
`manifest.json`. If a process dies between the append and the swap, the next locked operation sees that
the newest publish/rollback record names a manifest that is not current and finishes the swap
(roll-forward), so a committed publish or rollback always takes effect and the registry's history of
what was current stays true. Whatever the crash point, `manifest.json` is always the old or the new
complete manifest (it is only ever replaced by an atomic rename).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recsys_core import artifact_sync
from recsys_core.kinds import REQUIRED_KINDS
from recsys_core.manifest import (
    CURRENT_MOVING,
    FORMAT_VERSION,
    LOCK_FILE,
    MANIFEST_FILE,
    MANIFESTS_DIR,
    REGISTRY_FILE,
    ArtifactMeta,
    Manifest,
    ManifestError,
    RegistryAction,
    RegistryFields,
    RegistryRecord,
    current_timeline,
    is_hex64,
    json_file_bytes,
    list_targets,
    manifest_version,
    parse_registry,
    read_current,
    read_manifest,
    read_meta,
    read_registry,
    resolve_uri,
    target_dir,
    utc_timestamp,
    verify_artifact,
)
from recsys_core.names import UnsafePathError, validate_name
from recsys_core.object_store import RemoteConflict, remote_tree
from recsys_core.storage import fsync_dir, locked, write_all, write_atomic


class PublishError(ValueError):
    """A rollback (or other explicit operation) that cannot be done; nothing was changed."""


@dataclass(frozen=True)
class PublishOutcome:
    """What a publish or rollback did.

    `action` is one of publish, noop, history_only, refused (publish) or rollback; `previous` is the
    manifest version that was current before; `problems` lists the reasons of a refusal.
    """

    action: str
    manifest_version: str | None
    previous: str | None
    message: str
    problems: tuple[str, ...] = ()


# ------------------------------------------------------------------------------------------ helpers


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _as_date(as_of: dt.date | str) -> dt.date:
    # datetime is a date subclass, but its isoformat() would put a time into the manifest version.
    if isinstance(as_of, dt.datetime):
        raise TypeError("as_of must be a date, not a datetime")
    return as_of if isinstance(as_of, dt.date) else dt.date.fromisoformat(as_of)


def _prepare_target(artifact_root: Path, tenant: str, surface: str) -> Path:
    """Validate, create and re-validate the target dir (the re-check catches a symlink swapped in)."""
    target = target_dir(artifact_root, tenant, surface)
    target.mkdir(parents=True, exist_ok=True)
    if target_dir(artifact_root, tenant, surface) != target:
        raise UnsafePathError(f"{tenant}/{surface}: target directory changed while being created")
    return target


@contextlib.contextmanager
def target_lock(target: Path) -> Iterator[None]:
    """The target's lock (`<target>/.lock`), held for read-current -> write -> append -> swap."""
    with locked(target / LOCK_FILE):
        yield


def _transact(
    artifact_root: Path,
    tenant: str,
    surface: str,
    operation: Callable[[Path], PublishOutcome],
) -> PublishOutcome:
    """Run `operation` (a publish or rollback on the target directory) under the target's lock.

    With RECSYS_STORAGE_URL set, the local target is a copy of the bucket's: it is refreshed first, and what
    the operation did is committed to the bucket with conditional writes (recsys_core.artifact_sync). When
    another writer committed in between, the operation runs again on the newer state, as a second local
    writer would after waiting for the lock.
    """
    remote = remote_tree(artifact_root)
    target = (
        _prepare_target(artifact_root, tenant, surface)
        if remote
        else target_dir(artifact_root, tenant, surface)
    )
    with target_lock(target):
        if remote is None:
            return operation(target)
        while True:
            etag = artifact_sync.pull(remote, target)
            pulled = (target / REGISTRY_FILE).read_bytes() if etag is not None else None
            outcome = operation(target)
            try:
                artifact_sync.push(remote, target, etag, pulled)
            except RemoteConflict:
                continue
            return outcome


def read_records(target: Path) -> list[RegistryRecord]:
    path = target / REGISTRY_FILE
    try:
        return parse_registry(path.read_bytes(), source=str(path))[0]
    except FileNotFoundError:
        return []


def _append_record(target: Path, fields: RegistryFields) -> RegistryRecord:
    """Append one registry record with the next `seq`, fsynced. Caller holds the lock.

    A torn tail left by a crashed appender is cut off first: otherwise it would end up in the middle of
    the log, where it counts as corruption.
    """
    path = target / REGISTRY_FILE
    created = not path.exists()
    # O_NOFOLLOW: a symlinked registry must not make us append to a file outside the target.
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o644)
    try:
        size = os.fstat(fd).st_size
        data = os.pread(fd, size, 0) if size else b""
        records, good_end = parse_registry(data, source=str(path))
        if good_end < len(data):
            os.ftruncate(fd, good_end)
        record: RegistryRecord = {
            "seq": records[-1]["seq"] + 1 if records else 1,
            "at": utc_timestamp(),
            **fields,
        }
        line = (json.dumps(record, separators=(",", ":"), ensure_ascii=False) + "\n").encode()
        write_all(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:
        fsync_dir(target)
    return record


def _record(
    action: RegistryAction,
    mv: str,
    previous: str | None,
    as_of: str,
    *,
    actor: str | None = None,
    reason: str | None = None,
    run_id: str | None = None,
) -> RegistryFields:
    """Registry fields in a fixed order, every documented key present (null when not applicable)."""
    return {
        "action": action,
        "manifest_version": mv,
        "previous": previous,
        "as_of": as_of,
        "actor": actor,
        "reason": reason,
        "run_id": run_id,
    }


def _swap(target: Path, manifest: Manifest) -> Manifest:
    """Make `manifest` current: `updated_at` is the time of the swap, the rename is atomic."""
    swapped: Manifest = {**manifest, "updated_at": utc_timestamp()}
    write_atomic(target / MANIFEST_FILE, json_file_bytes(swapped))
    return swapped


def _rolled_back(records: Sequence[RegistryRecord]) -> dict[str, RegistryRecord]:
    """Manifest versions rolled back away from and not since re-instated by a rollback, with the record."""
    marks: dict[str, RegistryRecord] = {}
    for record in records:
        if record.get("action") == "rollback":
            if "from" in record:
                marks[record["from"]] = record
            if "to" in record:
                marks.pop(record["to"], None)
    return marks


def _load_current(
    target: Path, tenant: str, surface: str, records: Sequence[RegistryRecord]
) -> Manifest | None:
    """The current manifest, after finishing a swap that a crashed publish/rollback left undone.

    Caller holds the lock. The newest publish/rollback record is the committed state; if manifest.json
    disagrees (or is unreadable) and the committed manifest and its artifacts are intact, swap it in.
    """
    broken: ManifestError | None = None
    try:
        current = read_manifest(target / MANIFEST_FILE, base=target, tenant=tenant, surface=surface)
    except FileNotFoundError:
        current = None
    except ManifestError as exc:
        current, broken = None, exc
    timeline = current_timeline(records)
    if not timeline or (current is not None and current["manifest_version"] == timeline[-1]):
        if broken is not None:
            raise broken
        return current
    committed = timeline[-1]
    try:
        manifest = read_manifest(
            target / MANIFESTS_DIR / f"{committed}.json", base=target, tenant=tenant, surface=surface
        )
        intact = not any(verify_artifact(target / uri, False) for uri in manifest["current"].values())
    except (FileNotFoundError, ManifestError, UnsafePathError):
        intact = False
    if not intact:
        if broken is not None:
            raise broken
        return current
    return _swap(target, manifest)


def _served(
    target: Path, tenant: str, surface: str, records: Sequence[RegistryRecord]
) -> tuple[Manifest | None, str | None]:
    """What a rollback moves away from: the manifest being served, and the version of a publish (or
    rollback) that crashed between its registry record and its swap, if any.

    The operator rolls back what users see. Finishing the interrupted swap first (as a publish does) would
    make the rollback undo only that unseen publish and leave the served manifest in place.
    """
    try:
        served = read_manifest(target / MANIFEST_FILE, base=target, tenant=tenant, surface=surface)
    except (FileNotFoundError, ManifestError):
        return _load_current(target, tenant, surface, records), None
    timeline = current_timeline(records)
    committed = timeline[-1] if timeline else None
    unfinished = committed if committed != served["manifest_version"] else None
    return served, unfinished


def _check_inputs(
    target: Path,
    tenant: str,
    surface: str,
    day: str,
    artifacts: Mapping[str, Path],
    required_nonempty: Sequence[str],
) -> tuple[list[str], dict[str, ArtifactMeta]]:
    """Validate every artifact directory (protocol step 2); return problems and the metas read."""
    problems: list[str] = []
    metas: dict[str, ArtifactMeta] = {}
    if not artifacts:
        problems.append("no artifacts given")
    for kind in required_nonempty:
        if kind not in artifacts:
            problems.append(f"required artifact {kind} missing")
    for kind, given in artifacts.items():
        folder = target / kind / Path(given).name
        if Path(given).resolve() != folder:
            problems.append(
                f"{kind}: {given} is not a version directory {kind}/<version> of {tenant}/{surface}"
            )
            continue
        found = verify_artifact(folder, kind in required_nonempty)
        if found:
            problems.extend(found)
            continue
        meta = read_meta(folder)
        fields: Mapping[str, object] = meta  # by name: a meta.json need not have these three
        for key, expected in (("tenant", tenant), ("surface", surface), ("as_of", day)):
            if key in fields and fields[key] != expected:
                problems.append(
                    f"{kind}/{folder.name}: meta.json {key} is {fields[key]!r}, expected {expected!r}"
                )
        metas[kind] = meta
    return problems, metas


# ------------------------------------------------------------------------------------------ publish


def publish(
    artifact_root: Path,
    tenant: str,
    surface: str,
    as_of: dt.date,
    artifacts: Mapping[str, Path],
    *,
    required_nonempty: Sequence[str] = REQUIRED_KINDS,
    gate_problems: Sequence[str] = (),
    checks_summary: Mapping[str, Any] | None = None,
    run_id: str | None = None,
    actor: str = "pipeline",
    reason: str | None = None,
    blend: Mapping[str, float] | None = None,
    carry: Sequence[str] = (),
) -> PublishOutcome:
    """Publish the artifact directories `artifacts` (kind -> `<target>/<kind>/<version>`) as of `as_of`.

    `blend` (source -> weight) goes into the manifest, and into its version, for the API server to rank
    with; without it the server uses its configured weights. `actor` and `reason` are recorded with the
    outcome. The kinds of `carry` that `artifacts` does not give are taken from the current manifest, read
    under the target's lock (the pipeline carries the rules in force this way: a rules publish that lands
    while a run builds its models is never dropped).

    Outcomes (each recorded in the registry): `refused` if an artifact fails validation, `gate_problems`
    is non-empty, or the manifest was rolled back away from (nothing changes); `noop` if it is already
    current; `history_only` if `as_of` is older than the current manifest's (kept under manifests/,
    current unchanged); otherwise `publish` (manifest.json swapped last). Unsafe tenant/surface/kind
    names raise `UnsafePathError` before anything is written.
    """
    day = _as_date(as_of).isoformat()
    for kind in (*artifacts, *carry):
        validate_name("kind", kind)
    _prepare_target(artifact_root, tenant, surface)

    def operation(target: Path) -> PublishOutcome:
        records = read_records(target)
        current = _load_current(target, tenant, surface, records)
        carried = {
            kind: resolve_uri(artifact_root, tenant, surface, current["current"][kind])
            for kind in carry
            if kind not in artifacts and current is not None and kind in current["current"]
        }
        return _publish_locked(
            target,
            tenant,
            surface,
            day,
            {**artifacts, **carried},
            records,
            current,
            required_nonempty=required_nonempty,
            gate_problems=gate_problems,
            checks_summary=checks_summary,
            run_id=run_id,
            actor=actor,
            reason=reason,
            blend=blend,
        )

    return _transact(artifact_root, tenant, surface, operation)


def republish(
    artifact_root: Path,
    tenant: str,
    surface: str,
    changes: Mapping[str, Path],
    *,
    actor: str,
    reason: str,
) -> PublishOutcome:
    """Publish the current manifest with the artifact directories of `changes` (kind -> path) in place of
    its own: the same day, blend and checks, the other artifacts unchanged. The current manifest is read
    under the target's lock, so a publish that lands meanwhile (the next day's models) is built on, never
    undone. Raises `PublishError` when nothing is published there yet."""
    for kind in changes:
        validate_name("kind", kind)
    nothing = PublishError(f"{tenant}/{surface}: nothing is published yet; run the pipeline first")
    if not target_dir(artifact_root, tenant, surface).is_dir() and remote_tree(artifact_root) is None:
        raise nothing

    def operation(target: Path) -> PublishOutcome:
        records = read_records(target)
        current = _load_current(target, tenant, surface, records)
        if current is None:
            raise nothing
        artifacts = {
            kind: resolve_uri(artifact_root, tenant, surface, uri) for kind, uri in current["current"].items()
        }
        return _publish_locked(
            target,
            tenant,
            surface,
            current["as_of"],
            {**artifacts, **changes},
            records,
            current,
            checks_summary=current["checks"],
            actor=actor,
            reason=reason,
            blend=current.get("blend"),
        )

    return _transact(artifact_root, tenant, surface, operation)


def _publish_locked(
    target: Path,
    tenant: str,
    surface: str,
    day: str,
    artifacts: Mapping[str, Path],
    records: Sequence[RegistryRecord],
    current: Manifest | None,
    *,
    required_nonempty: Sequence[str] = REQUIRED_KINDS,
    gate_problems: Sequence[str] = (),
    checks_summary: Mapping[str, Any] | None = None,
    run_id: str | None = None,
    actor: str,
    reason: str | None,
    blend: Mapping[str, float] | None,
) -> PublishOutcome:
    """The publish of `publish` and `republish`, under the target's lock, `current` read under it."""
    versions = {kind: Path(path).name for kind, path in artifacts.items()}
    mv = manifest_version(tenant, surface, day, versions, blend)
    previous = current["manifest_version"] if current else None
    common = {"actor": actor, "run_id": run_id}

    problems, metas = _check_inputs(target, tenant, surface, day, artifacts, required_nonempty)
    problems = [*gate_problems, *problems]
    if problems:
        _append_record(target, _record("refused", mv, previous, day, **common, reason="; ".join(problems)))
        return PublishOutcome("refused", mv, previous, f"refused: {'; '.join(problems)}", tuple(problems))
    if mv == previous:
        _append_record(target, _record("noop", mv, previous, day, **common, reason=reason))
        return PublishOutcome("noop", mv, previous, f"manifest {mv[:12]} is already current")

    current_as_of = current["as_of"] if current else None
    forward = current_as_of is None or day >= current_as_of
    rolled = _rolled_back(records).get(mv)
    if forward and rolled is not None:
        why = (
            f"manifest version {mv} was rolled back on {rolled['at'][:10]} ({rolled.get('reason')}); "
            f"publish it explicitly with recsys rollback --to {mv}"
        )
        _append_record(target, _record("refused", mv, previous, day, **common, reason=why))
        return PublishOutcome("refused", mv, previous, why, (why,))

    manifest: Manifest = {
        "v": FORMAT_VERSION,
        "tenant": tenant,
        "surface": surface,
        "current": {kind: f"{kind}/{version}" for kind, version in sorted(versions.items())},
        "updated_at": utc_timestamp(),
        "manifest_version": mv,
        "as_of": day,
        "artifacts": {
            kind: {
                "version": versions[kind],
                "uri": f"{kind}/{versions[kind]}",
                "rows": sum(metas[kind]["rows"].values()),
                "window": metas[kind].get("window"),
            }
            for kind in sorted(versions)
        },
        "checks": {**(checks_summary or {}), "artifacts": {"passed": True}},
        "run_id": run_id,
        "published_by": actor,
    }
    if blend is not None:
        manifest["blend"] = dict(blend)
    history_dir = target / MANIFESTS_DIR
    if history_dir.is_symlink():  # would write history outside the target
        raise UnsafePathError(f"{tenant}/{surface}: {MANIFESTS_DIR}/ is a symlink; refused")
    history_dir.mkdir(exist_ok=True)
    history_file = history_dir / f"{mv}.json"
    try:
        # Immutable once written: a re-publish keeps the first file (and its run id).
        manifest = read_manifest(history_file, base=target, tenant=tenant, surface=surface)
    except (FileNotFoundError, ManifestError):
        write_atomic(history_file, json_file_bytes(manifest))

    if not forward:
        _append_record(target, _record("history_only", mv, previous, day, **common, reason=reason))
        return PublishOutcome(
            "history_only", mv, previous, f"{day} is older than current {current_as_of}: history only"
        )
    _append_record(target, _record("publish", mv, previous, day, **common, reason=reason))
    _swap(target, manifest)
    return PublishOutcome("publish", mv, previous, f"published {mv[:12]} as of {day}")


def rollback(
    artifact_root: Path,
    tenant: str,
    surface: str,
    *,
    to_version: str | None = None,
    steps: int | None = None,
    reason: str,
    actor: str,
) -> PublishOutcome:
    """Re-point current to an earlier manifest and record who and why. Raises `PublishError` if not possible.

    `to_version` names any manifest under manifests/. `steps=N` picks the N-th previous distinct manifest
    that was current, newest first, skipping the current one and any manifest that was rolled back away
    from (so `--steps 1` twice walks C -> B -> A instead of bouncing back to C).
    """
    if (to_version is None) == (steps is None):
        raise PublishError("give exactly one of to_version or steps")
    if not reason or not reason.strip() or not actor or not actor.strip():
        raise PublishError("a rollback needs a reason and an actor (they are recorded in the registry)")
    if not target_dir(artifact_root, tenant, surface).is_dir() and remote_tree(artifact_root) is None:
        raise PublishError(f"{tenant}/{surface}: nothing published yet, nothing to roll back")

    def operation(target: Path) -> PublishOutcome:
        records = read_records(target)
        current, unfinished = _served(target, tenant, surface, records)
        if current is None:
            raise PublishError(f"{tenant}/{surface}: nothing published yet, nothing to roll back")
        from_mv = current["manifest_version"]
        if steps is not None:
            if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
                raise PublishError(f"steps must be a positive integer, got {steps!r}")
            rolled = _rolled_back(records)
            candidates: list[str] = []
            for mv in reversed(current_timeline(records)):
                if mv not in (from_mv, unfinished) and mv not in rolled and mv not in candidates:
                    candidates.append(mv)
            if not candidates:
                raise PublishError(
                    f"{tenant}/{surface}: nothing to roll back to (no earlier manifest was current)"
                )
            if steps > len(candidates):
                raise PublishError(
                    f"steps={steps} out of range: {tenant}/{surface} has {len(candidates)} earlier manifest(s)"
                )
            to_mv = candidates[steps - 1]
        else:
            if not is_hex64(to_version):
                raise PublishError(f"unknown manifest version {to_version!r} (expected 64 hex characters)")
            to_mv = to_version
        if to_mv == from_mv:
            raise PublishError(f"manifest {to_mv} is already current; nothing to roll back")
        try:
            manifest = read_manifest(
                target / MANIFESTS_DIR / f"{to_mv}.json", base=target, tenant=tenant, surface=surface
            )
        except FileNotFoundError as exc:
            raise PublishError(f"unknown manifest version {to_mv}: not under {MANIFESTS_DIR}/") from exc
        except ManifestError as exc:
            raise PublishError(f"manifest {to_mv} is unusable: {exc}") from exc
        remote = remote_tree(artifact_root)
        if remote is not None:  # an older manifest's artifacts may not be in the local cache
            artifact_sync.fetch_artifacts(remote, target, manifest)
        problems = [
            problem
            for uri in manifest["current"].values()
            for problem in verify_artifact(resolve_uri(artifact_root, tenant, surface, uri), False)
        ]
        if problems:
            raise PublishError(
                f"cannot roll back to {to_mv}: its artifacts are missing or invalid (removed by gc?): "
                + "; ".join(problems)
            )
        _append_record(
            target,
            _record("rollback", to_mv, from_mv, manifest["as_of"], actor=actor, reason=reason)
            | {"from": from_mv, "to": to_mv},
        )
        _swap(target, manifest)
        return PublishOutcome(
            "rollback", to_mv, from_mv, f"rolled back {tenant}/{surface} from {from_mv[:12]} to {to_mv[:12]}"
        )

    return _transact(artifact_root, tenant, surface, operation)


# -------------------------------------------------------------------------------- history, status


def history(artifact_root: Path, tenant: str, surface: str) -> list[RegistryRecord]:
    """Registry records of a tenant and surface, newest last."""
    remote = remote_tree(artifact_root)
    if remote is not None:
        artifact_sync.pull(remote, _prepare_target(artifact_root, tenant, surface))
    return read_registry(artifact_root, tenant, surface)


def status(artifact_root: Path, *, now: dt.datetime | None = None) -> list[dict]:
    """One entry per tenant/surface: current manifest version, as-of, age and per-kind version/rows.

    A target whose manifest.json is malformed gets an `error` entry instead of failing the whole listing.
    """
    now = now or _utc_now()
    entries: list[dict] = []
    remote = remote_tree(artifact_root)
    if remote is not None:
        artifact_sync.pull_all(remote)
    for tenant, surface in list_targets(artifact_root):
        entry: dict[str, Any] = {"tenant": tenant, "surface": surface}
        try:
            current = read_current(artifact_root, tenant, surface)
        except (ManifestError, UnsafePathError) as exc:
            entries.append({**entry, "error": str(exc)})
            continue
        if current is None:
            entry.update(manifest_version=None, as_of=None, updated_at=None, age_seconds=None, artifacts={})
        else:
            updated = dt.datetime.fromisoformat(current["updated_at"])
            entry.update(
                manifest_version=current["manifest_version"],
                as_of=current["as_of"],
                updated_at=current["updated_at"],
                age_seconds=round((now - updated).total_seconds()),
                artifacts={
                    kind: {"version": item["version"], "rows": item.get("rows")}
                    for kind, item in current["artifacts"].items()
                },
                evaluation=(current.get("checks") or {}).get("evaluation"),
                blend=current.get("blend"),
            )
        # A refusal after the last publish or rollback is what an operator must see first: the reason
        # the current manifest is not newer.
        records = read_registry(artifact_root, tenant, surface)
        moved = max((r["seq"] for r in records if r.get("action") in CURRENT_MOVING), default=0)
        refusals = [r for r in records if r.get("action") == "refused" and r["seq"] > moved]
        if refusals:
            entry["refused"] = {
                "as_of": refusals[-1].get("as_of"),
                "at": refusals[-1].get("at"),
                "reason": refusals[-1].get("reason"),
            }
        entries.append(entry)
    return entries
