"""Split foreign event files into the landing layout (``<raw root>/dt=YYYY-MM-DD/``).

Supported inputs: contract JSONL (also the recsys suite's exposure-v1 files), MovieLens ratings
(``ratings.csv``, ``u.data``, ``ratings.dat``) and OTTO session JSONL, each optionally gzip-compressed.
Every event goes to the folder of its UTC day in one file per source and day,
``import-<stem>-<sha256 prefix of the source>.jsonl``, so importing the same file again rewrites identical
files and never touches anything else. Nothing is dropped: a line that cannot be converted or dated lands,
verbatim, in the folder of the day the import runs, where the pipeline quarantines it with a reason.

Input is streamed and output buffered per day up to a bounded size, so memory does not grow with the file.
"""

from __future__ import annotations

import datetime as dt
import gzip
import hashlib
import math
import os
import re
import secrets
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from io import BufferedIOBase
from pathlib import Path
from typing import TypeGuard

import orjson

from recsys_core.names import validate_name

__all__ = ["FORMATS", "ImportReport", "import_file"]

FORMATS = ("auto", "jsonl", "movielens", "otto")

# Output is flushed to the per-day temporary files whenever this much is buffered.
FLUSH_LINES = 500_000
FLUSH_BYTES = 64 * 1024 * 1024

# RFC 3339 proper: fromisoformat alone also accepts ISO forms the contract does not (e.g. 20240101T0000Z).
_RFC3339 = re.compile(
    r"(\d{4}-\d{2}-\d{2})[Tt ](?:[01]\d|2[0-3]):[0-5]\d:[0-5]\d(?:\.\d+)?([Zz]|[+-]\d{2}:\d{2})"
)
_UDATA_LINE = re.compile(rb"\s*\d+\t\d+\t[0-9.]+\t\d+\s*")
OTTO_EVENT_TYPES = {"clicks": "click", "carts": "add_to_cart", "orders": "purchase"}
_EPOCH = dt.date(1970, 1, 1)


@dataclass(frozen=True)
class ImportReport:
    """What `import_file` did.

    `lines_read` counts data lines (a CSV header excluded); for contract JSONL and MovieLens
    ``lines_read = events_written + undated_lines + blank_lines``, for OTTO one line holds a whole session.
    `per_day` counts the events written per UTC day; undated lines are counted apart and land in
    `undated_day` (the day the import ran).
    """

    format: str
    lines_read: int
    events_written: int
    per_day: dict[str, int]
    files: tuple[Path, ...]
    first_day: str | None
    last_day: str | None
    undated_lines: int
    blank_lines: int
    undated_day: str | None


def import_file(
    source: Path,
    raw_root: Path,
    *,
    fmt: str = "auto",
    tenant: str | None = None,
    surface: str | None = None,
    progress: Callable[[str], None] | None = None,
    today: dt.date | None = None,
) -> ImportReport:
    """Import one file into the landing layout under `raw_root`; see the module docstring.

    `fmt` is one of `FORMATS`; `auto` detects it from the name and first line. MovieLens and OTTO need
    `tenant` and `surface`; for contract JSONL they only fill in lines that lack the field, and complete
    lines are copied byte for byte. `today` (default: the current UTC date) receives undatable lines.
    """
    source = Path(source)
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")
    for kind, value in (("tenant", tenant), ("surface", surface)):
        if value is not None:
            validate_name(kind, value)
    inner_name = source.name[:-3] if source.name.lower().endswith(".gz") else source.name
    if fmt == "auto":
        fmt = _detect_format(source, inner_name)
    if fmt in ("movielens", "otto") and (tenant is None or surface is None):
        raise ValueError(
            f"{fmt} files carry no tenant or surface: pass both tenant and surface (--tenant, --surface)"
        )

    digest = _sha256(source)
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", Path(inner_name).stem)[:80] or "source"
    undated_day = (today or dt.datetime.now(dt.UTC).date()).isoformat()
    splitter = _DaySplitter(Path(raw_root), f"import-{stem}-{digest[:12]}.jsonl")
    stats = _Stats()
    converter = {"jsonl": _convert_jsonl, "movielens": _convert_movielens, "otto": _convert_otto}[fmt]
    try:
        with _open(source) as stream:
            for day, line in converter(stream, stats, tenant, surface):
                if day is None:
                    stats.undated += 1
                    splitter.add(undated_day, line)
                else:
                    stats.per_day[day] = stats.per_day.get(day, 0) + 1
                    splitter.add(day, line)
                if splitter.buffered_lines >= FLUSH_LINES or splitter.buffered_bytes >= FLUSH_BYTES:
                    splitter.flush()
                    if progress is not None:
                        progress(f"{source.name}: {stats.lines:,} lines read")
        files = splitter.commit()
    except BaseException:
        splitter.abort()
        raise

    days = sorted(stats.per_day)
    report = ImportReport(
        format=fmt,
        lines_read=stats.lines,
        events_written=sum(stats.per_day.values()),
        per_day={day: stats.per_day[day] for day in days},
        files=tuple(files),
        first_day=days[0] if days else None,
        last_day=days[-1] if days else None,
        undated_lines=stats.undated,
        blank_lines=stats.blank,
        undated_day=undated_day if stats.undated else None,
    )
    if progress is not None:
        span = f"{report.first_day}..{report.last_day}" if days else "no days"
        undated = f", {report.undated_lines:,} undatable line(s) -> dt={undated_day}" if stats.undated else ""
        progress(
            f"{source.name} ({fmt}): {report.events_written:,} events over {len(days):,} day(s) ({span}){undated}"
        )
    return report


