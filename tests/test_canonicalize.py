"""canonicalize_partition: raw landing files of one day -> canonical_events + quarantine partitions."""

from __future__ import annotations

import datetime as dt
import gzip
import itertools
import json
import os
import random
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from recsys_core.lake import partition_dir, read_summary
from recsys_core.settings import IngestConfig
from recsys_dagster.ingest import canonicalize, contract
from recsys_dagster.ingest.canonicalize import RawFileError, canonicalize_partition

DAY = dt.date(2025, 3, 10)
BOM = b"\xef\xbb\xbf"
NOON = dt.datetime(2025, 3, 10, 12, tzinfo=dt.UTC)


def event(n: int, **fields: object) -> dict:
    """A valid event of DAY; `n` makes it distinct from the others."""
    ts = (NOON + dt.timedelta(seconds=n)).strftime("%Y-%m-%dT%H:%M:%SZ")
    base = {"ts": ts, "tenant": "acme", "surface": "home", "session_id": f"s{n % 7}", "item_id": f"i{n}"}
    return {k: v for k, v in (base | fields).items() if v is not None}


def line(n: int, **fields: object) -> bytes:
    return json.dumps(event(n, **fields)).encode()


def run(layout, config: IngestConfig | None = None, day: dt.date = DAY, lake_root: Path | None = None):
    return canonicalize_partition(
        layout.raw_root, lake_root or layout.lake_root, day, config or IngestConfig()
    )


def read(lake_root: Path, asset: str, day: dt.date = DAY) -> pl.DataFrame:
    """All Parquet files of a partition, in file name order."""
    files = sorted(partition_dir(lake_root, asset, day).glob("*.parquet"))
    assert files, f"no Parquet files in {asset} {day}"
    return pl.concat([pl.read_parquet(f) for f in files])


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative name -> bytes), hidden ones included."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def staging_folders(lake_root: Path) -> list[str]:
    """What canonicalization has left in its staging area, besides the per-day lock files."""
    staging = lake_root / ".staging"
    return sorted(p.name for p in staging.iterdir() if p.suffix != ".lock") if staging.exists() else []


# --------------------------------------------------------------------------------------------------
# Every line ends up in exactly one place, with the right reason at the right line


def test_every_reason_lands_on_its_line(layout, write_raw: Callable[..., Path]) -> None:
    long_line = line(90, pad="p" * 6000)
    cases: list[tuple[bytes, str]] = [
        (BOM + line(1), "ok"),  # a byte order mark starts the file
        (line(2), "ok"),
        (b"", "blank"),
        (b"  \t ", "blank"),
        (long_line, "line_too_long"),
        (b'{"ts": "2025-03-10T12:00:00Z", "tenant": "\xff\xfe"}', "invalid_utf8"),
        (b'{"ts": "2025-03-10T12:00:00Z", "tenant": "acme"', "invalid_json"),
        (line(3)[:-1] + b', "value": NaN}', "invalid_json"),
        (BOM + line(4), "invalid_json"),  # a byte order mark inside the file is not whitespace
        (b'[{"ts": "2025-03-10T12:00:00Z"}]', "not_an_object"),
        (b'"just a string"', "not_an_object"),
        (b"42", "not_an_object"),
        (line(5, extra={"deep": [1, {"x": {"y": [None, True]}}]}), "ok"),  # nested unknown fields are fine
        (line(6, tenant=True), "bad_type"),
        (line(7, rank="3"), "bad_type"),
        (line(8)[:-1] + b', "request_id": "\\ud800"}', "bad_type"),
        (line(9, v=2), "unsupported_version"),
        (json.dumps({k: v for k, v in event(10).items() if k != "item_id"}).encode(), "missing_field"),
        (line(11, session_id=" "), "empty_id"),
        (line(12, item_id="i" * 300), "id_too_long"),
        (line(13, tenant=".."), "bad_identifier"),
        (line(14, ts="yesterday"), "bad_ts"),
        (line(15, ts="2025-01-01T00:00:00Z"), "ts_out_of_range"),
        (line(16, event_type="view"), "unknown_event_type"),
        (line(17, rank=-1), "negative_rank"),
        (line(18)[:-1] + b', "value": 1e999}', "non_finite_value"),
        (line(2), "duplicate"),  # an exact repeat of line 2
        (line(19, ts=int((NOON.timestamp() + 19) * 1000)), "ok"),
        (line(20), "ok"),  # the last line has no newline
    ]
    data = b"\r\n".join(raw for raw, _ in cases)
    write_raw(layout.raw_root, DAY, "mixed.jsonl", data)

    summary = run(layout, IngestConfig(max_line_bytes=2000))

    quarantine = read(layout.lake_root, "quarantine")
    canonical = read(layout.lake_root, "canonical_events")
    expected_reasons = {n: kind for n, (_, kind) in enumerate(cases, 1) if kind in contract.REASONS}
    assert dict(zip(quarantine["source_line"], quarantine["reason"], strict=True)) == expected_reasons
    assert sorted(canonical["source_line"]) == [n for n, (_, kind) in enumerate(cases, 1) if kind == "ok"]
    assert set(quarantine["source_file"]) == set(canonical["source_file"]) == {f"dt={DAY}/mixed.jsonl"}

    assert summary.lines_read == len(cases)
    assert summary.blank_lines == 2
    assert summary.duplicates == 1
    assert summary.quarantined == len(expected_reasons) == quarantine.height
    assert summary.canonical_rows == canonical.height == 5
    assert summary.lines_read == summary.canonical_rows + summary.quarantined + summary.duplicates + 2
    assert summary.reconciled
    assert summary.reasons == dict(Counter(expected_reasons.values()))
    assert summary.files == [f"dt={DAY}/mixed.jsonl"]

    stored = read_summary(layout.lake_root, DAY)
    assert stored is not None and stored["reconciled"] is True
    for key in (
        "lines_read",
        "canonical_rows",
        "quarantined",
        "duplicates",
        "blank_lines",
        "reasons",
        "files",
    ):
        assert stored[key] == getattr(summary, key), key
    # Every quarantined line says why, beyond its reason code.
    without_detail = quarantine.filter(pl.col("detail").is_null() | (pl.col("detail") == ""))
    assert without_detail.select("source_line", "reason").rows() == []


