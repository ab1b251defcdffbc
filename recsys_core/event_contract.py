"""Event contract v1: the one definition of what a valid raw event is, in the standard library only.

A raw line becomes an event in two stages, and each rule lives in exactly one of them:

1. *parse*: bytes -> a row of typed fields, or a parse-level rejection (`line_too_long`,
   `invalid_utf8`, `invalid_json`, `not_an_object`, `bad_type`). `parse_line` is the reference
   implementation, one line at a time; the pipeline's `canonicalize` has a vectorised fast path that must
   agree with it (a property test holds them together) and falls back to `parse_line` for anything unusual.
2. *validate*: the value-level rules (required fields, identifier rules, timestamps, ranges), in the order
   of VALIDATION_REASONS. The pipeline applies them to whole frames at once
   (`recsys_dagster.ingest.contract.validate_events`, polars); `validate_event` applies the same rules to
   one parsed row, for the API server's ingestion endpoint, which imports no pipeline library. A property
   test holds the two together.

Documented in `docs/reference/event-contract.md`.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from collections.abc import Collection
from typing import Any, NamedTuple

import numpy as np

from recsys_core.names import is_valid_name

CONTRACT_VERSION = 1
MAX_ID_CHARS = 256
RAW_PREFIX_CHARS = 4096
# Deeper nesting is invalid_json. The fast path's reader takes up to about 1000 levels; lines with more
# than this many `[` and `{` go to parse_line instead (see canonicalize), which applies the limit.
MAX_NESTING = 512

# The fields of a parsed row that hold text; every field is optional in JSON (None when absent).
STRING_FIELDS = (
    "ts",
    "tenant",
    "surface",
    "session_id",
    "user_id",
    "item_id",
    "event_type",
    "request_id",
    "event_id",
)
# How each field of a parsed row is typed: "str", "int" (64-bit) or "float". Every field is optional in
# JSON, so every one may be None in a parsed row.
FIELD_TYPES: dict[str, str] = {
    "v": "int",
    **dict.fromkeys(STRING_FIELDS, "str"),
    "value": "float",
    "rank": "int",
}
REQUIRED_FIELDS = ("ts", "tenant", "surface", "session_id", "item_id")
# `ts` in epoch milliseconds: up to 17 digits, and only the years 0001-9999 (the years RFC 3339 can
# write); a value outside them is quarantined as ts_out_of_range, like any ts outside the arrival window.
EPOCH_MS_PATTERN = r"^-?[0-9]{1,17}$"
EPOCH_MS_RANGE = (-62_135_596_800_000, 253_402_300_799_999)

# Reason codes, in the order the rules are applied: a line gets the first that applies.
PARSE_REASONS = ("line_too_long", "invalid_utf8", "invalid_json", "not_an_object", "bad_type")
VALIDATION_REASONS = (
    "unsupported_version",
    "missing_field",
    "empty_id",
    "id_too_long",
    "bad_identifier",
    "bad_ts",
    "ts_out_of_range",
    "unknown_event_type",
    "negative_rank",
    "non_finite_value",
)
REASONS = PARSE_REASONS + VALIDATION_REASONS


class Rejection(NamedTuple):
    """Why a line cannot be parsed into typed fields."""

    reason: str
    detail: str


def line_too_long(length: int, max_line_bytes: int) -> Rejection:
    """The rejection of a line of `length` bytes (without its line end) over the limit."""
    return Rejection("line_too_long", f"line is {length} bytes, limit is {max_line_bytes}")


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')


def _nesting_depth(line: bytes) -> int:
    """How deeply arrays and objects nest in a JSON line (an upper bound if the line is not JSON)."""
    if line.count(b"[") + line.count(b"{") <= MAX_NESTING:
        return 0  # cannot be deeper than the limit: not worth counting
    code = np.frombuffer(_JSON_STRING.sub(b"", line), np.uint8)
    opens = (code == ord("[")) | (code == ord("{"))
    closes = (code == ord("]")) | (code == ord("}"))
    return int(np.cumsum(opens.astype(np.int64) - closes).max(initial=0))


def _first_key_wins(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A repeated key keeps its first value, as the vectorised reader does."""
    obj: dict[str, Any] = {}
    for key, value in pairs:
        obj.setdefault(key, value)
    return obj


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def parse_line(line: bytes, max_line_bytes: int) -> dict[str, Any] | Rejection | None:
    """Parse one raw line (without its newline) into typed fields.

    Returns None for a blank line, a Rejection for a parse-level failure, else a dict with exactly the
    keys of FIELD_TYPES (None where absent or null).
    """
    line = line.removesuffix(b"\r")
    if len(line) > max_line_bytes:
        return line_too_long(len(line), max_line_bytes)
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Rejection("invalid_utf8", f"invalid UTF-8 at byte {exc.start}")
    if not text.strip(" \t\r\n"):
        return None
    if _nesting_depth(line) > MAX_NESTING:
        # Checked first because json.loads fails on deep nesting at a depth that depends on the caller's
        # stack: this keeps the outcome of a line the same wherever it is parsed.
        return Rejection("invalid_json", f"arrays and objects nested deeper than {MAX_NESTING} levels")
    try:
        obj = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_first_key_wins)
    except (ValueError, RecursionError) as exc:
        return Rejection("invalid_json", str(exc)[:200])
    if not isinstance(obj, dict):
        return Rejection("not_an_object", f"JSON {type(obj).__name__} is not an object")
    row: dict[str, Any] = {}
    for name, kind in FIELD_TYPES.items():
        value = obj.get(name)
        if value is None:
            row[name] = None
            continue
        converted = _convert(value, kind)
        if converted is _BAD:
            expected = "a string" if kind == "str" else "a 64-bit integer" if kind == "int" else "a number"
            return Rejection("bad_type", f"field {name!r} must be {expected}, got {_json_type(value)}")
        row[name] = converted
    return row