@dataclass
class _Stats:
    lines: int = 0
    blank: int = 0
    undated: int = 0
    per_day: dict[str, int] = field(default_factory=dict)


class _DaySplitter:
    """Per-day output files, written through hidden temporary files and renamed into place at the end.

    Lines are buffered per day and appended to the day's temporary file on `flush`, so memory stays
    bounded while the number of days (thousands for MovieLens) never needs as many open file handles.
    """

    def __init__(self, raw_root: Path, file_name: str) -> None:
        self._raw_root = raw_root
        self._file_name = file_name
        # A per-run token keeps a crashed or concurrent import's leftovers out of this run's files.
        self._tmp_suffix = f".{os.getpid()}-{secrets.token_hex(4)}.tmp"
        self._buffers: dict[str, list[bytes]] = {}
        self._tmp_files: dict[str, Path] = {}
        self.buffered_lines = 0
        self.buffered_bytes = 0

    def add(self, day: str, line: bytes) -> None:
        self._buffers.setdefault(day, []).append(line)
        self.buffered_lines += 1
        self.buffered_bytes += len(line) + 1

    def flush(self) -> None:
        for day, lines in self._buffers.items():
            tmp = self._tmp_files.get(day)
            if tmp is None:
                folder = self._raw_root / f"dt={day}"
                folder.mkdir(parents=True, exist_ok=True)
                tmp = folder / f".{self._file_name}{self._tmp_suffix}"
                self._tmp_files[day] = tmp
            with open(tmp, "ab") as out:
                out.write(b"\n".join(lines))
                out.write(b"\n")
        self._buffers.clear()
        self.buffered_lines = self.buffered_bytes = 0

    def commit(self) -> list[Path]:
        self.flush()
        written = []
        for day in sorted(self._tmp_files):
            tmp = self._tmp_files[day]
            final = tmp.with_name(self._file_name)
            os.replace(tmp, final)
            written.append(final)
        self._tmp_files.clear()
        return written

    def abort(self) -> None:
        for tmp in self._tmp_files.values():
            tmp.unlink(missing_ok=True)
        self._tmp_files.clear()
        self._buffers.clear()


def _open(source: Path) -> BufferedIOBase:
    """Open for binary reading, decompressing gzip (recognised by its magic bytes, not its name)."""
    with open(source, "rb") as probe:
        magic = probe.read(2)
    if magic == b"\x1f\x8b":
        return gzip.open(source, "rb")
    return open(source, "rb")


def _sha256(source: Path) -> str:
    digest = hashlib.sha256()
    with open(source, "rb") as stream:
        while block := stream.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _detect_format(source: Path, inner_name: str) -> str:
    """Guess the format from the first non-blank line, falling back on the file name."""
    first = b""
    with _open(source) as stream:
        for raw in stream:
            if raw.strip():
                first = raw.strip()
                break
    name = inner_name.lower()
    if first.lower().startswith(b"userid,movieid,rating") or _UDATA_LINE.fullmatch(first):
        return "movielens"
    if name in ("u.data", "ratings.dat", "ratings.csv") or (b"::" in first and first[:1].isdigit()):
        return "movielens"
    try:
        obj = orjson.loads(first)
    except orjson.JSONDecodeError:
        obj = None
    if isinstance(obj, dict):
        return "otto" if "session" in obj and isinstance(obj.get("events"), list) else "jsonl"
    if name.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"
    raise ValueError(f"cannot detect the format of {source.name}: pass one of {', '.join(FORMATS[1:])}")


def _lines(stream: Iterable[bytes], stats: _Stats) -> Iterator[bytes]:
    """Yield non-blank lines without their line feed (a CR stays: lines are copied verbatim)."""
    for raw in stream:
        stats.lines += 1
        line = raw[:-1] if raw.endswith(b"\n") else raw
        if not line.strip():
            stats.blank += 1
            continue
        yield line


def _day_of_epoch_days(days: int, cache: dict[int, str | None]) -> str | None:
    """ISO date `days` after 1970-01-01 (None outside the calendar), memoised: inputs are time-ordered."""
    if days not in cache:
        try:
            cache[days] = (_EPOCH + dt.timedelta(days=days)).isoformat()
        except OverflowError:
            cache[days] = None
    return cache[days]


