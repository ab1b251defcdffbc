"""Event contract v1: the one definition of what a valid raw event is.

A raw line becomes an event in two stages, and each rule lives in exactly one of them:

1. *parse*: bytes -> a row of typed fields, or a parse-level rejection (`line_too_long`,
   `invalid_utf8`, `invalid_json`, `not_an_object`, `bad_type`). `parse_line` is the reference
   implementation, one line at a time; `canonicalize` has a vectorised fast path that must agree with it
   (a property test holds them together) and falls back to `parse_line` for anything unusual.
2. *validate*: `validate_events` applies every value-level rule (required fields, identifier rules,
   timestamps, ranges) to a whole frame of parsed rows at once, so the rules are written once.

Documented in `docs/reference/event-contract.md`.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import polars as pl

from recsys_core.names import NAME_PATTERN

if TYPE_CHECKING:
    import pandera.polars as pa

CONTRACT_VERSION = 1
MAX_ID_CHARS = 256
RAW_PREFIX_CHARS = 4096
# Deeper nesting is invalid_json. The fast path's reader takes up to about 1000 levels; lines with more
# than this many `[` and `{` go to parse_line instead (see canonicalize), which applies the limit.
MAX_NESTING = 512

# Parsed-row columns and their types; everything optional in JSON is nullable here.
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
PARSED_SCHEMA: dict[str, pl.DataType] = {
    "v": pl.Int64(),
    **{name: pl.String() for name in STRING_FIELDS},
    "value": pl.Float64(),
    "rank": pl.Int64(),
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

CANONICAL_SCHEMA: dict[str, pl.DataType] = {
    "event_id": pl.String(),
    "ts": pl.Datetime("us", "UTC"),
    "tenant": pl.String(),
    "surface": pl.String(),
    "session_id": pl.String(),
    "user_id": pl.String(),
    "item_id": pl.String(),
    "event_type": pl.String(),
    "value": pl.Float64(),
    "rank": pl.Int64(),
    "request_id": pl.String(),
    "source_file": pl.String(),
    "source_line": pl.Int64(),
}
QUARANTINE_SCHEMA: dict[str, pl.DataType] = {
    "source_file": pl.String(),
    "source_line": pl.Int64(),
    "reason": pl.String(),
    "detail": pl.String(),
    "raw": pl.String(),
}


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
    keys of PARSED_SCHEMA (None where absent or null).
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
    for name, dtype in PARSED_SCHEMA.items():
        value = obj.get(name)
        if value is None:
            row[name] = None
            continue
        converted = _convert(value, dtype)
        if converted is _BAD:
            expected = (
                "a string"
                if dtype == pl.String()
                else "a 64-bit integer"
                if dtype == pl.Int64()
                else "a number"
            )
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


def _convert(value: Any, dtype: pl.DataType) -> Any:
    if isinstance(value, bool):
        return _BAD
    if dtype == pl.String():
        text = string_field(value)
        return _BAD if text is None else text
    if dtype == pl.Int64():
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


def validate_events(
    parsed: pl.DataFrame,
    day: dt.date,
    *,
    event_types: Sequence[str],
    max_lateness_days: int,
    max_clock_skew_hours: int,
) -> pl.DataFrame:
    """Apply every value-level rule to parsed rows.

    Returns the rows with identifiers trimmed, `ts` as a UTC timestamp, defaults filled, and two extra
    columns `reason` / `detail` that are null for valid rows: the valid rows first, in input order, then
    the rejected ones.
    """
    events = parsed.with_columns(
        pl.col("tenant", "surface", "session_id", "item_id").str.strip_chars(),
        # An empty optional id means "not given" (an empty user id: an anonymous event).
        *(
            _none_if_empty(pl.col(name).str.strip_chars()).alias(name)
            for name in ("user_id", "request_id", "event_id")
        ),
        pl.col("event_type").fill_null("exposure"),
    )
    events = events.with_columns(parse_ts(events.get_column("ts")).alias("ts_parsed"))

    window_start, window_end = arrival_window(day, max_lateness_days, max_clock_skew_hours)
    rules = _rules(events, event_types, window_start, window_end)
    broken = events.select(pl.any_horizontal(cond.fill_null(False) for cond, _, _ in rules)).to_series()
    accepted = events.filter(~broken).with_columns(
        pl.lit(None, pl.String).alias("reason"), pl.lit(None, pl.String).alias("detail")
    )
    if broken.any():
        # Which rule failed first, and its message, only for the (usually few) rejected rows.
        first_rule = pl.lit(None, pl.Int32)
        for index in reversed(range(len(rules))):
            first_rule = pl.when(rules[index][0].fill_null(False)).then(index).otherwise(first_rule)
        detail = pl.lit(None, pl.String)
        for index, (_, _, message) in enumerate(rules):
            detail = pl.when(pl.col("_rule") == index).then(message).otherwise(detail)
        codes = [code for _, code, _ in rules]
        rejected = (
            events.filter(broken)
            .with_columns(first_rule.alias("_rule"))
            .with_columns(
                pl.col("_rule")
                .replace_strict(list(range(len(rules))), codes, return_dtype=pl.String)
                .alias("reason"),
                detail.alias("detail"),
            )
            .drop("_rule")
        )
        accepted = pl.concat([accepted, rejected])
    return accepted.drop("ts", "v").rename({"ts_parsed": "ts"})


def _none_if_empty(expr: pl.Expr) -> pl.Expr:
    return pl.when(expr == "").then(None).otherwise(expr)


def _rules(
    events: pl.DataFrame, event_types: Sequence[str], window_start: dt.datetime, window_end: dt.datetime
) -> list[tuple[pl.Expr, str, pl.Expr]]:
    """(condition, reason code, detail message) in the order they are applied."""
    rules: list[tuple[pl.Expr, str, pl.Expr]] = [
        (
            pl.col("v").is_not_null() & (pl.col("v") != CONTRACT_VERSION),
            "unsupported_version",
            pl.format("contract version {} is not supported (expected 1)", pl.col("v")),
        ),
    ]
    rules += [
        (pl.col(name).is_null(), "missing_field", pl.lit(f"required field {name!r} is missing"))
        for name in REQUIRED_FIELDS
    ]
    rules += [
        (pl.col(name) == "", "empty_id", pl.lit(f"{name!r} is empty"))
        for name in ("tenant", "surface", "session_id", "item_id")
    ]
    rules += [
        (
            pl.col(name).str.len_chars() > MAX_ID_CHARS,
            "id_too_long",
            pl.format(f"{name!r} has {{}} characters, limit is {MAX_ID_CHARS}", pl.col(name).str.len_chars()),
        )
        for name in ("session_id", "user_id", "item_id", "request_id", "event_id")
    ]
    for name in ("tenant", "surface"):
        # Tenants and surfaces are few: check the distinct values, not every row.
        names = events.get_column(name).drop_nulls().unique()
        good = names.filter(names.str.contains(NAME_PATTERN) & ~names.is_in([".", ".."]))
        rules.append(
            (
                ~pl.col(name).is_in(good.implode()),
                "bad_identifier",
                pl.format(
                    f"{name} {{}} must be 1-64 characters of A-Z a-z 0-9 . _ - and not . or ..", pl.col(name)
                ),
            )
        )
    rules += [
        (
            pl.col("ts_parsed").is_null() & ~_is_epoch_ms(pl.col("ts")),
            "bad_ts",
            pl.format("ts {} is neither RFC 3339 with a zone nor epoch milliseconds", pl.col("ts")),
        ),
        (
            # Epoch milliseconds beyond EPOCH_MS_RANGE are left unparsed.
            pl.col("ts_parsed").is_null()
            | (pl.col("ts_parsed") < window_start)
            | (pl.col("ts_parsed") >= window_end),
            "ts_out_of_range",
            pl.format(
                f"ts {{}} is outside the arrival window [{window_start:%Y-%m-%dT%H:%M}Z, {window_end:%Y-%m-%dT%H:%M}Z)",
                pl.coalesce(pl.col("ts_parsed").dt.strftime("%Y-%m-%dT%H:%M:%S%.fZ"), pl.col("ts")),
            ),
        ),
        (
            ~pl.col("event_type").is_in(list(event_types)),
            "unknown_event_type",
            pl.format("event_type {} is not one of " + ", ".join(event_types), pl.col("event_type")),
        ),
        (pl.col("rank") < 0, "negative_rank", pl.format("rank {} is negative", pl.col("rank"))),
        (
            ~pl.col("value").is_finite(),
            "non_finite_value",
            pl.format("value {} is not finite", pl.col("value")),
        ),
    ]
    return rules


def parse_ts(ts: pl.Series) -> pl.Series:
    """`ts` texts -> UTC timestamps (null where a text is in none of the accepted forms, or is epoch
    milliseconds outside `EPOCH_MS_RANGE`).

    Accepted: RFC 3339 with a zone, also with a lower-case t/z or a space separator, and epoch milliseconds
    (a JSON integer or a string of digits). The pipeline and `recsys import` both date events with this.
    """
    frame = ts.to_frame("ts")
    parsed = frame.select(_parse_strict_ts(pl.col("ts"))).to_series()
    unparsed = parsed.is_null() & ts.is_not_null()
    if unparsed.any():
        # RFC 3339 also allows a lower-case t/z and a space separator: normalise only those rows.
        relaxed = _parse_strict_ts(
            pl.col("ts").str.to_uppercase().str.replace(r"^(\d{4}-\d{2}-\d{2}) ", "${1}T")
        )
        parsed = frame.select(pl.when(unparsed).then(relaxed).otherwise(parsed)).to_series()
    return parsed.alias(ts.name)


def utc_days(ts: Sequence[str | None]) -> list[str | None]:
    """The UTC day (YYYY-MM-DD) of each `ts` text as the pipeline parses it; None where it does not, or
    where the day is outside the years 0001-9999 (`0001-01-01T00:00:00+01:00` is in year 0 in UTC)."""
    epoch_days = parse_ts(pl.Series("ts", ts, dtype=pl.String)).dt.date().to_physical()
    # Each distinct day is formatted once: a batch of events spans few days.
    distinct = epoch_days.drop_nulls().unique().to_frame("n").with_columns(day=pl.col("n").cast(pl.Date))
    names = distinct.filter(pl.col("day").dt.year().is_between(1, 9999)).select(
        "n", pl.col("day").dt.strftime("%Y-%m-%d")
    )
    lookup = dict(names.iter_rows())
    return [lookup.get(n) for n in epoch_days.to_list()]


def _parse_strict_ts(ts: pl.Expr) -> pl.Expr:
    ms = ts.cast(pl.Int64, strict=False)
    # Checked before the cast to microseconds, which silently wraps around beyond about year 294000.
    in_range = ms.is_between(*EPOCH_MS_RANGE)
    epoch = pl.from_epoch(pl.when(in_range).then(ms), time_unit="ms").dt.replace_time_zone("UTC")
    rfc3339 = ts.str.to_datetime("%Y-%m-%dT%H:%M:%S%.f%#z", time_unit="us", strict=False)
    return (
        pl.when(_is_epoch_ms(ts))
        .then(epoch.dt.cast_time_unit("us"))
        .otherwise(rfc3339.dt.convert_time_zone("UTC"))
    )


def _is_epoch_ms(ts: pl.Expr) -> pl.Expr:
    return ts.str.contains(EPOCH_MS_PATTERN)


def canonical_schema_model() -> pa.DataFrameSchema:
    """Pandera schema of the canonical_events table (the `schema` gate)."""
    # Imported here: only the schema gate's validation of the files needs pandera, and a run whose
    # partitions carry a usable profile does not (docs/reference/checks.md).
    import pandera.polars as pa

    required_text = pa.Check.str_length(min_value=1, max_value=MAX_ID_CHARS)
    return pa.DataFrameSchema(
        {
            "event_id": pa.Column(pl.String, required_text),
            "ts": pa.Column(pl.Datetime("us", "UTC")),
            "tenant": pa.Column(pl.String, pa.Check.str_matches(NAME_PATTERN)),
            "surface": pa.Column(pl.String, pa.Check.str_matches(NAME_PATTERN)),
            "session_id": pa.Column(pl.String, required_text),
            "user_id": pa.Column(pl.String, required_text, nullable=True),
            "item_id": pa.Column(pl.String, required_text),
            "event_type": pa.Column(pl.String),
            "value": pa.Column(pl.Float64, nullable=True),
            "rank": pa.Column(pl.Int64, pa.Check.ge(0), nullable=True),
            "request_id": pa.Column(pl.String, nullable=True),
            "source_file": pa.Column(pl.String),
            "source_line": pa.Column(pl.Int64, pa.Check.ge(1)),
        },
        strict=True,
        ordered=True,
        # Uniqueness of (tenant, event_id), the idempotency key, is the unique_event_id gate's: checking it
        # here too would cost the schema gate most of its time.
    )