_BAD = object()


def string_field(value: Any) -> str | None:
    """A JSON value as a string field (an identifier or `ts`) holds it; None if its type is not allowed.

    Integers are accepted because many producers emit numeric ids (and `ts` as epoch milliseconds).
    """
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return None  # a lone surrogate escape
        return value
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else None


def _convert(value: Any, kind: str) -> Any:
    if isinstance(value, bool):
        return _BAD
    if kind == "str":
        text = string_field(value)
        return _BAD if text is None else text
    if kind == "int":
        return value if isinstance(value, int) and -(2**63) <= value < 2**63 else _BAD
    if isinstance(value, int):
        try:
            return float(value)
        except OverflowError:
            # An integer beyond the float range reads like the float literal 1e999 does: infinite, so
            # the value rule rejects it as non_finite_value.
            return math.inf if value > 0 else -math.inf
    return value if isinstance(value, float) else _BAD


def _json_type(value: Any) -> str:
    return {
        bool: "boolean",
        int: "integer",
        float: "number",
        str: "string",
        list: "array",
        dict: "object",
    }.get(type(value), type(value).__name__)


def arrival_window(
    day: dt.date, max_lateness_days: int, max_clock_skew_hours: int
) -> tuple[dt.datetime, dt.datetime]:
    """[start, end) of the event times a partition of arrival day `day` may hold."""
    midnight = dt.datetime.combine(day, dt.time(), dt.UTC)
    return (
        midnight - dt.timedelta(days=max_lateness_days),
        midnight + dt.timedelta(days=1, hours=max_clock_skew_hours),
    )


# What polars' `str.strip_chars()` trims (Unicode White_Space), which the pipeline trims identifiers with:
# `str.strip()` alone would also trim the separators \x1c-\x1f.
WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
# The forms of `ts` `validate_event` reads: RFC 3339 with a zone (also with a lower-case t/z or a space
# separator), or epoch milliseconds. The pipeline's reader is more lenient (it also reads one-digit fields
# and offsets without minutes): `validate_event` refuses those as bad_ts rather than accept a line the
# pipeline might read differently.
_RFC3339 = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt ]([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]{1,9}))?"
    r"(?:[Zz]|([+-])([0-9]{2}):([0-9]{2}))"
)
_EPOCH_MS = re.compile(EPOCH_MS_PATTERN.strip("^$"))
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_OUT_OF_YEARS = object()


