"""The item catalog: the record contract and its quarantine, the MovieLens movies.csv import, the latest
state as of a day with its checks' figures, the content artifact, and the pipeline publishing it."""

from __future__ import annotations

import csv
import datetime as dt
import json
import re
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from shared_data import shared_data_dir

from recsys_core.catalog import (
    DATA_FILE,
    QUARANTINE,
    UPDATES,
    catalog_problem,
    item_line,
    landing_dir,
    partition_dir,
    read_catalog,
    read_catalog_record,
)
from recsys_dagster.ingest.catalog import land_catalog, update_catalog
from recsys_dagster.ingest.importers import default_catalog_day, import_file
from recsys_dagster.transform.content import content_neighbors, item_features

DAY = dt.date(2024, 5, 2)
MAX_LINE = 4096
SKEW = dt.timedelta(hours=1)


def record(item_id: str, *, updated_at: str = "2024-05-02T08:00:00Z", **fields: object) -> dict:
    return {
        "tenant": "shop",
        "item_id": item_id,
        "title": f"Item {item_id}",
        "categories": ["shoes"],
        "tags": [],
        "available": True,
        "attributes": {"brand": "acme"},
        "updated_at": updated_at,
        **fields,
    }


def land(raw: Path, day: dt.date, name: str, lines: list[bytes]) -> None:
    folder = landing_dir(raw, day)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(b"".join(lines))


def update(tmp_path: Path, day: dt.date):
    return update_catalog(
        tmp_path / "raw", tmp_path / "lake", day, max_line_bytes=MAX_LINE, max_clock_skew=SKEW
    )


def state_rows(tmp_path: Path, day: dt.date) -> dict[tuple[str, str], dict]:
    return {(row["tenant"], row["item_id"]): row for row in read_catalog(tmp_path / "lake", day).to_pylist()}


# ------------------------------------------------------------------------------------------ landing


def test_every_bad_line_is_quarantined_with_its_reason_and_the_counts_reconcile(tmp_path: Path) -> None:
    raw, lake = tmp_path / "raw", tmp_path / "lake"
    bad = {
        "invalid_json": b"{not json\n",
        "not_an_object": b"[1, 2]\n",
        "invalid_utf8": b'{"tenant": "shop", "item_id": "\xff"}\n',
        "line_too_long": b'{"x": "' + b"y" * MAX_LINE + b'"}\n',
        "unsupported_version": item_line({**record("v"), "v": 2}),
        "missing_field": item_line({k: v for k, v in record("m").items() if k != "updated_at"}),
        "bad_type": item_line(record("b", categories="shoes")),
        "invalid_name": item_line(record("n", tenant="../x")),
        "empty_id": item_line(record("  ")),
        "id_too_long": item_line(record("x" * 257)),
        "bad_ts": item_line(record("t", updated_at="2024-05-02T08:00:00")),  # no time zone
        "ts_out_of_range": item_line(record("f", updated_at="2024-05-03T01:00:00Z")),  # after the day + 1 h
    }
    good = [
        item_line(record("a")),
        item_line(record(" b ", updated_at=1714600000000, available=False, tags=["sale", "sale", " new "])),
    ]
    lines = [good[0], b"\n", *bad.values(), good[1], good[0]]  # the last line repeats the first: counted
    land(raw, DAY, "items.jsonl", lines)
    summary = land_catalog(raw, lake, DAY, MAX_LINE, SKEW)

    assert summary["reasons"] == dict.fromkeys(sorted(bad), 1)
    assert (summary["lines_read"], summary["updates"], summary["duplicates"], summary["blank_lines"]) == (
        len(lines),
        2,
        1,
        1,
    )
    assert summary["reconciled"] is True
    rows = pq.read_table(partition_dir(lake, DAY, UPDATES) / DATA_FILE).to_pylist()
    assert [row["item_id"] for row in rows] == ["a", "b"]  # ids trimmed
    second = rows[1]
    assert second["tags"] == ["sale", "new"] and second["available"] is False
    assert second["updated_at"] == dt.datetime(2024, 5, 1, 21, 46, 40, tzinfo=dt.UTC)  # epoch milliseconds
    assert (second["source_file"], second["source_line"]) == ("items.jsonl", len(lines) - 1)
    assert json.loads(rows[0]["attributes"]) == {"brand": "acme"}
    quarantine = pq.read_table(partition_dir(lake, DAY, QUARANTINE) / DATA_FILE).to_pylist()
    assert [row["reason"] for row in quarantine] == list(bad)
    assert [row["line"] for row in quarantine] == list(range(3, 3 + len(bad)))


