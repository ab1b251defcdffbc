"""Raw landing files of one arrival day -> the `canonical_events` and `quarantine` partitions.

Every line read ends up in exactly one place: a canonical row, a quarantine row (with a reason), a
dropped duplicate, or a skipped blank line; the counts are returned as a `PartitionSummary` and the
reconciliation is asserted before anything is published.

How it stays fast and bounded:
- files are read in blocks of whole lines; each block is split with numpy and parsed by polars'
  NDJSON reader in one call (the fast path); only unusual lines (blank, too long, invalid UTF-8, not
  an object, wrong types) go through `contract.parse_line` one by one;
- each block's valid rows are appended, in reading order, to the current output file (in row groups of
  `_CanonicalWriter.ROW_GROUP_ROWS`) on a background thread while the next blocks are parsed, a new file
  every `rows_per_file` rows; duplicates are found through 16 bytes of hashes per distinct event, so
  memory depends on the block size, not on the partition size;
- the rows written are counted, on another background thread, into the figures the gates judge (the
  summary's `profile`, see `ProfileCounter`), so that the gates need not read the partition again.
Outputs are written to a staging directory and swapped into place only when complete.
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
import os
import re
import shutil
import time
import uuid
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import polars as pl
import polars_hash as plh
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recsys_core.lake import (
    SUMMARY_FILE,
    CanonicalProfile,
    SummaryRecord,
    content_hash,
    is_exposure_log_file,
    landing_dir,
    partition_dir,
)
from recsys_core.names import NAME_PATTERN
from recsys_core.settings import IngestConfig
from recsys_core.storage import locked, replace_dir, write_atomic
from recsys_dagster.ingest import contract

_T = TypeVar("_T")

BLOCK_BYTES = 16 * 1024 * 1024
PARALLEL_BLOCKS = 3
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
    # SHA-256 over the output Parquet files, computed once at write time so that gates, artifacts and
    # publishing can tie themselves to this exact data without re-reading it.
    content_hash: str = ""
    profile: CanonicalProfile | None = None
    seconds: float = 0.0

    @property
    def reconciled(self) -> bool:
        return self.lines_read == self.canonical_rows + self.quarantined + self.duplicates + self.blank_lines

    def to_json(self) -> SummaryRecord:
        """The summary as `_summary.json` holds it (the file has `seconds` null)."""
        record: SummaryRecord = {
            "day": self.day,
            "files": list(self.files),
            "bytes_read": self.bytes_read,
            "lines_read": self.lines_read,
            "canonical_rows": self.canonical_rows,
            "quarantined": self.quarantined,
            "duplicates": self.duplicates,
            "blank_lines": self.blank_lines,
            "reasons": dict(self.reasons),
            "output_files": list(self.output_files),
            "content_hash": self.content_hash,
            "seconds": self.seconds,
            "reconciled": self.reconciled,
        }
        if self.profile is not None:
            record["profile"] = self.profile
        return record


def landing_files(raw_root: Path, day: dt.date) -> list[Path]:
    """The day's landing files in name order; hidden files (in-flight writes) and folders are not read.

    Raises RawFileError for a landing file's name that leads to no regular file (a broken symbolic
    link, a pipe, ...): its data cannot be read, so the day cannot be complete.
    """
    folder = landing_dir(raw_root, day)
    if not folder.is_dir():
        return []
    files = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.name.endswith((".jsonl", ".jsonl.gz")) or path.is_dir():
            continue
        if not path.is_file():
            what = (
                f"a symbolic link to {os.readlink(path)}, which does not exist"
                if path.is_symlink() and not path.exists()
                else "not a regular file"
            )
            raise RawFileError(f"cannot read landing file {path}: it is {what}")
        files.append(path)
    return files


def canonicalize_partition(
    raw_root: Path,
    lake_root: Path,
    day: dt.date,
    config: IngestConfig,
    log: Callable[[str], None] | None = None,
) -> PartitionSummary:
    """Rebuild the canonical_events and quarantine partitions of `day` from its landing files."""
    staging_root = lake_root / ".staging"
    staging_root.mkdir(parents=True, exist_ok=True)
    # Runs of one day take turns on its lock, so with the lock held, any staging folder of the day was
    # left behind by a run that died before it could remove it.
    with locked(staging_root / f"{day.isoformat()}.lock"):
        for leftover in staging_root.glob(f"{day.isoformat()}-*"):
            if _STAGING_NAME.fullmatch(leftover.name) and leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover)
        return _rebuild_partition(raw_root, staging_root, lake_root, day, config, log)


# `<day>-<12 hex digits>`: the staging folder of one canonicalization run.
_STAGING_NAME = re.compile(r"\d{4}-\d{2}-\d{2}-[0-9a-f]{12}")


def _rebuild_partition(
    raw_root: Path,
    staging_root: Path,
    lake_root: Path,
    day: dt.date,
    config: IngestConfig,
    log: Callable[[str], None] | None,
) -> PartitionSummary:
    started = time.perf_counter()
    summary = PartitionSummary(day=day.isoformat())
    staging = staging_root / f"{day.isoformat()}-{uuid.uuid4().hex[:12]}"
    canonical_stage = staging / "canonical_events"
    quarantine_stage = staging / "quarantine"
    canonical_stage.mkdir(parents=True)
    quarantine_stage.mkdir(parents=True)
    canonical = _CanonicalWriter(canonical_stage, config.rows_per_file)
    profile = _ProfileThread(
        ProfileCounter(contract.arrival_window(day, config.max_lateness_days, config.max_clock_skew_hours))
    )
    try:
        quarantine = _QuarantineWriter(quarantine_stage)
        # Blocks are parsed on a small thread pool (polars and numpy release the GIL) and merged in
        # reading order; at most PARALLEL_BLOCKS + 1 blocks are in memory at once, besides the writer's
        # (see _CanonicalWriter).
        lines_merged: dict[str, int] = {}  # per landing file

        def merge(block: Future[_BlockResult]) -> None:
            result = block.result()
            before = lines_merged.get(result.source, 0)
            result.merge_into(summary, canonical, quarantine, profile, before)
            lines_merged[result.source] = before + result.lines

        with ThreadPoolExecutor(PARALLEL_BLOCKS) as pool:
            pending: deque[Future[_BlockResult]] = deque()
            for path in landing_files(raw_root, day):
                source = path.relative_to(raw_root).as_posix()
                summary.files.append(source)
                for block in _read_blocks(path, config.max_line_bytes):
                    pending.append(pool.submit(_process_block, block, source, day, config))
                    if len(pending) > PARALLEL_BLOCKS:
                        merge(pending.popleft())
                if log:
                    log(f"{day}: read {source}")
            while pending:
                merge(pending.popleft())
        quarantine.close()
        summary.output_files = canonical.close()
        summary.canonical_rows, summary.duplicates = canonical.rows, canonical.duplicates
        summary.quarantined = quarantine.rows
        summary.profile = profile.close(distinct_keys=canonical.seen.count)
        if not summary.reconciled:
            raise AssertionError(f"reconciliation failed for {day}: {summary.to_json()}")
        summary.content_hash = content_hash(canonical_stage)
        summary.seconds = round(time.perf_counter() - started, 3)
        write_atomic(canonical_stage / SUMMARY_FILE, _json_bytes(summary.to_json() | {"seconds": None}))
        replace_dir(quarantine_stage, partition_dir(lake_root, "quarantine", day))
        replace_dir(canonical_stage, partition_dir(lake_root, "canonical_events", day))
    finally:
        try:
            canonical.shutdown()  # after a failure, a file may still be being written into the staging folder
            profile.shutdown()
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return summary


@dataclass
class _LongLine:
    """A line longer than `max_line_bytes`, read without keeping it: its length in bytes (without the
    `\n`; a final `\r` counts here, not in `rejection`) and its first bytes, for the quarantine record."""

    prefix: bytes = b""
    length: int = 0
    ends_with_cr: bool = False

    def extend(self, chunk: bytes) -> None:
        if chunk:
            if len(self.prefix) < _RAW_PREFIX_BYTES:
                self.prefix += chunk[: _RAW_PREFIX_BYTES - len(self.prefix)]
            self.length += len(chunk)
            self.ends_with_cr = chunk.endswith(b"\r")

    def rejection(self, max_line_bytes: int) -> contract.Rejection:
        return contract.line_too_long(self.length - self.ends_with_cr, max_line_bytes)


def _read_blocks(path: Path, max_line_bytes: int) -> Iterator[bytes | _LongLine]:
    """Yield the file in blocks of whole lines (strips a leading BOM); a line that runs over a whole
    block and past `max_line_bytes` comes alone, as a `_LongLine`, so that memory stays bounded however
    long it is."""
    gzipped = path.name.endswith(".gz")
    carry = b""
    long_line: _LongLine | None = None
    first = True
    try:
        with (gzip.open if gzipped else open)(path, "rb") as handle:
            while True:
                chunk = handle.read(BLOCK_BYTES)
                if first:
                    chunk = chunk.removeprefix(UTF8_BOM)
                    first = False
                if not chunk:
                    break
                if long_line is not None:
                    end = chunk.find(b"\n")
                    long_line.extend(chunk if end < 0 else chunk[:end])
                    if end < 0:
                        continue
                    yield long_line
                    long_line, chunk = None, chunk[end + 1 :]
                cut = chunk.rfind(b"\n") + 1
                if not cut:
                    carry += chunk  # a line longer than a block
                    if len(carry) > max_line_bytes + 1:  # + 1: a final \r does not count
                        long_line = _LongLine()
                        long_line.extend(carry)
                        carry = b""
                    continue
                tail = chunk[cut:]
                if tail and not gzipped:
                    # Hand the unfinished line back to the file: re-reading it costs less than copying
                    # the block onto the carried-over bytes (seeking back in a gzip stream would not).
                    handle.seek(-len(tail), os.SEEK_CUR)
                    tail = b""
                yield carry + chunk[:cut] if carry else chunk[:cut]
                carry = tail
    except (OSError, EOFError, zlib.error) as exc:
        raise RawFileError(f"cannot read landing file {path}: {exc}") from exc
    if long_line is not None:
        yield long_line
    elif carry:
        yield carry + b"\n"


@dataclass
class _BlockResult:
    """One block's outcome; line numbers count from the block's first line, until `merge_into`."""

    source: str
    valid: pa.Table
    # The same rows as polars holds them: the profile counts from it (converting the Arrow table back
    # would cost more than the counting).
    valid_frame: pl.DataFrame
    keys: tuple[np.ndarray, np.ndarray]  # per valid row, the two hashes of (tenant, event_id)
    quarantined: dict[str, list]
    lines: int
    blank: int
    bytes: int

    def merge_into(
        self,
        summary: PartitionSummary,
        canonical: _CanonicalWriter,
        quarantine: _QuarantineWriter,
        profile: _ProfileThread,
        lines_before: int,
    ) -> None:
        """Add the block to the outputs; `lines_before` = lines of its file in the blocks before it."""
        summary.lines_read += self.lines
        summary.blank_lines += self.blank
        summary.bytes_read += self.bytes
        for code in self.quarantined["reason"]:
            summary.reasons[code] = summary.reasons.get(code, 0) + 1
        if self.quarantined["reason"]:
            lines = [n + lines_before for n in self.quarantined["source_line"]]
            quarantine.write(self.quarantined | {"source_line": lines})
            profile.add_quarantined(self.source, lines, self.quarantined["reason"])
        at = self.valid.schema.get_field_index("source_line")
        lines = pc.add(self.valid.column(at), lines_before)
        kept = canonical.add(self.valid.set_column(at, "source_line", lines), self.keys)
        if self.valid_frame.height:
            profile.add_rows(self.source, self.valid_frame, kept, lines_before)


def _process_block(block: bytes | _LongLine, source: str, day: dt.date, config: IngestConfig) -> _BlockResult:
    """Parse and validate one block of whole lines (pure: safe to run on a worker thread)."""
    if isinstance(block, _LongLine):
        rejection = block.rejection(config.max_line_bytes)
        too_long: dict[str, list] = {
            "source_file": [source],
            "source_line": [1],
            "reason": [rejection.reason],
            "detail": [rejection.detail],
            "raw": [_raw_text(block.prefix)],
        }
        no_keys = (np.empty(0, np.uint64), np.empty(0, np.uint64))
        return _BlockResult(
            source,
            _ARROW_CANONICAL_SCHEMA.empty_table(),
            pl.DataFrame(schema=contract.CANONICAL_SCHEMA),
            no_keys,
            too_long,
            1,
            0,
            block.length + 1,
        )
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
            (pl.col("line_index") + 1).alias("source_line"),
        )
        .pipe(_with_event_id, separators_possible=_may_hold_separators(block))
    )
    quarantined = {
        "source_file": [source] * len(rejected),
        "source_line": [1 + r[0] for r in rejected],
        "reason": [r[1] for r in rejected],
        "detail": [r[2] for r in rejected],
        "raw": [lines.text(r[0]) for r in rejected],
    }
    return _BlockResult(
        source, valid.to_arrow(), valid, _key_hashes(valid), quarantined, lines.count, blank, len(block)
    )


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
        return _raw_text(self.line(index))


# Enough bytes for RAW_PREFIX_CHARS characters of up to 4 bytes each.
_RAW_PREFIX_BYTES = contract.RAW_PREFIX_CHARS * 4


def _raw_text(line: bytes) -> str:
    """The start of a line as the quarantine's `raw` column holds it."""
    raw = line.removesuffix(b"\r")[:_RAW_PREFIX_BYTES]
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
    if b"\\" in block and b"\\u" in block:
        careful |= _escaped_surrogate_lines(lines)
    # Nesting beyond contract.MAX_NESTING is for parse_line to judge. A line nests at most as deep as its
    # count of `[` and `{`; most blocks have about one per line, which settles it without a count per line.
    if block.count(b"[") + block.count(b"{") - lines.count >= contract.MAX_NESTING:
        careful |= _open_bracket_counts(arr, lines) > contract.MAX_NESTING

    fast_index = np.flatnonzero(~careful)
    frames = []
    slow_index: list[int | np.integer] = list(np.flatnonzero(careful))
    if len(fast_index):
        source = block if len(fast_index) == lines.count else _mask_lines(block, lines, careful)
        parsed, failed = _read_ndjson_bisect(source, lines, 0, lines.count, careful)
        keep = ~careful
        if failed:
            slow_index.extend(failed)
            keep[failed] = False
        # Lines where the reader may have turned a non-string JSON value into a string go to the
        # reference parser too (see `_coerced_lines`).
        keep_count = int(np.count_nonzero(keep))
        suspect = _coerced_lines(arr, lines, parsed)
        if suspect is not None:
            suspect = suspect & keep
            slow_index.extend(np.flatnonzero(suspect))
            keep &= ~suspect
        parsed = parsed.with_columns(pl.int_range(pl.len(), dtype=pl.Int64).alias("line_index"))
        if keep_count != lines.count or suspect is not None:
            parsed = parsed.filter(pl.Series(keep))
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
    if not frames:
        return pl.DataFrame(schema=schema), rejected, blanks
    if len(frames) == 1:
        # Fast-path rows are already in line order.
        return frames[0], rejected, blanks
    return pl.concat(frames, how="vertical").sort("line_index"), rejected, blanks