def _event_time(text: str) -> dt.datetime | object | None:
    """`ts` as a UTC datetime (microseconds, further digits cut as the pipeline does); None if it is in
    none of the forms; _OUT_OF_YEARS if it is but falls outside the years 0001-9999."""
    if _EPOCH_MS.fullmatch(text):
        ms = int(text)
        if not EPOCH_MS_RANGE[0] <= ms <= EPOCH_MS_RANGE[1]:
            return _OUT_OF_YEARS
        return _EPOCH + dt.timedelta(milliseconds=ms)
    match = _RFC3339.fullmatch(text)
    if match is None:
        return None
    year, month, day, hour, minute, second, fraction, sign, zone_hours, zone_minutes = match.groups()
    try:
        offset = dt.timedelta(hours=int(zone_hours or 0), minutes=int(zone_minutes or 0)) * (
            -1 if sign == "-" else 1
        )
        local = dt.datetime(
            int(year),
            int(month),
            int(day),
            int(hour),
            int(minute),
            int(second),
            int((fraction or "").ljust(6, "0")[:6]),
            tzinfo=dt.timezone(offset),
        )
    except ValueError:
        return None  # no such date or time, or an offset of 24 hours or more
    try:
        return local.astimezone(dt.UTC)
    except OverflowError:
        return _OUT_OF_YEARS


def _iso(moment: dt.datetime) -> str:
    """As the pipeline writes a time in a detail: seconds, then 0, 3 or 6 fractional digits as needed."""
    fraction = ""
    if moment.microsecond:
        fraction = (
            f".{moment.microsecond // 1000:03d}"
            if moment.microsecond % 1000 == 0
            else f".{moment.microsecond:06d}"
        )
    return moment.strftime("%Y-%m-%dT%H:%M:%S") + fraction + "Z"


def validate_event(
    row: dict[str, Any],
    day: dt.date,
    *,
    event_types: Collection[str],
    max_lateness_days: int,
    max_clock_skew_hours: int,
) -> dict[str, Any] | Rejection:
    """Apply the value-level rules to one parsed row (`parse_line`) of arrival day `day`, in the order of
    VALIDATION_REASONS: the first rule it breaks, or the event with identifiers trimmed, `ts` as a UTC
    datetime and the defaults filled (the pipeline's `validate_events`, one row at a time)."""
    version = row["v"]
    if version is not None and version != CONTRACT_VERSION:
        return Rejection(
            "unsupported_version",
            f"contract version {version} is not supported (expected {CONTRACT_VERSION})",
        )
    for name in REQUIRED_FIELDS:
        if row[name] is None:
            return Rejection("missing_field", f"required field {name!r} is missing")
    event = dict(row)
    for name in ("tenant", "surface", "session_id", "item_id"):
        event[name] = row[name].strip(WHITESPACE)
    for name in ("user_id", "request_id", "event_id"):
        # An empty optional id means "not given" (an empty user id: an anonymous event).
        event[name] = (row[name].strip(WHITESPACE) or None) if row[name] is not None else None
    if event["event_type"] is None:
        event["event_type"] = "exposure"
    for name in ("tenant", "surface", "session_id", "item_id"):
        if event[name] == "":
            return Rejection("empty_id", f"{name!r} is empty")
    for name in ("session_id", "user_id", "item_id", "request_id", "event_id"):
        if event[name] is not None and len(event[name]) > MAX_ID_CHARS:
            return Rejection(
                "id_too_long", f"{name!r} has {len(event[name])} characters, limit is {MAX_ID_CHARS}"
            )
    for name in ("tenant", "surface"):
        if not is_valid_name(event[name]):
            return Rejection(
                "bad_identifier",
                f"{name} {event[name]} must be 1-64 characters of A-Z a-z 0-9 . _ - and not . or ..",
            )
    ts = event.pop("ts")
    moment = _event_time(ts)
    if moment is None:
        return Rejection("bad_ts", f"ts {ts} is neither RFC 3339 with a zone nor epoch milliseconds")
    window_start, window_end = arrival_window(day, max_lateness_days, max_clock_skew_hours)
    if not isinstance(moment, dt.datetime) or not window_start <= moment < window_end:
        shown = _iso(moment) if isinstance(moment, dt.datetime) else ts
        return Rejection(
            "ts_out_of_range",
            f"ts {shown} is outside the arrival window [{window_start:%Y-%m-%dT%H:%M}Z, {window_end:%Y-%m-%dT%H:%M}Z)",
        )
    if event["event_type"] not in event_types:
        return Rejection(
            "unknown_event_type", f"event_type {event['event_type']} is not one of " + ", ".join(event_types)
        )
    if event["rank"] is not None and event["rank"] < 0:
        return Rejection("negative_rank", f"rank {event['rank']} is negative")
    if event["value"] is not None and not math.isfinite(event["value"]):
        return Rejection("non_finite_value", f"value {event['value']} is not finite")
    del event["v"]
    event["ts"] = moment
    return event
