"""Storage on an S3-compatible object store (`RECSYS_STORAGE_URL=s3://bucket/prefix`).

The bucket is the system of record; the local trees under RECSYS_HOME (`lake/`, `artifacts/`, ...) are
a working cache of it with the same layout: the local tree `<home>/<name>` is the bucket's
`<prefix>/<name>/`. Steps work on local files as they do without a bucket, and the seams that move data
in and out (publishing, the server's manifest follower, landing) use a `RemoteTree`:

- immutable objects (artifact files, history manifests, landing files) are created with
  `If-None-Match: *`: an existing object is never overwritten, and as these are content-addressed an
  existing one already holds the same bytes;
- mutable pointers (a target's `registry.jsonl` and `manifest.json`) are replaced with
  `If-Match: <etag>` (compare and swap), which stands in for the file lock of a local tree: a writer
  whose copy is stale gets a conflict and starts over from what is there now.

Credentials and endpoint come from the standard variables AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_REGION and AWS_ENDPOINT_URL (and AWS_SESSION_TOKEN when set).
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.parse
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import obstore
from obstore.exceptions import AlreadyExistsError, NotFoundError, PreconditionError
from obstore.store import S3Store

from recsys_core.storage import commit_dir, write_atomic

if TYPE_CHECKING:  # a TypedDict of the type stubs only
    from obstore.store import S3Config

STORAGE_URL_VAR = "RECSYS_STORAGE_URL"


class StorageConfigError(ValueError):
    """RECSYS_STORAGE_URL is not a usable storage location."""


@dataclass(frozen=True)
class StorageLocation:
    """Where the system of record lives: `s3://bucket/prefix` (prefix may be empty)."""

    bucket: str
    prefix: str

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")


def parse_storage_url(value: str | None) -> StorageLocation | None:
    """The location RECSYS_STORAGE_URL names; None (the local tree) when unset, empty or `file:`."""
    if not value or value.startswith("file:"):
        return None
    parts = urllib.parse.urlsplit(value)
    if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
        raise StorageConfigError(f"{STORAGE_URL_VAR}={value!r}: expected s3://bucket/prefix (or unset)")
    prefix = parts.path.strip("/")
    if prefix and any(part in ("", ".", "..") for part in prefix.split("/")):
        raise StorageConfigError(f"{STORAGE_URL_VAR}={value!r}: the prefix must be a plain path")
    return StorageLocation(parts.netloc, prefix)


class RemoteConflict(Exception):
    """A conditional write lost a race: the object changed since it was read."""


@dataclass(frozen=True)
class RemoteObject:
    data: bytes
    etag: str


class RemoteTree:
    """One local tree's counterpart in the bucket: keys are POSIX paths relative to the tree."""

    def __init__(self, store: S3Store, bucket: str, prefix: str, local_root: Path) -> None:
        self.store = store
        self.bucket = bucket
        self.prefix = prefix
        self.local_root = Path(local_root)

    def key(self, relative: str) -> str:
        return f"{self.prefix}/{relative}" if self.prefix else relative

    def url(self, relative: str) -> str:
        """The object's `s3://bucket/key` name, for messages."""
        return f"s3://{self.bucket}/{self.key(relative)}"

    def get(self, relative: str) -> RemoteObject | None:
        """The object's bytes and ETag; None if it does not exist."""
        try:
            result = obstore.get(self.store, self.key(relative))
        except (NotFoundError, FileNotFoundError):
            return None
        return RemoteObject(bytes(result.bytes()), str(result.meta["e_tag"]))

    def etag(self, relative: str) -> str | None:
        """The object's ETag (a HEAD request); None if it does not exist."""
        try:
            return str(obstore.head(self.store, self.key(relative))["e_tag"])
        except (NotFoundError, FileNotFoundError):
            return None

    def create(self, relative: str, data: bytes) -> bool:
        """Create an immutable object (`If-None-Match: *`); False if it already exists."""
        try:
            obstore.put(self.store, self.key(relative), data, mode="create")
        except AlreadyExistsError:
            return False
        return True

    def swap(self, relative: str, data: bytes, expected_etag: str | None) -> str:
        """Replace the object if its ETag is still `expected_etag` (None: if it does not exist yet);
        the new ETag. Raises `RemoteConflict` when another writer got there first."""
        mode: obstore.PutMode = "create" if expected_etag is None else {"e_tag": expected_etag}
        try:
            result = obstore.put(self.store, self.key(relative), data, mode=mode)
        except (AlreadyExistsError, PreconditionError) as exc:
            raise RemoteConflict(relative) from exc
        return str(result["e_tag"])

    def replace(self, relative: str, data: bytes) -> str:
        """Write the object whatever is there (a mutable file of a tree one writer owns); its ETag."""
        return str(obstore.put(self.store, self.key(relative), data)["e_tag"])

    def listing(self, relative_prefix: str) -> dict[str, dict[str, Any]]:
        """Every object under `relative_prefix/` (recursively): relative path -> its metadata."""
        relative_prefix = relative_prefix.strip("/")
        base = self.key(relative_prefix) if relative_prefix else self.prefix
        skip = len(self.prefix) + 1 if self.prefix else 0
        found: dict[str, dict[str, Any]] = {}
        # obstore lists whole path segments under `base`, so `a/b` never matches `a/bc`.
        for batch in obstore.list(self.store, base or None):
            for meta in batch:
                found[str(meta["path"])[skip:]] = dict(meta)
        return found

    def children(self, relative_prefix: str) -> list[str]:
        """The names of the "directories" right under `relative_prefix/` (one listing, not recursive)."""
        relative_prefix = relative_prefix.strip("/")
        base = self.key(relative_prefix) if relative_prefix else self.prefix
        found = obstore.list_with_delimiter(self.store, base or None)
        return sorted(PurePosixPath(str(prefix)).name for prefix in found["common_prefixes"])

    def delete(self, relatives: list[str]) -> None:
        if relatives:
            obstore.delete(self.store, [self.key(r) for r in relatives])

    def upload_dir(self, local_dir: Path, relative: str, *, last: str | None = None) -> int:
        """Create the objects of every file under `local_dir` at `relative/...` (existing ones are kept:
        content-addressed, they hold the same bytes). `last` is uploaded after all others, so that its
        presence means the directory is complete. Returns the number of objects created."""
        files = sorted(p for p in Path(local_dir).rglob("*") if p.is_file())
        files.sort(key=lambda p: p.name == last)
        created = 0
        for path in files:
            created += self.create(f"{relative}/{path.relative_to(local_dir).as_posix()}", path.read_bytes())
        return created

    def download_dir(self, relative: str, local_dir: Path) -> bool:
        """Download every object under `relative/` into `local_dir` (staged, then renamed into place);
        False if there is nothing there. An existing `local_dir` is left as it is (immutable content)."""
        if local_dir.is_dir():
            return True
        objects = self.listing(relative)
        if not objects:
            return False
        local_dir.parent.mkdir(parents=True, exist_ok=True)
        staged = local_dir.parent / f".download-{local_dir.name}-{uuid.uuid4().hex[:8]}"
        try:
            for path in objects:
                inner = PurePosixPath(path).relative_to(relative)
                found = self.get(path)
                if found is None:  # deleted while listed (gc): the directory is not whole
                    return False
                (staged / inner).parent.mkdir(parents=True, exist_ok=True)
                (staged / inner).write_bytes(found.data)
            if not commit_dir(staged, local_dir):
                return True
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        return True

    def download_file(self, relative: str, local_path: Path) -> RemoteObject | None:
        """Copy one object to `local_path` (atomically); None (and `local_path` removed) if it is absent."""
        found = self.get(relative)
        if found is None:
            local_path.unlink(missing_ok=True)
            return None
        local_path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(local_path, found.data)
        return found


