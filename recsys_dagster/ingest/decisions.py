"""Landing a day of decision traces: `raw/decisions/dt=D/*.jsonl` -> the `decisions` table of day D.

Every line becomes a row of `decisions` or of `decisions_quarantine` (with a reason code), or is a blank
line or a repeat of a request id already landed that day (the first is kept): nothing is dropped
uncounted, and `_summary.json` reconciles the counts. The raw files are never changed. Both tables are
written into staging folders and swapped in whole, so a failed run leaves the previous partition in place.
The contract and the line rules are `recsys_core.decisions` (docs/reference/decisions.md).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from recsys_core.decisions import (
    DATA_FILE,
    QUARANTINE,
    QUARANTINE_SCHEMA,
    RAW_PREFIX_CHARS,
    SCHEMA,
    TraceError,
    landing_dir,
    parse_trace,
    partition_dir,
)
from recsys_core.lake import SUMMARY_FILE
from recsys_core.storage import fsync_file, replace_dir, write_atomic

# Rows buffered before they are written out as one row group.
BLOCK_ROWS = 10_000


def land_decisions(raw_root: Path, lake_root: Path, day: dt.date, max_line_bytes: int) -> dict[str, Any]:
    """Land day `day`'s trace files; returns the summary also written to `_summary.json`."""
    files = sorted(
        path for path in landing_dir(raw_root, day).glob("*.jsonl") if not path.name.startswith(".")
    )
    target, quarantine_target = partition_dir(lake_root, day), partition_dir(lake_root, day, QUARANTINE)
    stage = target.with_name(f".stage-{target.name}-{uuid.uuid4().hex[:8]}")
    quarantine_stage = quarantine_target.with_name(f".stage-{quarantine_target.name}-{uuid.uuid4().hex[:8]}")
    counts: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    try:
        stage.mkdir(parents=True)
        quarantine_stage.mkdir(parents=True)
        with (
            _Writer(stage / DATA_FILE, SCHEMA) as traces,
            _Writer(quarantine_stage / DATA_FILE, QUARANTINE_SCHEMA) as quarantine,
        ):
            seen: set[bytes] = set()
            for path, number, line in _lines(files, max_line_bytes):
                counts["lines_read"] += 1
                if not line.strip():
                    counts["blank_lines"] += 1
                    continue
                try:
                    row = parse_trace(line, day, max_line_bytes)
                except TraceError as error:
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
                key = hashlib.blake2b(
                    "\x00".join((row["tenant"], row["surface"], row["request_id"])).encode(), digest_size=16
                ).digest()
                if key in seen:
                    counts["duplicates"] += 1
                    continue
                seen.add(key)
                traces.add(row)
        summary: dict[str, Any] = {
            "day": day.isoformat(),
            "files": [path.name for path in files],
            "lines_read": counts["lines_read"],
            "traces": traces.rows,
            "quarantined": quarantine.rows,
            "duplicates": counts["duplicates"],
            "blank_lines": counts["blank_lines"],
            "reasons": dict(sorted(reasons.items())),
        }
        summary["reconciled"] = summary["lines_read"] == sum(
            summary[name] for name in ("traces", "quarantined", "duplicates", "blank_lines")
        )
        write_atomic(stage / SUMMARY_FILE, (json.dumps(summary, indent=2) + "\n").encode())
        replace_dir(quarantine_stage, quarantine_target)
        replace_dir(stage, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        shutil.rmtree(quarantine_stage, ignore_errors=True)
    return summary


def _lines(files: list[Path], max_line_bytes: int) -> Iterator[tuple[Path, int, bytes]]:
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
