"""Landing a day of a JSONL feed (decision traces, catalog updates): lines -> a table and its quarantine.

Every line becomes a row of the table or of its quarantine (with a reason code), or is a blank line or a
repeat of a row already landed that day (the first is kept): nothing is dropped uncounted, and
`_summary.json` reconciles the counts (`lines_read = rows + quarantined + duplicates + blank_lines`). The
raw files are never changed. Both tables are written into staging folders and swapped in whole, so a
failed run leaves the previous partition in place, and the same files give the same bytes.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from recsys_core.lake import SUMMARY_FILE
from recsys_core.landing import QUARANTINE_SCHEMA, RAW_PREFIX_CHARS, LineError
from recsys_core.storage import fsync_file, replace_dir, write_atomic

# Rows buffered before they are written out as one row group.
BLOCK_ROWS = 10_000
# The lineage columns filled in by the landing itself when the table's schema has them.
SOURCE_FILE, SOURCE_LINE = "source_file", "source_line"


def landing_files(folder: Path) -> list[Path]:
    """The `*.jsonl` files of a landing folder in name order; hidden ones (still being written) left out."""
    return sorted(path for path in Path(folder).glob("*.jsonl") if not path.name.startswith("."))


def land_lines(
    files: Sequence[Path],
    target: Path,
    quarantine_target: Path,
    *,
    day: dt.date,
    schema: pa.Schema,
    parse: Callable[[bytes], dict[str, Any]],
    key: Callable[[dict[str, Any]], Sequence[str]],
    rows_name: str,
    max_line_bytes: int,
    data_file: str,
) -> dict[str, Any]:
    """Land `files` into `target/data_file` (rows of `schema`) and `quarantine_target/data_file`.

    `parse` turns one line (without its newline) into a row or raises `LineError`; two rows with the same
    `key` are one row seen twice (the first is kept). The summary, also written to `target/_summary.json`,
    counts the rows under `rows_name`.
    """
    stage = target.with_name(f".stage-{target.name}-{uuid.uuid4().hex[:8]}")
    quarantine_stage = quarantine_target.with_name(f".stage-{quarantine_target.name}-{uuid.uuid4().hex[:8]}")
    lineage = SOURCE_FILE in schema.names
    counts: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    try:
        stage.mkdir(parents=True)
        quarantine_stage.mkdir(parents=True)
        with (
            _Writer(stage / data_file, schema) as rows,
            _Writer(quarantine_stage / data_file, QUARANTINE_SCHEMA) as quarantine,
        ):
            seen: set[bytes] = set()
            for path, number, line in _lines(files, max_line_bytes):
                counts["lines_read"] += 1
                if not line.strip():
                    counts["blank_lines"] += 1
                    continue
                try:
                    row = parse(line)
                except LineError as error:
                    reasons[error.reason] += 1
                    raw = line[:RAW_PREFIX_CHARS].decode("utf-8", errors="replace")
                    quarantine.add(
                        {
                            "file": path.name,
                            "line": number,
                            "reason": error.reason,
                            "detail": error.detail,
                            "raw": raw,
                        }
                    )
                    continue
                digest = hashlib.blake2b("\x00".join(key(row)).encode(), digest_size=16).digest()
                if digest in seen:
                    counts["duplicates"] += 1
                    continue
                seen.add(digest)
                if lineage:
                    row[SOURCE_FILE], row[SOURCE_LINE] = path.name, number
                rows.add(row)
        summary: dict[str, Any] = {
            "day": day.isoformat(),
            "files": [path.name for path in files],
            "lines_read": counts["lines_read"],
            rows_name: rows.rows,
            "quarantined": quarantine.rows,
            "duplicates": counts["duplicates"],
            "blank_lines": counts["blank_lines"],
            "reasons": dict(sorted(reasons.items())),
        }
        summary["reconciled"] = summary["lines_read"] == sum(
            summary[name] for name in (rows_name, "quarantined", "duplicates", "blank_lines")
        )
        write_atomic(stage / SUMMARY_FILE, (json.dumps(summary, indent=2) + "\n").encode())
        replace_dir(quarantine_stage, quarantine_target)
        replace_dir(stage, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        shutil.rmtree(quarantine_stage, ignore_errors=True)
    return summary


def _lines(files: Sequence[Path], max_line_bytes: int) -> Iterator[tuple[Path, int, bytes]]:
    """(file, line number from 1, line without its newline) of every line; a line longer than
    `max_line_bytes` is cut there (and so quarantined as too long) without being held whole."""
    for path in files:
        with open(path, "rb") as handle:
            number = 0
            while True:
                line = handle.readline(max_line_bytes + 1)
                if not line:
                    break
                number += 1
                if len(line) > max_line_bytes and not line.endswith(b"\n"):
                    while (rest := handle.readline(1 << 20)) and not rest.endswith(b"\n"):
                        pass
                yield path, number, line.rstrip(b"\r\n")


class _Writer:
    """A Parquet file written in row groups of BLOCK_ROWS rows; an empty table still gets its schema."""

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        self.path, self.schema = path, schema
        self.rows = 0
        self._buffer: list[dict[str, Any]] = []
        self._writer = pq.ParquetWriter(path, schema, compression="zstd")

    def add(self, row: dict[str, Any]) -> None:
        self._buffer.append(row)
        if len(self._buffer) >= BLOCK_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self._buffer:
            self._writer.write_table(pa.Table.from_pylist(self._buffer, schema=self.schema))
            self.rows += len(self._buffer)
            self._buffer = []

    def __enter__(self) -> _Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        self._flush()
        self._writer.close()
        fsync_file(self.path)
