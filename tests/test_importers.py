"""Behaviour of `recsys import`: splitting foreign files into the landing layout by event day."""

from __future__ import annotations

import csv
import datetime as dt
import gzip
import hashlib
from collections import Counter
from pathlib import Path

import orjson
import pytest
from shared_data import shared_data_dir

from recsys_core.settings import IngestConfig
from recsys_dagster.ingest import importers
from recsys_dagster.ingest.canonicalize import canonicalize_partition
from recsys_dagster.ingest.importers import import_file

TODAY = dt.date(2030, 1, 15)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")[:-1]


def _out_name(source: Path, stem: str) -> str:
    return f"import-{stem}-{hashlib.sha256(source.read_bytes()).hexdigest()[:12]}.jsonl"


@pytest.fixture(scope="module")
def data_dir() -> Path:
    found = shared_data_dir()
    if found is None:
        pytest.skip("shared data sets not found: set RECSYS_SHARED_DATA")
    return found


def test_movielens_ratings_land_on_their_days(data_dir: Path, tmp_path: Path) -> None:
    source = data_dir / "ml-latest-small" / "ratings.csv"
    report = import_file(source, tmp_path, tenant="demo", surface="movies")

    # Independent expectation: the UTC day of every rating, straight from the CSV.
    with open(source, newline="") as handle:
        rows = list(csv.DictReader(handle))
    expected = Counter(
        dt.datetime.fromtimestamp(int(r["timestamp"]), dt.UTC).date().isoformat() for r in rows
    )
    assert report.format == "movielens"
    assert report.lines_read == report.events_written == len(rows) == 100_836
    assert report.per_day == dict(sorted(expected.items()))
    assert sum(report.per_day.values()) == 100_836
    assert (report.first_day, report.last_day) == ("1996-03-29", "2018-09-24")
    assert report.undated_lines == 0 and report.undated_day is None
    assert len(report.files) == len(report.per_day)
    name = _out_name(source, "ratings")
    for day, count in report.per_day.items():
        assert len(_lines(tmp_path / f"dt={day}" / name)) == count

    first = orjson.loads(_lines(tmp_path / "dt=1996-03-29" / name)[0])
    assert first["v"] == 1 and first["event_type"] == "rating"
    assert (first["tenant"], first["surface"]) == ("demo", "movies")
    assert isinstance(first["ts"], int) and first["ts"] % 1000 == 0
    assert dt.datetime.fromtimestamp(first["ts"] / 1000, dt.UTC).date() == dt.date(1996, 3, 29)
    assert first["session_id"] == f"{first['user_id']}-19960329"
    assert isinstance(first["item_id"], str) and isinstance(first["value"], float)
    # The first CSV row (user 1, movie 1, 4.0 on 2000-07-30) keeps its values.
    row = orjson.loads(_lines(tmp_path / "dt=2000-07-30" / name)[0])
    assert {k: row[k] for k in ("user_id", "item_id", "value", "ts")} == {
        "user_id": "1",
        "item_id": "1",
        "value": 4.0,
        "ts": 964982703000,
    }


def test_otto_sessions_map_types_and_ids(data_dir: Path, tmp_path: Path) -> None:
    source = data_dir / "otto-sample" / "train.jsonl"
    report = import_file(source, tmp_path, tenant="shop", surface="pdp")
    assert report.format == "otto"
    assert report.lines_read == 20 and report.events_written == 862
    events = [orjson.loads(line) for path in report.files for line in _lines(path)]
    assert Counter(e["event_type"] for e in events) == {"click": 800, "add_to_cart": 52, "purchase": 10}
    assert all(e["session_id"] == e["user_id"] and e["session_id"].isdigit() for e in events)
    assert len({e["item_id"] for e in events}) == 510
    for path in report.files:
        day = path.parent.name.removeprefix("dt=")
        for line in _lines(path):
            ts = orjson.loads(line)["ts"]
            assert isinstance(ts, int)
            assert dt.datetime.fromtimestamp(ts / 1000, dt.UTC).date().isoformat() == day
    first_source_event = orjson.loads(source.read_bytes().splitlines()[0])["events"][0]
    assert {"ts": first_source_event["ts"], "item_id": str(first_source_event["aid"])} in [
        {"ts": e["ts"], "item_id": e["item_id"]} for e in events if e["session_id"] == "0"
    ]


