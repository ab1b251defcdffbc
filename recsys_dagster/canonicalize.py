"""Raw landing files of one arrival day -> the `canonical_events` and `quarantine` partitions.

Every line read ends up in exactly one place: a canonical row, a quarantine row (with a reason), a
dropped duplicate, or a skipped blank line; the counts are returned as a `PartitionSummary` and the
reconciliation is asserted before anything is published.

How it stays fast and bounded:
- files are read in blocks of whole lines; each block is split with numpy and parsed by polars'
  NDJSON reader in one call (the fast path); only unusual lines (blank, too long, invalid UTF-8, not
  an object, wrong types) go through `contract.parse_line` one by one;
- parsed rows are held in memory up to `rows_per_bucket`; beyond that they spill to disk, hashed by
  event id, and each output file is deduplicated and sorted bucket by bucket, so peak memory depends
  on the bucket size, not on the partition size.
Outputs are written to a staging directory and swapped into place only when complete.
"""

from __future__ import annotations

import datetime as dt
import gzip
import hashlib
import json
import math
import os
import shutil
import time
import uuid
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import polars_hash as plh
import pyarrow as pa
import pyarrow.parquet as pq

from recsys_dagster import contract
from recsys_dagster.settings import IngestConfig

BLOCK_BYTES = 8 * 1024 * 1024
PARALLEL_BLOCKS = 2
SPILL_SLOTS = 256
SUMMARY_FILE = "_summary.json"
UTF8_BOM = b"\xef\xbb\xbf"
HASHED_FIELDS = (
    "tenant",
    "surface",
    "session_id",
    "user_id",
    "item_id",
    "event_type",
    "ts",
    "value",
    "rank",
    "request_id",
)


class RawFileError(RuntimeError):
    """A landing file could not be read at all; the partition fails and nothing is written."""


@dataclass
class PartitionSummary:
    day: str
    files: list[str] = field(default_factory=list)
    bytes_read: int = 0
    lines_read: int = 0
    canonical_rows: int = 0
    quarantined: int = 0
    duplicates: int = 0
    blank_lines: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    output_files: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def reconciled(self) -> bool:
        return self.lines_read == self.canonical_rows + self.quarantined + self.duplicates + self.blank_lines

    def to_json(self) -> dict:
        return asdict(self) | {"reconciled": self.reconciled}


def partition_dir(lake_root: Path, asset: str, day: dt.date) -> Path:
    return lake_root / asset / f"dt={day.isoformat()}"


def landing_files(raw_root: Path, day: dt.date) -> list[Path]:
    """The day's landing files in name order; hidden files (in-flight writes) are not read."""
    folder = raw_root / f"dt={day.isoformat()}"
    if not folder.is_dir():
        return []
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.name.endswith((".jsonl", ".jsonl.gz"))
    )


def canonicalize_partition(
    raw_root: Path,
    lake_root: Path,
    day: dt.date,
    config: IngestConfig,
    log: Callable[[str], None] | None = None,
) -> PartitionSummary:
    """Rebuild the canonical_events and quarantine partitions of `day` from its landing files."""
    started = time.perf_counter()
    summary = PartitionSummary(day=day.isoformat())
    staging = lake_root / ".staging" / f"{day.isoformat()}-{uuid.uuid4().hex[:12]}"
    canonical_stage = staging / "canonical_events"
    quarantine_stage = staging / "quarantine"
    canonical_stage.mkdir(parents=True)
    quarantine_stage.mkdir(parents=True)
    try:
        buckets = _BucketStore(staging / "spill", config.rows_per_bucket)
        quarantine = _QuarantineWriter(quarantine_stage / "part-00000.parquet")
        # Blocks are parsed on a small thread pool (polars and numpy release the GIL) and merged in
        # reading order; at most PARALLEL_BLOCKS + 1 blocks are in memory at once.
        with ThreadPoolExecutor(PARALLEL_BLOCKS) as pool:
            pending: deque[Future[_BlockResult]] = deque()
            for path in landing_files(raw_root, day):
                source = path.relative_to(raw_root).as_posix()
                summary.files.append(source)
                for block, first_line in _read_blocks(path):
                    pending.append(pool.submit(_process_block, block, first_line, source, day, config))
                    if len(pending) > PARALLEL_BLOCKS:
                        pending.popleft().result().merge_into(summary, buckets, quarantine)
                if log:
                    log(f"{day}: read {source}")
            while pending:
                pending.popleft().result().merge_into(summary, buckets, quarantine)
        quarantine.close()
        summary.output_files = buckets.write_outputs(canonical_stage, summary)
        summary.quarantined = quarantine.rows
        if not summary.reconciled:
            raise AssertionError(f"reconciliation failed for {day}: {summary.to_json()}")
        summary.seconds = round(time.perf_counter() - started, 3)
        _write_json(canonical_stage / SUMMARY_FILE, summary.to_json() | {"seconds": None})
        _swap_into_place(quarantine_stage, partition_dir(lake_root, "quarantine", day))
        _swap_into_place(canonical_stage, partition_dir(lake_root, "canonical_events", day))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return summary


