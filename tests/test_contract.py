"""Event contract v1: the reference parser, the value rules, and the fast path held to both."""

from __future__ import annotations

import datetime as dt
import json
import math
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import polars as pl
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from recsys_core.settings import DEFAULT_EVENT_TYPES, IngestConfig
from recsys_dagster.ingest import canonicalize, contract

DAY = dt.date(2025, 3, 10)
UTC = dt.UTC
MIB = 1024 * 1024
BASE = {
    "ts": "2025-03-10T12:00:00Z",
    "tenant": "acme",
    "surface": "home",
    "session_id": "s1",
    "item_id": "i1",
}
NOON = dt.datetime(2025, 3, 10, 12, tzinfo=UTC)


def parse(line: bytes | str | dict, max_line_bytes: int = MIB) -> Any:
    if isinstance(line, dict):
        line = json.dumps(line)
    if isinstance(line, str):
        line = line.encode("utf-8")
    return contract.parse_line(line, max_line_bytes)


def validate(
    *rows: dict,
    day: dt.date = DAY,
    event_types: tuple[str, ...] = DEFAULT_EVENT_TYPES,
    max_lateness_days: int = 7,
    max_clock_skew_hours: int = 1,
) -> list[dict]:
    """validate_events on parsed rows (missing keys are null); results in input order."""
    schema = contract.PARSED_SCHEMA | {"_order": pl.Int64()}
    frame = pl.DataFrame(
        [
            {name: row.get(name) for name in contract.PARSED_SCHEMA} | {"_order": i}
            for i, row in enumerate(rows)
        ],
        schema=schema,
    )
    out = contract.validate_events(
        frame,
        day,
        event_types=event_types,
        max_lateness_days=max_lateness_days,
        max_clock_skew_hours=max_clock_skew_hours,
    )
    return out.sort("_order").drop("_order").to_dicts()


def outcome(obj: dict, **kwargs: Any) -> dict:
    """The reference path for one event: parse_line, then validate_events."""
    parsed = parse(obj)
    assert isinstance(parsed, dict), parsed
    return validate(parsed, **kwargs)[0]


def reason(obj: dict, **kwargs: Any) -> str | None:
    return outcome(obj, **kwargs)["reason"]


# --------------------------------------------------------------------------------------------------
# parse_line: parse-level reasons


def test_parses_a_full_event_into_typed_fields() -> None:
    line = BASE | {
        "v": 1,
        "user_id": "u1",
        "event_type": "click",
        "value": 4.5,
        "rank": 3,
        "request_id": "r1",
        "event_id": "e1",
    }
    assert parse(line) == {
        "v": 1,
        "ts": "2025-03-10T12:00:00Z",
        "tenant": "acme",
        "surface": "home",
        "session_id": "s1",
        "user_id": "u1",
        "item_id": "i1",
        "event_type": "click",
        "request_id": "r1",
        "event_id": "e1",
        "value": 4.5,
        "rank": 3,
    }


def test_absent_fields_are_none_and_keys_are_exactly_the_parsed_schema() -> None:
    row = parse(BASE)
    assert list(row) == list(contract.PARSED_SCHEMA)
    assert row["user_id"] is None and row["rank"] is None and row["v"] is None


def test_line_too_long_at_the_limit_boundary() -> None:
    line = json.dumps(BASE).encode()
    assert isinstance(parse(line, len(line)), dict)
    rejected = parse(line, len(line) - 1)
    assert rejected.reason == "line_too_long"
    assert str(len(line)) in rejected.detail and str(len(line) - 1) in rejected.detail


def test_trailing_carriage_return_does_not_count_towards_the_limit() -> None:
    line = json.dumps(BASE).encode()
    assert parse(line + b"\r", len(line)) == parse(line)


def test_line_too_long_is_checked_before_utf8() -> None:
    assert parse(b"\xff" * 10, 5).reason == "line_too_long"


@pytest.mark.parametrize(
    "line",
    [
        b'{"tenant": "\xff"}',
        b'{"tenant": "acme", "item_id": "\xc0\xaf"}',  # overlong encoding of "/"
        b'{"item_id": "\xed\xa0\x80"}',  # an encoded surrogate
        b'{"item_id": "\xe2\x82"}',  # truncated multi-byte sequence
        b"\xfe{}",
    ],
)
def test_invalid_utf8(line: bytes) -> None:
    assert parse(line).reason == "invalid_utf8"


@pytest.mark.parametrize(
    "line",
    [
        "NaN",
        '{"ts": "2025-03-10T12:00:00Z", "value": NaN}',
        '{"value": Infinity}',
        '{"value": -Infinity}',
        '{"ts": "2025-03-10T12:00:00Z", "tenant": "acme"',
        '{"ts": "2025',
        "{",
        '{"tenant": "acme",}',
        "{'tenant': 'acme'}",
        "{tenant: 1}",
        '{"tenant": "acme"} trailing',
        '{"tenant": "acme"}{"tenant": "b"}',
        '{"rank": 01}',
        '{"value": .5}',
        '{"tenant": "a\tb"}',  # a raw control character inside a string
        '{"tenant": "\\x41"}',
        '{"tenant": "\\u12"}',
        '{"x": ' + "[" * 100_000 + "]" * 100_000 + "}",
    ],
)
def test_invalid_json(line: str) -> None:
    assert parse(line).reason == "invalid_json"


@pytest.mark.parametrize("line", ["[]", '[{"tenant": "acme"}]', '"an event"', "42", "-1.5", "null", "true"])
def test_not_an_object(line: str) -> None:
    assert parse(line).reason == "not_an_object"


@pytest.mark.parametrize("field", contract.STRING_FIELDS)
@pytest.mark.parametrize("value", [True, False, 1.5, 1.0, -2e-3, {"a": "b"}, {}, [], ["x"]])
def test_bad_type_in_string_fields(field: str, value: Any) -> None:
    rejected = parse(BASE | {field: value})
    assert rejected.reason == "bad_type"
    assert repr(field) in rejected.detail


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("rank", "1"),
        ("rank", 1.0),
        ("rank", 1.5),
        ("rank", True),
        ("rank", [1]),
        ("rank", 2**63),
        ("rank", -(2**63) - 1),
        ("v", "1"),
        ("v", 1.0),
        ("v", False),
        ("value", "1.5"),
        ("value", True),
        ("value", [1.5]),
        ("value", {"amount": 1}),
    ],
)
def test_bad_type_in_numeric_fields(field: str, value: Any) -> None:
    rejected = parse(BASE | {field: value})
    assert rejected.reason == "bad_type"
    assert repr(field) in rejected.detail


