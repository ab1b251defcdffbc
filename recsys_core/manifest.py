"""Artifacts, manifests and the registry: the shared READ side of `docs/reference/artifacts.md`.

Both the pipeline (which publishes) and the API server (which follows `manifest.json`) import this
module, so it depends on nothing but the standard library, pyarrow and the rest of `recsys_core`. Writing
(publish, rollback, gc) lives in `recsys_dagster.publishing`.

Safety rules enforced here, before any byte is read or written:
- tenant, surface and kind names follow the name rule (`recsys_core.names`);
- every path is resolved (symlinks included) and must stay inside the artifact root; a tenant or surface
  directory that is itself a symlink is refused outright, so two names can never alias one directory.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, Literal, NotRequired, TypedDict, TypeGuard, cast, get_args

import numpy as np
import pyarrow.parquet as pq

from recsys_core.names import UnsafePathError, validate_name
from recsys_core.storage import file_sha256

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
MANIFESTS_DIR = "manifests"
REGISTRY_FILE = "registry.jsonl"
LOCK_FILE = ".lock"
META_FILE = "meta.json"
# Fields of meta.json that do not take part in the version (they change on every rebuild).
# The sources a manifest's `blend` weighs (recsys_core.settings.BlendWeights).
BLEND_SOURCES = ("als", "cooc", "popularity")
VOLATILE_META_FIELDS = frozenset({"version", "built_at", "run_id"})
RegistryAction = Literal["publish", "noop", "history_only", "refused", "rollback"]
REGISTRY_ACTIONS: frozenset[str] = frozenset(get_args(RegistryAction))

_HEX64_RE = re.compile(r"[0-9a-f]{64}")


class ManifestError(ValueError):
    """A manifest, meta.json or registry file that is missing required structure or is corrupt."""


# ------------------------------------------------------------------------------------------ records
# The JSON files of docs/reference/artifacts.md as the pipeline writes them. The types describe the
# files, they do not shape them: the writers decide the keys and their order.


class ArtifactWindow(TypedDict):
    """The trailing window an artifact was computed over."""

    days: int
    start: str
    end: str


class ArtifactMeta(TypedDict):
    """An artifact directory's `meta.json`.

    `write_artifact_dir` adds format, kind, rows, files, built_at and version to the fields its caller
    gives; the pipeline's builders give the others, which publishing checks only when they are present.
    """

    format: int
    kind: str
    version: str
    tenant: NotRequired[str]
    surface: NotRequired[str]
    as_of: NotRequired[str]
    window: NotRequired[ArtifactWindow]
    params: NotRequired[dict[str, Any]]
    rows: dict[str, int]
    files: dict[str, str]
    # The aggregate's days used, the content hash of each canonical day, the days missing.
    inputs: NotRequired[dict[str, list[str] | dict[str, str]]]
    built_at: str
    run_id: NotRequired[str | None]


class ManifestArtifact(TypedDict):
    """One kind in a manifest's `artifacts`; `window` is null when the artifact's meta.json has none."""

    version: str
    uri: str
    rows: int
    window: ArtifactWindow | None


class Manifest(TypedDict):
    """`manifest.json` and every file under `manifests/`."""

    v: int
    tenant: str
    surface: str
    current: dict[str, str]  # kind -> uri, relative to the directory of manifest.json
    updated_at: str
    manifest_version: str
    as_of: str
    artifacts: dict[str, ManifestArtifact]
    checks: dict[str, Any]  # per family of checks, what publishing confirmed
    run_id: str | None
    published_by: str
    # The served blend's weights (source -> weight), as evaluated before publishing; absent in manifests
    # written before the blend existed, which the server serves with its configured weights.
    blend: NotRequired[dict[str, float]]


# The fields of a registry record that follow its `seq` and `at`, in the order they are written (`from`
# is a keyword, hence the functional form). `previous` is null for the first publish; `actor`, `reason`
# and `run_id` are null when they do not apply.
RegistryFields = TypedDict(
    "RegistryFields",
    {
        "action": RegistryAction,
        "manifest_version": str,
        "previous": str | None,
        "as_of": str,
        "actor": str | None,
        "reason": str | None,
        "run_id": str | None,
        # Rollback records: the manifest versions current before and after.
        "from": NotRequired[str],
        "to": NotRequired[str],
    },
)


class RegistryRecord(RegistryFields):
    """One line of `registry.jsonl`: its sequence number and UTC time, then the fields."""

    seq: int
    at: str


def is_hex64(value: object) -> TypeGuard[str]:
    """True for a lowercase SHA-256 hex digest, the form of every version in this layout."""
    return isinstance(value, str) and _HEX64_RE.fullmatch(value) is not None


def target_dir(artifact_root: Path, tenant: str, surface: str) -> Path:
    """The resolved directory of one tenant and surface, refused if it is not exactly `<root>/<t>/<s>`.

    The root itself may be a symlink (it is resolved first); below it, the tenant and surface must be
    plain directories (or not exist yet). A symlink there is refused even if it points inside the root,
    because two names sharing one directory would share one registry and one lock.
    """
    validate_name("tenant", tenant)
    validate_name("surface", surface)
    root = Path(artifact_root).resolve()
    expected = root / tenant / surface
    resolved = expected.resolve()
    if resolved != expected:
        where = "outside the artifact root" if not resolved.is_relative_to(root) else "through a symlink"
        raise UnsafePathError(f"{tenant}/{surface}: resolves {where} ({resolved}); refused")
    return expected


def _inside(base: Path, relative: str, what: str) -> Path:
    """Resolve a relative POSIX path under `base`; refuse absolute paths, `..` and symlink escapes."""
    if not isinstance(relative, str) or not relative or "\x00" in relative or "\\" in relative:
        raise UnsafePathError(f"{what} {relative!r}: not a usable relative path")
    pure = PurePosixPath(relative)
    if pure.is_absolute() or any(part in ("..", ".") for part in pure.parts) or relative != pure.as_posix():
        raise UnsafePathError(f"{what} {relative!r}: must be a normalised relative path inside {base.name}/")
    resolved = (base / pure).resolve()
    if not resolved.is_relative_to(base.resolve()) or resolved == base.resolve():
        raise UnsafePathError(f"{what} {relative!r}: resolves outside its directory; refused")
    return resolved


def resolve_uri(artifact_root: Path, tenant: str, surface: str, uri: str) -> Path:
    """The artifact directory a manifest `current` URI points to, guaranteed inside the target dir."""
    return _inside(target_dir(artifact_root, tenant, surface), uri, "artifact uri")


# ------------------------------------------------------------------------------------------ hashing


def canonical_json(obj: Any) -> bytes:
    """Canonical JSON: sorted keys, no spaces, UTF-8, no NaN/Infinity (not JSON, not hashable stably)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode(
        "utf-8"
    )