def read_summary(lake_root: Path, day: dt.date) -> dict | None:
    path = partition_dir(lake_root, "canonical_events", day) / SUMMARY_FILE
    return json.loads(path.read_text()) if path.exists() else None


def _read_blocks(path: Path) -> Iterator[tuple[bytes, int]]:
    """Yield (block of whole lines, 1-based number of its first line); strips a leading BOM."""
    opener = gzip.open if path.name.endswith(".gz") else open
    line_no = 1
    carry = b""
    first = True
    try:
        with opener(path, "rb") as handle:
            while True:
                chunk = handle.read(BLOCK_BYTES)
                if first:
                    chunk = chunk.removeprefix(UTF8_BOM)
                    first = False
                if not chunk:
                    break
                data = carry + chunk
                cut = data.rfind(b"\n")
                if cut < 0:
                    carry = data
                    continue
                block, carry = data[: cut + 1], data[cut + 1 :]
                yield block, line_no
                line_no += block.count(b"\n")
    except (OSError, EOFError, zlib.error) as exc:
        raise RawFileError(f"cannot read landing file {path}: {exc}") from exc
    if carry:
        yield carry + b"\n", line_no


@dataclass
class _BlockResult:
    valid: pl.DataFrame
    quarantined: dict[str, list]
    lines: int
    blank: int
    bytes: int

    def merge_into(
        self, summary: PartitionSummary, buckets: _BucketStore, quarantine: _QuarantineWriter
    ) -> None:
        summary.lines_read += self.lines
        summary.blank_lines += self.blank
        summary.bytes_read += self.bytes
        for code in self.quarantined["reason"]:
            summary.reasons[code] = summary.reasons.get(code, 0) + 1
        if self.quarantined["reason"]:
            quarantine.write(self.quarantined)
        buckets.add(self.valid)


def _process_block(
    block: bytes, first_line: int, source: str, day: dt.date, config: IngestConfig
) -> _BlockResult:
    """Parse and validate one block of whole lines (pure: safe to run on a worker thread)."""
    lines = _LineIndex(block)
    parsed, rejected, blank = _parse_block(lines, config.max_line_bytes)
    events = contract.validate_events(
        parsed,
        day,
        event_types=config.event_types,
        max_lateness_days=config.max_lateness_days,
        max_clock_skew_hours=config.max_clock_skew_hours,
    )
    invalid = events.filter(pl.col("reason").is_not_null())
    rejected.extend(invalid.select("line_index", "reason", "detail").iter_rows())
    rejected.sort()
    valid = (
        events.filter(pl.col("reason").is_null())
        .with_columns(
            pl.lit(source).alias("source_file"),
            (pl.col("line_index") + first_line).alias("source_line"),
        )
        .pipe(_with_event_id)
    )
    quarantined = {
        "source_file": [source] * len(rejected),
        "source_line": [first_line + r[0] for r in rejected],
        "reason": [r[1] for r in rejected],
        "detail": [r[2] for r in rejected],
        "raw": [lines.text(r[0]) for r in rejected],
    }
    return _BlockResult(valid, quarantined, lines.count, blank, len(block))