_DIGIT = np.zeros(256, dtype=bool)
_DIGIT[ord("0") : ord("9") + 1] = True
_JSON_SPACE = np.zeros(256, dtype=bool)
_JSON_SPACE[[ord(" "), ord("\t"), ord("\r")]] = True
_VALUE_KEY = np.frombuffer(b'"value', np.uint8)


_ODD_TYPE = r"^(?:true$|false$|[\[{])"
_LOOK_ALIKE = r"^(?:[-+0-9.eE]+$|true$|false$|[\[{])"
# Up to this many look-alike lines per block simply go to the reference parser.
MAX_LOOK_ALIKES = 256


def _coerced_lines(arr: np.ndarray, lines: _LineIndex, parsed: pl.DataFrame) -> np.ndarray | None:
    """Lines where the NDJSON reader may have turned a non-string JSON value into a string.

    The reader stores booleans, floats, arrays and objects found in string fields as their text: `true`,
    `[1, 2]`, `{"a": 1}`, `0.5`, and an integral float even as plain digits (`1.0` -> `1`), which only
    the bytes can tell from an integer (integers are valid in string fields). Lines with a value that
    looks like one of those go to the reference parser, which knows the JSON type; None when there are
    none. When look-alikes are many (numeric ids, epoch timestamps), numbers are narrowed down to lines
    whose bytes hold a fraction or exponent number as a member value (`_float_member_lines`).
    """
    look_alike = _any_string_field_matches(parsed, _LOOK_ALIKE)
    count = int(np.count_nonzero(look_alike))
    if not count:
        return None
    if count <= MAX_LOOK_ALIKES:
        return look_alike
    suspect = _any_string_field_matches(parsed, _ODD_TYPE)
    floats = _float_member_lines(arr, lines)
    if floats is not None:
        suspect |= look_alike & floats
    return suspect if suspect.any() else None