def _contract_file(path: Path) -> dict[str, list[bytes]]:
    """Write a contract JSONL file; returns the lines expected per landing day (TODAY = undatable)."""
    lines = {
        "a": b'{"v":1,"ts":"2024-05-01T10:00:00.000Z","tenant":"t","surface":"home","session_id":"s1","item_id":"i1"}',
        # Odd spacing and key order must survive untouched.
        "b": b'{ "item_id" : "i2", "ts": "2024-05-02T01:30:00+02:00" , "tenant":"t","surface":"home","session_id":"s1" }',
        "c": b'{"ts":1714608000000,"tenant":"t","surface":"home","session_id":"s2","item_id":"i3","event_type":"click"}',
        "d": b'{"v":1,"ts":"2024-05-02T23:59:59.999-00:30","tenant":"t","surface":"home","session_id":"s3","item_id":"i4"}\r',
        "bad_json": b'{"v":1,"ts":"2024-05-01T10:00:00Z",',
        "bad_ts": b'{"v":1,"ts":"yesterday","tenant":"t","surface":"home","session_id":"s4","item_id":"i5"}',
        "naive_ts": b'{"v":1,"ts":"2024-05-01T10:00:00","tenant":"t","surface":"home","session_id":"s4","item_id":"i5"}',
        "no_ts": b'{"v":1,"tenant":"t","surface":"home","session_id":"s4","item_id":"i5"}',
        "array": b"[1, 2, 3]",
    }
    order = ["a", "bad_json", "b", "", "c", "bad_ts", "d", "naive_ts", "no_ts", "array", "a"]
    path.write_bytes(b"\n".join(lines[k] if k else b"" for k in order) + b"\n")
    today = [lines[k] for k in ("bad_json", "bad_ts", "naive_ts", "no_ts", "array")]
    return {
        "2024-05-01": [lines["a"], lines["b"], lines["a"]],
        "2024-05-02": [lines["c"]],
        "2024-05-03": [lines["d"]],
        TODAY.isoformat(): today,
    }


def test_contract_lines_are_copied_verbatim_by_day(tmp_path: Path) -> None:
    source = tmp_path / "events.jsonl"
    expected = _contract_file(source)
    raw = tmp_path / "raw"
    report = import_file(source, raw, today=TODAY)
    assert report.format == "jsonl"
    name = _out_name(source, "events")
    assert _tree(raw) == {f"dt={day}/{name}": b"\n".join(lines) + b"\n" for day, lines in expected.items()}
    assert report.per_day == {"2024-05-01": 3, "2024-05-02": 1, "2024-05-03": 1}
    assert report.undated_lines == 5 and report.undated_day == TODAY.isoformat()
    assert report.blank_lines == 1
    assert report.lines_read == 11 == report.events_written + report.undated_lines + report.blank_lines
    assert (report.first_day, report.last_day) == ("2024-05-01", "2024-05-03")


def test_tenant_and_surface_only_fill_in_what_a_line_lacks(tmp_path: Path) -> None:
    source = tmp_path / "partial.jsonl"
    complete = b'{"ts":"2024-05-01T10:00:00Z","tenant":"t","surface":"home","session_id":"s","item_id":"i"}'
    no_scope = b'{"ts":"2024-05-01T11:00:00Z","session_id":"s","item_id":"i"}'
    null_tenant = b'{"ts":"2024-05-01T12:00:00Z","tenant":null,"session_id":"s","item_id":"i"}'
    source.write_bytes(b"\n".join([complete, no_scope, null_tenant]))  # no final newline either
    report = import_file(source, tmp_path / "raw", tenant="acme", surface="web")
    lines = _lines(report.files[0])
    assert lines[0] == complete
    assert orjson.loads(lines[1]) == {**orjson.loads(no_scope), "tenant": "acme", "surface": "web"}
    assert lines[1].endswith(no_scope[1:])  # the original text follows the spliced-in fields
    # A present (if null) tenant is the line's own statement: left for the pipeline to judge.
    assert orjson.loads(lines[2]) == {**orjson.loads(null_tenant), "surface": "web"}