def test_quarantine_raw_holds_the_line_text_bounded(layout, write_raw: Callable[..., Path]) -> None:
    long_line = line(1, pad="p" * 20_000)
    cases = [
        line(2, tenant="bad tenant"),
        long_line,
        b'{"tenant": "caf\xc3\xa9", "item_id": "\xff"}',
        '{"tenant": "caf\u00e9", "ts": 3, "item_id": "\U0001f600"}'.encode(),
    ]
    write_raw(layout.raw_root, DAY, "q.jsonl", b"\r\n".join(cases) + b"\r\n")

    run(layout, IngestConfig(max_line_bytes=1000))

    raw = dict(zip(*read(layout.lake_root, "quarantine").select("source_line", "raw"), strict=True))
    assert raw[1] == cases[0].decode()  # no trailing carriage return
    assert 0 < len(raw[2]) <= contract.RAW_PREFIX_CHARS and long_line.decode().startswith(raw[2])
    assert raw[3].startswith('{"tenant": "caf\u00e9", "item_id": "') and raw[3].endswith('"}')
    assert raw[4] == cases[3].decode()


def test_lines_and_files_are_counted_from_one(layout, write_raw: Callable[..., Path]) -> None:
    write_raw(layout.raw_root, DAY, "a.jsonl", [line(1), "", line(2, rank=-5)])
    write_raw(layout.raw_root, DAY, "b.jsonl", [line(3, rank=-5), line(4)])
    run(layout)
    quarantine = read(layout.lake_root, "quarantine").sort("source_file", "source_line")
    assert quarantine.select("source_file", "source_line").rows() == [
        (f"dt={DAY}/a.jsonl", 3),
        (f"dt={DAY}/b.jsonl", 1),
    ]
    canonical = read(layout.lake_root, "canonical_events").sort("source_file", "source_line")
    assert canonical.select("source_file", "source_line").rows() == [
        (f"dt={DAY}/a.jsonl", 1),
        (f"dt={DAY}/b.jsonl", 2),
    ]


def test_canonical_values_and_schema(layout, write_raw: Callable[..., Path]) -> None:
    write_raw(
        layout.raw_root,
        DAY,
        "e.jsonl",
        [
            {
                "ts": "2025-03-10T13:30:00+01:30",
                "tenant": " acme ",
                "surface": "home\t",
                "session_id": " s1 ",
                "item_id": 42,
                "user_id": "",
                "rank": 2,
                "value": 3,
            },
            {
                "ts": 1741608000000,
                "tenant": "acme",
                "surface": "home",
                "session_id": "s2",
                "item_id": "i2",
                "event_type": "click",
                "user_id": " u2 ",
                "request_id": " r ",
                "event_id": " e-2 ",
            },
        ],
    )
    run(layout)
    canonical = read(layout.lake_root, "canonical_events").sort("source_line")
    assert canonical.schema == pl.Schema(contract.CANONICAL_SCHEMA)
    contract.canonical_schema_model().validate(canonical)
    first, second = canonical.to_dicts()
    assert first["ts"] == second["ts"] == NOON
    assert (first["tenant"], first["surface"], first["session_id"], first["item_id"]) == (
        "acme",
        "home",
        "s1",
        "42",
    )
    assert first["user_id"] is None  # an empty user id is an anonymous event
    assert first["event_type"] == "exposure"
    assert (first["rank"], first["value"], first["request_id"]) == (2, 3.0, None)
    assert first["event_id"]  # derived from the identifying fields
    assert (second["user_id"], second["request_id"], second["event_id"]) == ("u2", "r", "e-2")


