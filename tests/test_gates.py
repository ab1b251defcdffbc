"""Blocking gates on a canonical_events partition, and the confirmation that publishing relies on."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pytest

from recsys_core.lake import RecordError, confirm_gates_passed, partition_dir, read_checks
from recsys_core.settings import ChecksConfig, ConfigError, IngestConfig
from recsys_dagster.ingest.canonicalize import canonicalize_partition
from recsys_dagster.ingest.gates import (
    CHECKS_FILE,
    GATE_NAMES,
    GateResult,
    run_gates,
)
from recsys_serving.exposures import ExposureWriter

DAY = dt.date(2025, 3, 10)
NOON = dt.datetime(2025, 3, 10, 12, tzinfo=dt.UTC)


def events(n: int, day: dt.date = DAY, sessions: int = 3, prefix: str = "i") -> list[dict]:
    """`n` distinct valid events of `day`, spread over `sessions` sessions."""
    start = dt.datetime.combine(day, dt.time(12), dt.UTC)
    return [
        {
            "ts": (start + dt.timedelta(seconds=i)).isoformat(),
            "tenant": "acme",
            "surface": "home",
            "session_id": f"s{i % sessions}",
            "item_id": f"{prefix}{i}",
        }
        for i in range(n)
    ]


def materialize(layout, write_raw: Callable[..., Path], lines: list, day: dt.date = DAY) -> None:
    write_raw(layout.raw_root, day, "events.jsonl", lines)
    canonicalize_partition(layout.raw_root, layout.lake_root, day, IngestConfig())


def gates(layout, day: dt.date = DAY, ingest: IngestConfig | None = None, **checks) -> dict[str, GateResult]:
    results = run_gates(layout.lake_root, day, ingest or IngestConfig(), ChecksConfig(**checks))
    return {r.name: r for r in results}


def canonical(layout, day: dt.date = DAY) -> pl.DataFrame:
    return pl.read_parquet(partition_dir(layout.lake_root, "canonical_events", day) / "*.parquet")


def replace_canonical(layout, frame: pl.DataFrame, day: dt.date = DAY) -> None:
    """Overwrite the partition's data (keeping its summary), as a faulty writer would."""
    folder = partition_dir(layout.lake_root, "canonical_events", day)
    for path in folder.glob("*.parquet"):
        path.unlink()
    frame.write_parquet(folder / "part-00000.parquet")


def assert_only_failing(results: dict[str, GateResult], *names: str) -> None:
    assert sorted(name for name, r in results.items() if not r.passed) == sorted(names)


# --------------------------------------------------------------------------------------------------
# Clean data


def test_every_gate_passes_on_clean_data(layout, write_raw: Callable[..., Path]) -> None:
    materialize(layout, write_raw, events(30))
    results = run_gates(layout.lake_root, DAY, IngestConfig(), ChecksConfig())
    assert tuple(r.name for r in results) == GATE_NAMES
    assert all(r.passed and r.blocking for r in results), [
        (r.name, r.summary) for r in results if not r.passed
    ]
    assert all(r.summary for r in results)
    assert confirm_gates_passed(layout.lake_root, DAY) is None


def test_an_empty_day_passes(layout) -> None:
    canonicalize_partition(layout.raw_root, layout.lake_root, DAY, IngestConfig())
    assert_only_failing(gates(layout))


def test_gates_need_a_materialized_partition(layout) -> None:
    with pytest.raises(FileNotFoundError):
        run_gates(layout.lake_root, DAY, IngestConfig(), ChecksConfig())


def test_results_are_recorded_beside_the_partition(layout, write_raw: Callable[..., Path]) -> None:
    materialize(layout, write_raw, events(5))
    gates(layout)
    assert (partition_dir(layout.lake_root, "canonical_events", DAY) / CHECKS_FILE).is_file()
    record = read_checks(layout.lake_root, DAY)
    assert record["day"] == DAY.isoformat() and record["passed"] is True
    assert [r["name"] for r in record["results"]] == list(GATE_NAMES)


# --------------------------------------------------------------------------------------------------
# Crafted partitions: each gate fails with counts and a sample


def test_schema_gate_fails_on_a_bad_identifier(layout, write_raw: Callable[..., Path]) -> None:
    materialize(layout, write_raw, events(10))
    frame = canonical(layout).with_columns(
        pl.when(pl.col("item_id") == "i3")
        .then(pl.lit("bad tenant"))
        .otherwise(pl.col("tenant"))
        .alias("tenant")
    )
    replace_canonical(layout, frame)
    results = gates(layout)
    assert_only_failing(results, "schema")
    schema = results["schema"]
    assert schema.blocking
    assert schema.metadata["violations"] >= 1
    assert schema.sample and any("bad tenant" in str(row) for row in schema.sample)


def test_schema_gate_fails_on_a_wrong_type_or_extra_column(layout, write_raw: Callable[..., Path]) -> None:
    materialize(layout, write_raw, events(10))
    replace_canonical(layout, canonical(layout).with_columns(pl.col("rank").cast(pl.String)))
    assert not gates(layout)["schema"].passed
    replace_canonical(layout, canonical(layout).with_columns(pl.lit(1).alias("surprise")))
    assert not gates(layout)["schema"].passed


def test_non_null_keys_gate(layout, write_raw: Callable[..., Path]) -> None:
    materialize(layout, write_raw, events(10))
    frame = canonical(layout).with_columns(
        pl.when(pl.col("item_id").is_in(["i2", "i7"]))
        .then(None)
        .otherwise(pl.col("session_id"))
        .alias("session_id")
    )
    replace_canonical(layout, frame)
    result = gates(layout)["non_null_keys"]
    assert not result.passed
    assert result.metadata["violations"] == 2
    assert sorted(row["source_line"] for row in result.sample) == [3, 8]
    assert all(row["session_id"] is None for row in result.sample)


def test_unique_event_id_gate(layout, write_raw: Callable[..., Path]) -> None:
    materialize(layout, write_raw, events(10))
    frame = canonical(layout)
    replace_canonical(layout, pl.concat([frame, frame.head(2), frame.head(1)]))
    results = gates(layout)
    result = results["unique_event_id"]
    assert not result.passed and result.blocking
    assert result.metadata["violations"] == 2
    occurrences = sorted(row["occurrences"] for row in result.sample)
    assert occurrences == [2, 3]
    assert {row["event_id"] for row in result.sample} == set(frame.head(2)["event_id"])
    assert results["schema"].passed  # uniqueness is this gate's alone: the schema gate does not repeat it


@pytest.mark.parametrize(("lateness", "skew"), [(7, 1), (0, 0), (2, 6)])
def test_ts_in_range_gate_edges(layout, write_raw: Callable[..., Path], lateness: int, skew: int) -> None:
    materialize(layout, write_raw, events(6))
    midnight = dt.datetime.combine(DAY, dt.time(), dt.UTC)
    start = midnight - dt.timedelta(days=lateness)
    end = midnight + dt.timedelta(days=1, hours=skew)
    us = dt.timedelta(microseconds=1)
    stamps = [start, end - us, NOON, start - us, end, end + dt.timedelta(days=3)]
    frame = (
        canonical(layout)
        .sort("source_line")
        .with_columns(pl.Series("ts", stamps, dtype=pl.Datetime("us", "UTC")))
    )
    replace_canonical(layout, frame)
    result = gates(layout, ingest=IngestConfig(max_lateness_days=lateness, max_clock_skew_hours=skew))[
        "ts_in_range"
    ]
    assert not result.passed
    assert result.metadata["violations"] == 3
    assert sorted(row["source_line"] for row in result.sample) == [4, 5, 6]


def test_ts_in_range_uses_the_ingest_window(layout, write_raw: Callable[..., Path]) -> None:
    late = events(1, day=DAY - dt.timedelta(days=2))
    materialize(layout, write_raw, late + events(3))
    assert gates(layout)["ts_in_range"].passed
    strict = gates(layout, ingest=IngestConfig(max_lateness_days=1))["ts_in_range"]
    assert not strict.passed and strict.metadata["violations"] == 1


def test_quarantine_rate_gate(layout, write_raw: Callable[..., Path]) -> None:
    bad = [{"ts": "never", "tenant": "acme", "surface": "home", "session_id": "s", "item_id": "x"}, "{broken"]
    materialize(layout, write_raw, [*events(18), *bad, "", "  "])  # blank lines are not counted
    results = gates(layout)
    result = results["quarantine_rate"]
    assert_only_failing(results, "quarantine_rate")
    assert result.blocking
    assert result.metadata["count"] == 2
    assert result.metadata["lines"] == 20
    assert result.metadata["rate"] == pytest.approx(0.1)
    assert result.metadata["by_reason"] == {"bad_ts": 1, "invalid_json": 1}
    assert gates(layout, max_quarantine_rate=0.1)["quarantine_rate"].passed  # the limit is inclusive
    assert not gates(layout, max_quarantine_rate=0.099)["quarantine_rate"].passed


def test_duplicate_rate_gate(layout, write_raw: Callable[..., Path]) -> None:
    clean = events(17)
    materialize(layout, write_raw, [*clean, clean[0], clean[1], clean[0]])
    results = gates(layout)
    result = results["duplicate_rate"]
    assert_only_failing(results, "duplicate_rate")
    assert result.metadata["count"] == 3
    assert result.metadata["lines"] == 20
    assert result.metadata["rate"] == pytest.approx(0.15)
    assert gates(layout, max_duplicate_rate=0.15)["duplicate_rate"].passed
    assert not gates(layout, max_duplicate_rate=0.14)["duplicate_rate"].passed


def _history(layout, write_raw: Callable[..., Path], counts: dict[int, int]) -> None:
    """Materialize earlier days: days back -> number of events."""
    for back, n in counts.items():
        day = DAY - dt.timedelta(days=back)
        materialize(layout, write_raw, events(n, day=day, prefix=f"d{back}-"), day=day)


def test_volume_gate_without_enough_history_passes(layout, write_raw: Callable[..., Path]) -> None:
    _history(layout, write_raw, {1: 100, 2: 100, 3: 0})  # an empty day is no history
    materialize(layout, write_raw, events(1))
    result = gates(layout)["volume"]
    assert result.passed
    assert result.metadata["history_days"] == 2


def test_volume_gate_against_the_trailing_median(layout, write_raw: Callable[..., Path]) -> None:
    _history(layout, write_raw, {1: 100, 2: 10, 3: 1000, 5: 100})  # median 100
    outcomes = {}
    for rows in (19, 20, 100, 500, 501):  # allowed: 0.2 to 5 times the median, both inclusive
        materialize(layout, write_raw, events(rows))
        result = gates(layout)["volume"]
        assert result.metadata["trailing_median"] == 100
        assert result.metadata["history_days"] == 4
        assert result.metadata["rows"] == rows
        assert result.metadata["ratio"] == pytest.approx(rows / 100)
        outcomes[rows] = result.passed
    assert outcomes == {19: False, 20: True, 100: True, 500: True, 501: False}


def test_volume_gate_looks_back_only_over_the_trailing_days(layout, write_raw: Callable[..., Path]) -> None:
    _history(layout, write_raw, {1: 10, 2: 10, 3: 10, 6: 1000, 7: 1000})
    materialize(layout, write_raw, events(10))
    assert gates(layout, volume_trailing_days=3)["volume"].passed
    wide = gates(layout, volume_trailing_days=7)["volume"]
    assert wide.metadata["trailing_median"] == 10 and wide.metadata["history_days"] == 5
    assert gates(layout, volume_trailing_days=7, volume_min_history_days=6)["volume"].passed


def test_resource_limits_gate(layout, write_raw: Callable[..., Path]) -> None:
    materialize(layout, write_raw, events(12, sessions=3))  # 3 sessions of 4 distinct items each
    assert gates(layout, max_events=12, max_distinct_items=12, max_sessions=3, max_items_per_session=4)[
        "resource_limits"
    ].passed

    result = gates(layout, max_events=11, max_items_per_session=3)["resource_limits"]
    assert not result.passed and result.blocking
    exceeded = {row["measure"]: (row["observed"], row["limit_value"]) for row in result.metadata["exceeded"]}
    assert exceeded == {"events": (12, 11), "items_per_session": (4, 3)}
    assert "events" in result.summary and "items_per_session" in result.summary
    assert result.sample and result.sample[0]["items"] == 4

    exceeded = gates(layout, max_sessions=2, max_distinct_items=11)["resource_limits"].metadata["exceeded"]
    assert {row["measure"] for row in exceeded} == {"sessions", "distinct_items"}


# --------------------------------------------------------------------------------------------------
# Severity and confirmation


def test_warn_only_makes_a_gate_non_blocking(layout, write_raw: Callable[..., Path]) -> None:
    materialize(layout, write_raw, [*events(5), "{broken"])
    results = gates(layout, warn_only=("quarantine_rate",))
    assert not results["quarantine_rate"].passed
    assert results["quarantine_rate"].blocking is False
    assert all(r.blocking for name, r in results.items() if name != "quarantine_rate")
    assert read_checks(layout.lake_root, DAY)["passed"] is True
    assert confirm_gates_passed(layout.lake_root, DAY) is None

    gates(layout)
    assert read_checks(layout.lake_root, DAY)["passed"] is False


def test_unknown_warn_only_check_is_a_config_error(layout, write_raw: Callable[..., Path]) -> None:
    materialize(layout, write_raw, events(3))
    with pytest.raises(ConfigError, match="quarantine_rat"):
        gates(layout, warn_only=("quarantine_rat",))


def test_confirm_reports_a_failed_gate(layout, write_raw: Callable[..., Path]) -> None:
    materialize(layout, write_raw, [*events(5), "{broken"])
    gates(layout)
    reason = confirm_gates_passed(layout.lake_root, DAY)
    assert reason is not None and "quarantine_rate" in reason


def test_confirm_reports_a_partition_never_checked(layout, write_raw: Callable[..., Path]) -> None:
    assert confirm_gates_passed(layout.lake_root, DAY) is not None  # not even materialized
    materialize(layout, write_raw, events(5))
    reason = confirm_gates_passed(layout.lake_root, DAY)
    assert reason is not None and "never checked" in reason


def test_confirm_reports_data_changed_after_checking(layout, write_raw: Callable[..., Path]) -> None:
    materialize(layout, write_raw, events(5))
    gates(layout)
    assert confirm_gates_passed(layout.lake_root, DAY) is None
    record_path = partition_dir(layout.lake_root, "canonical_events", DAY) / CHECKS_FILE
    passed_record = record_path.read_bytes()

    # The partition is re-materialized from different raw data; its old (passing) record must not count.
    materialize(layout, write_raw, [*events(5), *events(3, prefix="new-")])
    assert confirm_gates_passed(layout.lake_root, DAY) is not None
    record_path.write_bytes(passed_record)
    reason = confirm_gates_passed(layout.lake_root, DAY)
    assert reason is not None and "changed" in reason


def test_confirm_after_a_failing_partition_is_fixed(layout, write_raw: Callable[..., Path]) -> None:
    materialize(layout, write_raw, [*events(5), "{broken"])
    gates(layout)
    assert confirm_gates_passed(layout.lake_root, DAY) is not None
    materialize(layout, write_raw, events(6))
    gates(layout)
    assert confirm_gates_passed(layout.lake_root, DAY) is None


def test_volume_is_judged_only_on_a_meaningful_median_and_blocks_only_recent_days(
    layout, write_raw: Callable[..., Path]
) -> None:
    _history(layout, write_raw, {1: 100, 2: 100, 3: 100})
    materialize(layout, write_raw, events(1))  # 0.01 x the trailing median: a collapsed feed
    recent = gates(layout, volume_block_recent_days=100_000)["volume"]
    assert not recent.passed and recent.blocking
    # DAY lies in the past: backfilled history is what it was, so the same collapse only warns.
    backfilled = gates(layout)["volume"]
    assert not backfilled.passed and not backfilled.blocking
    assert "volume_block_recent_days" in backfilled.summary
    assert read_checks(layout.lake_root, DAY)["passed"]
    # A median of 100 rows is too little to judge when the floor is higher.
    small = gates(layout, volume_min_median_rows=101, volume_block_recent_days=100_000)["volume"]
    assert small.passed and "too little volume to judge" in small.summary


# --------------------------------------------------------------------------------------------------
# The API server's exposure log is judged apart from producer data


def log_exposures(layout, items: int, day: dt.date = DAY) -> None:
    """What the API server's exposure log lands for one response of `items` items on `day`."""
    writer = ExposureWriter(layout.raw_root, host="h", pid=1)
    writer.record(
        tenant="acme",
        surface="home",
        session_id="one-client",
        user_id=None,
        request_id="r",
        item_ids=[f"x{i}" for i in range(items)],
        ts=dt.datetime.combine(day, dt.time(12), dt.UTC).timestamp(),
    )
    writer.close()


def test_exposure_log_lines_never_pass_or_fail_the_rate_gates_of_producer_lines(
    layout, write_raw: Callable[..., Path]
) -> None:
    # A repeated request as a server without event ids logged it: 400 identical lines, one of them torn.
    exposure = {**events(1)[0], "event_type": "exposure", "rank": 0, "request_id": "same"}
    write_raw(layout.raw_root, DAY, "exposures-h-1-1.jsonl", [exposure] * 400 + ["{torn"])
    materialize(layout, write_raw, [*events(100), *["{broken"] * 10])  # 10 of 110 producer lines bad
    results = gates(layout)
    exposure_log = {
        "exposure_log_files": 1,
        "exposure_log_lines": 401,
        "exposure_log_rows": 1,
        "exposure_log_quarantined": 1,
        "exposure_log_duplicates": 399,
        "exposure_log_by_reason": {"invalid_json": 1},
    }
    quarantine, duplicates = results["quarantine_rate"], results["duplicate_rate"]
    assert not quarantine.passed, "the exposure log's lines do not dilute the producers' bad lines"
    assert (
        quarantine.metadata
        == {
            "count": 10,
            "lines": 110,
            "rate": round(10 / 110, 6),
            "limit": 0.05,
            "by_reason": {"invalid_json": 10},
        }
        | exposure_log
    )
    assert duplicates.passed and duplicates.metadata["count"] == 0 and duplicates.metadata["lines"] == 110
    for result in (quarantine, duplicates, results["volume"], results["resource_limits"]):
        assert result.metadata.items() >= exposure_log.items()
        assert "producer events only (401 exposure log lines not judged)" in result.summary
    assert "exposure_log_lines" not in results["schema"].metadata


def test_exposure_log_rows_count_neither_in_volume_nor_in_resource_limits(
    layout, write_raw: Callable[..., Path]
) -> None:
    for back in (1, 2):
        log_exposures(layout, 400, day=DAY - dt.timedelta(days=back))
    _history(layout, write_raw, {1: 100, 2: 100, 3: 100})
    gates(
        layout, day=DAY - dt.timedelta(days=1)
    )  # day 1's producer rows come from its checks, day 2's are counted
    log_exposures(layout, 3000)  # one client, one session, 3,000 distinct items
    materialize(layout, write_raw, events(100))
    limits = {"max_events": 150, "max_items_per_session": 50, "volume_block_recent_days": 100_000}
    results = gates(layout, **limits)
    volume = results["volume"]
    assert volume.passed and volume.metadata["rows"] == 100 and volume.metadata["trailing_median"] == 100
    assert volume.metadata["exposure_log_rows"] == 3000
    assert results["resource_limits"].passed
    # The producers' own events are still held to the limits.
    tight = gates(layout, **(limits | {"max_events": 99}))["resource_limits"]
    assert not tight.passed and tight.summary.startswith("events 100 > 99")


def test_a_damaged_record_of_a_neighbouring_day_is_named(layout, write_raw: Callable[..., Path]) -> None:
    """The volume gate reads the trailing days' summaries: one cut short names its file, not a bare error."""
    before = DAY - dt.timedelta(days=1)
    materialize(layout, write_raw, events(5, before), before)
    materialize(layout, write_raw, events(5))
    damaged = partition_dir(layout.lake_root, "canonical_events", before) / "_summary.json"
    damaged.write_text(damaged.read_text()[:30])
    with pytest.raises(RecordError, match=rf"{re.escape(str(damaged))} cannot be read: not JSON"):
        gates(layout)
