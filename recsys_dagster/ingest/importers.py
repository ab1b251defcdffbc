"""Split foreign event files into the landing layout (``<raw root>/dt=YYYY-MM-DD/``).

Supported inputs: contract JSONL (also the recsys suite's exposure-v1 files), MovieLens ratings
(``ratings.csv``, ``u.data``, ``ratings.dat``) and OTTO session JSONL, each optionally gzip-compressed; and
two item catalog formats: catalog JSONL (docs/reference/catalog.md) and MovieLens ``movies.csv``. A catalog
file is a snapshot without arrival dates: all of it lands in ``<raw root>/catalog/dt=<day>/``, the day the
caller chooses (`default_catalog_day`).
Every event goes to the folder of its UTC day (as the pipeline dates it: `contract.utc_days`) in one file
per source and day,
``import-<stem>-<sha256 prefix of the source>.jsonl``, so importing the same file again rewrites identical
files and never touches anything else. Nothing is dropped: a line that cannot be converted or dated lands,
verbatim, in the folder of the day the import runs, where the pipeline quarantines it with a reason.

Input is streamed and output buffered per day up to a bounded size, so memory does not grow with the file.
"""

from __future__ import annotations

import csv
import datetime as dt
import functools
import gzip
import hashlib
import io
import itertools
import math
import os
import re
import secrets
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from io import BufferedIOBase
from pathlib import Path
from typing import Any, BinaryIO, TypeGuard, TypeVar, cast

import orjson

from recsys_core.catalog import CATALOG
from recsys_core.lake import day_folder
from recsys_core.names import validate_name
from recsys_dagster.ingest import contract

__all__ = [
    "CATALOG_FORMATS",
    "FORMATS",
    "ImportReport",
    "default_catalog_day",
    "detect_format",
    "import_file",
]

FORMATS = ("auto", "jsonl", "movielens", "otto", "catalog", "movies")
# The formats whose records are catalog items rather than events.
CATALOG_FORMATS = ("catalog", "movies")

# Output is flushed to the per-day temporary files whenever this much is buffered.
FLUSH_LINES = 500_000
FLUSH_BYTES = 64 * 1024 * 1024

_UDATA_LINE = re.compile(rb"\s*\d+\t\d+\t[0-9.]+\t\d+\s*")
# A MovieLens title ends with its year: "Toy Story (1995)".
_TITLE_YEAR = re.compile(r"^(?P<title>.*?)\s*\((?P<year>\d{4})\)\s*$")
NO_GENRES = "(no genres listed)"
OTTO_EVENT_TYPES = {"clicks": "click", "carts": "add_to_cart", "orders": "purchase"}
# Timestamps are dated in batches of this many (one call of the pipeline's vectorised parser each).
DATE_BATCH = 65_536