# --------------------------------------------------------------------------------------------------
# Duplicates


def test_duplicates_across_files_keep_the_first_by_file_name_then_line(
    layout, write_raw: Callable[..., Path]
) -> None:
    # b.jsonl is written first: reading order is by name, not by arrival.
    write_raw(
        layout.raw_root,
        DAY,
        "b.jsonl",
        [line(1, event_id="dup-1", item_id="from-b"), line(2), line(3)],
    )
    write_raw(
        layout.raw_root,
        DAY,
        "a.jsonl",
        [
            line(1, event_id="dup-1", item_id="from-a-1"),
            line(2),
            line(4, event_id="dup-1", item_id="from-a-3"),
        ],
    )
    summary = run(layout)
    canonical = read(layout.lake_root, "canonical_events").sort("source_file", "source_line")
    assert canonical.select("source_file", "source_line").rows() == [
        (f"dt={DAY}/a.jsonl", 1),
        (f"dt={DAY}/a.jsonl", 2),
        (f"dt={DAY}/b.jsonl", 3),
    ]
    assert canonical.filter(pl.col("event_id") == "dup-1")["item_id"].to_list() == ["from-a-1"]
    assert summary.duplicates == 3
    assert summary.files == [f"dt={DAY}/a.jsonl", f"dt={DAY}/b.jsonl"]
    assert read(layout.lake_root, "quarantine").height == 0
    assert summary.reconciled


def test_event_ids_are_idempotency_keys_per_tenant(layout, write_raw: Callable[..., Path]) -> None:
    write_raw(
        layout.raw_root,
        DAY,
        "a.jsonl",
        [line(1, event_id="1"), line(2, event_id="1", tenant="other"), line(3, event_id="1", tenant="other")],
    )
    summary = run(layout)
    canonical = read(layout.lake_root, "canonical_events").sort("source_line")
    assert canonical.select("tenant", "event_id", "source_line").rows() == [
        ("acme", "1", 1),
        ("other", "1", 2),
    ]
    assert summary.duplicates == 1


def test_the_same_event_spelled_differently_is_a_duplicate(layout, write_raw: Callable[..., Path]) -> None:
    spellings = [
        event(1),
        event(1, tenant=" acme ", item_id=" i1 ", session_id="s1 "),
        event(1, ts="2025-03-10T13:00:01+01:00"),
        event(1, ts=int(NOON.timestamp() * 1000) + 1000),
        event(1, event_type="exposure", v=1, user_id=""),
    ]
    write_raw(layout.raw_root, DAY, "e.jsonl", [*spellings, event(1, event_id=" x "), event(2, event_id="x")])
    summary = run(layout)
    assert summary.canonical_rows == 2
    assert summary.duplicates == 5
    assert sorted(read(layout.lake_root, "canonical_events")["source_line"]) == [1, 6]


def test_distinct_events_get_distinct_derived_ids(layout, write_raw: Callable[..., Path]) -> None:
    """No two different events may share a derived id, however their field values are split."""
    pairs = [
        (event(1, user_id="u\x1fv", item_id="i"), event(1, user_id="u", item_id="v\x1fi")),
        (event(2, session_id="s\x1fx", user_id="u"), event(2, session_id="s", user_id="x\x1fu")),
        (event(3, rank=1), event(3, value=1.0)),
        (event(4, request_id="r"), event(4)),
    ]
    write_raw(layout.raw_root, DAY, "e.jsonl", [e for pair in pairs for e in pair])
    summary = run(layout)
    assert summary.duplicates == 0
    assert summary.canonical_rows == 8
    assert read(layout.lake_root, "canonical_events")["event_id"].n_unique() == 8


# --------------------------------------------------------------------------------------------------
# Input formats and landing layout