@pytest.mark.parametrize("field", ["rank", "v"])
@pytest.mark.parametrize(
    "value",
    [2**63, 2**64 + 1, -(2**63) - 1, 10**309, -(10**400)],
    ids=["2**63", "2**64+1", "-2**63-1", "1e309", "-1e400"],
)
def test_integers_beyond_64_bits_are_bad_type(field: str, value: int) -> None:
    rejected = parse(BASE | {field: value})
    assert rejected == contract.Rejection(
        "bad_type", f"field {field!r} must be a 64-bit integer, got integer"
    )


def test_int64_extremes_are_accepted_for_rank() -> None:
    assert parse(BASE | {"rank": 2**63 - 1})["rank"] == 2**63 - 1
    assert parse(BASE | {"rank": -(2**63)})["rank"] == -(2**63)


@pytest.mark.parametrize("escape", ["\\ud800", "\\udfff", "a\\ud83d", "\\ude00\\ud83d", "\\ud83dx"])
@pytest.mark.parametrize("field", ["ts", "tenant", "session_id", "user_id", "item_id", "event_id"])
def test_lone_surrogate_escapes_are_bad_type(field: str, escape: str) -> None:
    line = json.dumps(BASE | {field: "@"}).replace('"@"', f'"{escape}"')
    assert parse(line).reason == "bad_type"


def test_surrogate_pairs_decode_and_lone_surrogates_in_unknown_fields_are_ignored() -> None:
    line = json.dumps(BASE | {"item_id": "@", "note": "#"}).replace('"@"', '"\\ud83d\\ude00"')
    row = parse(line.replace('"#"', '"\\ud800"'))
    assert row["item_id"] == "\U0001f600"


@pytest.mark.parametrize("field", contract.STRING_FIELDS)
@pytest.mark.parametrize(("value", "text"), [(12345, "12345"), (-7, "-7"), (0, "0"), (2**70, str(2**70))])
def test_integers_are_accepted_for_string_fields(field: str, value: int, text: str) -> None:
    assert parse(BASE | {field: value})[field] == text


def test_integer_value_becomes_a_float() -> None:
    value = parse(BASE | {"value": 3})["value"]
    assert value == 3.0 and isinstance(value, float)


def test_numeric_ids_make_a_valid_event() -> None:
    row = outcome(
        {"ts": 1741608000000, "tenant": 7, "surface": 8, "session_id": 9, "item_id": 10, "user_id": 11}
    )
    assert row["reason"] is None
    assert (row["tenant"], row["surface"], row["session_id"], row["item_id"], row["user_id"]) == (
        "7",
        "8",
        "9",
        "10",
        "11",
    )
    assert row["ts"] == NOON


@pytest.mark.parametrize("field", list(contract.PARSED_SCHEMA))
def test_null_is_treated_as_absent(field: str) -> None:
    with_null = parse(BASE | {field: None})
    without = parse({k: v for k, v in BASE.items() if k != field})
    assert with_null == without
    assert with_null[field] is None


def test_a_repeated_key_keeps_its_first_value() -> None:
    line = '{"ts": "2025-03-10T12:00:00Z", "tenant": "acme", "tenant": "other", "rank": 1, "rank": -1, '
    row = parse(
        line + '"user_id": null, "user_id": "u1", "surface": "home", "session_id": "s", "item_id": "i"}'
    )
    assert (row["tenant"], row["rank"], row["user_id"]) == ("acme", 1, None)


def test_unknown_fields_are_ignored() -> None:
    extra = {"Tenant": True, "extra": {"deep": [1, {"x": None}]}, "score": 1.5, "": "empty key"}
    assert parse(BASE | extra) == parse(BASE)


@pytest.mark.parametrize("line", [b"", b" ", b"\t", b"\r", b" \t \r", b"   \t"])
def test_blank_lines_give_none(line: bytes) -> None:
    assert contract.parse_line(line, MIB) is None


def test_crlf_line_parses_like_lf() -> None:
    line = json.dumps(BASE).encode()
    assert parse(line + b"\r") == parse(line)


# --------------------------------------------------------------------------------------------------
# validate_events: value-level reasons


def test_valid_event_gets_typed_canonical_values() -> None:
    row = outcome(BASE | {"user_id": "u1", "value": 2.5, "rank": 0, "request_id": "r1", "event_id": "e1"})
    assert row["reason"] is None and row["detail"] is None
    assert row["ts"] == NOON
    assert row["event_type"] == "exposure"
    assert (row["tenant"], row["surface"], row["session_id"], row["item_id"]) == ("acme", "home", "s1", "i1")
    assert (row["user_id"], row["request_id"], row["event_id"], row["value"], row["rank"]) == (
        "u1",
        "r1",
        "e1",
        2.5,
        0,
    )


def test_validate_result_columns() -> None:
    out = contract.validate_events(
        pl.DataFrame([parse(BASE)], schema=contract.PARSED_SCHEMA),
        DAY,
        event_types=DEFAULT_EVENT_TYPES,
        max_lateness_days=7,
        max_clock_skew_hours=1,
    )
    assert out.schema["ts"] == pl.Datetime("us", "UTC")
    assert "v" not in out.columns
    assert {"reason", "detail"} <= set(out.columns)


@pytest.mark.parametrize(
    ("version", "expected"),
    [(2, "unsupported_version"), (0, "unsupported_version"), (-1, "unsupported_version"), (1, None)],
)
def test_contract_version(version: int, expected: str | None) -> None:
    assert reason(BASE | {"v": version}) == expected


def test_missing_version_defaults_to_1() -> None:
    assert reason(BASE) is None


@pytest.mark.parametrize("field", contract.REQUIRED_FIELDS)
def test_missing_required_field(field: str) -> None:
    assert reason({k: v for k, v in BASE.items() if k != field}) == "missing_field"
    assert reason(BASE | {field: None}) == "missing_field"


@pytest.mark.parametrize("field", ["tenant", "surface", "session_id", "item_id"])
@pytest.mark.parametrize("value", ["", " ", " \t "])
def test_empty_id(field: str, value: str) -> None:
    assert reason(BASE | {field: value}) == "empty_id"