class _LineIndex:
    """Line boundaries of a block (each line without its newline)."""

    def __init__(self, block: bytes) -> None:
        self.block = block
        ends = np.nonzero(np.frombuffer(block, np.uint8) == 10)[0]
        self.ends = ends
        self.starts = np.empty_like(ends)
        self.starts[0] = 0
        self.starts[1:] = ends[:-1] + 1
        self.count = len(ends)

    def line(self, index: int) -> bytes:
        return self.block[self.starts[index] : self.ends[index]]

    def text(self, index: int) -> str:
        raw = self.line(index).removesuffix(b"\r")[: contract.RAW_PREFIX_CHARS * 4]
        return raw.decode("utf-8", "backslashreplace")[: contract.RAW_PREFIX_CHARS]


def _parse_block(lines: _LineIndex, max_line_bytes: int) -> tuple[pl.DataFrame, list, int]:
    """Parse every line; returns (parsed rows with `line_index`, [(index, reason, detail)], blanks)."""
    block = lines.block
    arr = np.frombuffer(block, np.uint8)
    lengths = lines.ends - lines.starts
    # Lines the vectorised reader must not see: it would skip blanks (breaking line alignment), reject
    # the whole block for one bad line, or silently accept what the contract rejects.
    careful = lengths > max_line_bytes
    careful |= lengths == 0
    nonempty = lengths > 0
    careful[nonempty] |= arr[lines.starts[nonempty]] != ord("{")
    last = lines.ends - 1 - ((lengths > 0) & (arr[np.maximum(lines.ends - 1, 0)] == 13))
    careful[nonempty] |= arr[np.maximum(last[nonempty], 0)] != ord("}")
    if not _is_utf8(block):
        careful |= _invalid_utf8_lines(lines)
    if b"\\u" in block:
        careful |= _escaped_surrogate_lines(lines)

    fast_index = np.flatnonzero(~careful)
    frames = []
    slow_index = list(np.flatnonzero(careful))
    if len(fast_index):
        source = block if len(fast_index) == lines.count else _mask_lines(block, lines, careful)
        parsed, failed = _read_ndjson_bisect(source, lines, 0, lines.count, careful)
        if failed:
            slow_index.extend(failed)
            keep = np.ones(lines.count, dtype=bool)
            keep[careful] = False
            keep[failed] = False
        else:
            keep = ~careful
        parsed = parsed.with_columns(pl.int_range(pl.len(), dtype=pl.Int64).alias("line_index")).filter(
            pl.Series(keep)
        )
        suspicious = parsed.filter(_coerced_type_suspected())
        if suspicious.height:
            slow_index.extend(suspicious["line_index"].to_list())
            parsed = parsed.join(suspicious.select("line_index"), on="line_index", how="anti")
        frames.append(parsed)
    rejected: list[tuple[int, str, str]] = []
    blanks = 0
    slow_rows = []
    for index in sorted(int(i) for i in slow_index):
        result = contract.parse_line(lines.line(index), max_line_bytes)
        if result is None:
            blanks += 1
        elif isinstance(result, contract.Rejection):
            rejected.append((index, result.reason, result.detail))
        else:
            slow_rows.append(result | {"line_index": index})
    if slow_rows:
        frames.append(pl.DataFrame(slow_rows, schema=contract.PARSED_SCHEMA | {"line_index": pl.Int64}))
    schema = contract.PARSED_SCHEMA | {"line_index": pl.Int64()}
    parsed = pl.concat(frames, how="vertical") if frames else pl.DataFrame(schema=schema)
    return parsed.sort("line_index"), rejected, blanks


def _read_ndjson_bisect(
    source: bytes, lines: _LineIndex, lo: int, hi: int, skip: np.ndarray
) -> tuple[pl.DataFrame, list[int]]:
    """Parse lines [lo, hi) of `source`; a range the reader rejects is halved until the bad lines are
    isolated (they are returned for the per-line parser). Rows stay aligned with lines."""
    start, end = int(lines.starts[lo]), int(lines.ends[hi - 1]) + 1
    try:
        frame = pl.read_ndjson(source[start:end], schema=contract.PARSED_SCHEMA)
        if frame.height == hi - lo:
            return frame, []
    except pl.exceptions.PolarsError:
        pass
    if hi - lo <= 16:
        empty = pl.DataFrame(
            {k: [None] * (hi - lo) for k in contract.PARSED_SCHEMA}, schema=contract.PARSED_SCHEMA
        )
        return empty, [i for i in range(lo, hi) if not skip[i]]
    mid = (lo + hi) // 2
    left, left_failed = _read_ndjson_bisect(source, lines, lo, mid, skip)
    right, right_failed = _read_ndjson_bisect(source, lines, mid, hi, skip)
    return pl.concat([left, right]), left_failed + right_failed