def test_gzip_input_reads_like_plain(layout, write_raw: Callable[..., Path], tmp_path: Path) -> None:
    lines = [line(n) for n in range(20)] + [b"", line(3), b"{broken", line(21, rank=-1)]
    write_raw(layout.raw_root, DAY, "events.jsonl.gz", BOM + b"\n".join(lines) + b"\n")
    plain_raw = tmp_path / "plain"
    write_raw(plain_raw, DAY, "events.jsonl", BOM + b"\n".join(lines) + b"\n")

    gz = run(layout)
    plain = canonicalize_partition(plain_raw, tmp_path / "plain_lake", DAY, IngestConfig())

    for key in ("lines_read", "canonical_rows", "quarantined", "duplicates", "blank_lines", "reasons"):
        assert getattr(gz, key) == getattr(plain, key), key
    assert gz.canonical_rows == 20 and gz.duplicates == 1 and gz.blank_lines == 1
    assert gz.files == [f"dt={DAY}/events.jsonl.gz"]
    drop = ["source_file"]
    assert (
        read(layout.lake_root, "canonical_events")
        .drop(drop)
        .equals(read(tmp_path / "plain_lake", "canonical_events").drop(drop))
    )
    assert (
        read(layout.lake_root, "quarantine")
        .drop(drop)
        .equals(read(tmp_path / "plain_lake", "quarantine").drop(drop))
    )


def test_hidden_and_foreign_files_are_ignored(layout, write_raw: Callable[..., Path]) -> None:
    write_raw(layout.raw_root, DAY, "events.jsonl", [line(1)])
    write_raw(layout.raw_root, DAY, ".in-flight.jsonl", [line(2), b"garbage"])
    write_raw(layout.raw_root, DAY, ".hidden.jsonl.gz", [line(3)])
    write_raw(layout.raw_root, DAY, "notes.txt", [b"not an event"])
    write_raw(layout.raw_root, DAY, "data.json", [line(4)])
    (layout.raw_root / f"dt={DAY}" / "folder.jsonl").mkdir()
    write_raw(layout.raw_root, DAY - dt.timedelta(days=1), "events.jsonl", [line(5)])

    summary = run(layout)
    assert summary.files == [f"dt={DAY}/events.jsonl"]
    assert summary.lines_read == 1
    assert read(layout.lake_root, "canonical_events")["item_id"].to_list() == ["i1"]
    assert read(layout.lake_root, "quarantine").height == 0


@pytest.mark.parametrize("landing", ["missing", "empty_folder", "empty_file", "only_hidden"])
def test_a_day_without_events_gives_an_empty_schema_correct_partition(
    layout, write_raw: Callable[..., Path], landing: str
) -> None:
    folder = layout.raw_root / f"dt={DAY}"
    if landing == "empty_folder":
        folder.mkdir()
    elif landing == "empty_file":
        write_raw(layout.raw_root, DAY, "events.jsonl", b"")
    elif landing == "only_hidden":
        write_raw(layout.raw_root, DAY, ".events.jsonl", [line(1)])

    summary = run(layout)

    canonical = read(layout.lake_root, "canonical_events")
    quarantine = read(layout.lake_root, "quarantine")
    assert canonical.height == 0 and quarantine.height == 0
    assert canonical.schema == pl.Schema(contract.CANONICAL_SCHEMA)
    assert quarantine.schema == pl.Schema(contract.QUARANTINE_SCHEMA)
    assert (summary.lines_read, summary.canonical_rows, summary.quarantined, summary.duplicates) == (
        0,
        0,
        0,
        0,
    )
    assert summary.reconciled
    assert read_summary(layout.lake_root, DAY)["canonical_rows"] == 0


# --------------------------------------------------------------------------------------------------
# Determinism, replacement, atomicity


def _mixed_day(write_raw: Callable[..., Path], raw_root: Path, n: int = 300, seed: int = 7) -> None:
    rng = random.Random(seed)
    for name in ("b.jsonl", "a.jsonl.gz"):
        lines: list[bytes] = []
        for i in range(n):
            k = rng.randrange(n * 2)
            choice = rng.random()
            if choice < 0.05:
                lines.append(line(k, rank=-1))
            elif choice < 0.08:
                lines.append(b"{not json")
            elif choice < 0.1:
                lines.append(b"")
            elif choice < 0.15:
                lines.append(line(k, event_id=f"e{k % 40}"))
            else:
                lines.append(
                    line(k, ts=(NOON + dt.timedelta(seconds=rng.randrange(-3600, 3600))).isoformat())
                )
            if i % 50 == 0:
                lines.append(lines[-1])  # an exact repeat
        write_raw(raw_root, DAY, name, lines)


