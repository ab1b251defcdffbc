"""Behaviour of the synthetic event generator: layout, contract shape, traffic realism, determinism."""

from __future__ import annotations

import datetime as dt
import re
from collections import Counter, defaultdict
from pathlib import Path

import orjson
import polars as pl
import pytest

from recsys_core.lake import partition_dir
from recsys_core.settings import IngestConfig
from recsys_dagster.ingest import generate
from recsys_dagster.ingest.canonicalize import canonicalize_partition
from recsys_dagster.ingest.generate import GenerateReport, generate_events

END = dt.date(2024, 3, 10)
DAYS = 3
PER_DAY = 20_000
SMALL = {"n_users": 800, "n_items": 1_000}
TS_FORMAT = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z")
REQUIRED = ("v", "ts", "tenant", "surface", "session_id", "item_id", "event_type")


def _day_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir())


def _parse_ts(ts: str) -> dt.datetime:
    return dt.datetime.fromisoformat(ts)


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, GenerateReport, list[str]]:
    root = tmp_path_factory.mktemp("raw")
    messages: list[str] = []
    report = generate_events(
        root, end_date=END, days=DAYS, events_per_day=PER_DAY, seed=7, progress=messages.append, **SMALL
    )
    return root, report, messages


@pytest.fixture(scope="module")
def events(generated: tuple[Path, GenerateReport, list[str]]) -> dict[str, list[dict]]:
    """Parsed events per arrival day, in file order (duplicates included)."""
    root, _, _ = generated
    by_day: dict[str, list[dict]] = {}
    for day_dir in _day_dirs(root):
        rows = []
        for path in sorted(day_dir.glob("*.jsonl")):
            rows.extend(orjson.loads(line) for line in path.read_bytes().splitlines())
        by_day[day_dir.name.removeprefix("dt=")] = rows
    return by_day


def test_layout_report_and_progress(generated: tuple[Path, GenerateReport, list[str]]) -> None:
    root, report, messages = generated
    expected_days = [(END - dt.timedelta(days=d)).isoformat() for d in range(DAYS - 1, -1, -1)]
    assert [p.name for p in _day_dirs(root)] == [f"dt={d}" for d in expected_days]
    assert report.events_per_day == dict.fromkeys(expected_days, PER_DAY)
    assert report.total_events == DAYS * PER_DAY
    assert report.files == tuple(root / f"dt={d}" / "events-00000.jsonl" for d in expected_days)
    for path in report.files:
        content = path.read_bytes()
        assert content.endswith(b"\n")
        assert content.count(b"\n") == PER_DAY
    # Nothing but the numbered files: no temporary leftovers that a glob could pick up.
    assert sorted(p.name for p in root.rglob("*") if p.is_file()) == ["events-00000.jsonl"] * DAYS
    assert len(messages) == DAYS and all(d in m for d, m in zip(expected_days, messages, strict=True))


def test_every_line_is_a_contract_event(events: dict[str, list[dict]]) -> None:
    for rows in events.values():
        for event in rows:
            assert all(isinstance(event[key], int if key == "v" else str) for key in REQUIRED), event
            assert event["v"] == 1 and event["tenant"] == "demo" and event["surface"] == "home"
            assert TS_FORMAT.fullmatch(event["ts"]), event["ts"]
            assert re.fullmatch(r"i\d{6}", event["item_id"])
            assert "event_id" not in event
            assert event["event_type"] in ("exposure", "click", "add_to_cart", "purchase")
            if "user_id" in event:
                assert re.fullmatch(r"u\d{5}", event["user_id"])
            if event["event_type"] in ("exposure", "click"):
                assert 0 <= event["rank"] <= 9 and event["request_id"]
            else:
                assert "rank" not in event and "request_id" not in event
            if event["event_type"] == "purchase":
                assert isinstance(event["value"], float | int) and 0.5 < event["value"] < 1000
            else:
                assert "value" not in event


def test_event_mix_follows_the_funnel(events: dict[str, list[dict]]) -> None:
    mix = Counter(e["event_type"] for rows in events.values() for e in rows)
    assert mix["exposure"] > mix["click"] > mix["add_to_cart"] > mix["purchase"] > 0
    assert 0.02 < mix["click"] / mix["exposure"] < 0.15