@dataclass(frozen=True)
class ImportReport:
    """What `import_file` did.

    `lines_read` counts data lines (a CSV header excluded); for contract JSONL and MovieLens
    ``lines_read = events_written + undated_lines + blank_lines``, for OTTO one line holds a whole session.
    `per_day` counts the events written per UTC day; undated lines are counted apart and land in
    `undated_day` (the day the import ran). A catalog import (`feed` "catalog") writes catalog records,
    all of them into the one landing day it was given (`per_day` has that day only), and counts them as
    `events_written`; nothing is undated.
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
    feed: str = "events"


def import_file(
    source: Path,
    raw_root: Path,
    *,
    fmt: str = "auto",
    tenant: str | None = None,
    surface: str | None = None,
    progress: Callable[[str], None] | None = None,
    today: dt.date | None = None,
    catalog_day: dt.date | None = None,
) -> ImportReport:
    """Import one file into the landing layout under `raw_root`; see the module docstring.

    `fmt` is one of `FORMATS`; `auto` detects it from the name and first line. MovieLens and OTTO need
    `tenant` and `surface`; for contract JSONL they only fill in lines that lack the field, and complete
    lines are copied byte for byte. `today` (default: the current UTC date) receives undatable lines.
    Catalog formats land in the folder of `catalog_day` (default: `default_catalog_day`); `movies` needs
    `tenant`, and catalog JSONL takes it for the lines that lack one.
    """
    source = Path(source)
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")
    for kind, value in (("tenant", tenant), ("surface", surface)):
        if value is not None:
            validate_name(kind, value)
    inner_name = _inner_name(source)
    if fmt == "auto":
        fmt = detect_format(source)
    if fmt in ("movielens", "otto") and (tenant is None or surface is None):
        raise ValueError(
            f"{fmt} files carry no tenant or surface: pass both tenant and surface (--tenant, --surface)"
        )
    if fmt == "movies" and tenant is None:
        raise ValueError("movies files carry no tenant: pass the tenant whose catalog it is (--tenant)")

    digest = _sha256(source)
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", Path(inner_name).stem)[:80] or "source"
    today = today or dt.datetime.now(dt.UTC).date()
    undated_day = today.isoformat()
    feed = "catalog" if fmt in CATALOG_FORMATS else "events"
    converter: Callable[[Iterable[bytes], _Stats, str | None, str | None], Iterator[tuple[str | None, bytes]]]
    if feed == "catalog":
        # A snapshot has no arrival dates: every line lands on the one day, and its records are dated by the
        # day's start (a malformed line lands there too, for the pipeline to quarantine with a reason).
        landing_day = catalog_day or default_catalog_day(Path(raw_root), today)[0]
        raw_root, undated_day = Path(raw_root) / CATALOG, landing_day.isoformat()
        convert_catalog = _convert_catalog if fmt == "catalog" else _convert_movies
        converter = functools.partial(convert_catalog, day=landing_day)
    else:
        converter = {"jsonl": _convert_jsonl, "movielens": _convert_movielens, "otto": _convert_otto}[fmt]
    splitter = _DaySplitter(Path(raw_root), f"import-{stem}-{digest[:12]}.jsonl")
    stats = _Stats()
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
        feed=feed,
    )
    if progress is not None and feed == "catalog":
        malformed = f", {stats.undated:,} malformed line(s) kept for quarantine" if stats.undated else ""
        progress(
            f"{source.name} ({fmt}): {report.events_written:,} catalog records -> catalog/dt={undated_day}"
            f"{malformed}"
        )
    elif progress is not None:
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


def _inner_name(source: Path) -> str:
    """The file's name without a `.gz` suffix."""
    return source.name[:-3] if source.name.lower().endswith(".gz") else source.name


def _sha256(source: Path) -> str:
    digest = hashlib.sha256()
    with open(source, "rb") as stream:
        while block := stream.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def detect_format(source: Path) -> str:
    """Guess the format from the first non-blank line, falling back on the file name."""
    inner_name = _inner_name(Path(source))
    first = b""
    with _open(source) as stream:
        for raw in stream:
            if raw.strip():
                first = raw.strip()
                break
    name = inner_name.lower()
    if first.lower().replace(b'"', b"").startswith(b"movieid,title,genres"):
        return "movies"
    if first.lower().startswith(b"userid,movieid,rating") or _UDATA_LINE.fullmatch(first):
        return "movielens"
    if name in ("u.data", "ratings.dat", "ratings.csv") or (b"::" in first and first[:1].isdigit()):
        return "movielens"
    try:
        obj = orjson.loads(first)
    except orjson.JSONDecodeError:
        obj = None
    if isinstance(obj, dict):
        if "session" in obj and isinstance(obj.get("events"), list):
            return "otto"
        # A catalog record is an item with its update time; an event has a session and a time.
        return "catalog" if "updated_at" in obj and "session_id" not in obj and "ts" not in obj else "jsonl"
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


def _json_objects(stream: Iterable[bytes], stats: _Stats) -> Iterator[tuple[bytes, dict[str, Any] | None]]:
    """Each non-blank line with its JSON object (None when the line is not one)."""
    for line in _lines(stream, stats):
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:
            obj = None
        yield line, obj if isinstance(obj, dict) else None


_Payload = TypeVar("_Payload")


def _dated(items: Iterable[tuple[str | None, _Payload]]) -> Iterator[tuple[str | None, _Payload]]:
    """Date each item's `ts` text (None: no usable ts) with `contract.utc_days`, a batch at a time; the
    items come back in order, each with its UTC day (None where the ts cannot be dated)."""
    pending = iter(items)
    while batch := list(itertools.islice(pending, DATE_BATCH)):
        days = contract.utc_days([ts for ts, _ in batch])
        yield from zip(days, (payload for _, payload in batch), strict=True)


