"""Writing one content-addressed artifact version directory (`<target>/<kind>/<version>/`)."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from recsys_core.manifest import (
    FORMAT_VERSION,
    META_FILE,
    artifact_version,
    json_file_bytes,
    utc_timestamp,
    verify_artifact,
)
from recsys_core.names import UnsafePathError, validate_name
from recsys_core.storage import commit_dir, file_sha256, fsync_dir, fsync_file, write_atomic


def write_artifact_dir(
    target_dir: Path,
    kind: str,
    meta_without_version: Mapping[str, Any],
    files: Mapping[str, pl.DataFrame | np.ndarray | bytes],
) -> tuple[str, Path]:
    """Write one artifact version directory `<target>/<kind>/<version>/` and return (version, path).

    Frames are written as Parquet (zstd, statistics), arrays as `.npy` (whose bytes depend only on the
    array's dtype, shape and values) and bytes as they are (a `.json` document) into `<target>/<kind>/.tmp-<uuid>/`, hashed and
    counted into meta's `files` / `rows`; the version is computed from the meta (see
    `manifest.artifact_version`), meta.json written, and the temp dir renamed into place. Identical
    frames give byte-identical files and so the same version; if that directory already exists (and
    verifies) the new copy is discarded and the existing one touched, so gc's age guard protects it
    until it is published. `meta_without_version` must be JSON-serialisable.
    """
    validate_name("kind", kind)
    if not files:
        raise ValueError("an artifact needs at least one file")
    for name, data in files.items():
        validate_name("file", name)
        suffix = (
            ".npy" if isinstance(data, np.ndarray) else ".json" if isinstance(data, bytes) else ".parquet"
        )
        if name.startswith(".") or not name.endswith(suffix):
            raise ValueError(f"file name {name!r} must end with {suffix} and not start with '.'")
    if "version" in meta_without_version:
        raise ValueError("meta_without_version must not contain 'version': it is computed here")
    if meta_without_version.get("kind", kind) != kind:
        raise ValueError(f"meta kind {meta_without_version['kind']!r} does not match {kind!r}")
    kind_dir = Path(target_dir) / kind
    if kind_dir.is_symlink():  # the version directory would land wherever the link points
        raise UnsafePathError(f"{kind_dir.name}/ is a symlink; refused")
    kind_dir.mkdir(parents=True, exist_ok=True)
    tmp = kind_dir / f".tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        hashes: dict[str, str] = {}
        rows: dict[str, int] = {}
        for name in sorted(files):
            path = tmp / name
            count = _write_file(path, files[name])
            if count is not None:
                rows[name] = count
            fsync_file(path)
            hashes[name] = file_sha256(path)
        meta = {**meta_without_version, "format": FORMAT_VERSION, "kind": kind, "rows": rows, "files": hashes}
        meta.setdefault("built_at", utc_timestamp())
        version = artifact_version(meta)
        meta["version"] = version
        write_atomic(tmp / META_FILE, json_file_bytes(meta))
        final = kind_dir / version
        if not commit_dir(tmp, final):
            if verify_artifact(final, False):
                # Same name but not whole or not matching: move it aside (gc removes it) and use ours.
                os.rename(final, kind_dir / f".corrupt-{version[:12]}-{uuid.uuid4().hex[:8]}")
                os.rename(tmp, final)
                fsync_dir(kind_dir)
            else:
                shutil.rmtree(tmp)
                os.utime(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return version, final


def _write_file(path: Path, data: pl.DataFrame | np.ndarray | bytes) -> int | None:
    """Write one artifact file; returns its row count (an array's first dimension; None for a document)."""
    if isinstance(data, bytes):
        path.write_bytes(data)
        return None
    if isinstance(data, np.ndarray):
        with open(path, "wb") as handle:
            np.save(handle, np.ascontiguousarray(data), allow_pickle=False)
        return int(data.shape[0])
    # Chunk layout decides row groups, so identical frames chunked differently would give different bytes
    # (and versions) without the rechunk.
    frame = data.rechunk()
    frame.write_parquet(path, compression="zstd", statistics=True)
    return frame.height