def test_gzip_input_gives_the_same_lines(tmp_path: Path) -> None:
    plain = tmp_path / "events.jsonl"
    _contract_file(plain)
    packed = tmp_path / "packed" / "events.jsonl.gz"
    packed.parent.mkdir()
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    plain_report = import_file(plain, tmp_path / "a", today=TODAY)
    gz_report = import_file(packed, tmp_path / "b", today=TODAY)
    assert gz_report.format == "jsonl" and gz_report.per_day == plain_report.per_day
    assert [p.read_bytes() for p in gz_report.files] == [p.read_bytes() for p in plain_report.files]
    assert all(p.name == _out_name(packed, "events") for p in gz_report.files)


def _udata(path: Path) -> None:
    # u.data: tab separated, no header; 86399 and 86400 straddle the first UTC midnight.
    path.write_bytes(b"196\t242\t3\t86399\n186\t302\t3.5\t86400\nnot a rating\n22\t377\t1\t891717742\n")


def test_udata_is_detected_and_dated_in_utc(tmp_path: Path) -> None:
    source = tmp_path / "u.data"
    _udata(source)
    report = import_file(source, tmp_path / "raw", tenant="ml", surface="home", today=TODAY)
    assert report.format == "movielens"
    assert report.per_day == {"1970-01-01": 1, "1970-01-02": 1, "1998-04-04": 1}
    assert report.undated_lines == 1 and report.lines_read == 4
    events = {p.parent.name: orjson.loads(_lines(p)[0]) for p in report.files if "2030" not in p.parent.name}
    assert events["dt=1970-01-01"] == {
        "v": 1,
        "ts": 86_399_000,
        "tenant": "ml",
        "surface": "home",
        "session_id": "196-19700101",
        "user_id": "196",
        "item_id": "242",
        "event_type": "rating",
        "value": 3.0,
    }
    assert events["dt=1970-01-02"]["value"] == 3.5
    assert _lines(tmp_path / "raw" / f"dt={TODAY}" / _out_name(source, "u")) == [b"not a rating"]


def test_reimport_is_idempotent_and_leaves_other_files_alone(tmp_path: Path) -> None:
    source = tmp_path / "ratings.csv"
    source.write_bytes(b"userId,movieId,rating,timestamp\r\n1,1,4.0,964982703\r\n1,3,4.0,964981247\r\n")
    raw = tmp_path / "raw"
    other = raw / "dt=2000-07-30" / "events-00000.jsonl"
    other.parent.mkdir(parents=True)
    other.write_bytes(b'{"v":1}\n')
    first = import_file(source, raw, tenant="t", surface="s")
    before = _tree(raw)
    second = import_file(source, raw, tenant="t", surface="s")
    assert _tree(raw) == before and first == second
    assert first.lines_read == 2 and first.per_day == {"2000-07-30": 2}
    assert other.read_bytes() == b'{"v":1}\n'
    assert len(before) == 2  # no temporary files left behind


def test_small_flushes_give_identical_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "events.jsonl"
    _contract_file(source)
    import_file(source, tmp_path / "big", today=TODAY)
    monkeypatch.setattr(importers, "FLUSH_LINES", 2)
    messages: list[str] = []
    import_file(source, tmp_path / "small", today=TODAY, progress=messages.append)
    assert _tree(tmp_path / "small") == _tree(tmp_path / "big")
    assert len(messages) > 3


@pytest.mark.parametrize("kind", ["movielens", "otto"])
def test_foreign_formats_need_tenant_and_surface(tmp_path: Path, kind: str) -> None:
    source = tmp_path / ("u.data" if kind == "movielens" else "train.jsonl")
    if kind == "movielens":
        _udata(source)
    else:
        source.write_bytes(b'{"session":1,"events":[{"aid":5,"ts":1659304800025,"type":"clicks"}]}\n')
    with pytest.raises(ValueError, match="tenant"):
        import_file(source, tmp_path / "raw", surface="home")
    with pytest.raises(ValueError, match="surface"):
        import_file(source, tmp_path / "raw", fmt=kind, tenant="t")
    assert not (tmp_path / "raw").exists()