@pytest.mark.parametrize("field", ["session_id", "user_id", "item_id", "request_id", "event_id"])
def test_id_too_long_counts_characters_after_trimming(field: str) -> None:
    assert reason(BASE | {field: "x" * 257}) == "id_too_long"
    assert reason(BASE | {field: "x" * 256}) is None
    assert reason(BASE | {field: "\u00e9" * 256}) is None  # 512 bytes, 256 characters
    assert reason(BASE | {field: "  " + "x" * 256 + " "}) is None


@pytest.mark.parametrize("field", ["tenant", "surface"])
@pytest.mark.parametrize("value", [".", "..", " .. ", "a b", "a/b", "\u00e9", "x" * 65, "a\x00", "a:b"])
def test_bad_identifier(field: str, value: str) -> None:
    assert reason(BASE | {field: value}) == "bad_identifier"


@pytest.mark.parametrize("field", ["tenant", "surface"])
@pytest.mark.parametrize("value", ["...", ".a", "a.b", "A-z_0.9", "x" * 64, "-", "_"])
def test_good_identifier(field: str, value: str) -> None:
    assert reason(BASE | {field: value}) is None


def test_identifier_rule_is_per_row_in_a_mixed_frame() -> None:
    tenants = ["acme", "..", "shop", "bad tenant", "acme", "."]
    results = validate(*(parse(BASE | {"tenant": t}) for t in tenants))
    assert [r["reason"] for r in results] == [
        None,
        "bad_identifier",
        None,
        "bad_identifier",
        None,
        "bad_identifier",
    ]


@pytest.mark.parametrize(
    "ts",
    [
        "yesterday",
        "",
        "2025-03-10",
        "2025-03-10T12:00:00",
        "2025-03-10T12:00Z",
        "2025-13-10T12:00:00Z",
        "2025-02-30T12:00:00Z",
        "2025-03-10T25:00:00Z",
        "12:00:00Z",
        "1741608000000.5",
        "1.741608e12",
        "0x1F",
        "123456789012345678",
        "2025-03-10T12:00:00Z trailing",
    ],
)
def test_bad_ts(ts: str) -> None:
    assert reason(BASE | {"ts": ts}) == "bad_ts"


@pytest.mark.parametrize(
    ("ts", "expected"),
    [
        ("2025-03-10T12:00:00Z", NOON),
        ("2025-03-10T12:00:00+00:00", NOON),
        ("2025-03-10T12:00:00-00:00", NOON),
        ("2025-03-10T14:30:00+02:30", NOON),
        ("2025-03-10T07:00:00-05:00", NOON),
        ("2025-03-11T01:00:00+13:00", NOON),
        ("2025-03-10T12:00:00.5Z", NOON.replace(microsecond=500_000)),
        ("2025-03-10T12:00:00.123Z", NOON.replace(microsecond=123_000)),
        ("2025-03-10T12:00:00.123456Z", NOON.replace(microsecond=123_456)),
        ("2025-03-10T12:00:00.123456789Z", NOON.replace(microsecond=123_456)),
        ("2025-03-10T13:00:00.000001+01:00", NOON.replace(microsecond=1)),
        ("2025-03-10t12:00:00z", NOON),
        ("2025-03-10t13:00:00+01:00", NOON),
        ("2025-03-10 12:00:00Z", NOON),
        ("2025-03-10 12:00:00.25z", NOON.replace(microsecond=250_000)),
        ("2025-03-10 14:00:00+02:00", NOON),
    ],
)
def test_rfc3339_variants(ts: str, expected: dt.datetime) -> None:
    row = outcome(BASE | {"ts": ts})
    assert row["reason"] is None, row
    assert row["ts"] == expected


def test_rfc3339_variants_mixed_in_one_frame() -> None:
    stamps = ["2025-03-10T12:00:00Z", "2025-03-10t12:00:00z", "2025-03-10 12:00:00Z", "1741608000000", "nope"]
    results = validate(*(parse(BASE | {"ts": t}) for t in stamps))
    assert [r["ts"] for r in results] == [NOON, NOON, NOON, NOON, None]
    assert [r["reason"] for r in results] == [None, None, None, None, "bad_ts"]


@pytest.mark.parametrize("ts", [1741608000000, "1741608000000"])
def test_epoch_milliseconds(ts: int | str) -> None:
    row = outcome(BASE | {"ts": ts})
    assert row["reason"] is None and row["ts"] == NOON


@pytest.mark.parametrize(
    "ts",
    [
        18448538687845552,  # wrapped around to 2026-11-13 when cast to microseconds
        "18448538687845552",
        -18448538687845552,
        9223372036854776,  # the first millisecond beyond a 64-bit count of microseconds
        99999999999999999,
        contract.EPOCH_MS_RANGE[1] + 1,
        contract.EPOCH_MS_RANGE[0] - 1,
    ],
)
def test_epoch_milliseconds_beyond_year_9999_are_out_of_range(ts: int | str) -> None:
    row = outcome(BASE | {"ts": ts}, day=dt.date(2026, 11, 13))
    assert row["reason"] == "ts_out_of_range" and row["ts"] is None
    assert row["detail"] == (f"ts {ts} is outside the arrival window [2026-11-06T00:00Z, 2026-11-14T01:00Z)")


@pytest.mark.parametrize(
    ("ts", "shown"),
    [
        (contract.EPOCH_MS_RANGE[1], "9999-12-31T23:59:59.999Z"),
        (contract.EPOCH_MS_RANGE[0], "0001-01-01T00:00:00Z"),
    ],
)
def test_epoch_milliseconds_at_the_ends_of_the_range_are_read(ts: int, shown: str) -> None:
    row = validate(parse(BASE | {"ts": ts}))[0]
    assert row["reason"] == "ts_out_of_range" and row["detail"].startswith(f"ts {shown} is outside")