@pytest.mark.parametrize("rows_per_file", [2_000_000, 50])
def test_rerun_gives_byte_identical_outputs(
    layout, write_raw: Callable[..., Path], tmp_path: Path, rows_per_file: int
) -> None:
    _mixed_day(write_raw, layout.raw_root)
    config = IngestConfig(rows_per_file=rows_per_file)
    run(layout, config)
    canonical_dir = partition_dir(layout.lake_root, "canonical_events", DAY)
    quarantine_dir = partition_dir(layout.lake_root, "quarantine", DAY)
    first = (snapshot(canonical_dir), snapshot(quarantine_dir))

    run(layout, config)
    assert (snapshot(canonical_dir), snapshot(quarantine_dir)) == first

    other_lake = tmp_path / "other-lake"
    run(layout, config, lake_root=other_lake)
    assert snapshot(partition_dir(other_lake, "canonical_events", DAY)) == first[0]
    assert snapshot(partition_dir(other_lake, "quarantine", DAY)) == first[1]


def test_rerun_replaces_the_partition(layout, write_raw: Callable[..., Path]) -> None:
    raw_file = write_raw(layout.raw_root, DAY, "events.jsonl", [line(n) for n in range(400)] + [b"{bad"])
    run(layout, IngestConfig(rows_per_file=50))
    canonical_dir = partition_dir(layout.lake_root, "canonical_events", DAY)
    assert len(list(canonical_dir.glob("*.parquet"))) > 1

    raw_file.unlink()
    write_raw(layout.raw_root, DAY, "events.jsonl", [line(1000), line(1001), line(1002)])
    summary = run(layout)

    assert sorted(p.name for p in canonical_dir.iterdir()) == ["_summary.json", "part-00000.parquet"]
    assert sorted(read(layout.lake_root, "canonical_events")["item_id"]) == ["i1000", "i1001", "i1002"]
    assert read(layout.lake_root, "quarantine").height == 0
    assert read_summary(layout.lake_root, DAY)["lines_read"] == summary.lines_read == 3
    for asset in ("canonical_events", "quarantine"):
        assert [p.name for p in (layout.lake_root / asset).iterdir()] == [f"dt={DAY}"]


def test_other_days_are_left_alone(layout, write_raw: Callable[..., Path]) -> None:
    other = DAY - dt.timedelta(days=1)
    write_raw(layout.raw_root, other, "events.jsonl", [line(1, ts="2025-03-09T12:00:00Z")])
    run(layout, day=other)
    before = snapshot(partition_dir(layout.lake_root, "canonical_events", other))
    write_raw(layout.raw_root, DAY, "events.jsonl", [line(2)])
    run(layout)
    assert snapshot(partition_dir(layout.lake_root, "canonical_events", other)) == before