def test_otto_malformed_sessions_are_kept_whole(tmp_path: Path) -> None:
    source = tmp_path / "train.jsonl"
    good = b'{"session":7,"events":[{"aid":5,"ts":1659304800025,"type":"clicks"},{"aid":6,"ts":1659304900000,"type":"orders"}]}'
    bad = b'{"session":8,"events":[{"aid":5,"ts":"soon","type":"clicks"}]}'
    # Well formed, but its second event's ts is beyond the year 9999.
    undatable = b'{"session":9,"events":[{"aid":5,"ts":1659304800025,"type":"clicks"},{"aid":6,"ts":18448538687845552,"type":"clicks"}]}'
    source.write_bytes(b"\n".join([good, bad, b'{"session":10,"events":[]}', undatable, good]) + b"\n")
    report = import_file(source, tmp_path / "raw", tenant="t", surface="s", today=TODAY)
    assert report.per_day == {"2022-07-31": 4} and report.undated_lines == 2
    assert _lines(tmp_path / "raw" / f"dt={TODAY}" / _out_name(source, "train")) == [bad, undatable]


def test_unknown_or_undetectable_format_is_an_error(tmp_path: Path) -> None:
    source = tmp_path / "notes.txt"
    source.write_text("hello\n")
    with pytest.raises(ValueError, match="cannot detect"):
        import_file(source, tmp_path / "raw")
    with pytest.raises(ValueError, match="unknown format"):
        import_file(source, tmp_path / "raw", fmt="parquet")


def test_every_accepted_ts_form_lands_where_the_pipeline_accepts_it(tmp_path: Path) -> None:
    """Each event goes to the folder of the day the pipeline dates it, so that canonicalizing those
    days quarantines none of them; a ts the pipeline cannot date waits in today's folder."""
    stamps = {
        "1714608000000": "2024-05-02",  # epoch milliseconds as a string of digits
        "-1": "1969-12-31",
        "2016-12-31T23:59:60Z": "2017-01-01",  # a leap second: the next day's first second
        "2016-12-31t23:59:60.5z": "2017-01-01",
        "2024-05-01 23:30:00-01:00": "2024-05-02",
        "2024-05-01T00:30:00+01:00": "2024-04-30",
    }
    undatable = ["18448538687845552", 18448538687845552, "2024-05-01", 1.5e12]
    lines = [
        orjson.dumps({"ts": ts, "tenant": "t", "surface": "s", "session_id": "s1", "item_id": f"i{n}"})
        for n, ts in enumerate([*stamps, *undatable])
    ]
    # A repeated ts: the first one counts, as in the pipeline.
    lines.append(
        b'{"ts":"2024-05-01T10:00:00Z","ts":"2030-01-01T00:00:00Z","tenant":"t","surface":"s","session_id":"s1","item_id":"r"}'
    )
    source = tmp_path / "events.jsonl"
    source.write_bytes(b"\n".join(lines) + b"\n")
    raw = tmp_path / "raw"

    report = import_file(source, raw, today=TODAY)

    expected_days = Counter([*stamps.values(), "2024-05-01"])
    assert report.per_day == dict(sorted(expected_days.items()))
    assert report.undated_lines == len(undatable)
    config = IngestConfig(max_lateness_days=0, max_clock_skew_hours=0)
    for day, count in expected_days.items():
        summary = canonicalize_partition(raw, tmp_path / "lake", dt.date.fromisoformat(day), config)
        assert (summary.canonical_rows, summary.quarantined) == (count, 0), day
    today = canonicalize_partition(raw, tmp_path / "lake", TODAY, config)
    assert today.reasons == {"ts_out_of_range": 2, "bad_ts": 1, "bad_type": 1}