def _any_string_field_matches(parsed: pl.DataFrame, pattern: str) -> np.ndarray:
    matches = parsed.select(
        pl.any_horizontal([pl.col(name).str.contains(pattern) for name in contract.STRING_FIELDS])
        .fill_null(False)
        .alias("x")
    )
    return matches.to_series().to_numpy().astype(bool, copy=True)


def _float_member_lines(arr: np.ndarray, lines: _LineIndex) -> np.ndarray | None:
    """Lines holding a member (other than `"value"`) whose value is a number token with a fraction or
    exponent; None if there is none. Found from the bytes, conservatively (look-alikes inside strings
    that are not preceded by `"` `:` are not counted; those that are, are)."""
    n = len(arr)
    if n < 3:
        return None
    body = arr[1:]
    mark = (body == ord(".")) | (body == ord("e")) | (body == ord("E"))
    mark &= (arr[:-1] - np.uint8(48)) < 10
    pos = np.flatnonzero(mark)  # position of the digit before the mark
    if not len(pos):
        return None
    # Walk back over the integer digits.
    q = pos.copy()
    active = np.arange(len(q))
    while len(active):
        prev = q[active] - 1
        ok = prev >= 0
        ok[ok] = _DIGIT[arr[prev[ok]]]
        active = active[ok]
        q[active] -= 1
    q -= 1  # the byte before the digits
    q = q[q >= 0]
    q -= arr[q] == ord("-")
    q = _skip_space_back(arr, q)
    q = q[arr[np.maximum(q, 0)] == ord(":")]
    q = _skip_space_back(arr, q - 1)
    q = q[(q >= 0) & (arr[np.maximum(q, 0)] == ord('"'))]
    if not len(q):
        return None
    # Members named exactly "value": `"value"` preceded (after whitespace) by `{` or `,`.
    is_value = q >= len(_VALUE_KEY) + 1
    cand = q[is_value]
    for offset, byte in enumerate(_VALUE_KEY):
        is_value[is_value] &= arr[cand - len(_VALUE_KEY) + offset] == byte
        cand = q[is_value]
    before = _skip_space_back(arr, cand - len(_VALUE_KEY) - 1)
    good = (before >= 0) & np.isin(arr[np.maximum(before, 0)], (ord("{"), ord(",")))
    is_value[is_value] = good
    q = q[~is_value]
    if not len(q):
        return None
    suspect = np.zeros(lines.count, dtype=bool)
    suspect[np.searchsorted(lines.ends, q)] = True
    return suspect


