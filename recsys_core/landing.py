"""What every landed JSONL feed shares besides events: line errors with reason codes, the quarantine table,
and the first rules a line must pass before its own contract reads it.

The decision traces (`recsys_core.decisions`) and the item catalog (`recsys_core.catalog`) are landed the
same way (`recsys_dagster.ingest.landing.land_lines`): every line becomes a row, a quarantined line with a
reason code, a repeat of a row already landed that day, or a blank line. Only pyarrow and the standard
library are used: the API server imports the contracts too.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pyarrow as pa

# The first characters of a quarantined line kept in the quarantine table.
RAW_PREFIX_CHARS = 4096

# The reason codes every feed checks first, in this order, before its own contract.
LINE_REASONS = ("line_too_long", "invalid_utf8", "invalid_json", "not_an_object")

QUARANTINE_SCHEMA = pa.schema(
    [
        ("file", pa.string()),
        ("line", pa.int64()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("raw", pa.string()),
    ]
)


class LineError(ValueError):
    """A landed line that breaks its contract; `reason` is one of the feed's reason codes."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def json_object(line: bytes, max_line_bytes: int, error: type[LineError] = LineError) -> dict[str, Any]:
    """The JSON object of one line, or `error` with the first of LINE_REASONS the line breaks. NaN and
    Infinity are not JSON and are refused."""
    if len(line) > max_line_bytes:
        raise error("line_too_long", f"{len(line):,} bytes > {max_line_bytes:,}")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error("invalid_utf8", str(exc)) from None
    try:
        raw = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise error("invalid_json", str(exc)[:200]) from None
    if not isinstance(raw, dict):
        raise error("not_an_object", type(raw).__name__)
    return raw


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def iso_timestamp(value: object, name: str, error: type[LineError] = LineError) -> dt.datetime:
    """An ISO 8601 text with a time zone as a UTC datetime, or `error("bad_ts")`."""
    if not isinstance(value, str):
        raise error("bad_ts", f"{name} must be an ISO 8601 string")
    try:
        moment = dt.datetime.fromisoformat(value)
    except ValueError:
        raise error("bad_ts", f"{name} {value[:40]!r} is not ISO 8601") from None
    if moment.utcoffset() is None:
        raise error("bad_ts", f"{name} {value[:40]!r} has no time zone")
    return moment.astimezone(dt.UTC)
