"""The file I/O primitives every write of the product goes through.

Readers never see a partial file or directory, and what was written survives a power loss:
- `write_atomic` replaces one file (temp file in the same directory, write, fsync, rename, fsync the dir);
- `replace_file` does the same for a file a library wrote next to its target;
- `replace_dir` swaps a fully written staging directory into place (an atomic exchange on Linux);
- `commit_dir` renames a staging directory to its final, content-addressed name (immutable once there);
- `locked` serialises writers of one tree (an advisory lock on a lock file);
- `fsync_file` / `fsync_dir` make a write or a rename durable.

This module is the seam where storage is chosen: the product's local-disk layout is implemented here, and
nothing else in the product renames, exchanges or locks files by itself.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path


def fsync_file(path: Path) -> None:
    """fsync a file's contents (after writing it by a library that does not)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename or a new entry in it survives a power loss."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    """Write every byte of `data` to the descriptor (os.write may write less than it is given)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so readers see the old or the new file, never a partial one.

    Temp file in the same directory (a rename is only atomic within one filesystem), write, fsync,
    `os.replace`, then fsync the directory so the rename itself is durable.
    """
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def replace_file(staged: Path, target: Path) -> None:
    """Move a fully written file (written by a library, in the same directory) over `target`, durably."""
    fsync_file(staged)
    os.replace(staged, target)
    fsync_dir(Path(target).parent)


def replace_dir(staged: Path, target: Path) -> None:
    """Replace the `target` directory by `staged` so that readers see the old or the new one.

    On Linux the two directories are exchanged in one atomic renameat2(RENAME_EXCHANGE); elsewhere the
    old directory is renamed away first, which leaves a moment with no directory (never a partial one).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and _exchange(staged, target):
        shutil.rmtree(staged, ignore_errors=True)
        fsync_dir(target.parent)
        return
    old = target.with_name(f".old-{target.name}-{uuid.uuid4().hex[:8]}")
    if target.exists():
        os.rename(target, old)
    os.rename(staged, target)
    fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def commit_dir(staged: Path, final: Path) -> bool:
    """Rename a fully written staging directory to `final`; False (and `staged` kept) if `final` exists.

    Used for content-addressed directories: an existing `final` holds the same content by construction,
    so the caller decides whether to keep it (after verifying it) or to move it aside.
    """
    try:
        os.rename(staged, final)
    except OSError as exc:
        if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not final.is_dir():
            raise
        return False
    fsync_dir(final.parent)
    return True


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    renameat2 = getattr(_LIBC, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    status: int = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return status == 0


_LIBC = ctypes.CDLL(None, use_errno=True)


@contextlib.contextmanager
def locked(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on `lock_file` (created if missing; a symlink is refused).

    The lock is released when the block ends, and also if the process dies (closing the descriptor
    releases the flock).
    """
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def file_sha256(path: Path) -> str:
    """SHA-256 hex of a file's bytes (`files_sha256` of the one file)."""
    return files_sha256([Path(path)], with_names=False)


# Hashes already computed in this process, by the files' identities (see files_sha256).
_HASH_MEMO_LIMIT = 4096
_hash_memo: dict[tuple[object, ...], str] = {}


def files_sha256(paths: Iterable[Path], *, with_names: bool) -> str:
    """SHA-256 hex over the bytes of `paths` in the order given, each preceded by its name when
    `with_names` (a canonical partition's content hash), streamed.

    Data is verified against its recorded hash before each step that uses it, and several steps of one
    process read the same files: a file is hashed once per process while its device, inode, size,
    modification and change times stay the same (a change to a file's bytes always changes its change
    time). The memo is keyed by that identity, not by path, so files hashed in a staging folder are known
    once the folder is renamed into place (renaming a folder leaves the files in it untouched).
    """
    paths = [Path(p) for p in paths]
    key = (with_names, *((p.name if with_names else "", *_signature(p)) for p in paths))
    found = _hash_memo.get(key)
    if found is not None:
        return found
    digest = hashlib.sha256()
    for path in paths:
        if with_names:
            digest.update(path.name.encode())
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 22):
                digest.update(chunk)
    if len(_hash_memo) >= _HASH_MEMO_LIMIT:
        _hash_memo.clear()
    _hash_memo[key] = digest.hexdigest()
    return _hash_memo[key]


def _signature(path: Path) -> tuple[int, int, int, int, int]:
    stat = os.stat(path)
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns
