"""The profile canonicalization records in `_summary.json`: its figures are the ones canonical_profile.sql
computes from the written files, the gates judge the same with and without it, and they trust it only
while it is bound to the files they check."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import pandera.errors
import polars as pl
import pytest

from recsys_core import storage
from recsys_core.lake import (
    SUMMARY_FILE,
    content_hash,
    parquet_files,
    partition_dir,
    read_checks,
    read_summary,
)
from recsys_core.settings import ChecksConfig, IngestConfig
from recsys_dagster.ingest import canonicalize, contract
from recsys_dagster.ingest.canonicalize import ProfileCounter, canonicalize_partition, value_rule_rows
from recsys_dagster.ingest.gates import arrival_window, exposure_log_figures, exposure_log_files, run_gates
from recsys_dagster.transform.sql import run_sql

DAY = dt.date(2025, 3, 10)
NOON = dt.datetime(2025, 3, 10, 12, tzinfo=dt.UTC)
# Limits every scenario exceeds somewhere, so that the comparisons include failed gates and their samples.
TIGHT = {
    "max_items_per_session": 4,
    "max_sessions": 5,
    "max_quarantine_rate": 0.01,
    "max_duplicate_rate": 0.01,
}


def event(i: int, **fields: Any) -> dict:
    return {
        "ts": (NOON + dt.timedelta(seconds=i)).isoformat(),
        "tenant": "acme",
        "surface": "home",
        "session_id": f"s{i % 7}",
        "item_id": f"i{i % 11}",
    } | fields


def duplicates(write: Callable[[str, list], None]) -> None:
    lines: list[Any] = [event(i, event_id=f"e{i % 40}") for i in range(60)]  # 20 repeated ids, other content
    lines += [event(i) for i in range(30)] * 2  # client retries: identical lines, derived ids
    write("events.jsonl", lines)


def exposure_log(write: Callable[[str, list], None]) -> None:
    exposure = event(1, event_type="exposure", rank=0, request_id="same", session_id="bot")
    write("exposures-h-1-1.jsonl", [exposure] * 50 + [event(i, session_id="bot", rank=i) for i in range(40)])
    write("exposures-h-1-2.jsonl", ["{torn", event(3, session_id="x", item_id="solo")])
    write("events.jsonl", [*(event(i) for i in range(80)), "{broken", "[1]"])


def out_of_window(write: Callable[[str, list], None]) -> None:
    start, end = arrival_window(DAY, IngestConfig())
    edges = [start, end - dt.timedelta(microseconds=1), start - dt.timedelta(microseconds=1), end]
    lines = [event(i, ts=ts.isoformat(), item_id=f"edge{i}") for i, ts in enumerate(edges)]
    lines += [event(i, ts=(NOON + dt.timedelta(days=30)).isoformat()) for i in range(5)]
    write("events.jsonl", [*lines, *(event(i) for i in range(50))])


def sessions_across_blocks(write: Callable[[str, list], None]) -> None:
    """Sessions whose items repeat in many small blocks, under several tenants and surfaces that share
    session and item ids."""
    lines = []
    for i in range(400):
        scope = {"tenant": f"t{i % 3}"} if i % 5 else {"tenant": "t0", "surface": "pdp"}
        lines.append(event(i, session_id=f"s{i % 13}", item_id=f"i{(i * 7) % 23}", **scope))
    lines += [event(i, session_id="big", item_id=f"i{i % 9}") for i in range(0, 400, 3)]
    write("a.jsonl", lines[:250])
    write("b.jsonl.gz", lines[250:])


def nothing(write: Callable[[str, list], None]) -> None:
    write("events.jsonl", ["", "{broken"])


SCENARIOS = {
    f.__name__: f for f in (duplicates, exposure_log, out_of_window, sessions_across_blocks, nothing)
}


@pytest.fixture(params=sorted(SCENARIOS))
def partition(request: pytest.FixtureRequest, layout, write_raw, monkeypatch: pytest.MonkeyPatch) -> Path:
    """One scenario's day, canonicalized in blocks of a few lines (so the figures are merged over blocks)."""
    monkeypatch.setattr(canonicalize, "BLOCK_BYTES", 1024)
    SCENARIOS[request.param](lambda name, lines: write_raw(layout.raw_root, DAY, name, lines))
    canonicalize_partition(layout.raw_root, layout.lake_root, DAY, IngestConfig())
    return layout.lake_root


def sql_profile(paths: list[str], window: tuple[dt.datetime, dt.datetime], exposure_files: list[str]) -> dict:
    params = {"paths": paths, "exposure_files": exposure_files}
    params |= {"window_start": window[0].isoformat(), "window_end": window[1].isoformat()}
    return run_sql("checks/canonical_profile", params).row(0, named=True)


def test_the_recorded_profile_is_what_the_sql_counts_in_the_files(partition: Path) -> None:
    summary = read_summary(partition, DAY)
    assert summary is not None
    profile = summary["profile"]
    paths = [str(p) for p in parquet_files(partition_dir(partition, "canonical_events", DAY))]
    window = arrival_window(DAY, IngestConfig())
    counted = sql_profile(paths, window, exposure_log_files(summary))
    assert {key: profile[key] for key in counted} == counted
    assert (profile["window_start"], profile["window_end"]) == (window[0].isoformat(), window[1].isoformat())
    assert profile["value_rule_rows"] == 0
    exposures = exposure_log_figures(partition, DAY, summary, paths)
    assert profile["exposure_log"] == {
        "files": exposures.files,
        "lines": exposures.lines,
        "rows": exposures.rows,
        "quarantined": exposures.quarantined,
        "reasons": exposures.reasons,
    }


def test_the_gates_judge_the_same_with_and_without_the_profile(partition: Path) -> None:
    checks = ChecksConfig(**TIGHT)
    with_profile = run_gates(partition, DAY, IngestConfig(), checks)
    assert read_checks(partition, DAY)["figures_from"] == "profile"
    # A partition written before profiles were recorded: same files, same hash, no profile.
    summary_file = partition_dir(partition, "canonical_events", DAY) / SUMMARY_FILE
    summary = json.loads(summary_file.read_text())
    del summary["profile"]
    summary_file.write_text(json.dumps(summary))
    without = run_gates(partition, DAY, IngestConfig(), checks)
    assert read_checks(partition, DAY)["figures_from"] == "files"
    assert [r.to_record() for r in with_profile] == [r.to_record() for r in without]
    assert any(not r.passed for r in without), "some gate must fail, or the comparison proves little"


@pytest.mark.parametrize(
    ("tamper", "failing"),
    [
        pytest.param(lambda f: f.with_columns(pl.col("rank").cast(pl.String)), "schema", id="wrong type"),
        pytest.param(
            lambda f: f.with_columns(pl.lit(-1, pl.Int64).alias("rank")), "schema", id="negative rank"
        ),
        pytest.param(
            lambda f: f.with_columns(pl.lit("no/tenant").alias("tenant")), "schema", id="bad tenant"
        ),
        pytest.param(lambda f: pl.concat([f, f.head(3)]), "unique_event_id", id="repeated rows"),
    ],
)
def test_a_file_written_by_hand_under_a_stale_profile_fails_its_gate(
    layout, write_raw, tamper: Callable[[pl.DataFrame], pl.DataFrame], failing: str
) -> None:
    write_raw(layout.raw_root, DAY, "events.jsonl", [event(i) for i in range(30)])
    canonicalize_partition(layout.raw_root, layout.lake_root, DAY, IngestConfig())
    assert "profile" in read_summary(layout.lake_root, DAY)
    # The partition's file rewritten by hand: its summary (and profile) still describe the old data.
    written = partition_dir(layout.lake_root, "canonical_events", DAY) / "part-00000.parquet"
    tamper(pl.read_parquet(written)).write_parquet(written)
    results = run_gates(layout.lake_root, DAY, IngestConfig(), ChecksConfig())
    assert read_checks(layout.lake_root, DAY)["figures_from"] == "files"
    assert [r.name for r in results if not r.passed] == [failing]


def test_a_profile_counted_against_another_arrival_window_is_not_used(layout, write_raw) -> None:
    late = [event(i, ts=(NOON - dt.timedelta(days=3)).isoformat()) for i in range(5)]
    write_raw(layout.raw_root, DAY, "events.jsonl", [*late, *(event(i) for i in range(20))])
    canonicalize_partition(layout.raw_root, layout.lake_root, DAY, IngestConfig())
    narrower = IngestConfig(max_lateness_days=1)
    results = {r.name: r for r in run_gates(layout.lake_root, DAY, narrower, ChecksConfig())}
    assert read_checks(layout.lake_root, DAY)["figures_from"] == "files"
    assert not results["ts_in_range"].passed and results["ts_in_range"].metadata["violations"] == 5


# --------------------------------------------------------------------------------------------------
# The counter itself, on rows canonicalization would never write


def odd_rows() -> pl.DataFrame:
    """Canonical rows breaking every rule the gates judge, with nulls in the keys and in the ids."""
    start, end = contract.arrival_window(DAY, 7, 1)
    rows = []
    for i in range(60):
        rows.append(
            {
                "event_id": [f"e{i % 50}", None, ""][i % 3] if i % 4 else f"e{i}",
                "ts": [NOON, start - dt.timedelta(seconds=1), end, None, start][i % 5],
                "tenant": ["acme", "other", None, "no/tenant"][i % 4],
                "surface": ["home", None, "pdp"][i % 3],
                "session_id": [f"s{i % 6}", None, "x" * 300][i % 7 % 3],
                "user_id": [None, "", "u" * 257, "u1"][i % 4],
                "item_id": [f"i{i % 9}", None, "é" * 200][i % 8 % 3],
                "event_type": [None, "click"][i % 2],
                "value": None,
                "rank": [None, -1, 3][i % 3],
                "request_id": None,
                "source_file": [None, "dt=2025-03-10/a.jsonl", "dt=2025-03-10/exposures-1.jsonl"][i % 3],
                "source_line": i - 2,
            }
        )
    return pl.DataFrame(rows, schema=contract.CANONICAL_SCHEMA)


def test_the_counter_agrees_with_the_sql_on_rows_with_nulls_and_broken_rules(tmp_path: Path) -> None:
    rows = odd_rows()
    window = contract.arrival_window(DAY, 7, 1)
    counter = ProfileCounter(window)
    for offset in range(0, rows.height, 13):  # blocks of 13 rows, each from its own landing file
        block = rows.slice(offset, 13)
        for (source,), part in block.group_by("source_file", maintain_order=True):
            counter.add_rows(source or "dt=2025-03-10/a.jsonl", part)
    path = tmp_path / "rows.parquet"
    rows.with_columns(pl.col("source_file").fill_null("dt=2025-03-10/a.jsonl")).write_parquet(path)
    counted = sql_profile([str(path)], window, ["dt=2025-03-10/exposures-1.jsonl"])
    profile = counter.result(rows=rows.height, distinct_keys=rows.height)
    # duplicate_id_rows is the writer's (rows kept minus distinct keys), not the counter's.
    assert {k: profile[k] for k in counted if k != "duplicate_id_rows"} == {
        k: v for k, v in counted.items() if k != "duplicate_id_rows"
    }
    assert all(profile[k] for k in ("null_key_rows", "ts_out_of_range_rows", "value_rule_rows"))


def test_value_rule_rows_counts_the_rows_pandera_rejects() -> None:
    rows = odd_rows()
    with pytest.raises(pandera.errors.SchemaErrors) as failure:
        contract.canonical_schema_model().validate(rows, lazy=True)
    rejected = failure.value.failure_cases.get_column("index").drop_nulls().n_unique()
    assert value_rule_rows(rows) == rejected > 0
    assert value_rule_rows(rows.head(0)) == 0


def canonical_rows(pairs: list[tuple[str, str]], first_line: int) -> pl.DataFrame:
    """Valid canonical rows of (session, item) pairs."""
    return pl.DataFrame(
        [
            {
                "event_id": f"e{first_line + i}",
                "ts": NOON,
                "tenant": "acme",
                "surface": "home",
                "session_id": session,
                "item_id": item,
                "event_type": "click",
                "source_file": "dt=2025-03-10/a.jsonl",
                "source_line": first_line + i,
            }
            for i, (session, item) in enumerate(pairs)
        ],
        schema=contract.CANONICAL_SCHEMA,
    )


def test_the_profile_counts_the_items_of_sessions_over_blocks_exactly() -> None:
    """Per-block counts bound a session's distinct items; only sessions the bounds leave open are counted
    exactly from their hashes."""
    counter = ProfileCounter(contract.arrival_window(DAY, 7, 1))
    blocks = [
        [("a", "1"), ("a", "2"), ("b", "1"), ("b", "2"), ("b", "3")],  # b: 3 items, the best lower bound
        [("a", "2"), ("a", "3"), ("c", "9")],  # a: at most 4 (2 + 2), in fact 3
        [("a", "4"), ("c", "9")],  # a: 4 in the end; c stays at 1
    ]
    line = 1
    for block in blocks:
        counter.add_rows("dt=2025-03-10/a.jsonl", canonical_rows(block, line))
        line += len(block)
    profile = counter.result(rows=10, distinct_keys=10)
    assert (profile["sessions"], profile["items_per_session"], profile["distinct_items"]) == (3, 4, 5)
    assert profile["events"] == 10 and profile["value_rule_rows"] == 0


def test_a_partition_renamed_into_place_is_not_hashed_again(tmp_path: Path, monkeypatch) -> None:
    staged = tmp_path / "staging"
    staged.mkdir()
    pl.DataFrame({"a": [1, 2]}).write_parquet(staged / "part-00000.parquet")
    hashed = content_hash(staged)
    final = tmp_path / "lake" / "dt=2025-03-10"
    final.parent.mkdir()
    staged.rename(final)
    reads: list[Path] = []
    real_open = open

    def recorded_open(path: Path, mode: str) -> BinaryIO:
        reads.append(path)
        return real_open(path, mode)

    monkeypatch.setattr(storage, "open", recorded_open, raising=False)
    assert content_hash(final) == hashed
    assert reads == [], "the memo knows the files by identity, wherever their folder is"
    # Changed bytes (same size) change the file's modification and change times: hashed again.
    data = bytearray((final / "part-00000.parquet").read_bytes())
    data[-20] ^= 1
    (final / "part-00000.parquet").write_bytes(bytes(data))
    assert content_hash(final) != hashed
    assert reads == [final / "part-00000.parquet"]