def _contract_day(ts: object, cache: dict[int, str | None], utc_dates: dict[str, bool]) -> str | None:
    """UTC day of a contract `ts` (RFC 3339 with zone, or epoch ms), None if it cannot be parsed."""
    if isinstance(ts, int) and not isinstance(ts, bool):
        return _day_of_epoch_days(ts // 86_400_000, cache)
    if not isinstance(ts, str) or (match := _RFC3339.fullmatch(ts)) is None:
        return None
    date, zone = match.groups()
    if zone in ("Z", "z"):
        # Already UTC, so the day is the date part: only its validity (no 2024-02-30) needs a check,
        # once per distinct date, which keeps the common case off the datetime parser.
        if date not in utc_dates:
            utc_dates[date] = _is_date(date)
        return date if utc_dates[date] else None
    try:
        return dt.datetime.fromisoformat(ts.upper()).astimezone(dt.UTC).date().isoformat()
    except (ValueError, OverflowError):
        return None


def _is_date(text: str) -> bool:
    try:
        dt.date.fromisoformat(text)
    except ValueError:
        return False
    return True


def _convert_jsonl(
    stream: Iterable[bytes], stats: _Stats, tenant: str | None, surface: str | None
) -> Iterator[tuple[str | None, bytes]]:
    cache: dict[int, str | None] = {}
    utc_dates: dict[str, bool] = {}
    defaults = [(key, value) for key, value in (("tenant", tenant), ("surface", surface)) if value]
    for line in _lines(stream, stats):
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:
            yield None, line
            continue
        day = _contract_day(obj.get("ts"), cache, utc_dates) if isinstance(obj, dict) else None
        if day is None:
            yield None, line
            continue
        missing = [(key, value) for key, value in defaults if key not in obj]
        if missing:
            # Splice the missing fields in after "{" rather than re-serialising, so everything the
            # line already says stays byte for byte as it was.
            fields = b",".join(orjson.dumps(key) + b":" + orjson.dumps(value) for key, value in missing)
            brace = line.index(b"{") + 1
            line = line[:brace] + fields + (b"," if obj else b"") + line[brace:]
        yield day, line


def _convert_movielens(
    stream: Iterable[bytes], stats: _Stats, tenant: str | None, surface: str | None
) -> Iterator[tuple[str | None, bytes]]:
    cache: dict[int, str | None] = {}
    compact: dict[str, str] = {}
    scope = f'"tenant":{orjson.dumps(tenant).decode()},"surface":{orjson.dumps(surface).decode()}'
    separator: bytes | None = None
    for line in _lines(stream, stats):
        if separator is None:
            separator = b"\t" if b"\t" in line else b"::" if b"::" in line else b","
            if b"movieid" in line.lower():
                # The header of ratings.csv: not data, so not counted as a line read.
                stats.lines -= 1
                continue
        fields = line.split(separator)
        if len(fields) != 4:
            yield None, line
            continue
        try:
            user, item = int(fields[0]), int(fields[1])
            rating, seconds = float(fields[2]), int(fields[3])
        except ValueError:
            yield None, line
            continue
        day = _day_of_epoch_days(seconds // 86_400, cache)
        if day is None or not math.isfinite(rating):
            yield None, line
            continue
        yyyymmdd = compact.get(day) or compact.setdefault(day, day.replace("-", ""))
        event = (
            f'{{"v":1,"ts":{seconds * 1000},{scope},"session_id":"{user}-{yyyymmdd}","user_id":"{user}",'
            f'"item_id":"{item}","event_type":"rating","value":{rating!r}}}'
        )
        yield day, event.encode()


def _convert_otto(
    stream: Iterable[bytes], stats: _Stats, tenant: str | None, surface: str | None
) -> Iterator[tuple[str | None, bytes]]:
    cache: dict[int, str | None] = {}
    scope = f'"tenant":{orjson.dumps(tenant).decode()},"surface":{orjson.dumps(surface).decode()}'
    for line in _lines(stream, stats):
        events = _otto_events(line, cache)
        if events is None:
            yield None, line
            continue
        for day, session, aid, ts, kind in events:
            event_type = OTTO_EVENT_TYPES.get(kind)
            # An unknown type is passed on as is, for the pipeline to reject with a reason.
            type_json = f'"{event_type}"' if event_type else orjson.dumps(kind).decode()
            event = (
                f'{{"v":1,"ts":{ts},{scope},"session_id":"{session}","user_id":"{session}",'
                f'"item_id":"{aid}","event_type":{type_json}}}'
            )
            yield day, event.encode()


def _otto_events(line: bytes, cache: dict[int, str | None]) -> list[tuple[str, int, int, int, str]] | None:
    """Parse one OTTO session line; None if any part of it is malformed (the line is then kept whole)."""
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(obj, dict):
        return None
    session, events = obj.get("session"), obj.get("events")
    if not _is_int(session) or not isinstance(events, list):
        return None
    out = []
    for event in events:
        if not isinstance(event, dict):
            return None
        aid, ts, kind = event.get("aid"), event.get("ts"), event.get("type")
        if not (_is_int(aid) and _is_int(ts) and isinstance(kind, str)):
            return None
        day = _day_of_epoch_days(ts // 86_400_000, cache)
        if day is None:
            return None
        out.append((day, session, aid, ts, kind))
    return out


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)