def test_requests_show_ten_distinct_ranked_items_and_clicks_follow_exposures(
    events: dict[str, list[dict]],
) -> None:
    exposed: dict[str, dict[int, str]] = defaultdict(dict)
    for rows in events.values():
        for e in rows:
            if e["event_type"] == "exposure":
                exposed[e["request_id"]][e["rank"]] = e["item_id"]
    complete = [slots for slots in exposed.values() if len(slots) == 10]
    # Only a request cut off at the end of a chunk may be incomplete.
    assert len(complete) >= len(exposed) - 2 * DAYS
    assert all(sorted(slots) == list(range(10)) and len(set(slots.values())) == 10 for slots in complete)
    clicks = [e for rows in events.values() for e in rows if e["event_type"] == "click"]
    assert clicks and all(exposed[c["request_id"]][c["rank"]] == c["item_id"] for c in clicks)


def test_item_popularity_is_heavy_tailed(events: dict[str, list[dict]]) -> None:
    counts = Counter(e["item_id"] for rows in events.values() for e in rows if e["event_type"] == "exposure")
    ranked = sorted(counts.values(), reverse=True)
    top_share = sum(ranked[: SMALL["n_items"] // 100]) / sum(ranked)
    # Uniform popularity would give the top 1% of items about 1% of exposures.
    assert top_share > 0.2
    assert len(counts) > SMALL["n_items"] // 2  # and a long tail still gets shown


def test_users_come_back_across_days_heavy_and_light(events: dict[str, list[dict]]) -> None:
    sessions_of: dict[str, set[str]] = defaultdict(set)
    days_of: dict[str, set[str]] = defaultdict(set)
    session_sizes: Counter[str] = Counter()
    anonymous = 0
    total = 0
    for day, rows in events.items():
        for e in rows:
            total += 1
            session_sizes[e["session_id"]] += 1
            if "user_id" not in e:
                anonymous += 1
                continue
            sessions_of[e["user_id"]].add(e["session_id"])
            days_of[e["user_id"]].add(day)
    assert 0.005 < anonymous / total < 0.08
    assert sum(len(d) == DAYS for d in days_of.values()) >= 20
    per_user = sorted(len(s) for s in sessions_of.values())
    median = per_user[len(per_user) // 2]
    assert per_user[-1] >= 5 * median  # a few heavy users...
    assert sum(n == 1 for n in per_user) > len(per_user) // 5  # ...and many light ones
    sizes = sorted(session_sizes.values())
    assert sizes[len(sizes) // 2] >= 10 and sizes[-1] >= 5 * sizes[len(sizes) // 2]


def test_purchases_follow_carts_in_the_same_session(events: dict[str, list[dict]]) -> None:
    for rows in events.values():
        carted: dict[tuple[str, str], str] = {}
        for e in sorted(rows, key=lambda e: e["ts"]):
            key = (e["session_id"], e["item_id"])
            if e["event_type"] == "add_to_cart":
                carted.setdefault(key, e["ts"])
            elif e["event_type"] == "purchase":
                assert key in carted


def test_duplicates_are_exact_repeats_within_a_file(
    generated: tuple[Path, GenerateReport, list[str]],
) -> None:
    _, report, _ = generated
    repeats = 0
    for path in report.files:
        seen: set[bytes] = set()
        for line in path.read_bytes().splitlines():
            repeats += line in seen
            seen.add(line)
    assert repeats == report.duplicate_lines
    assert 0 < repeats < 0.005 * DAYS * PER_DAY


def test_late_events_are_from_the_previous_evening(
    events: dict[str, list[dict]], generated: tuple[Path, GenerateReport, list[str]]
) -> None:
    late_total = 0
    for day, rows in events.items():
        start = dt.datetime.fromisoformat(day).replace(tzinfo=dt.UTC)
        times = [_parse_ts(e["ts"]) for e in rows]
        late = [t for t in times if t < start]
        assert all(start - dt.timedelta(hours=6) <= t for t in late)
        assert all(t < start + dt.timedelta(days=1) for t in times)
        assert 0.001 < len(late) / len(rows) < 0.015
        late_total += len(late)
    # Duplicated lines may repeat a late event, so the file count can exceed the report slightly.
    assert generated[1].late_events <= late_total <= generated[1].late_events + generated[1].duplicate_lines


def test_same_seed_same_bytes_other_seed_other_bytes(
    tmp_path: Path, generated: tuple[Path, GenerateReport, list[str]]
) -> None:
    root, _, _ = generated
    generate_events(tmp_path / "again", end_date=END, days=DAYS, events_per_day=PER_DAY, seed=7, **SMALL)
    assert _tree_bytes(tmp_path / "again") == _tree_bytes(root)
    generate_events(tmp_path / "other", end_date=END, days=1, events_per_day=PER_DAY, seed=8, **SMALL)
    name = f"dt={END.isoformat()}/events-00000.jsonl"
    assert (tmp_path / "other" / name).read_bytes() != (root / name).read_bytes()


def test_chunks_become_numbered_files_and_stale_ones_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(generate, "CHUNK_LINES", 4_000)
    report = generate_events(tmp_path, end_date=END, days=1, events_per_day=10_000, **SMALL)
    day_dir = tmp_path / f"dt={END.isoformat()}"
    names = sorted(p.name for p in day_dir.iterdir())
    assert names == ["events-00000.jsonl", "events-00001.jsonl", "events-00002.jsonl"]
    sizes = [len((day_dir / n).read_bytes().splitlines()) for n in names]
    assert sum(sizes) == 10_000 and max(sizes) <= 4_000
    assert report.total_events == 10_000
    # Files are in time order: each starts no earlier than the previous one's regular traffic.
    firsts = [orjson.loads((day_dir / n).read_bytes().splitlines()[0])["ts"] for n in names]
    assert firsts == sorted(firsts)

    unrelated = day_dir / "import-other-0123456789ab.jsonl"
    unrelated.write_text('{"v":1}\n')
    generate_events(tmp_path, end_date=END, days=1, events_per_day=3_000, **SMALL)
    assert sorted(p.name for p in day_dir.iterdir()) == ["events-00000.jsonl", unrelated.name]


def test_every_tenant_and_surface_combination_gets_traffic(tmp_path: Path) -> None:
    generate_events(
        tmp_path,
        end_date=END,
        days=1,
        events_per_day=5_000,
        tenants=("acme", "globex"),
        surfaces=("home", "pdp", "cart"),
        **SMALL,
    )
    lines = (tmp_path / f"dt={END.isoformat()}" / "events-00000.jsonl").read_bytes().splitlines()
    combos = Counter((e["tenant"], e["surface"]) for e in map(orjson.loads, lines))
    assert len(combos) == 6 and min(combos.values()) > 200


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tenants": ("bad tenant",)}, "invalid tenant"),
        ({"surfaces": ()}, "at least one surface"),
        ({"days": 0}, "days"),
        ({"n_items": 5}, "n_items"),
        ({"malformed_per_day": -1}, "malformed_per_day"),
        ({"events_per_day": 0, "malformed_per_day": 3}, "copies of event lines"),
    ],
)
def test_rejects_bad_arguments(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        generate_events(tmp_path, end_date=END, **{"events_per_day": 100, **kwargs})
    assert not any(tmp_path.iterdir())


def test_malformed_lines_are_quarantined_with_the_reason_they_were_made_for(tmp_path: Path) -> None:
    raw, lake = tmp_path / "raw", tmp_path / "lake"
    report = generate_events(
        raw, end_date=END, days=1, events_per_day=5_000, seed=3, malformed_per_day=240, **SMALL
    )
    assert set(report.malformed_lines) == set(generate.MALFORMATIONS)  # 240 draws cover all 12 kinds
    assert sum(report.malformed_lines.values()) == 240

    summary = canonicalize_partition(raw, lake, END, IngestConfig())
    assert summary.lines_read == 5_240
    assert summary.reasons == report.malformed_lines
    assert summary.canonical_rows + summary.duplicates == 5_000
    # Mixed in among the events, not appended: some malformed line comes before the last event line.
    quarantined = pl.read_parquet(partition_dir(lake, "quarantine", END) / "part-00000.parquet")
    assert quarantined["source_line"].min() < 5_000