def test_landing_again_gives_the_same_bytes(tmp_path: Path) -> None:
    raw, lake = tmp_path / "raw", tmp_path / "lake"
    land(raw, DAY, "items.jsonl", [item_line(record(str(n))) for n in range(50)])
    update(tmp_path, DAY)
    first = {
        table: (partition_dir(lake, DAY, table) / DATA_FILE).read_bytes() for table in ("catalog", UPDATES)
    }
    update(tmp_path, DAY)
    assert {
        table: (partition_dir(lake, DAY, table) / DATA_FILE).read_bytes() for table in ("catalog", UPDATES)
    } == first


# ------------------------------------------------------------------------------------------ state


def test_the_latest_update_wins_and_unavailable_items_stay(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    day1, day2, day3 = DAY, DAY + dt.timedelta(days=1), DAY + dt.timedelta(days=2)
    land(
        raw,
        day1,
        "a.jsonl",
        [
            item_line(record("kept", title="first")),
            item_line(record("newer", title="old", updated_at="2024-05-02T08:00:00Z")),
            item_line(record("late", title="newest", updated_at="2024-05-02T20:00:00Z")),
            item_line(record("tie", title="day 1")),
        ],
    )
    land(
        raw,
        day2,
        "a.jsonl",
        [
            item_line(record("newer", title="new", updated_at="2024-05-03T09:00:00Z")),
            # Landed later but updated earlier: does not replace the newer record.
            item_line(record("late", title="stale", updated_at="2024-05-01T00:00:00Z")),
            # Same updated_at as day 1's: the one landed last wins.
            item_line(record("tie", title="day 2")),
            item_line(record("gone", available=False, updated_at="2024-05-03T10:00:00Z")),
        ],
    )
    # Day 1 and 2 are never run by themselves: the state as of day 3 lands them.
    result = update(tmp_path, day3)
    assert result.record["landed_now"] == [day1.isoformat(), day2.isoformat(), day3.isoformat()]
    state = state_rows(tmp_path, day3)
    assert {item: row["title"] for (_, item), row in state.items()} == {
        "gone": "Item gone",
        "kept": "first",
        "late": "newest",
        "newer": "new",
        "tie": "day 2",
    }
    assert state[("shop", "gone")]["available"] is False
    assert state[("shop", "newer")]["landed_on"] == day2
    assert (result.record["items"], result.record["available_items"]) == (5, 4)
    assert list(state) == sorted(state)

    # As of day 1 only day 1's updates count.
    update(tmp_path, day1)
    assert {item: row["title"] for (_, item), row in state_rows(tmp_path, day1).items()} == {
        "kept": "first",
        "late": "newest",
        "newer": "old",
        "tie": "day 1",
    }

    # A landing folder whose files changed since it was landed is landed again.
    land(raw, day2, "b.jsonl", [item_line(record("kept", title="fixed", updated_at="2024-05-03T11:00:00Z"))])
    again = update(tmp_path, day3)
    assert again.record["landed_now"] == [day2.isoformat(), day3.isoformat()]
    assert state_rows(tmp_path, day3)[("shop", "kept")]["title"] == "fixed"


def test_a_daily_run_folds_the_previous_state_with_the_days_updates(tmp_path: Path) -> None:
    days = [DAY + dt.timedelta(days=n) for n in range(4)]
    raw = tmp_path / "raw"
    land(raw, days[0], "a.jsonl", [item_line(record(str(n), title=f"first {n}")) for n in range(30)])
    land(
        raw,
        days[2],
        "a.jsonl",
        [
            item_line(record(str(n), title=f"second {n}", updated_at="2024-05-04T01:00:00Z"))
            for n in range(0, 30, 3)
        ]
        + [item_line(record("new", updated_at="2024-05-04T02:00:00Z"))],
    )
    folded = [update(tmp_path, day).record for day in days]
    assert [r["from_previous_day"] for r in folded] == [False, True, True, True]
    assert [r["items"] for r in folded] == [30, 30, 31, 31]
    assert state_rows(tmp_path, days[3])[("shop", "3")]["title"] == "second 3"
    # The same as folding every landing at once.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "raw").symlink_to(raw)
    full = update(fresh, days[3]).record
    assert not full["from_previous_day"] and full["sha256"] == folded[3]["sha256"]
    # An earlier landing that changes invalidates the states folded from it.
    land(raw, days[0], "b.jsonl", [item_line(record("late", updated_at="2024-05-02T09:00:00Z"))])
    again = update(tmp_path, days[3]).record
    assert not again["from_previous_day"] and again["items"] == 32


def test_the_checks_figures(tmp_path: Path) -> None:
    raw, lake = tmp_path / "raw", tmp_path / "lake"
    land(raw, DAY, "a.jsonl", [item_line(record(item)) for item in ("i1", "i2", "i3")] + [b"oops\n"])
    # The day's events: shop sees i1, i2, i4, i5 (two missing of four); a tenant without a catalog is left
    # out of the figure.
    events = pl.DataFrame(
        {
            "tenant": ["shop", "shop", "shop", "shop", "shop", "other"],
            "item_id": ["i1", "i2", "i4", "i5", "i1", "zz"],
        }
    )
    canonical = lake / "canonical_events" / f"dt={DAY}"
    canonical.mkdir(parents=True)
    events.write_parquet(canonical / "part-00000.parquet")
    result = update(tmp_path, DAY)
    record_ = result.record
    assert (record_["event_items"], record_["missing_items"], record_["missing_share"]) == (4, 2, 0.5)
    assert (record_["reconciled"], record_["duplicate_keys"], record_["passed"]) == (True, 0, True)
    assert result.day_landing["quarantined"] == 1
    assert read_catalog_record(lake, DAY) == record_
    assert catalog_problem(lake, DAY) is None
    # The state file edited after it was written: what is built from it refuses it.
    pl.read_parquet(partition_dir(lake, DAY) / DATA_FILE).head(1).write_parquet(
        partition_dir(lake, DAY) / DATA_FILE
    )
    assert "changed after it was written" in (catalog_problem(lake, DAY) or "")


def test_no_catalog_is_an_empty_state_that_passes(tmp_path: Path) -> None:
    result = update(tmp_path, DAY)
    assert (result.record["items"], result.record["passed"], result.record["missing_share"]) == (0, True, 0.0)
    assert read_catalog(tmp_path / "lake", DAY).num_rows == 0


# ------------------------------------------------------------------------------------------ import


@pytest.fixture(scope="module")
def movies_csv() -> Path:
    found = shared_data_dir()
    if found is None:
        pytest.skip("shared data sets not found: set RECSYS_SHARED_DATA")
    return found / "ml-latest-small" / "movies.csv"


def test_movielens_movies_become_the_tenants_catalog(movies_csv: Path, tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    report = import_file(movies_csv, raw, tenant="ml", catalog_day=DAY)
    assert (report.format, report.feed, report.events_written, report.undated_lines) == (
        "movies",
        "catalog",
        9742,
        0,
    )
    (path,) = report.files
    assert path.parent == landing_dir(raw, DAY)

    # Independent expectation, straight from the CSV.
    with open(movies_csv, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    result = update(tmp_path, DAY)
    assert result.record["items"] == len(rows) == 9742 and result.day_landing["quarantined"] == 0
    state = state_rows(tmp_path, DAY)
    toy_story = state[("ml", "1")]
    assert toy_story["title"] == "Toy Story"
    assert toy_story["categories"] == ["Adventure", "Animation", "Children", "Comedy", "Fantasy"]
    assert json.loads(toy_story["attributes"]) == {"year": 1995}
    assert toy_story["updated_at"] == dt.datetime(2024, 5, 2, tzinfo=dt.UTC)
    for row in rows:
        item = state[("ml", row["movieId"])]
        genres = [] if row["genres"] == "(no genres listed)" else row["genres"].split("|")
        assert item["categories"] == genres
        year = re.search(r"\((\d{4})\)\s*$", row["title"])
        assert json.loads(item["attributes"]) == ({"year": int(year[1])} if year else {})
    assert sum(not item["categories"] for item in state.values()) == 34
    assert state[("ml", "7789")]["title"] == "11'09\"01 - September 11"  # quoted CSV field with a comma
    no_year = next(row["movieId"] for row in rows if row["title"] == "Babylon 5")
    assert (state[("ml", no_year)]["title"], state[("ml", no_year)]["attributes"]) == ("Babylon 5", "{}")

    # Same input, same file; importing again changes nothing.
    first = path.read_bytes()
    again = import_file(movies_csv, raw, tenant="ml", catalog_day=DAY)
    assert again.files == report.files and path.read_bytes() == first
    assert sorted(p.name for p in landing_dir(raw, DAY).iterdir()) == [path.name]
    other = import_file(movies_csv, tmp_path / "other", tenant="ml", catalog_day=DAY)
    assert other.files[0].read_bytes() == first
    with pytest.raises(ValueError, match="--tenant"):
        import_file(movies_csv, raw, catalog_day=DAY)


def test_catalog_jsonl_is_recognised_and_copied_verbatim(tmp_path: Path) -> None:
    source = tmp_path / "items.jsonl"
    lines = [item_line({k: v for k, v in record("a").items() if k != "tenant"}), item_line(record("b"))]
    source.write_bytes(b"".join([*lines, b"not json\n"]))
    report = import_file(source, tmp_path / "raw", tenant="shop", catalog_day=DAY)
    assert (report.format, report.events_written, report.undated_lines) == ("catalog", 2, 1)
    written = report.files[0].read_bytes().splitlines()
    assert written[0] == b'{"tenant":"shop",' + lines[0][1:].rstrip(b"\n")  # the missing tenant spliced in
    assert written[1:] == [lines[1].rstrip(b"\n"), b"not json"]


def test_the_default_catalog_day_is_the_first_day_events_landed(tmp_path: Path) -> None:
    raw, today = tmp_path / "raw", dt.date(2026, 1, 1)
    assert default_catalog_day(raw, today) == (today, "today: no events have landed yet")
    for day in ("2018-09-24", "2018-09-20"):
        (raw / f"dt={day}").mkdir(parents=True)
        (raw / f"dt={day}" / "e.jsonl").write_text("{}\n")
    (raw / "dt=2018-01-01").mkdir()  # an empty folder is not a landed day
    day, why = default_catalog_day(raw, today)
    assert day == dt.date(2018, 9, 20) and "first day events landed" in why


# ------------------------------------------------------------------------------------------ content


def test_items_sharing_categories_and_tags_are_the_nearest() -> None:
    items = pl.DataFrame(
        {
            "item_id": ["boot", "sneaker", "sandal", "laptop", "phone", "cable"],
            "title": ["Leather boot", "Running sneaker", "Beach sandal", "Laptop 14", "Phone X", "USB cable"],
            "categories": [["shoes"], ["shoes"], ["shoes"], ["tech"], ["tech"], ["tech"]],
            "tags": [["winter", "leather"], ["sport"], ["summer"], ["work"], ["work"], []],
        }
    )
    neighbors = content_neighbors(items, top_k=2)
    top = {item: group["neighbor_id"].to_list() for (item,), group in neighbors.group_by("item_id")}
    assert set(top["boot"]) == {"sneaker", "sandal"}
    assert top["laptop"][0] == "phone" and top["phone"][0] == "laptop"  # category and tag in common
    assert set(top["cable"]) == {"laptop", "phone"}
    # Ranks from 1, scores falling, ties by item id; nobody is their own neighbour.
    boot = neighbors.filter(pl.col("item_id") == "boot")
    assert boot["rank"].to_list() == [1, 2] and boot["neighbor_id"].to_list() == ["sandal", "sneaker"]
    assert (neighbors["item_id"] != neighbors["neighbor_id"]).all()
    assert (neighbors["score"] > 0).all() and (neighbors["score"] <= 1).all()
    # Shuffled input, same rows.
    assert content_neighbors(items.reverse(), top_k=2).equals(neighbors)
    assert item_features("The Matrix (1999)", ["Sci-Fi"], ["cult"]) == [
        "category:sci-fi",
        "tag:cult",
        "title:matrix",
        "title:1999",
    ]


# ------------------------------------------------------------------------------------------ pipeline


def test_recsys_run_publishes_content_once_a_catalog_has_landed(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from recsys_cli import cli
    from recsys_core.manifest import read_current, resolve_uri

    end = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)

    def recsys(*args: object) -> int:
        return cli.main([str(a) for a in args])

    generate = (
        "generate",
        "--end",
        end,
        "--days",
        2,
        "--events-per-day",
        2000,
        "--users",
        200,
        "--items",
        120,
    )
    assert recsys(*generate) == 0
    # Without a catalog: published without content, nothing fails.
    assert recsys("run", "--start", end - dt.timedelta(days=1), "--end", end, "--quiet") == cli.EXIT_OK
    manifest = read_current(home / "artifacts", "demo", "home")
    assert manifest is not None and "content" not in manifest["current"]

    # A catalog of the items the events name, every fifth one unavailable, two categories.
    items = sorted(
        {
            json.loads(line)["item_id"]
            for path in (home / "raw").glob("dt=*/*.jsonl")
            for line in path.read_text().splitlines()
        }
    )
    source = tmp_path / "items.jsonl"
    source.write_bytes(
        b"".join(
            item_line(
                {
                    k: v
                    for k, v in record(item, categories=[f"c{n % 2}"], available=n % 5 != 0).items()
                    if k != "tenant"
                }
            )
            for n, item in enumerate(items)
        )
    )
    capsys.readouterr()
    assert recsys("import", "--tenant", "demo", source) == cli.EXIT_OK
    first_day = end - dt.timedelta(days=1)
    assert f"catalog landing day {first_day}: the first day events landed" in capsys.readouterr().out
    assert recsys("run", "--start", end, "--end", end, "--quiet") == cli.EXIT_OK

    manifest = read_current(home / "artifacts", "demo", "home")
    assert manifest is not None and "content" in manifest["current"]
    folder = resolve_uri(home / "artifacts", "demo", "home", manifest["current"]["content"])
    neighbors = pl.read_parquet(folder / "neighbors.parquet")
    unavailable = {item for n, item in enumerate(items) if n % 5 == 0}
    assert set(neighbors["item_id"]) == set(items) - unavailable
    assert not set(neighbors["neighbor_id"]) & unavailable
    category = {item: n % 2 for n, item in enumerate(items)}
    assert all(category[a] == category[b] for a, b in neighbors.select("item_id", "neighbor_id").iter_rows())
    assert neighbors.height == len(set(items) - unavailable) * 20
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["rows"]["neighbors.parquet"] == neighbors.height
    # What the server filters and diversifies by: every item, its availability, and a vector per item.
    table = pl.read_parquet(folder / "items.parquet")
    assert table["item_id"].to_list() == sorted(items)
    assert set(table.filter(~pl.col("available"))["item_id"]) == unavailable
    indptr = np.load(folder / "vector_indptr.npy")
    assert len(indptr) == len(items) + 1
    lengths = dict(zip(table["item_id"], np.diff(indptr).tolist(), strict=True))
    assert all((lengths[item] == 0) == (item in unavailable) for item in items)
    assert meta["inputs"]["catalog"]["day"] == end.isoformat() and meta["params"]["top_k"] == 20

    # The same input again: the same content version, and so nothing new to publish.
    assert recsys("run", "--start", end, "--end", end, "--quiet") == cli.EXIT_OK
    again = read_current(home / "artifacts", "demo", "home")
    assert again is not None and again["manifest_version"] == manifest["manifest_version"]