def json_file_bytes(obj: Any) -> bytes:
    """Human-readable JSON for files people open (manifests, meta.json), keys in the documented order.

    Never hashed as such: versions are computed from `canonical_json`, so the layout here is free.
    """
    return (json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode()


def utc_timestamp(moment: dt.datetime | None = None) -> str:
    """`YYYY-MM-DDTHH:MM:SSZ` of `moment` (default: now), the form of every time in this layout."""
    moment = moment or dt.datetime.now(dt.UTC)
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def artifact_version(meta: Mapping[str, Any]) -> str:
    """SHA-256 hex of the canonical JSON of `meta` without its volatile fields (version, built_at, run_id)."""
    stable = {k: v for k, v in meta.items() if k not in VOLATILE_META_FIELDS}
    return hashlib.sha256(canonical_json(stable)).hexdigest()


def manifest_version(
    tenant: str,
    surface: str,
    as_of: dt.date | str,
    versions: Mapping[str, str],
    blend: Mapping[str, float] | None = None,
) -> str:
    """SHA-256 hex of the canonical JSON of `{tenant, surface, as_of, artifacts: {kind: version}}`, plus
    `blend` when the manifest carries blend weights (manifests written before them have none)."""
    day = as_of.isoformat() if isinstance(as_of, dt.date) else str(as_of)
    payload: dict[str, Any] = {
        "tenant": tenant,
        "surface": surface,
        "as_of": day,
        "artifacts": dict(versions),
    }
    if blend is not None:
        payload["blend"] = dict(blend)
    return hashlib.sha256(canonical_json(payload)).hexdigest()


# -------------------------------------------------------------------------------------- manifests


def read_manifest(
    path: Path, *, base: Path | None = None, tenant: str | None = None, surface: str | None = None
) -> Manifest:
    """Read and validate one manifest file; raise `ManifestError` with the reason if it is malformed.

    `base` is the directory the `current` URIs are relative to: the directory holding `manifest.json`
    (the default, `path.parent`), which for a file under `manifests/` is its grandparent. `tenant` and
    `surface`, when given, must match the file's. A missing file raises `FileNotFoundError`.
    """
    path = Path(path)
    base = Path(base) if base is not None else path.parent
    try:
        manifest = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:
        raise ManifestError(f"{path}: not readable JSON ({exc})") from exc

    def bad(why: str) -> ManifestError:
        return ManifestError(f"{path}: {why}")

    if not isinstance(manifest, dict):
        raise bad("not a JSON object")
    if manifest.get("v") != FORMAT_VERSION:
        raise bad(f"unsupported manifest format v={manifest.get('v')!r} (expected {FORMAT_VERSION})")
    for field, expected in (("tenant", tenant), ("surface", surface)):
        value = manifest.get(field)
        try:
            validate_name(field, value)
        except UnsafePathError as exc:
            raise bad(str(exc)) from exc
        if expected is not None and value != expected:
            raise bad(f"{field} is {value!r}, expected {expected!r}")
    try:
        _iso_text(dt.datetime.fromisoformat, manifest.get("updated_at"))
    except (TypeError, ValueError) as exc:
        raise bad(f"updated_at {manifest.get('updated_at')!r} is not an ISO timestamp") from exc
    current = manifest.get("current")
    if not isinstance(current, dict) or not current:
        raise bad("current must be a non-empty object of kind -> uri")
    artifacts = manifest.get("artifacts")
    if not isinstance(artifacts, dict) or set(artifacts) != set(current):
        raise bad("artifacts must describe exactly the kinds listed in current")
    versions: dict[str, str] = {}
    for kind, uri in current.items():
        try:
            validate_name("kind", kind)
            _inside(base, uri, f"current[{kind!r}]")
        except UnsafePathError as exc:
            raise bad(str(exc)) from exc
        entry = artifacts[kind]
        if not isinstance(entry, dict) or not is_hex64(entry.get("version")) or entry.get("uri") != uri:
            raise bad(f"artifacts[{kind!r}] must carry a 64-hex version and the same uri as current")
        if uri != f"{kind}/{entry['version']}":
            raise bad(f"current[{kind!r}] is {uri!r}, expected {kind}/<version>")
        versions[kind] = entry["version"]
    as_of = manifest.get("as_of")
    try:
        day = _iso_text(dt.date.fromisoformat, as_of)
    except (TypeError, ValueError) as exc:
        raise bad(f"as_of {as_of!r} is not an ISO date") from exc
    blend = manifest.get("blend")
    if blend is not None and not _is_blend(blend):
        raise bad(f"blend must map {', '.join(BLEND_SOURCES)} to numbers >= 0, got {blend!r}")
    mv = manifest.get("manifest_version")
    if not is_hex64(mv):
        raise bad("manifest_version missing or not 64 hex characters")
    # Recomputing the version catches a hand-edited or mixed-up manifest, not just a truncated one.
    if mv != manifest_version(manifest["tenant"], manifest["surface"], day, versions, blend):
        raise bad("manifest_version does not match its tenant/surface/as_of/artifact versions and blend")
    return cast(Manifest, manifest)  # validated above: what the readers rely on is there


def _is_blend(value: object) -> bool:
    return (
        isinstance(value, dict)
        and set(value) == set(BLEND_SOURCES)
        and all(
            isinstance(w, int | float) and not isinstance(w, bool) and 0 <= w < float("inf")
            for w in value.values()
        )
    )


def _iso_text(parse: Callable[[str], object], value: object) -> str:
    """`value`, a string that `parse` (a `fromisoformat`) accepts; TypeError or ValueError otherwise."""
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    parse(value)
    return value


def read_current(artifact_root: Path, tenant: str, surface: str) -> Manifest | None:
    """The current manifest of a tenant and surface, validated; None if nothing was published yet."""
    folder = target_dir(artifact_root, tenant, surface)
    try:
        return read_manifest(folder / MANIFEST_FILE, base=folder, tenant=tenant, surface=surface)
    except FileNotFoundError:
        return None


# -------------------------------------------------------------------------------------- artifacts


def read_meta(artifact_dir: Path) -> ArtifactMeta:
    """An artifact directory's `meta.json`; `ManifestError` if missing or not a JSON object.

    Only its being an object is checked here; `verify_artifact` checks the rest.
    """
    path = Path(artifact_dir) / META_FILE
    try:
        meta = json.loads(path.read_bytes())
    except FileNotFoundError as exc:
        raise ManifestError(f"{path}: missing") from exc
    except (OSError, ValueError) as exc:
        raise ManifestError(f"{path}: not readable JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise ManifestError(f"{path}: not a JSON object")
    return cast(ArtifactMeta, meta)


def verify_artifact(artifact_dir: Path, required_nonempty: bool) -> list[str]:
    """Every problem found with one artifact directory (empty list = valid).

    Checks the publishing protocol's step 2: meta.json present and well-formed, every listed file present
    with a matching SHA-256 and (for Parquet, from the footer only) row count, the version recomputed and
    equal both to meta's `version` and to the directory name, and at least one row when required.
    """
    folder = Path(artifact_dir)
    label = f"{folder.parent.name}/{folder.name}"
    if not folder.is_dir():
        return [f"{label}: artifact directory missing"]
    try:
        meta = read_meta(folder)
    except ManifestError as exc:
        return [f"{label}: {exc}"]
    problems: list[str] = []
    if meta.get("format") != FORMAT_VERSION:
        problems.append(f"{label}: meta.json format {meta.get('format')!r} (expected {FORMAT_VERSION})")
    if meta.get("kind") != folder.parent.name:
        problems.append(f"{label}: meta.json kind {meta.get('kind')!r} does not match its directory")
    files, rows = meta.get("files"), meta.get("rows")
    if not isinstance(files, dict) or not files:
        return [*problems, f"{label}: meta.json files must be a non-empty object of name -> sha256"]
    if not isinstance(rows, dict) or not set(rows) <= set(files):
        return [*problems, f"{label}: meta.json rows must be an object keyed by listed files"]
    for name, digest in files.items():
        try:
            path = _inside(folder, name, "file")
        except UnsafePathError as exc:
            problems.append(f"{label}: {exc}")
            continue
        if not path.is_file():
            problems.append(f"{label}: listed file {name} missing")
            continue
        if file_sha256(path) != digest:
            problems.append(f"{label}: {name} sha256 mismatch (file changed or corrupt)")
            continue
        if name in rows:
            expected = rows[name]
            if not isinstance(expected, int) or isinstance(expected, bool) or expected < 0:
                problems.append(f"{label}: rows[{name!r}] is not a non-negative integer")
            elif name.endswith((".parquet", ".npy")):
                try:
                    actual = _row_count(path)
                except Exception as exc:  # any footer or header error means the file is unusable
                    problems.append(f"{label}: {name} is not readable ({exc})")
                    continue
                if actual != expected:
                    problems.append(f"{label}: {name} has {actual} rows, meta.json says {expected}")
    try:
        recomputed = artifact_version(meta)
    except ValueError as exc:  # NaN in meta: cannot be canonical JSON
        recomputed = f"<uncomputable: {exc}>"
    if meta.get("version") != recomputed:
        problems.append(f"{label}: version in meta.json does not match its recomputed content hash")
    if folder.name != recomputed:
        problems.append(f"{label}: directory name is not the artifact version {recomputed[:12]}...")
    if required_nonempty and not problems:
        total = sum(v for v in rows.values() if isinstance(v, int))
        if total == 0:
            problems.append(f"{label}: required artifact is empty (0 rows)")
    return problems


def _row_count(path: Path) -> int:
    """Rows of a Parquet file (from its footer) or of a `.npy` array (its first dimension, from its header)."""
    if path.name.endswith(".npy"):
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            if version == (1, 0):
                shape, _, _ = np.lib.format.read_array_header_1_0(handle)
            else:
                shape, _, _ = np.lib.format.read_array_header_2_0(handle)
        return int(shape[0]) if shape else 1
    rows: int = pq.ParquetFile(path).metadata.num_rows
    return rows


# ------------------------------------------------------------------------------------ listing, log


def list_targets(artifact_root: Path) -> list[tuple[str, str]]:
    """(tenant, surface) pairs under the root that have a manifest.json or a registry, sorted.

    Entries with unsafe names or symlinked directories are skipped, not followed.
    """
    root = Path(artifact_root)
    found: list[tuple[str, str]] = []
    if not root.is_dir():
        return found
    for tenant_entry in sorted(os.scandir(root), key=lambda e: e.name):
        if not tenant_entry.is_dir(follow_symlinks=False):
            continue
        for surface_entry in sorted(os.scandir(tenant_entry.path), key=lambda e: e.name):
            if not surface_entry.is_dir(follow_symlinks=False):
                continue
            try:
                folder = target_dir(root, tenant_entry.name, surface_entry.name)
            except UnsafePathError:
                continue
            if (folder / MANIFEST_FILE).is_file() or (folder / REGISTRY_FILE).is_file():
                found.append((tenant_entry.name, surface_entry.name))
    return found


# Registry actions that move `current`; their `manifest_version` is what became current.
CURRENT_MOVING = ("publish", "rollback")


def current_timeline(records: Sequence[RegistryRecord]) -> list[str]:
    """Manifest versions in the order they became current (publish and rollback records)."""
    return [r["manifest_version"] for r in records if r.get("action") in CURRENT_MOVING]


def parse_registry(data: bytes, *, source: str = REGISTRY_FILE) -> tuple[list[RegistryRecord], int]:
    """Parse registry bytes into records plus the byte offset where the last good record ends.

    A crash while appending can leave the final line torn (partial, or zero-filled after power loss):
    that line is ignored, and the offset tells the next appender where to cut it off. An unparseable
    line anywhere else means the log is corrupt, and `ManifestError` says which line.
    """
    records: list[RegistryRecord] = []
    good_end = 0
    offset = 0
    lines = data.split(b"\n")
    # The chunk after the final newline is empty for a clean file, or the torn tail otherwise.
    for number, line in enumerate(lines, start=1):
        end = offset + len(line) + (1 if number < len(lines) else 0)
        is_last = number == len(lines) or (number == len(lines) - 1 and lines[-1] == b"")
        if line.strip():
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or not isinstance(record.get("seq"), int):
                    raise ValueError("not a record with an integer seq")
                if record.get("action") not in REGISTRY_ACTIONS:
                    raise ValueError(f"unknown action {record.get('action')!r}")
                if number == len(lines):
                    # No trailing newline: the write may have stopped mid-record even if it parses.
                    raise ValueError("unterminated final line")
            except ValueError as exc:
                if is_last:
                    break
                raise ManifestError(f"{source}: line {number} is corrupt ({exc})") from exc
            records.append(cast(RegistryRecord, record))  # a known action and an integer seq
        good_end = end
        offset = end
    return records, good_end


def read_registry(artifact_root: Path, tenant: str, surface: str) -> list[RegistryRecord]:
    """Registry records of a tenant and surface, oldest first ([] if none); tolerates a torn last line."""
    path = target_dir(artifact_root, tenant, surface) / REGISTRY_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    return parse_registry(data, source=str(path))[0]