# The local record of which bucket object each cached file is a copy of: relative path -> [ETag, size,
# mtime_ns] of the file when it was last downloaded or uploaded.
SYNC_INDEX = ".bucket-index.json"


def _tree_files(root: Path) -> dict[str, Path]:
    """Files of a local tree, without dot names anywhere in their path (temp files, staging, locks)."""
    if not root.is_dir():
        return {}
    return {
        path.relative_to(root).as_posix(): path
        for path in root.rglob("*")
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(root).parts)
    }


def _stat(path: Path) -> list[int]:
    info = path.stat()
    return [info.st_size, info.st_mtime_ns]


def _read_index(root: Path) -> dict[str, list[Any]]:
    try:
        index = json.loads((root / SYNC_INDEX).read_bytes())
    except (FileNotFoundError, ValueError):
        return {}
    return index if isinstance(index, dict) else {}


def sync_down(remote: RemoteTree) -> int:
    """Bring the local tree up to date with the bucket's: download each object the cache does not hold
    as it is in the bucket (a warm cache costs one listing). Files the bucket lacks are left alone.
    Returns the number of files downloaded."""
    root = remote.local_root
    index = _read_index(root)
    downloaded = 0
    for relative, meta in sorted(remote.listing("").items()):
        if any(part.startswith(".") for part in relative.split("/")):
            continue
        local = root / relative
        known = index.get(relative)
        if known and known[0] == meta["e_tag"] and local.is_file() and _stat(local) == known[1:]:
            continue
        found = remote.download_file(relative, local)
        if found is not None:
            index[relative] = [found.etag, *_stat(local)]
            downloaded += 1
    if downloaded:
        root.mkdir(parents=True, exist_ok=True)
        write_atomic(root / SYNC_INDEX, json.dumps(index, sort_keys=True).encode())
    return downloaded