def _mask_lines(block: bytes, lines: _LineIndex, mask: np.ndarray) -> bytes:
    """Replace masked lines by `{}` padded with spaces, keeping every offset and line in place."""
    data = bytearray(block)
    view = np.frombuffer(data, np.uint8)
    for index in np.flatnonzero(mask):
        start, end = int(lines.starts[index]), int(lines.ends[index])
        view[start:end] = 32
        if end - start >= 2:
            view[start : start + 2] = (123, 125)
    # A masked line shorter than `{}` cannot be replaced in place; the reader then sees an empty line,
    # which the row count check below catches and the bisection isolates.
    return bytes(data)


def _coerced_type_suspected() -> pl.Expr:
    """Rows where the NDJSON reader may have turned a non-string JSON value into a string.

    The reader stores booleans, floats, arrays and objects found in string fields as their text; such
    values look like `true`, `1.5` or `{...}`. Those rows (and the rare genuine strings that look the
    same) are re-parsed by the reference parser, which knows the JSON type.
    """
    pattern = r"^(?:true|false|[\[{].*|-?[0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?)$"
    integer = r"^-?[0-9]+$"
    checks = [
        pl.col(name).str.contains(pattern) & ~pl.col(name).str.contains(integer)
        for name in contract.STRING_FIELDS
    ]
    return pl.any_horizontal(checks).fill_null(False)


def _is_utf8(block: bytes) -> bool:
    offsets = pa.py_buffer(np.array([0, len(block)], dtype=np.int64))
    try:
        pa.Array.from_buffers(pa.large_string(), 1, [None, offsets, pa.py_buffer(block)]).validate(full=True)
    except pa.ArrowInvalid:
        return False
    return True


def _invalid_utf8_lines(lines: _LineIndex) -> np.ndarray:
    bad = np.zeros(lines.count, dtype=bool)
    for index in range(lines.count):
        try:
            lines.line(index).decode("utf-8")
        except UnicodeDecodeError:
            bad[index] = True
    return bad


def _escaped_surrogate_lines(lines: _LineIndex) -> np.ndarray:
    """Lines with a \\uD800-\\uDFFF escape: the fast reader mangles lone surrogates."""
    marked = np.zeros(lines.count, dtype=bool)
    block = lines.block
    for marker in (b"\\ud", b"\\uD"):
        pos = block.find(marker)
        while pos >= 0:
            if block[pos + 3 : pos + 4] in (
                b"8",
                b"9",
                b"a",
                b"b",
                b"c",
                b"d",
                b"e",
                b"f",
                b"A",
                b"B",
                b"C",
                b"D",
                b"E",
                b"F",
            ):
                marked[np.searchsorted(lines.ends, pos)] = True
            pos = block.find(marker, pos + 1)
    return marked


def _with_event_id(events: pl.DataFrame) -> pl.DataFrame:
    """Fill missing event ids with a stable hash of the identifying fields (xxh3-128, hex)."""
    identity = plh.concat_str(
        [
            (pl.col(name).dt.epoch("us") if name == "ts" else pl.col(name)).cast(pl.String).fill_null("")
            for name in HASHED_FIELDS
        ],
        separator="\x1f",
        ignore_nulls=False,
    )
    derived = pl.lit("h") + identity.nchash.xxh3_128().cast(pl.String).str.zfill(39)
    return events.with_columns(pl.coalesce(pl.col("event_id"), derived).alias("event_id")).select(
        list(contract.CANONICAL_SCHEMA)
    )