def _contract_ts(line: bytes, obj: dict[str, Any]) -> str | None:
    """The line's `ts` as the pipeline reads it (a string, or an integer as its digits), None if unusable.

    orjson keeps the last of repeated keys where the contract keeps the first: a line that may repeat
    `ts` (twice spelled out, or a key written with escapes) is read again by the contract's parser.
    """
    if line.count(b'"ts"') > 1 or b"\\u" in line:
        parsed = contract.parse_line(line, max_line_bytes=len(line))
        return parsed["ts"] if isinstance(parsed, dict) else None
    return contract.string_field(obj.get("ts"))


def _convert_jsonl(
    stream: Iterable[bytes], stats: _Stats, tenant: str | None, surface: str | None
) -> Iterator[tuple[str | None, bytes]]:
    defaults = [(key, value) for key, value in (("tenant", tenant), ("surface", surface)) if value]

    # Only bytes and strings wait for their batch to be dated: thousands of parsed objects held at once
    # would keep the garbage collector busy.
    def parsed() -> Iterator[tuple[str | None, tuple[bytes, bytes]]]:
        for line, obj in _json_objects(stream, stats):
            if obj is None:
                yield None, (line, line)
                continue
            completed = _spliced(line, obj, [(key, value) for key, value in defaults if key not in obj])
            yield _contract_ts(line, obj), (line, completed)

    for day, (line, completed) in _dated(parsed()):
        yield (day, completed) if day is not None else (None, line)


def _spliced(line: bytes, obj: dict[str, Any], missing: list[tuple[str, str]]) -> bytes:
    """The line with the missing fields spliced in after "{" rather than re-serialised, so that everything
    the line already says stays byte for byte as it was."""
    if not missing:
        return line
    fields = b",".join(orjson.dumps(key) + b":" + orjson.dumps(value) for key, value in missing)
    brace = line.index(b"{") + 1
    return line[:brace] + fields + (b"," if obj else b"") + line[brace:]


def _convert_movielens(
    stream: Iterable[bytes], stats: _Stats, tenant: str | None, surface: str | None
) -> Iterator[tuple[str | None, bytes]]:
    compact: dict[str, str] = {}
    scope = f'"tenant":{orjson.dumps(tenant).decode()},"surface":{orjson.dumps(surface).decode()}'

    def ratings() -> Iterator[tuple[str | None, tuple[bytes, tuple[int, int, float, int] | None]]]:
        separator: bytes | None = None
        for line in _lines(stream, stats):
            if separator is None:
                separator = b"\t" if b"\t" in line else b"::" if b"::" in line else b","
                if b"movieid" in line.lower():
                    # The header of ratings.csv: not data, so not counted as a line read.
                    stats.lines -= 1
                    continue
            rating = _movielens_rating(line, separator)
            yield None if rating is None else str(rating[3] * 1000), (line, rating)

    for day, (line, rating) in _dated(ratings()):
        if day is None or rating is None:
            yield None, line
            continue
        user, item, value, seconds = rating
        yyyymmdd = compact.get(day) or compact.setdefault(day, day.replace("-", ""))
        event = (
            f'{{"v":1,"ts":{seconds * 1000},{scope},"session_id":"{user}-{yyyymmdd}","user_id":"{user}",'
            f'"item_id":"{item}","event_type":"rating","value":{value!r}}}'
        )
        yield day, event.encode()


def _movielens_rating(line: bytes, separator: bytes) -> tuple[int, int, float, int] | None:
    """(user, movie, rating, epoch seconds) of one ratings line; None if it is not one."""
    fields = line.split(separator)
    if len(fields) != 4:
        return None
    try:
        user, item = int(fields[0]), int(fields[1])
        rating, seconds = float(fields[2]), int(fields[3])
    except ValueError:
        return None
    return (user, item, rating, seconds) if math.isfinite(rating) else None