def sync_up(remote: RemoteTree) -> int:
    """Make the bucket's tree what the local one is after a step wrote it: upload each file changed since
    it was last synced, delete from the bucket the files this cache synced before and no longer has (a
    partition rewritten with fewer files). Objects it never knew (written by another machine) are kept.
    Returns the number of files uploaded."""
    root = remote.local_root
    index = _read_index(root)
    files = _tree_files(root)
    uploaded = 0
    for relative, path in sorted(files.items()):
        known = index.get(relative)
        if known and _stat(path) == known[1:]:
            continue
        index[relative] = [remote.replace(relative, path.read_bytes()), *_stat(path)]
        uploaded += 1
    gone = sorted(relative for relative in index if relative not in files)
    remote.delete(gone)
    for relative in gone:
        del index[relative]
    if uploaded or gone:
        write_atomic(root / SYNC_INDEX, json.dumps(index, sort_keys=True).encode())
    return uploaded


def pull_trees(*roots: Path) -> None:
    """`sync_down` each local tree from the bucket (nothing when RECSYS_STORAGE_URL is unset)."""
    for root in roots:
        remote = remote_tree(root)
        if remote is not None:
            sync_down(remote)


def push_trees(*roots: Path) -> None:
    """`sync_up` each local tree to the bucket (nothing when RECSYS_STORAGE_URL is unset)."""
    for root in roots:
        remote = remote_tree(root)
        if remote is not None:
            sync_up(remote)


_stores: dict[tuple[str, ...], S3Store] = {}


def remote_tree(local_root: Path, environ: Mapping[str, str] | None = None) -> RemoteTree | None:
    """The bucket counterpart of the local tree `local_root` (`<prefix>/<name of the tree>`), or None
    when RECSYS_STORAGE_URL is unset: the local tree is then the system of record."""
    env = os.environ if environ is None else environ
    location = parse_storage_url(env.get(STORAGE_URL_VAR))
    if location is None:
        return None
    options = (
        location.bucket,
        env.get("AWS_ENDPOINT_URL", ""),
        env.get("AWS_REGION", "") or env.get("AWS_DEFAULT_REGION", ""),
        env.get("AWS_ACCESS_KEY_ID", ""),
        env.get("AWS_SECRET_ACCESS_KEY", ""),
        env.get("AWS_SESSION_TOKEN", ""),
    )
    store = _stores.get(options)
    if store is None:
        bucket, endpoint, region, key_id, secret, token = options
        config: S3Config = {"region": region or "us-east-1"}
        if endpoint:
            config["endpoint"] = endpoint
        if key_id:
            config["access_key_id"] = key_id
            config["secret_access_key"] = secret
        if token:
            config["session_token"] = token
        store = S3Store(bucket, config=config, client_options={"allow_http": endpoint.startswith("http:")})
        _stores[options] = store
    name = Path(local_root).name
    return RemoteTree(store, location.bucket, f"{location.prefix}/{name}".lstrip("/"), Path(local_root))