class _BucketStore:
    """Holds valid rows; spills to disk past `rows_per_bucket` so that memory stays bounded."""

    def __init__(self, spill_dir: Path, rows_per_bucket: int) -> None:
        self.spill_dir = spill_dir
        self.rows_per_bucket = rows_per_bucket
        self.frames: list[pl.DataFrame] = []
        self.held = 0
        self.total = 0
        self.spills: list[Path] = []

    def add(self, frame: pl.DataFrame) -> None:
        if not frame.height:
            return
        self.frames.append(
            frame.with_columns(pl.int_range(self.total, self.total + frame.height).alias("_seq"))
        )
        self.held += frame.height
        self.total += frame.height
        if self.held >= self.rows_per_bucket:
            self._spill()

    def _spill(self) -> None:
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        path = self.spill_dir / f"run-{len(self.spills):05d}.parquet"
        frame = pl.concat(self.frames).with_columns(_slot().alias("_slot")).sort("_slot", maintain_order=True)
        # Small row groups let each bucket read only its own slots back.
        frame.write_parquet(path, row_group_size=50_000, statistics=True, compression="lz4")
        self.spills.append(path)
        self.frames, self.held = [], 0

    def write_outputs(self, out_dir: Path, summary: PartitionSummary) -> list[str]:
        if not self.spills:
            frames = self.frames or [pl.DataFrame(schema=contract.CANONICAL_SCHEMA | {"_seq": pl.Int64})]
            return [_write_bucket(pl.concat(frames), out_dir / "part-00000.parquet", summary)]
        if self.frames:
            self._spill()
        buckets = max(1, math.ceil(self.total / self.rows_per_bucket))
        names = []
        for bucket in range(buckets):
            frame = (
                pl.scan_parquet(self.spills)
                .filter(pl.col("_slot") % buckets == bucket)
                .drop("_slot")
                .collect()
            )
            names.append(_write_bucket(frame, out_dir / f"part-{bucket:05d}.parquet", summary))
        return names


def _slot() -> pl.Expr:
    return (plh.col("event_id").nchash.xxh3_64() % SPILL_SLOTS).cast(pl.Int32)


def _write_bucket(frame: pl.DataFrame, path: Path, summary: PartitionSummary) -> str:
    """Drop duplicate event ids (the first in reading order wins), sort by time, write.

    Rows arrive in reading order (spill runs keep it per slot, and one id always maps to one slot), and
    `_seq` numbers them in that order, so ties in `ts` are broken the same way on every run.
    """
    hashed = frame.select(plh.col("event_id").nchash.xxh3_64().alias("h"))["h"]
    maybe_dup = hashed.is_duplicated()
    if maybe_dup.any():
        keep = ~maybe_dup | frame["event_id"].is_first_distinct()
        before = frame.height
        frame = frame.filter(keep)
        summary.duplicates += before - frame.height
    frame = frame.sort("ts", maintain_order=True).drop("_seq")
    summary.canonical_rows += frame.height
    frame.write_parquet(path, compression="zstd", statistics=True)
    return path.name


class _QuarantineWriter:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows = 0
        self.schema = pa.schema([(name, pa.string()) for name in contract.QUARANTINE_SCHEMA]).set(
            1, pa.field("source_line", pa.int64())
        )
        self.writer: pq.ParquetWriter | None = None

    def write(self, columns: dict[str, list]) -> None:
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.path, self.schema, compression="zstd")
        self.writer.write_table(pa.table(columns, schema=self.schema))
        self.rows += len(columns["reason"])

    def close(self) -> None:
        if self.writer is None:
            pq.write_table(self.schema.empty_table(), self.path, compression="zstd")
        else:
            self.writer.close()


def _write_json(path: Path, payload: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _swap_into_place(staged: Path, target: Path) -> None:
    """Replace the `target` directory by `staged`; readers never see a half-written partition."""
    target.parent.mkdir(parents=True, exist_ok=True)
    old = target.with_name(f".old-{target.name}-{uuid.uuid4().hex[:8]}")
    if target.exists():
        os.rename(target, old)
    os.rename(staged, target)
    shutil.rmtree(old, ignore_errors=True)


def content_hash(folder: Path) -> str:
    """SHA-256 over the names and bytes of a partition's Parquet files."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.parquet")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()
