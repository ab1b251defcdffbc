"""Event contract v1 in the pipeline: the value-level rules applied to whole frames of parsed rows at once
(polars), the canonical table's schema and the quarantine's.

The contract's constants, reason codes and line parser are `recsys_core.event_contract`'s (standard library
only, so that the API server validates posted events with them); this module applies the same rules to a
frame, in the same order, and a property test holds `validate_events` and the core's one-row
`validate_event` together. Documented in `docs/reference/event-contract.md`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import TYPE_CHECKING

import polars as pl

from recsys_core.event_contract import (
    CONTRACT_VERSION,
    EPOCH_MS_PATTERN,
    EPOCH_MS_RANGE,
    FIELD_TYPES,
    MAX_ID_CHARS,
    MAX_NESTING,
    PARSE_REASONS,
    RAW_PREFIX_CHARS,
    REASONS,
    REQUIRED_FIELDS,
    STRING_FIELDS,
    VALIDATION_REASONS,
    Rejection,
    arrival_window,
    line_too_long,
    parse_line,
    string_field,
)
from recsys_core.names import NAME_PATTERN

if TYPE_CHECKING:
    import pandera.polars as pa

__all__ = [
    "CANONICAL_SCHEMA",
    "CONTRACT_VERSION",
    "EPOCH_MS_RANGE",
    "MAX_ID_CHARS",
    "MAX_NESTING",
    "PARSED_SCHEMA",
    "PARSE_REASONS",
    "QUARANTINE_SCHEMA",
    "RAW_PREFIX_CHARS",
    "REASONS",
    "REQUIRED_FIELDS",
    "STRING_FIELDS",
    "VALIDATION_REASONS",
    "Rejection",
    "arrival_window",
    "canonical_schema_model",
    "line_too_long",
    "parse_line",
    "parse_ts",
    "string_field",
    "utc_days",
    "validate_events",
]

# Parsed-row columns and their types; everything optional in JSON is nullable here.
_POLARS_TYPES = {"str": pl.String(), "int": pl.Int64(), "float": pl.Float64()}
PARSED_SCHEMA: dict[str, pl.DataType] = {name: _POLARS_TYPES[kind] for name, kind in FIELD_TYPES.items()}

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