@pytest.mark.parametrize(
    ("ts", "day"),
    [
        ("2016-12-31T23:59:60Z", "2017-01-01"),  # a leap second: the next day's first second
        ("2016-12-31t23:59:60.5z", "2017-01-01"),
        ("1741608000000", "2025-03-10"),
        ("-1", "1969-12-31"),
        ("2025-03-10T00:30:00+01:00", "2025-03-09"),
        ("0001-01-01T00:30:00+01:00", None),  # year 0 in UTC
        ("18448538687845552", None),
        ("2025-03-10", None),
        (None, None),
    ],
)
def test_utc_days_date_ts_as_the_pipeline_does(ts: str | None, day: str | None) -> None:
    assert contract.utc_days([ts]) == [day]
    if day is not None:
        dated = outcome(BASE | {"ts": ts}, day=dt.date.fromisoformat(day))
        assert dated["reason"] is None and dated["ts"].date().isoformat() == day


def test_epoch_milliseconds_keep_their_millisecond() -> None:
    assert outcome(BASE | {"ts": 1741608000123})["ts"] == NOON.replace(microsecond=123_000)


def _iso(moment: dt.datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _ms(moment: dt.datetime) -> int:
    return round(moment.timestamp() * 1000)


@pytest.mark.parametrize(("lateness", "skew"), [(7, 1), (0, 0), (2, 5), (30, 24)])
def test_ts_window_edges(lateness: int, skew: int) -> None:
    midnight = dt.datetime.combine(DAY, dt.time(), UTC)
    start = midnight - dt.timedelta(days=lateness)
    end = midnight + dt.timedelta(days=1, hours=skew)
    us = dt.timedelta(microseconds=1)
    ms = dt.timedelta(milliseconds=1)
    cases = [
        (_iso(start), None),
        (_iso(start - us), "ts_out_of_range"),
        (_iso(end - us), None),
        (_iso(end), "ts_out_of_range"),
        (_ms(start), None),
        (_ms(start - ms), "ts_out_of_range"),
        (_ms(end - ms), None),
        (_ms(end), "ts_out_of_range"),
        ((end + dt.timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S+01:00"), "ts_out_of_range"),
        ((end - us + dt.timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S.%f+01:00"), None),
    ]
    got = [
        reason(BASE | {"ts": ts}, max_lateness_days=lateness, max_clock_skew_hours=skew) for ts, _ in cases
    ]
    assert got == [expected for _, expected in cases]


def test_default_window_is_seven_days_back_and_one_hour_ahead() -> None:
    assert reason(BASE | {"ts": "2025-03-03T00:00:00Z"}) is None
    assert reason(BASE | {"ts": "2025-03-02T23:59:59Z"}) == "ts_out_of_range"
    assert reason(BASE | {"ts": "2025-03-11T00:59:59Z"}) is None
    assert reason(BASE | {"ts": "2025-03-11T01:00:00Z"}) == "ts_out_of_range"
    assert reason(BASE | {"ts": "1970-01-01T00:00:00Z"}) == "ts_out_of_range"


def test_ts_out_of_range_detail_shows_the_window() -> None:
    detail = outcome(BASE | {"ts": "2025-03-12T00:00:00Z"})["detail"]
    assert "2025-03-03T00:00" in detail and "2025-03-11T01:00" in detail


@pytest.mark.parametrize("event_type", ["view", "Click", "CLICK", "", " click"])
def test_unknown_event_type(event_type: str) -> None:
    assert reason(BASE | {"event_type": event_type}) == "unknown_event_type"


@pytest.mark.parametrize("event_type", DEFAULT_EVENT_TYPES)
def test_default_event_types_accepted(event_type: str) -> None:
    assert reason(BASE | {"event_type": event_type}) is None


def test_event_types_are_configurable() -> None:
    assert reason(BASE | {"event_type": "view"}, event_types=("view", "exposure")) is None
    assert reason(BASE | {"event_type": "click"}, event_types=("view", "exposure")) == "unknown_event_type"


def test_default_event_type_is_exposure_and_must_be_allowed() -> None:
    assert outcome(BASE)["event_type"] == "exposure"
    assert outcome(BASE | {"event_type": None})["event_type"] == "exposure"
    assert reason(BASE, event_types=("click",)) == "unknown_event_type"


@pytest.mark.parametrize(
    ("rank", "expected"), [(-1, "negative_rank"), (-(2**63), "negative_rank"), (0, None), (7, None)]
)
def test_rank(rank: int, expected: str | None) -> None:
    assert reason(BASE | {"rank": rank}) == expected


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_non_finite_value(value: float) -> None:
    row = validate(parse(BASE) | {"value": value})[0]
    assert row["reason"] == "non_finite_value"


@pytest.mark.parametrize(
    "value", [10**309, -(10**309), 2**1024, 10**4000], ids=["1e309", "-1e309", "2**1024", "1e4000"]
)
def test_an_integer_beyond_the_float_range_is_non_finite(value: int) -> None:
    """Like the float literal 1e999; converting it used to raise OverflowError and fail the partition."""
    parsed = parse(f'{json.dumps(BASE)[:-1]}, "value": {value}}}')
    assert math.isinf(parsed["value"]) and (parsed["value"] > 0) == (value > 0)
    assert validate(parsed)[0]["reason"] == "non_finite_value"


def test_huge_number_overflows_to_non_finite() -> None:
    row = validate(
        parse(
            '{"ts": "2025-03-10T12:00:00Z", "tenant": "a", "surface": "b", "session_id": "c", "item_id": "d", "value": 1e999}'
        )
    )[0]
    assert row["reason"] == "non_finite_value"


@pytest.mark.parametrize("value", [0.0, -0.0, 1.7976931348623157e308, -5e-324, 3])
def test_finite_values_accepted(value: float) -> None:
    assert reason(BASE | {"value": value}) is None


# One violation per validation rule, on fields that do not overlap (except the two ts rules).
VIOLATIONS: dict[str, dict] = {
    "unsupported_version": {"v": 2},
    "missing_field": {"item_id": None},
    "empty_id": {"session_id": " "},
    "id_too_long": {"request_id": "r" * 257},
    "bad_identifier": {"surface": "bad surface"},
    "bad_ts": {"ts": "never"},
    "ts_out_of_range": {"ts": "2020-01-01T00:00:00Z"},
    "unknown_event_type": {"event_type": "view"},
    "negative_rank": {"rank": -1},
    "non_finite_value": {"value": math.inf},
}


def test_violations_cover_every_validation_reason() -> None:
    assert tuple(VIOLATIONS) == contract.VALIDATION_REASONS


@pytest.mark.parametrize("first", range(len(contract.VALIDATION_REASONS)))
def test_first_rule_wins(first: int) -> None:
    """A row breaking every rule from `first` on gets the reason of rule `first`."""
    row = parse(BASE)
    for code in reversed(contract.VALIDATION_REASONS[first:]):
        row |= VIOLATIONS[code]
    assert validate(row)[0]["reason"] == contract.VALIDATION_REASONS[first]


def test_first_rule_wins_for_every_pair() -> None:
    codes = contract.VALIDATION_REASONS
    failures = []
    for i, early in enumerate(codes):
        for late in codes[i + 1 :]:
            if VIOLATIONS[early].keys() & VIOLATIONS[late].keys():
                continue
            row = parse(BASE) | VIOLATIONS[late] | VIOLATIONS[early]
            got = validate(row)[0]["reason"]
            if got != early:
                failures.append((early, late, got))
    assert failures == []


def test_parse_reasons_precede_validation_reasons() -> None:
    assert contract.REASONS == contract.PARSE_REASONS + contract.VALIDATION_REASONS
    assert contract.PARSE_REASONS == (
        "line_too_long",
        "invalid_utf8",
        "invalid_json",
        "not_an_object",
        "bad_type",
    )


@pytest.mark.parametrize(
    ("code", "row", "field"),
    [
        ("missing_field", {"ts": None}, "ts"),
        ("missing_field", {"tenant": None}, "tenant"),
        ("missing_field", {"surface": None}, "surface"),
        ("missing_field", {"session_id": None}, "session_id"),
        ("missing_field", {"tenant": None, "item_id": None}, "tenant"),
        ("empty_id", {"tenant": ""}, "tenant"),
        ("empty_id", {"session_id": ""}, "session_id"),
        ("id_too_long", {"session_id": "s" * 300}, "session_id"),
        ("id_too_long", {"user_id": "u" * 300}, "user_id"),
        ("id_too_long", {"item_id": "i" * 300}, "item_id"),
        ("bad_identifier", {"tenant": "bad tenant"}, "tenant"),
    ],
)
def test_rejection_detail_names_the_offending_field(code: str, row: dict, field: str) -> None:
    result = validate(parse(BASE) | row)[0]
    assert result["reason"] == code
    assert result["detail"] is not None and field in result["detail"], result["detail"]
    others = {"ts", "tenant", "surface", "session_id", "user_id", "item_id", "request_id", "event_id"} - {
        field
    }
    named = {f for f in others if re.search(rf"\b{f}\b", result["detail"])}
    assert named == set(), f"detail {result['detail']!r} names {named}, not only {field!r}"


def test_every_rejection_has_a_detail() -> None:
    row = parse(BASE)
    for code, violation in VIOLATIONS.items():
        result = validate(row | violation)[0]
        assert result["reason"] == code
        assert result["detail"], code


# --------------------------------------------------------------------------------------------------
# Trimming, defaults, anonymous users


def test_identifiers_are_trimmed() -> None:
    row = outcome(
        {
            "ts": "2025-03-10T12:00:00Z",
            "tenant": " acme ",
            "surface": "\thome",
            "session_id": "  s 1  ",
            "item_id": "i1\t",
            "user_id": " u1 ",
            "request_id": " r1",
            "event_id": "e1 ",
        }
    )
    assert row["reason"] is None
    assert [
        row[k] for k in ("tenant", "surface", "session_id", "item_id", "user_id", "request_id", "event_id")
    ] == [
        "acme",
        "home",
        "s 1",
        "i1",
        "u1",
        "r1",
        "e1",
    ]


@pytest.mark.parametrize("user_id", ["", "  ", None])
def test_empty_user_id_is_anonymous(user_id: str | None) -> None:
    row = outcome(BASE | {"user_id": user_id})
    assert row["reason"] is None
    assert row["user_id"] is None


@pytest.mark.parametrize("field", ["request_id", "event_id"])
def test_empty_optional_ids_become_null(field: str) -> None:
    row = outcome(BASE | {field: " "})
    assert row["reason"] is None and row[field] is None


def test_user_id_length_limit_still_applies() -> None:
    assert reason(BASE | {"user_id": "u" * 257}) == "id_too_long"


# --------------------------------------------------------------------------------------------------
# Property: canonicalize (fast path + fallback) agrees line by line with the reference path

PROP_CONFIG = dict(max_line_bytes=4000, max_lateness_days=7, max_clock_skew_hours=1)
EPOCH = dt.datetime(1970, 1, 1, tzinfo=UTC)
WINDOW_START = dt.datetime.combine(DAY, dt.time(), UTC) - dt.timedelta(days=7)
WINDOW_END = dt.datetime.combine(DAY, dt.time(), UTC) + dt.timedelta(days=1, hours=1)
CANONICAL_FIELDS = (
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
NO_ROW = "no row (a blank line or a dropped duplicate)"
DERIVED_ID = re.compile(r"^h[0-9]{39}$")

texts = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=8)
good_names = st.sampled_from(["acme", "shop", " acme ", "a.b", "A-1_b", "...", "x" * 64])
bad_names = st.one_of(st.sampled_from([".", "..", "", " ", "a b", "x" * 65, "caf\u00e9"]), texts)
good_ids = st.one_of(
    st.sampled_from(["s1", "s2", "item-9", " padded ", "x" * 256, "\u00e9" * 256, "a\u2028b", "\U0001f600"]),
    texts.filter(lambda t: t.strip()),
    st.integers(-(10**20), 10**20),
)
# Plain ids: strings without escapes the per-line parser must see (no integers, no astral characters).
plain_ids = st.one_of(
    st.sampled_from(["s1", "s2", "item-9", " padded ", "x" * 256, "\u00e9" * 256]),
    st.text(
        st.characters(min_codepoint=0x20, max_codepoint=0xFFFF, exclude_categories=("Cs",)), max_size=8
    ).filter(lambda t: t.strip() and not any(c.isdigit() for c in t)),
)
bad_ids = st.one_of(st.sampled_from(["", "   ", "y" * 257]), texts)
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**64), 2**64),
    st.floats(allow_nan=False, allow_infinity=False),
    texts,
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=6,
)
INTEGRAL_FLOATS = (0.0, -0.0, 1.0, -3.0, 100.0, 1741608000000.0, 1e20)
BAD_TS = ["", "soon", "2025-03-10", "2025-03-10T12:00:00", "2025-03-10T12:00Z", "2025-03-10T12:00:00Z "]


@st.composite
def ts_values(draw: st.DrawFn, rfc3339_only: bool = False) -> Any:
    """Timestamps in every accepted spelling, mostly inside the window, some just outside it."""
    epoch = [] if rfc3339_only else ["epoch_int", "epoch_str"]
    kind = draw(st.sampled_from(["z", "z", "offset", "lower", "space", *epoch]))
    edge = draw(st.sampled_from(["inside", "inside", "inside", "start", "end"]))
    if edge == "start":
        moment = WINDOW_START + dt.timedelta(milliseconds=draw(st.integers(-2, 1)))
    elif edge == "end":
        moment = WINDOW_END + dt.timedelta(milliseconds=draw(st.integers(-2, 1)))
    else:
        span = (WINDOW_END - WINDOW_START) // dt.timedelta(microseconds=1)
        moment = WINDOW_START + dt.timedelta(microseconds=draw(st.integers(0, span - 1)))
    if kind == "epoch_int":
        return (moment - EPOCH) // dt.timedelta(milliseconds=1)
    if kind == "epoch_str":
        return str((moment - EPOCH) // dt.timedelta(milliseconds=1))
    fraction = draw(st.sampled_from(["", ".%f", ".%f"]))
    if kind == "offset":
        minutes = draw(st.sampled_from([-330, -60, 0, 60, 345, 840]))
        local = moment + dt.timedelta(minutes=minutes)
        sign = "-" if minutes < 0 else "+"
        zone = f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"
        return local.strftime(f"%Y-%m-%dT%H:%M:%S{fraction}") + zone
    text = moment.strftime(f"%Y-%m-%dT%H:%M:%S{fraction}Z")
    if kind == "lower":
        return text.lower()
    if kind == "space":
        return text.replace("T", " ")
    return text


@st.composite
def events(draw: st.DrawFn, plain: bool = False) -> dict:
    """A valid event (apart from timestamps at the window edges), fields in random order.

    A plain event has RFC 3339 timestamps and string ids only: nothing that makes canonicalize hand
    the line to the per-line parser, so that the vectorised reader is the one being checked."""
    ids = plain_ids if plain else good_ids
    event: dict[str, Any] = {
        "ts": draw(ts_values(rfc3339_only=plain)),
        "tenant": draw(good_names),
        "surface": draw(good_names),
        "session_id": draw(ids),
        "item_id": draw(ids),
    }
    optional = {
        "v": st.just(1),
        "user_id": st.one_of(ids, st.sampled_from(["", " "])),
        "event_type": st.sampled_from(DEFAULT_EVENT_TYPES),
        "value": st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers(-1000, 10**25)),
        "rank": st.one_of(st.integers(0, 20), st.integers(0, 2**63 - 1)),
        "request_id": ids,
        "event_id": st.one_of(st.sampled_from(["e1", "e2", " e1 ", "e3", ""]), ids),
    }
    for key, strategy in optional.items():
        if draw(st.booleans()):
            event[key] = draw(strategy)
    # Unknown fields are ignored, but their floats send a line to the per-line parser: keep them rare.
    if not plain and draw(st.integers(0, 3)) == 0:
        event["extra"] = draw(json_values)
    return dict(draw(st.permutations(list(event.items()))))


def bad_values(field: str) -> st.SearchStrategy:
    """Values of the right JSON type that break a value rule."""
    if field in ("tenant", "surface"):
        return bad_names
    if field == "ts":
        return st.one_of(st.sampled_from(BAD_TS), st.integers(-(10**15), 10**15).map(str))
    if field == "v":
        return st.integers(-5, 5).filter(lambda v: v != 1)
    if field == "rank":
        return st.integers(-(2**63), -1)
    if field == "event_type":
        return st.sampled_from(["view", "Click", "", " click"])
    if field == "value":
        return st.sampled_from(["1e999", "-1e999"])  # JSON numbers that overflow to infinity
    return bad_ids


def dumps(draw: st.DrawFn, obj: Any) -> str:
    separators = draw(st.sampled_from([(", ", ": "), (",", ":"), (" , ", " : ")]))
    return json.dumps(obj, ensure_ascii=draw(st.booleans()), separators=separators)


STRING_OR_NUMERIC = (*contract.STRING_FIELDS, "v", "value", "rank")
ALL_KINDS = (
    *["valid"] * 4,
    *["bad_value"] * 2,
    "wrong_type_string",
    "wrong_type_number",
    "drop",
    "null",
    "garbage",
    "braced_garbage",
    "blank",
    "truncate",
    "non_object",
    "non_finite",
    "long",
    "duplicate_key",
    "lone_surrogate",
    "padded",
    *["huge_number"] * 2,
    "long_epoch",
    "deep_nesting",
)
# Kinds that the vectorised reader accepts or that are masked out of its input. A line it rejects sends
# its whole neighbourhood (up to 16 lines) to the per-line parser, so files of these kinds only are the
# ones that really exercise the fast path.
FAST_PATH_KINDS = (
    *["valid"] * 4,
    *["bad_value"] * 2,
    *["wrong_type_string"] * 2,
    "drop",
    "null",
    "long",
    *["duplicate_key"] * 2,
    "lone_surrogate",
    "padded",
    "non_finite",
    "long_epoch",
    "deep_nesting",
)
# Integers beyond 64 bits and beyond the float range (a line must not fail its partition), and 17-digit
# epoch milliseconds on both sides of the years 0001-9999.
huge_integers = st.one_of(
    st.integers(2**63 - 2, 2**64 + 2),
    st.integers(-(2**63) - 2, -(2**63) + 2),
    st.integers(10**300, 10**330),
    st.integers(-(10**330), -(10**300)),
    st.sampled_from([2**1024, 2**1024 - 2**970, 2**1024 - 2**971, 10**38, 2**128]),
)
long_epochs = st.one_of(
    st.integers(10**16, 10**17 - 1),
    st.integers(-(10**17) + 1, -(10**16)),
    st.sampled_from([*contract.EPOCH_MS_RANGE]).flatmap(lambda end: st.integers(end - 2, end + 2)),
)
NESTING_DEPTHS = (2, 100, 511, 512, 513, 900, 1000, 1030, 1500)


@st.composite
def raw_lines(draw: st.DrawFn, kinds: tuple[str, ...] = ALL_KINDS, plain: bool = False) -> bytes:
    """One raw line: a valid event, or one with a single mutation, or not an event at all."""
    kind = draw(st.sampled_from(kinds))
    event = draw(events(plain))
    if kind == "garbage":
        return draw(st.binary(max_size=40)).replace(b"\n", b" ")
    if kind == "braced_garbage":
        return b"{" + draw(st.binary(max_size=40)).replace(b"\n", b" ") + b"}"
    if kind == "blank":
        return draw(st.sampled_from([b"", b" ", b"\t", b"  \t ", b"\r"]))
    if kind == "non_object":
        return dumps(draw, draw(st.one_of(json_scalars, st.lists(json_scalars, max_size=3)))).encode()
    overflow = None
    if kind == "bad_value":
        field = draw(st.sampled_from([*contract.STRING_FIELDS, "v", "rank", "value"]))
        event[field] = draw(bad_values(field))
        if field == "value":
            overflow, event[field] = event[field], "@overflow@"
    elif kind.startswith("wrong_type"):
        field = draw(
            st.sampled_from(contract.STRING_FIELDS if kind == "wrong_type_string" else ("v", "value", "rank"))
        )
        event[field] = draw(st.one_of(json_values, st.booleans(), st.sampled_from(INTEGRAL_FLOATS)))
    elif kind == "drop":
        event.pop(draw(st.sampled_from(sorted(event))))
    elif kind == "null":
        event[draw(st.sampled_from(STRING_OR_NUMERIC))] = None
    elif kind == "long":
        event["pad"] = "p" * draw(st.integers(3700, 4300))
    elif kind == "huge_number":
        event[draw(st.sampled_from(["value", "value", "rank", "v", *STRING_OR_NUMERIC]))] = draw(
            huge_integers
        )
    elif kind == "long_epoch":
        ms = draw(long_epochs)
        event["ts"] = draw(st.sampled_from([ms, str(ms)]))
    elif kind == "deep_nesting":
        depth = draw(st.sampled_from(NESTING_DEPTHS))
        nested = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
        field = draw(st.sampled_from(["extra", "item_id", "value"]))
        event[field] = "@nested@"
        overflow = nested[0] * (depth - 1) + "1" + nested[1] * (depth - 1)
    text = dumps(draw, event)
    if overflow:
        text = text.replace('"@overflow@"', overflow).replace('"@nested@"', overflow)
    if kind == "truncate":
        text = text[: draw(st.integers(0, len(text) - 1))]
    elif kind == "non_finite":
        literal = draw(st.sampled_from(["NaN", "Infinity", "-Infinity"]))
        text = text[:-1] + f', "value": {literal}}}'
    elif kind == "duplicate_key":
        field = draw(st.sampled_from(sorted(event)))
        values = (
            st.one_of(st.none(), plain_ids)
            if plain
            else st.one_of(st.none(), good_ids, st.sampled_from([-1, 0.5]))
        )
        other = values.filter(lambda v: v != event[field])
        text = "{" + json.dumps(field) + ": " + json.dumps(draw(other)) + ", " + text[1:]
    elif kind == "lone_surrogate":
        field = draw(st.sampled_from(contract.STRING_FIELDS))
        escape = draw(st.sampled_from(["\\ud800", "x\\udfff", "\\ud83d", "\\ud83d\\ude00"]))
        text = text[:-1] + f', "{field}": "{escape}"}}'
    elif kind == "padded":
        text = draw(st.sampled_from(["", " ", "\t"])) + text + draw(st.sampled_from(["", " ", "\t"]))
    return text.encode("utf-8")


def reference_outcomes(lines: list[bytes], config: IngestConfig) -> tuple[dict[int, tuple], int, int]:
    """Line number -> expected outcome, via parse_line and validate_events one line at a time."""
    expected: dict[int, tuple] = {}
    seen: set = set()
    blanks = duplicates = 0
    for number, line in enumerate(lines, 1):
        parsed = contract.parse_line(line, config.max_line_bytes)
        if parsed is None:
            blanks += 1
            continue
        if isinstance(parsed, contract.Rejection):
            expected[number] = ("quarantine", parsed.reason, parsed.detail)
            continue
        validated = contract.validate_events(
            pl.DataFrame([parsed], schema=contract.PARSED_SCHEMA),
            DAY,
            event_types=config.event_types,
            max_lateness_days=config.max_lateness_days,
            max_clock_skew_hours=config.max_clock_skew_hours,
        )
        # A rejected row is not converted whole: its ts may lie beyond Python's datetime range (year 9999).
        reason, detail = validated.select("reason", "detail").row(0)
        if reason is not None:
            expected[number] = ("quarantine", reason, detail)
            continue
        row = validated.row(0, named=True)
        fields = tuple(repr(row[k]) if k == "value" else row[k] for k in CANONICAL_FIELDS)
        # Event ids are idempotency keys within a tenant.
        identity = (
            ("given", row["tenant"], row["event_id"]) if row["event_id"] is not None else ("derived", fields)
        )
        if identity in seen:
            duplicates += 1
            continue
        seen.add(identity)
        event_id = row["event_id"] if row["event_id"] is not None else "<derived>"
        expected[number] = ("canonical", *(row[k] for k in CANONICAL_FIELDS), event_id)
    return expected, blanks, duplicates


def product_outcomes(lake_root: Path) -> dict[int, tuple]:
    got: dict[int, tuple] = {}
    folder = f"dt={DAY.isoformat()}"
    quarantine = pl.read_parquet(lake_root / "quarantine" / folder / "*.parquet")
    for row in quarantine.iter_rows(named=True):
        assert row["source_line"] not in got
        got[row["source_line"]] = ("quarantine", row["reason"], row["detail"])
    canonical = pl.read_parquet(lake_root / "canonical_events" / folder / "*.parquet")
    for row in canonical.iter_rows(named=True):
        assert row["source_line"] not in got
        event_id = "<derived>" if DERIVED_ID.match(row["event_id"]) else row["event_id"]
        got[row["source_line"]] = ("canonical", *(row[k] for k in CANONICAL_FIELDS), event_id)
    return got


def assert_agrees_with_reference(
    write_raw: Callable[..., Path], data: bytes, config: IngestConfig, block_bytes: int | None = None
) -> None:
    """canonicalize_partition on a file holding `data` gives, line by line, the reference outcome."""
    file_lines = data.split(b"\n")
    if data.endswith(b"\n") or not data:
        file_lines.pop()
    if file_lines:  # a UTF-8 byte order mark at the start of a file is not part of its first line
        file_lines[0] = file_lines[0].removeprefix(canonicalize.UTF8_BOM)
    expected, blanks, duplicates = reference_outcomes(file_lines, config)

    block = block_bytes or canonicalize.BLOCK_BYTES
    with tempfile.TemporaryDirectory() as tmp, mock.patch.object(canonicalize, "BLOCK_BYTES", block):
        raw_root, lake_root = Path(tmp) / "raw", Path(tmp) / "lake"
        write_raw(raw_root, DAY, "events.jsonl", data)
        summary = canonicalize.canonicalize_partition(raw_root, lake_root, DAY, config)
        got = product_outcomes(lake_root)

    mismatches = [
        f"line {n}: {file_lines[n - 1][:300]!r}\n  reference: {expected.get(n, NO_ROW)}\n"
        f"  canonicalize: {got.get(n, NO_ROW)}"
        for n in sorted(expected.keys() | got.keys())
        if expected.get(n) != got.get(n)
    ]
    assert not mismatches, "\n".join(mismatches)
    assert summary.lines_read == len(file_lines)
    assert summary.blank_lines == blanks
    assert summary.duplicates == duplicates
    assert summary.reconciled


def _line(extra: str) -> bytes:
    return (json.dumps(BASE)[:-1] + ", " + extra + "}").encode()


# Lines where the vectorised reader and the reference parser could read the JSON differently.
TRICKY_LINES = {
    "repeated_key_rank": _line('"rank": 1, "rank": -1'),
    "repeated_key_null_then_value": _line('"user_id": null, "user_id": "u1"'),
    "repeated_key_value_then_null": _line('"event_type": "click", "event_type": null'),
    "repeated_key_three_times": _line('"item_id": "first", "item_id": "last"'),
    "repeated_key_version": _line('"v": 1, "v": 2'),
    "integral_float_ts": b'{"ts": 1741608000000.0, "tenant": "acme", "surface": "home", "session_id": "s", "item_id": "i"}',
    "integral_float_session": _line('"session_id": 1.0').replace(b'"session_id": "s1", ', b""),
    "exponent_item": _line('"request_id": 1e2'),
    "negative_zero_float_user": _line('"user_id": -0.0'),
    "int_id": _line('"user_id": 42'),
    "big_int_id": _line('"event_id": 123456789012345678901234567890'),
    "float_value": _line('"value": 0.1'),
    "float_rank": _line('"rank": 2.0'),
    "string_rank": _line('"rank": "2"'),
    "bool_value": _line('"value": false'),
    "nested_id": _line('"request_id": {"a": "line\nbreak"}'),
    "escaped_key": _line('"us\u0065r_id": "u1"'),
    "trailing_comma": _line('"rank": 1,'),
    "nan_value": _line('"value": NaN'),
    "int_beyond_float_value": _line('"value": 1' + "0" * 309),
    "negative_int_beyond_float_value": _line('"value": -1' + "0" * 400),
    "int_beyond_64_bits_rank": _line(f'"rank": {2**64 + 1}'),
    "int_beyond_64_bits_version": _line(f'"v": {-(2**63) - 1}'),
    "epoch_wrapping_around": json.dumps(BASE | {"ts": 18448538687845552}).encode(),
    "epoch_string_wrapping_around": json.dumps(BASE | {"ts": "-18448538687845552"}).encode(),
    "nested_1000_levels": _line('"extra": ' + "[" * 999 + "]" * 999),
    "nested_513_levels": _line('"extra": ' + '{"a":' * 512 + "1" + "}" * 512),
}


@pytest.mark.parametrize("name", list(TRICKY_LINES))
def test_canonicalize_agrees_with_the_reference_parser_on_tricky_lines(
    write_raw: Callable[..., Path], name: str
) -> None:
    clean = json.dumps(BASE | {"session_id": "neighbour"}).encode()
    data = b"\n".join([clean, TRICKY_LINES[name], json.dumps(BASE | {"item_id": "after"}).encode()]) + b"\n"
    assert_agrees_with_reference(write_raw, data, IngestConfig(**PROP_CONFIG))


@settings(
    max_examples=60,
    deadline=None,
    # No shrinking: it costs more than the test, and a failure already names each disagreeing line.
    phases=(Phase.explicit, Phase.reuse, Phase.generate),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
@given(
    lines=st.sampled_from([(FAST_PATH_KINDS, True), (ALL_KINDS, False)]).flatmap(
        lambda profile: st.lists(raw_lines(*profile), min_size=3, max_size=16)
    ),
    repeats=st.lists(st.tuples(st.integers(0, 15), st.integers(0, 15)), max_size=4),
    crlf=st.lists(st.booleans(), min_size=16, max_size=16),
    final_newline=st.booleans(),
    block_bytes=st.sampled_from([None, 4096, 300]),
    rows_per_file=st.sampled_from([2_000_000, 4]),
)
# Epoch milliseconds of the year 33658: out of range, and beyond what Python's datetime can hold.
@example(
    lines=[b'{"ts":"1000000000000000","tenant":"acme","surface":"acme","session_id":"s","item_id":"i"}'] * 3,
    repeats=[],
    crlf=[False] * 16,
    final_newline=True,
    block_bytes=None,
    rows_per_file=2_000_000,
)
def test_canonicalize_agrees_with_the_reference_parser_line_by_line(
    write_raw: Callable[..., Path],
    lines: list[bytes],
    repeats: list[tuple[int, int]],
    crlf: list[bool],
    final_newline: bool,
    block_bytes: int | None,
    rows_per_file: int,
) -> None:
    """Random mixes of valid, broken and odd lines: the fast path never disagrees with parse_line +
    validate_events (same reason per quarantined line, same values per canonical line), whatever the
    block size and the output file size."""
    lines = list(lines)
    for source, target in repeats:  # exact repeats of earlier lines: duplicates
        if source < target < len(lines):
            lines[target] = lines[source]
    lines = [line + b"\r" if cr else line for line, cr in zip(lines, crlf, strict=False)]
    data = b"\n".join(lines) + (b"\n" if final_newline else b"")
    config = IngestConfig(rows_per_file=rows_per_file, **PROP_CONFIG)
    assert_agrees_with_reference(write_raw, data, config, block_bytes)