def _convert_otto(
    stream: Iterable[bytes], stats: _Stats, tenant: str | None, surface: str | None
) -> Iterator[tuple[str | None, bytes]]:
    scope = f'"tenant":{orjson.dumps(tenant).decode()},"surface":{orjson.dumps(surface).decode()}'

    # One item per event, with its session line and the session's size; a malformed session is one
    # item without an event.
    def events() -> Iterator[tuple[str | None, tuple[bytes, tuple[int, int, int, str] | None, int]]]:
        for line in _lines(stream, stats):
            parsed = _otto_events(line)
            if parsed is None:
                yield None, (line, None, 1)
            for event in parsed or ():
                yield str(event[2]), (line, event, len(parsed or ()))

    session: list[tuple[str | None, tuple[int, int, int, str]]] = []
    for day, (line, event, size) in _dated(events()):
        if event is None:
            yield None, line  # malformed: kept whole
            continue
        session.append((day, event))
        if len(session) < size:
            continue
        if any(event_day is None for event_day, _ in session):
            yield None, line  # an event that cannot be dated: the session is kept whole
        else:
            for event_day, (session_id, aid, ts, kind) in session:
                event_type = OTTO_EVENT_TYPES.get(kind)
                # An unknown type is passed on as is, for the pipeline to reject with a reason.
                type_json = f'"{event_type}"' if event_type else orjson.dumps(kind).decode()
                text = (
                    f'{{"v":1,"ts":{ts},{scope},"session_id":"{session_id}","user_id":"{session_id}",'
                    f'"item_id":"{aid}","event_type":{type_json}}}'
                )
                yield event_day, text.encode()
        session = []


def _otto_events(line: bytes) -> list[tuple[int, int, int, str]] | None:
    """(session, aid, ts, type) of each event of one OTTO session line; None if any part of it is
    malformed (the line is then kept whole)."""
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
        out.append((session, aid, ts, kind))
    return out


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def default_catalog_day(raw_root: Path, today: dt.date) -> tuple[dt.date, str]:
    """The landing day of a catalog snapshot imported without one, and why.

    The pipeline's catalog as of day D holds what landed on days <= D, so a snapshot lands on the first
    day events landed (a history imported before it then sees the catalog on every one of its days), or
    on `today` when no event has landed yet.
    """
    days = sorted(
        folder.name.removeprefix("dt=")
        for folder in Path(raw_root).glob("dt=*")
        if folder.is_dir() and any(path.is_file() for path in folder.glob("*.jsonl*"))
    )
    for text in days:
        try:
            day = dt.date.fromisoformat(text)
        except ValueError:
            continue
        return day, f"the first day events landed ({day_folder(day)} under the raw landing zone)"
    return today, "today: no events have landed yet"


def _item_record(
    tenant: str, item_id: str, title: str, categories: list[str], attributes: dict[str, Any], day: dt.date
) -> bytes:
    record = {
        "v": 1,
        "tenant": tenant,
        "item_id": item_id,
        "title": title,
        "categories": categories,
        "tags": [],
        "available": True,
        "attributes": attributes,
        "updated_at": f"{day.isoformat()}T00:00:00Z",
    }
    return orjson.dumps(record)


def _convert_movies(
    stream: Iterable[bytes], stats: _Stats, tenant: str | None, surface: str | None, *, day: dt.date
) -> Iterator[tuple[str | None, bytes]]:
    """MovieLens movies.csv (`movieId,title,genres`): title without its trailing "(year)", genres split on
    "|" as categories ("(no genres listed)" = none), the year in attributes. A row that is not a movie is
    passed on as it was read (for the pipeline to quarantine)."""
    landing = day.isoformat()
    text = io.TextIOWrapper(cast(BinaryIO, stream), encoding="utf-8", errors="replace", newline="")
    header = True
    for fields in csv.reader(text):
        stats.lines += 1
        if header:
            header = False
            stats.lines -= 1  # the header is not data
            continue
        if not any(field.strip() for field in fields):
            stats.blank += 1
            continue
        if len(fields) != 3 or not fields[0].strip().isdigit():
            yield None, ",".join(fields).encode()
            continue
        movie_id, title, genres = (field.strip() for field in fields)
        attributes: dict[str, Any] = {}
        if found := _TITLE_YEAR.match(title):
            title, attributes["year"] = found["title"], int(found["year"])
        categories = [genre for genre in genres.split("|") if genre and genre != NO_GENRES]
        yield landing, _item_record(cast(str, tenant), movie_id, title, categories, attributes, day)


def _convert_catalog(
    stream: Iterable[bytes], stats: _Stats, tenant: str | None, surface: str | None, *, day: dt.date
) -> Iterator[tuple[str | None, bytes]]:
    """Catalog JSONL: lines copied byte for byte, a missing tenant spliced in; a line that is not a JSON
    object is passed on as it was (for the pipeline to quarantine)."""
    landing = day.isoformat()
    for line, obj in _json_objects(stream, stats):
        if obj is None:
            yield None, line
        elif tenant is not None and "tenant" not in obj:
            yield landing, _spliced(line, obj, [("tenant", tenant)])
        else:
            yield landing, line