@pytest.mark.parametrize(
    ("corruption", "message"),
    [
        ("not_gzip", "Not a gzipped file"),
        ("truncated", "ended before the end-of-stream marker"),
        ("broken_symlink", "a symbolic link to gone.jsonl.gz, which does not exist"),
        ("symlink_loop", "a symbolic link to b.jsonl.gz, which does not exist"),
        ("fifo", "not a regular file"),
    ],
)
def test_unreadable_landing_file_fails_and_leaves_the_previous_partition(
    layout, write_raw: Callable[..., Path], corruption: str, message: str
) -> None:
    write_raw(layout.raw_root, DAY, "a.jsonl", [line(n) for n in range(10)] + [b"{bad"])
    run(layout)
    before = {asset: snapshot(layout.lake_root / asset) for asset in ("canonical_events", "quarantine")}

    unreadable = layout.raw_root / f"dt={DAY}" / "b.jsonl.gz"
    if corruption == "not_gzip":
        unreadable.write_bytes(b"this is not gzip data\n" * 10)
    elif corruption == "truncated":
        payload = gzip.compress(b"\n".join(line(n) for n in range(100, 2000)) + b"\n")
        unreadable.write_bytes(payload[: len(payload) // 2])
    elif corruption == "fifo":
        os.mkfifo(unreadable)
    else:
        unreadable.symlink_to("gone.jsonl.gz" if corruption == "broken_symlink" else unreadable.name)
    write_raw(layout.raw_root, DAY, "c.jsonl", [line(50)])

    with pytest.raises(RawFileError, match=r"b\.jsonl\.gz") as failure:
        run(layout)
    assert message in str(failure.value)

    after = {asset: snapshot(layout.lake_root / asset) for asset in ("canonical_events", "quarantine")}
    assert after == before
    for asset in ("canonical_events", "quarantine"):
        assert [p.name for p in (layout.lake_root / asset).iterdir()] == [f"dt={DAY}"]
    assert staging_folders(layout.lake_root) == []


# --------------------------------------------------------------------------------------------------
# Output files and ordering


def test_file_size_does_not_change_the_rows(layout, write_raw: Callable[..., Path], tmp_path: Path) -> None:
    _mixed_day(write_raw, layout.raw_root, n=1500, seed=11)
    one = run(layout, IngestConfig(), lake_root=tmp_path / "one")
    many = run(layout, IngestConfig(rows_per_file=50), lake_root=tmp_path / "many")

    many_files = sorted(partition_dir(tmp_path / "many", "canonical_events", DAY).glob("*.parquet"))
    assert len(many_files) > 1
    assert all(pl.read_parquet(path).height == 50 for path in many_files[:-1])
    assert one.duplicates > 50
    assert (many.duplicates, many.canonical_rows, many.quarantined) == (
        one.duplicates,
        one.canonical_rows,
        one.quarantined,
    )
    rows = read(tmp_path / "many", "canonical_events")
    assert rows.height == one.canonical_rows
    assert rows["event_id"].n_unique() == rows.height
    assert rows.equals(read(tmp_path / "one", "canonical_events"))  # same rows, same order
    assert read(tmp_path / "many", "quarantine").equals(read(tmp_path / "one", "quarantine"))
    assert many.reconciled


def test_output_is_in_reading_order(layout, write_raw: Callable[..., Path]) -> None:
    rng = random.Random(3)
    lines = []
    for n in range(300):
        ts = NOON + dt.timedelta(seconds=rng.randrange(-20, 20))
        lines.append(line(n, ts=ts.isoformat()))
    lines.insert(100, b"{bad")
    write_raw(layout.raw_root, DAY, "b.jsonl", lines[150:])
    write_raw(layout.raw_root, DAY, "a.jsonl", lines[:150])
    run(layout, IngestConfig(rows_per_file=40))
    canonical = read(layout.lake_root, "canonical_events")
    assert canonical.height == 300
    assert not canonical["ts"].is_sorted()
    assert canonical.select("source_file", "source_line").equals(
        canonical.sort("source_file", "source_line").select("source_file", "source_line")
    )
    assert canonical["item_id"].to_list() == [f"i{n}" for n in range(300)]


def test_many_small_landing_files_give_few_row_groups(
    layout, write_raw: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # One row group per file (or per block) would make the partition several times larger and slower to
    # scan; rows are gathered into row groups of ROW_GROUP_ROWS whatever the landing layout.
    monkeypatch.setattr(canonicalize._CanonicalWriter, "ROW_GROUP_ROWS", 100)
    monkeypatch.setattr(canonicalize._QuarantineWriter, "ROW_GROUP_ROWS", 30)
    for f in range(60):
        write_raw(layout.raw_root, DAY, f"f{f:03d}.jsonl", [line(f * 10 + n) for n in range(5)] + [b"{bad"])
    summary = run(layout, IngestConfig(rows_per_file=250))
    assert (summary.canonical_rows, summary.quarantined) == (300, 60)

    def row_groups(asset: str) -> list[list[int]]:
        files = sorted(partition_dir(layout.lake_root, asset, DAY).glob("*.parquet"))
        metadata = [pq.ParquetFile(path).metadata for path in files]
        return [[m.row_group(i).num_rows for i in range(m.num_row_groups)] for m in metadata]

    assert row_groups("canonical_events") == [[100, 100, 50], [50]]
    assert row_groups("quarantine") == [[30, 30]]
    assert read(layout.lake_root, "canonical_events")["item_id"].to_list() == [
        f"i{f * 10 + n}" for f in range(60) for n in range(5)
    ]


@pytest.mark.parametrize(
    ("block", "possible"),
    [
        (b'{"item_id": "a"}\n{"item_id": "b\\n"}\n', False),
        (b'{"item_id": "a\x1fb"}\n', True),
        (b'{"item_id": "a\x1eb"}\n', True),
        (b'{"item_id": "a\\u001Fb"}\n', True),
        (b'{"item_id": "a\\u001eb"}\n', True),
        (b'{"item_id": "a\\u0010b"}\n', True),
    ],
)
def test_separator_check_finds_raw_and_escaped_separators(block: bytes, possible: bool) -> None:
    # When it answers False, derived ids skip the per-row ambiguity check (see _with_event_id).
    assert canonicalize._may_hold_separators(block) is possible


def test_a_duplicate_in_a_later_output_file_is_dropped_and_the_first_kept(
    layout, write_raw: Callable[..., Path]
) -> None:
    first = [line(n, event_id=f"e{n}", item_id="first") for n in range(30)]
    # Same ids later in the day (in files written after the first ones), plus one new id per tenant.
    again = [line(n, event_id=f"e{n}", item_id="again") for n in range(0, 30, 3)]
    other_tenant = [line(100, event_id="e1", tenant="other")]
    write_raw(layout.raw_root, DAY, "a.jsonl", first)
    write_raw(layout.raw_root, DAY, "b.jsonl", [*again, *other_tenant])
    summary = run(layout, IngestConfig(rows_per_file=7))

    files = sorted(partition_dir(layout.lake_root, "canonical_events", DAY).glob("*.parquet"))
    assert len(files) == 5  # 31 rows kept, in files of 7
    rows = read(layout.lake_root, "canonical_events")
    assert summary.duplicates == 10 and summary.canonical_rows == 31
    assert rows.filter(pl.col("tenant") == "acme")["item_id"].unique().to_list() == ["first"]
    assert rows.filter(pl.col("tenant") == "other")["event_id"].to_list() == ["e1"]


@pytest.mark.parametrize("filter_bits", [canonicalize._SeenKeys.FILTER_BITS, 3])
def test_seen_keys_match_a_set_across_many_levels(filter_bits: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # With 3 bits (8 filter bits), every key finds its bit set by some other key: all are looked up.
    monkeypatch.setattr(canonicalize._SeenKeys, "FILTER_BITS", filter_bits)
    rng = random.Random(5)
    seen_keys = canonicalize._SeenKeys()
    reference: set[tuple[str, str]] = set()
    for batch in range(9):
        keys = [(rng.choice("ab"), f"id{rng.randrange(400)}") for _ in range(120)]
        frame = pl.DataFrame(keys, schema=["tenant", "event_id"], orient="row")
        expected = []
        for key in keys:
            expected.append(key not in reference)
            reference.add(key)
        assert seen_keys.first_occurrences(*canonicalize._key_hashes(frame)).tolist() == expected, batch
    sizes = [len(level[0]) for level in seen_keys.levels]
    assert sum(sizes) == len(reference)
    assert all(bigger > 2 * smaller for bigger, smaller in itertools.pairwise(sizes)), sizes


def test_lookup_checks_every_entry_whose_first_hash_collides() -> None:
    # Distinct keys may share the first 64-bit hash: all of them are compared on the second.
    first = np.array([5, 7, 7, 7, 9], dtype=np.uint64)
    second = np.array([1, 2, 3, 4, 5], dtype=np.uint64)
    probe_first = np.array([7, 7, 7, 8, 9], dtype=np.uint64)
    probe_second = np.array([4, 2, 9, 1, 5], dtype=np.uint64)
    found = canonicalize._contains((first, second), probe_first, probe_second)
    assert found.tolist() == [True, True, False, False, True]


# --------------------------------------------------------------------------------------------------
# Lines far beyond ingest.max_line_bytes


@pytest.mark.parametrize("name", ["long.jsonl", "long.jsonl.gz"])
@pytest.mark.parametrize("ending", [b"\n", b"\r\n", b""])
def test_a_line_over_many_blocks_is_counted_not_kept(
    layout, write_raw: Callable[..., Path], monkeypatch: pytest.MonkeyPatch, name: str, ending: bytes
) -> None:
    """A line running over many read blocks is quarantined with its full length and the start of its
    text; the lines around it keep their numbers (the last case: a file with no newline at all)."""
    monkeypatch.setattr(canonicalize, "BLOCK_BYTES", 4096)
    long_line = b'{"pad": "' + b"\xc3\xa9" * 30_000 + b'"}'
    around = [line(1), line(2)] if ending else []
    data = b"".join(text + b"\n" for text in around[:1]) + long_line + ending
    data += b"".join(text + b"\n" for text in around[1:])
    write_raw(layout.raw_root, DAY, name, data)

    summary = run(layout, IngestConfig(max_line_bytes=1000))

    quarantined = read(layout.lake_root, "quarantine").to_dicts()
    long_number = 2 if ending else 1
    assert quarantined == [
        {
            "source_file": f"dt={DAY}/{name}",
            "source_line": long_number,
            "reason": "line_too_long",
            "detail": f"line is {len(long_line)} bytes, limit is 1000",
            "raw": long_line.decode()[: contract.RAW_PREFIX_CHARS],
        }
    ]
    canonical = read(layout.lake_root, "canonical_events")
    assert canonical.select("item_id", "source_line").rows() == ([("i1", 1), ("i2", 3)] if ending else [])
    assert summary.lines_read == len(around) + 1 and summary.reconciled
    assert summary.bytes_read == len(data) + (not ending)  # a last line without a newline counts one


MEMORY_PROBE = """
import datetime as dt, gzip, json, resource, sys, zlib
from pathlib import Path
from recsys_core.settings import IngestConfig
from recsys_dagster.ingest.canonicalize import canonicalize_partition

raw, lake, line_mib = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
small, big = dt.date(2025, 3, 9), dt.date(2025, 3, 10)
event = {"ts": "2025-03-10T12:00:00Z", "tenant": "a", "surface": "b", "session_id": "s", "item_id": "i"}
for day in (small, big):
    (raw / f"dt={day}").mkdir(parents=True)
(raw / f"dt={small}" / "e.jsonl").write_bytes(b'{"pad": "x"}\\n' * 1000)
# One line of line_mib MiB, gzipped (about 1000:1), then one valid event.
packer = zlib.compressobj(1, zlib.DEFLATED, 31)
with open(raw / f"dt={big}" / "e.jsonl.gz", "wb") as out:
    out.write(packer.compress(b'{"pad": "'))
    for _ in range(line_mib):
        out.write(packer.compress(b"x" * (1 << 20)))
    out.write(packer.compress(b'"}\\n' + json.dumps(event).encode() + b"\\n") + packer.flush())
config = IngestConfig(max_line_bytes=1 << 20)
canonicalize_partition(raw, lake, small, config)  # the libraries' own memory is in place from here on
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
summary = canonicalize_partition(raw, lake, big, config)
growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps({"growth_kib": growth, "reasons": summary.reasons, "rows": summary.canonical_rows}))
"""


def test_an_endless_line_in_a_small_gzip_file_does_not_grow_memory(tmp_path: Path) -> None:
    """A few hundred KiB of gzip holding a 256 MiB line: peak memory (measured in a fresh process,
    after a warm-up run) grows by far less than the line."""
    line_mib = 256
    probe = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(tmp_path / "raw"), str(tmp_path / "lake"), str(line_mib)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    result = json.loads(probe.stdout)
    assert result["reasons"] == {"line_too_long": 1} and result["rows"] == 1
    # Reading it keeps a few blocks (16 MiB each) at a time; keeping the line would take 256 MiB or more.
    assert result["growth_kib"] < line_mib * 1024 // 3, result


# --------------------------------------------------------------------------------------------------
# Staging leftovers of a crashed run

CRASH_PROBE = """
import datetime as dt, os, signal, sys
from pathlib import Path
from recsys_core.settings import IngestConfig
from recsys_dagster.ingest.canonicalize import canonicalize_partition

def die(message):  # called once a landing file has been read into the staging folder
    os.kill(os.getpid(), signal.SIGKILL)

canonicalize_partition(Path(sys.argv[1]), Path(sys.argv[2]), dt.date.fromisoformat(sys.argv[3]), IngestConfig(), die)
"""


def test_a_crashed_runs_staging_is_removed_by_the_next_run_of_its_day(
    layout, write_raw: Callable[..., Path]
) -> None:
    other_day = DAY - dt.timedelta(days=1)
    for day in (DAY, other_day):
        write_raw(layout.raw_root, day, "events.jsonl", [line(n) for n in range(50)])
        killed = subprocess.run(
            [sys.executable, "-c", CRASH_PROBE, layout.raw_root, layout.lake_root, day.isoformat()],
            capture_output=True,
            timeout=120,
        )
        assert killed.returncode == -9, killed.stderr
    left = staging_folders(layout.lake_root)
    assert [name[:10] for name in left] == sorted([str(other_day), str(DAY)])
    assert any((layout.lake_root / ".staging" / name).rglob("*.parquet") for name in left)
    # Not a staging folder of a run: left alone.
    foreign = layout.lake_root / ".staging" / f"{DAY}-notes"
    foreign.mkdir()

    summary = run(layout)

    assert summary.canonical_rows == 50
    # Only the day's own leftovers go: the other day's wait for a run of that day.
    assert staging_folders(layout.lake_root) == sorted(
        [f"{DAY}-notes", *(n for n in left if n.startswith(str(other_day)))]
    )
    run(layout, day=other_day)
    assert staging_folders(layout.lake_root) == [f"{DAY}-notes"]