def _skip_space_back(arr: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Move each position back over JSON whitespace (never past the start; -1 if it runs out)."""
    q = q.copy()
    active = np.flatnonzero(q >= 0)
    while len(active):
        ok = _JSON_SPACE[arr[q[active]]]
        active = active[ok]
        q[active] -= 1
        active = active[q[active] >= 0]
    return q


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


def _open_bracket_counts(arr: np.ndarray, lines: _LineIndex) -> np.ndarray:
    opens = (arr == ord("[")) | (arr == ord("{"))
    # reduceat over the line starts (each line ends where the next begins, newline included).
    return np.add.reduceat(opens, lines.starts, dtype=np.int64) if lines.count else np.zeros(0, np.int64)


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


_FIELD_SEPARATOR = "\x1f"
_ABSENT = "\x1e"


def _may_hold_separators(block: bytes) -> bool:
    """Whether a value parsed from `block` may contain the characters `_with_event_id` joins with: as raw
    bytes, or JSON-escaped (conservatively: any escape of a code point from U+0010 to U+001F)."""
    # Single bytes first: a one-byte search is much faster than a search for a longer pattern.
    escaped = b"\\" in block and b"\\u001" in block
    return escaped or _FIELD_SEPARATOR.encode() in block or _ABSENT.encode() in block


def _with_event_id(events: pl.DataFrame, *, separators_possible: bool = True) -> pl.DataFrame:
    """Fill missing event ids with a stable hash (xxh3-128) of the identifying fields.

    The hashed text must differ for any two different events. Normally the fields are joined with a
    control character, absent ones written as another; a row whose values contain those characters
    themselves (checked by counting them, unless `separators_possible` is False because the raw bytes
    hold neither) is encoded instead as `<byte length>:<text>` per field behind a leading \x02, which no
    joined row starts with (tenants are plain identifiers).
    """
    texts = [
        (pl.col(name).dt.epoch("us") if name == "ts" else pl.col(name)).cast(pl.String)
        for name in HASHED_FIELDS
    ]
    joined = plh.concat_str([text.fill_null(_ABSENT) for text in texts], separator=_FIELD_SEPARATOR)
    keyed = events.with_columns(joined.alias("_identity"))
    unambiguous = (
        pl.col("_identity").str.count_matches(_FIELD_SEPARATOR, literal=True) == len(HASHED_FIELDS) - 1
    ) & (
        pl.col("_identity").str.count_matches(_ABSENT, literal=True)
        == pl.sum_horizontal(t.is_null() for t in texts)
    )
    if separators_possible and not keyed.select(unambiguous.all()).item():
        parts: list[pl.Expr] = [pl.lit("\x02")]
        for text in texts:
            parts += [
                text.str.len_bytes().cast(pl.String).fill_null("-"),
                pl.lit(":"),
                text.fill_null(""),
                pl.lit(";"),
            ]
        prefixed = plh.concat_str(parts, separator="")
        keyed = keyed.with_columns(
            pl.when(unambiguous).then(pl.col("_identity")).otherwise(prefixed).alias("_identity")
        )
    derived = pl.lit("h") + plh.col("_identity").nchash.xxh3_128().cast(pl.String).str.zfill(39)
    return keyed.with_columns(pl.coalesce(pl.col("event_id"), derived).alias("event_id")).select(
        list(contract.CANONICAL_SCHEMA)
    )


# Dictionary encoding for the columns whose values repeat (it also makes DuckDB's scans of them about 30%
# faster), not for the mostly distinct event and request ids; statistics only where a reader may filter.
# Both together cut a quarter of the write time. zstd level 1 writes about twice as fast as the default
# level 3 at about the same size here.
_CANONICAL_PARQUET = {
    "compression": "zstd",
    "compression_level": 1,
    "use_dictionary": ["tenant", "surface", "session_id", "user_id", "item_id", "event_type", "source_file"],
    "write_statistics": ["ts", "tenant", "surface", "event_type", "value", "rank", "source_line"],
}
_ARROW_CANONICAL_SCHEMA = pl.DataFrame(schema=contract.CANONICAL_SCHEMA).to_arrow().schema


class _ParquetParts:
    """Arrow tables appended to `part-00000.parquet`, `part-00001.parquet`, ... in `out_dir`: row groups of
    `row_group_rows` rows however small the tables (many small landing files would otherwise give as many
    tiny row groups, which make the files several times larger and every later scan slower), a new file
    every `rows_per_file` rows. Used from one thread at a time."""

    def __init__(
        self, out_dir: Path, schema: pa.Schema, options: dict, row_group_rows: int, rows_per_file: int
    ) -> None:
        self.out_dir, self.schema, self.options = out_dir, schema, options
        self.row_group_rows, self.rows_per_file = row_group_rows, rows_per_file
        self.files: list[str] = []
        self._file: pq.ParquetWriter | None = None
        self._file_rows = 0
        self._buffered: list[pa.Table] = []
        self._buffered_rows = 0

    def append(self, rows: pa.Table) -> None:
        self._buffered.append(rows)
        self._buffered_rows += rows.num_rows
        self._write_row_groups(flush=False)

    def close(self) -> list[str]:
        """Write what is buffered and close; an empty file if nothing was appended. Returns the names."""
        self._write_row_groups(flush=True)
        if not self.files:
            self._open_next()
        self.abort()
        return self.files

    def abort(self) -> None:
        """Close the open file without writing what is buffered (after a failure)."""
        if self._file is not None:
            self._file.close()
            self._file, self._file_rows = None, 0

    def _write_row_groups(self, *, flush: bool) -> None:
        while self._buffered_rows:
            size = min(self.row_group_rows, self.rows_per_file - self._file_rows)
            if self._buffered_rows < size and not flush:
                return
            size = min(size, self._buffered_rows)
            buffered = pa.concat_tables(self._buffered)
            writer = self._file if self._file is not None else self._open_next()
            writer.write_table(buffered.slice(0, size), row_group_size=size)
            self._file_rows += size
            rest = buffered.slice(size)
            self._buffered, self._buffered_rows = ([rest] if rest.num_rows else []), rest.num_rows
            if self._file_rows == self.rows_per_file:
                self.abort()

    def _open_next(self) -> pq.ParquetWriter:
        name = f"part-{len(self.files):05d}.parquet"
        self.files.append(name)
        self._file = pq.ParquetWriter(self.out_dir / name, self.schema, **self.options)
        return self._file


class _CanonicalWriter:
    """Appends valid rows, in reading order, to Parquet files of at most `rows_per_file` rows.

    A row whose (tenant, event_id) already appeared earlier in reading order is a duplicate and is dropped
    (event ids are idempotency keys within one tenant). What is left of each block goes to a background
    thread that writes row groups of `ROW_GROUP_ROWS` rows while the next blocks are parsed; memory holds
    at most `MAX_QUEUED_WRITES` blocks waiting for it and one row group's worth of rows, plus 16 bytes per
    distinct key (`_SeenKeys`).
    """

    MAX_QUEUED_WRITES = 2
    ROW_GROUP_ROWS = 131_072

    def __init__(self, out_dir: Path, rows_per_file: int) -> None:
        self.seen = _SeenKeys()
        self.rows = 0
        self.duplicates = 0
        self._parts = _ParquetParts(
            out_dir, _ARROW_CANONICAL_SCHEMA, _CANONICAL_PARQUET, self.ROW_GROUP_ROWS, rows_per_file
        )
        self._thread = _SerialThread("canonical-writer", self.MAX_QUEUED_WRITES)

    def add(self, rows: pa.Table, keys: tuple[np.ndarray, np.ndarray]) -> np.ndarray | None:
        """Takes the blocks in reading order: the first occurrence of a key is the one kept. Returns which
        rows were kept, or None when all were."""
        if not rows.num_rows:
            return None
        first = self.seen.first_occurrences(*keys)
        kept = None if first.all() else first
        if kept is not None:
            rows = rows.filter(pa.array(kept))
        self.duplicates += len(first) - rows.num_rows
        self.rows += rows.num_rows
        self._thread.submit(self._parts.append, rows)
        return kept

    def close(self) -> list[str]:
        """Finish the last file (an empty one if there were no rows at all); returns the file names."""
        return self._thread.finish(self._parts.close)

    def shutdown(self) -> None:
        """Stop writing and close the open file (after a failure, before the staging folder goes)."""
        self._thread.shutdown()
        self._parts.abort()


class _SerialThread:
    """Calls run one at a time, in the order submitted, on a thread of its own; at most `max_queued` wait
    (a submit beyond that waits for the oldest), so that the memory they hold stays bounded."""

    def __init__(self, name: str, max_queued: int) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=name)
        self._queued: deque[Future[None]] = deque()
        self._max_queued = max_queued

    def submit(self, call: Callable[..., None], *args: object) -> None:
        if len(self._queued) >= self._max_queued:
            self._queued.popleft().result()
        self._queued.append(self._pool.submit(call, *args))

    def finish(self, last: Callable[[], _T]) -> _T:
        """Wait for every call submitted (raising the first failure), then run `last` there; stops."""
        try:
            while self._queued:
                self._queued.popleft().result()
            return self._pool.submit(last).result()
        finally:
            self._pool.shutdown(wait=True)

    def shutdown(self) -> None:
        """Drop what has not started and wait for the running call (after a failure)."""
        self._pool.shutdown(wait=True, cancel_futures=True)


def _key_hashes(events: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Two independent 64-bit hashes (xxh3 and wyhash) of each row's (tenant, event_id)."""
    key = plh.concat_str([pl.col("tenant"), pl.col("event_id")], separator="\x00")
    hashes = events.select(key.nchash.xxh3_64().alias("h1"), key.nchash.wyhash().alias("h2"))
    return hashes["h1"].to_numpy(), hashes["h2"].to_numpy()


class _SeenKeys:
    """The (tenant, event_id) keys seen so far, each as its two 64-bit hashes (`_key_hashes`).

    Two keys are taken to be the same when both hashes agree: 128 bits, the same strength as the derived
    event ids themselves. The pairs are kept in a few arrays ("levels") sorted by the first hash and looked
    up with binary search. In front of them, a bitmap with one bit per value of the first hash's top
    `FILTER_BITS` bits (16 MiB) tells most new keys from seen ones without a search: a key whose bit is
    clear was never seen; only the others (a few percent, until tens of millions of keys) are looked up.
    """

    FILTER_BITS = 27

    def __init__(self) -> None:
        self.levels: list[tuple[np.ndarray, np.ndarray]] = []
        self._filter = np.zeros(1 << (self.FILTER_BITS - 3), dtype=np.uint8)

    @property
    def count(self) -> int:
        """Distinct keys remembered."""
        return sum(len(level[0]) for level in self.levels)

    def first_occurrences(self, h1: np.ndarray, h2: np.ndarray) -> np.ndarray:
        """True for each key seen for the first time (earlier keys of the same call included), in the
        order given; remembers the new keys."""
        # Sorted by the first hash, the lookups walk each level in one direction (binary search is then
        # cache-friendly) and the new keys come out ready to be kept as a level.
        order = np.argsort(h1)
        repeats = h1[order][1:] == h1[order][:-1]
        if repeats.any():
            # Runs of equal first hashes (duplicates, or distinct keys that collide) are ordered by
            # second hash, then position, so that each key's first occurrence leads its group.
            at = np.flatnonzero(np.append(repeats, False) | np.insert(repeats, 0, False))
            run = order[at]
            order[at] = run[np.lexsort((run, h2[run], h1[run]))]
        h1, h2 = h1[order], h2[order]
        new = np.ones(len(order), dtype=bool)
        new[1:] = (h1[1:] != h1[:-1]) | (h2[1:] != h2[:-1])
        slot = h1 >> np.uint64(64 - self.FILTER_BITS)
        byte, bit = slot >> np.uint64(3), np.left_shift(1, slot & np.uint64(7)).astype(np.uint8)
        maybe_seen = np.flatnonzero(new & (self._filter[byte] & bit).astype(bool))
        if len(maybe_seen):
            seen = np.zeros(len(maybe_seen), dtype=bool)
            for level in self.levels:
                seen |= _contains(level, h1[maybe_seen], h2[maybe_seen])
            new[maybe_seen[seen]] = False
        np.bitwise_or.at(self._filter, byte[new], bit[new])
        self._remember(h1[new], h2[new])
        first = np.empty_like(new)
        first[order] = new
        return first

    def _remember(self, h1: np.ndarray, h2: np.ndarray) -> None:
        """Keep keys given in ascending order of `h1` as a new level; each level stays more than twice the
        size of the next, so there are at most log2(keys) + 1 levels."""
        if not len(h1):
            return
        self.levels.append((h1, h2))
        while len(self.levels) >= 2 and len(self.levels[-2][0]) <= 2 * len(self.levels[-1][0]):
            newer = self.levels.pop()
            self.levels.append(_merge(self.levels.pop(), newer))


def _merge(
    a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Two levels sorted by their first array -> one. A stable sort (timsort) finds the two sorted runs
    and merges them in linear time."""
    first = np.concatenate([a[0], b[0]])
    order = np.argsort(first, kind="stable")
    return first[order], np.concatenate([a[1], b[1]])[order]


def _contains(level: tuple[np.ndarray, np.ndarray], h1: np.ndarray, h2: np.ndarray) -> np.ndarray:
    """Which (h1, h2) pairs are in `level` (sorted by its first array)."""
    sorted1, sorted2 = level
    if not len(sorted1):
        return np.zeros(len(h1), dtype=bool)
    at = np.searchsorted(sorted1, h1)
    clipped = np.minimum(at, len(sorted1) - 1)
    same_first = sorted1[clipped] == h1
    found = same_first & (sorted2[clipped] == h2)
    # Distinct keys whose first hashes collide sit next to each other: look past the first of them.
    for i in np.flatnonzero(same_first & ~found):
        j = int(at[i]) + 1
        while j < len(sorted1) and sorted1[j] == h1[i]:
            if sorted2[j] == h2[i]:
                found[i] = True
                break
            j += 1
    return found


class _QuarantineWriter:
    """Quarantine rows in `part-00000.parquet` of `out_dir`, in row groups of `ROW_GROUP_ROWS` rows."""

    ROW_GROUP_ROWS = 65_536
    SCHEMA = pa.schema([(name, pa.string()) for name in contract.QUARANTINE_SCHEMA]).set(
        1, pa.field("source_line", pa.int64())
    )

    def __init__(self, out_dir: Path) -> None:
        self.rows = 0
        # One file whatever the number of rows: quarantine is small.
        self._parts = _ParquetParts(out_dir, self.SCHEMA, {"compression": "zstd"}, self.ROW_GROUP_ROWS, 2**62)

    def write(self, columns: dict[str, list]) -> None:
        table = pa.table(columns, schema=self.SCHEMA)
        self.rows += table.num_rows
        self._parts.append(table)

    def close(self) -> None:
        self._parts.close()


# The canonical columns that are never null, the key columns among them, and the text columns whose values
# are 1 to MAX_ID_CHARS characters (user_id only when it is given): the rules of the schema gate
# (contract.canonical_schema_model).
_NOT_NULL = (
    "event_id",
    "ts",
    "tenant",
    "surface",
    "session_id",
    "item_id",
    "event_type",
    "source_file",
    "source_line",
)
_KEYS = ("event_id", "ts", "tenant", "surface", "session_id", "item_id")
_LENGTH_RULED = ("event_id", "session_id", "user_id", "item_id")
# Seeds of the 64-bit hashes that tell sessions and items apart while counting (kept in memory only).
_SESSION_SEED, _ITEM_SEED = 0x5E55, 0x17E7
_SCOPE_HASH = pl.struct("tenant", "surface").hash(0x5C0E)


class ProfileCounter:
    """Counts, over the rows of a partition as they are written, the figures the gates judge: the
    `CanonicalProfile` of the summary, the same figures dbt_like_sql/checks/canonical_profile.sql computes
    from the files (tests hold the two together).

    Fed block by block (`add_rows`, `add_quarantined`), it keeps per block only small aggregates, except
    for the figure that cannot be merged from them: the most distinct items of one session. For that it
    keeps, per producer row, 64-bit hashes of its session and item (16 bytes a row); each block's
    per-session counts give, per session, an upper bound (the sum over blocks) and a lower bound (the
    largest block's count), and only the sessions whose upper bound exceeds the best lower bound are
    counted exactly from the hashes at the end. Distinct items and sessions are counted through the same
    64-bit hashes: two different values with the same hash (odds about 1 in 10^6 for ten million distinct
    values) would be counted once.
    """

    def __init__(self, window: tuple[dt.datetime, dt.datetime]) -> None:
        self.window = window
        self.null_key_rows = 0
        self.ts_out_of_range_rows = 0
        self.value_rule_rows = 0
        self.events = 0
        self._items: list[pa.Array] = []  # per block, the distinct item hashes of its producer rows
        self._session_items: list[pl.DataFrame] = []  # per block: session hash, distinct items in the block
        self._pairs: list[pl.DataFrame] = []  # per block: session hash, item hash (null item: null) per row
        self._exposure_rows: dict[str, int] = {}
        self._exposure_last_line: dict[str, int] = {}
        self._exposure_quarantined: dict[str, int] = {}
        self._exposure_reasons: dict[str, int] = {}

    def add_rows(self, source: str, frame: pl.DataFrame) -> None:
        """Count rows written from landing file `source` (canonical columns)."""
        if not frame.height:
            return
        start, end = self.window
        null_keys, out_of_range = frame.select(
            pl.any_horizontal(pl.col(_KEYS).is_null()).sum(),
            ((pl.col("ts") < start) | (pl.col("ts") >= end)).sum(),
        ).row(0)
        self.null_key_rows += null_keys
        self.ts_out_of_range_rows += out_of_range
        self.value_rule_rows += value_rule_rows(frame)
        if is_exposure_log_file(source):
            self._exposure_rows[source] = self._exposure_rows.get(source, 0) + frame.height
            self._last_line(source, frame.select(pl.col("source_line").max()).item())
            return
        self.events += frame.height
        # (tenant, surface, id) hashed as the id's hash XOR the hash of its (tenant, surface), which is
        # hashed once when the block has only one (the usual case): a third of the cost of hashing rows.
        if _single_value(frame, "tenant") and _single_value(frame, "surface"):
            scope: pl.Expr = pl.lit(frame.head(1).select(_SCOPE_HASH).item(), dtype=pl.UInt64)
        else:
            scope = _SCOPE_HASH
        hashes = frame.select(
            (pl.col("session_id").hash(_SESSION_SEED) ^ scope).alias("session"),
            (pl.col("item_id").hash(_ITEM_SEED) ^ scope).alias("item"),
            pl.col("item_id").is_null().alias("no_item"),
        )
        self._items.append(pc.unique(hashes.get_column("item").to_arrow()))
        # count(DISTINCT item_id) per session does not count a null item id.
        pairs = hashes.select("session", pl.when(~pl.col("no_item")).then(pl.col("item")).alias("item"))
        self._pairs.append(pairs)
        self._session_items.append(pairs.group_by("session").agg(pl.col("item").drop_nulls().n_unique()))

    def add_quarantined(self, source: str, lines: list[int], reasons: list[str]) -> None:
        """Count lines of landing file `source` that were quarantined (only the exposure log's count)."""
        if not lines or not is_exposure_log_file(source):
            return
        self._exposure_quarantined[source] = self._exposure_quarantined.get(source, 0) + len(lines)
        self._last_line(source, max(lines))
        for reason in reasons:
            self._exposure_reasons[reason] = self._exposure_reasons.get(reason, 0) + 1

    def _last_line(self, source: str, line: int) -> None:
        self._exposure_last_line[source] = max(self._exposure_last_line.get(source, 0), line)

    def result(self, *, rows: int, distinct_keys: int) -> CanonicalProfile:
        """The figures; `rows` written in all, `distinct_keys` the distinct (tenant, event_id) among them."""
        start, end = self.window
        sessions, items_per_session = self._sessions()
        items = len(pc.unique(pa.chunked_array(self._items, pa.uint64()))) if self._items else 0
        return {
            "window_start": start.isoformat(),
            "window_end": end.isoformat(),
            "null_key_rows": self.null_key_rows,
            "duplicate_id_rows": rows - distinct_keys,
            "ts_out_of_range_rows": self.ts_out_of_range_rows,
            "value_rule_rows": self.value_rule_rows,
            "events": self.events,
            "distinct_items": items,
            "sessions": sessions,
            "items_per_session": items_per_session,
            "exposure_log": {
                "files": len(self._exposure_last_line),
                "lines": sum(self._exposure_last_line.values()),
                "rows": sum(self._exposure_rows.values()),
                "quarantined": sum(self._exposure_quarantined.values()),
                "reasons": dict(sorted(self._exposure_reasons.items())),
            },
        }

    def _sessions(self) -> tuple[int, int]:
        """(sessions, most distinct items in one session) of the producer rows."""
        if not self._session_items:
            return 0, 0
        per_block = pl.concat(self._session_items)
        lower = int(per_block.get_column("item").max())  # type: ignore[arg-type]
        bounds = per_block.group_by("session").agg(pl.col("item").sum())
        candidates = bounds.filter(pl.col("item") > lower).get_column("session")
        if not len(candidates):
            return bounds.height, lower
        exact = (
            pl.concat(self._pairs)
            .filter(pl.col("session").is_in(candidates.implode()))
            .group_by("session")
            .agg(pl.col("item").drop_nulls().n_unique())
            .get_column("item")
            .max()
        )
        return bounds.height, max(lower, int(exact))  # type: ignore[arg-type]


def value_rule_rows(rows: pl.DataFrame) -> int:
    """Rows of canonical columns that break a rule of the schema gate (`contract.canonical_schema_model`):
    a null where the column allows none, a text of 0 or more than MAX_ID_CHARS characters, a tenant or
    surface that is not a name, a negative rank, a source line below 1."""
    broken = [pl.col(name).is_null() for name in _NOT_NULL]
    longest = rows.select(pl.col(_LENGTH_RULED).str.len_bytes().max()).row(0, named=True)
    for name in _LENGTH_RULED:
        broken.append(pl.col(name).str.len_bytes() == 0)
        if (longest[name] or 0) > contract.MAX_ID_CHARS:
            # A text has at most as many characters as bytes: characters are counted only when needed.
            broken.append(pl.col(name).str.len_chars() > contract.MAX_ID_CHARS)
    for name in ("tenant", "surface"):
        # Few distinct values, often one: each is matched once.
        column = rows.get_column(name)
        values = column.head(1) if _single_value(rows, name) else column.unique()
        wrong = values.filter(~values.str.contains(NAME_PATTERN))
        if len(wrong):
            broken.append(pl.col(name).is_in(wrong.implode()))
    broken += [pl.col("rank") < 0, pl.col("source_line") < 1]
    return int(rows.select(pl.any_horizontal(rule.fill_null(False) for rule in broken).sum()).item())


def _single_value(rows: pl.DataFrame, name: str) -> bool:
    """Whether every row has the first row's value in column `name` (null counting as a value)."""
    column = rows.get_column(name)
    return bool(column.eq_missing(column[0]).all()) if len(column) else True


class _ProfileThread:
    """A `ProfileCounter` fed on a thread of its own, in the order the blocks are written."""

    MAX_QUEUED = 4

    def __init__(self, counter: ProfileCounter) -> None:
        self.counter = counter
        self.rows = 0
        self._thread = _SerialThread("canonical-profile", self.MAX_QUEUED)

    def add_rows(self, source: str, block: pl.DataFrame, kept: np.ndarray | None, lines_before: int) -> None:
        """Count the rows of a block that were written: `kept` of them (all if None), their line numbers
        counted from the block's first line, which is line `lines_before` + 1 of `source`."""
        self.rows += block.height if kept is None else int(np.count_nonzero(kept))
        self._thread.submit(self._count, source, block, kept, lines_before)

    def _count(self, source: str, block: pl.DataFrame, kept: np.ndarray | None, lines_before: int) -> None:
        rows = block if kept is None else block.filter(pl.Series(kept))
        self.counter.add_rows(source, rows.with_columns(pl.col("source_line") + lines_before))

    def add_quarantined(self, source: str, lines: list[int], reasons: list[str]) -> None:
        self._thread.submit(self.counter.add_quarantined, source, lines, reasons)

    def close(self, *, distinct_keys: int) -> CanonicalProfile:
        return self._thread.finish(lambda: self.counter.result(rows=self.rows, distinct_keys=distinct_keys))

    def shutdown(self) -> None:
        self._thread.shutdown()


def _json_bytes(payload: SummaryRecord) -> bytes:
    return (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode()
