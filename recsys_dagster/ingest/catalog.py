"""The item catalog as of a day: land the day's catalog records, then fold every landed update into the
latest state of each item.

`update_catalog` is what the `catalog` asset runs for day D:

1. land `raw/catalog/dt=D/*.jsonl` into `lake/catalog_updates/dt=D/` (quarantine, repeats, reconciliation:
   `recsys_dagster.ingest.landing.land_lines`); an earlier landing folder that was never landed, or whose
   files changed since (a snapshot imported into a past day), is landed too, so the state never misses an
   update whatever days were run before;
2. the state: of all updates landed on days <= D, per (tenant, item_id) the one with the latest
   `updated_at`; a tie goes to the update landed last (later day, then later file name, then later line).
   An update with `available: false` keeps the item, as unavailable. When the state as of D - 1 was folded
   from exactly the landings before D as they are now, it is folded with D's updates only;
3. the figures its checks judge: whether every landing used reconciles, whether (tenant, item_id) is
   unique in the written state, and how many of the items seen in the day's canonical events (of tenants
   that have a catalog) the catalog lacks.

The state partition records them in `_summary.json` with the SHA-256 of its file, so that what is built
from it (the content artifact) can confirm it used passed, unmodified data. Nothing here imports Dagster.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from recsys_core.catalog import (
    DATA_FILE,
    QUARANTINE,
    STATE_SCHEMA,
    UPDATES,
    UPDATES_SCHEMA,
    CatalogRecord,
    catalog_problem,
    landing_days,
    landing_dir,
    parse_item,
    partition_dir,
    read_catalog,
    read_catalog_record,
    record_key,
)
from recsys_core.lake import SUMMARY_FILE, parquet_files, read_json_record
from recsys_core.lake import partition_dir as lake_partition_dir
from recsys_core.storage import file_sha256, fsync_file, replace_dir, write_atomic
from recsys_dagster.ingest.landing import land_lines, landing_files


@dataclass(frozen=True)
class CatalogDay:
    """What `update_catalog` did for one day."""

    record: CatalogRecord
    landings: dict[str, dict[str, Any]]  # the landing summaries of `landed_now`, by day

    @property
    def day_landing(self) -> dict[str, Any]:
        """The landing summary of the day itself."""
        return self.landings[self.record["day"]]


def land_catalog(
    raw_root: Path, lake_root: Path, day: dt.date, max_line_bytes: int, max_clock_skew: dt.timedelta
) -> dict[str, Any]:
    """Land day `day`'s catalog files; returns the summary also written to `_summary.json` (the landed
    records are counted as `updates`)."""
    return land_lines(
        landing_files(landing_dir(raw_root, day)),
        partition_dir(lake_root, day, UPDATES),
        partition_dir(lake_root, day, QUARANTINE),
        day=day,
        schema=UPDATES_SCHEMA,
        parse=lambda line: parse_item(line, day, max_line_bytes, max_clock_skew),
        key=record_key,
        rows_name="updates",
        max_line_bytes=max_line_bytes,
        data_file=DATA_FILE,
    )


def update_catalog(
    raw_root: Path,
    lake_root: Path,
    day: dt.date,
    *,
    max_line_bytes: int,
    max_clock_skew: dt.timedelta,
) -> CatalogDay:
    """Land day `day` (and any earlier landing folder not landed as it is now) and write the catalog state
    as of `day` with its figures; see the module docstring."""
    landings: dict[str, dict[str, Any]] = {}
    summaries: dict[str, dict[str, Any]] = {}
    for landing_day in landing_days(raw_root, day):
        summary = None if landing_day == day else _landing_summary(lake_root, landing_day, raw_root)
        if summary is None:
            summary = land_catalog(raw_root, lake_root, landing_day, max_line_bytes, max_clock_skew)
            landings[landing_day.isoformat()] = summary
        summaries[landing_day.isoformat()] = summary
    # A day without a landing folder received nothing: its landing is empty, and nothing is written for it.
    landings.setdefault(day.isoformat(), _empty_landing(day))
    inputs = {landing: _fingerprint(summary) for landing, summary in summaries.items()}
    previous = _previous_state(lake_root, day, inputs)
    state = fold_updates(
        lake_root,
        [dt.date.fromisoformat(d) for d in inputs if previous is None or d == day.isoformat()],
        previous,
    )
    target = partition_dir(lake_root, day)
    stage = target.with_name(f".stage-{target.name}-{uuid.uuid4().hex[:8]}")
    try:
        stage.mkdir(parents=True)
        pq.write_table(state, stage / DATA_FILE, compression="zstd")
        fsync_file(stage / DATA_FILE)
        written = pl.read_parquet(stage / DATA_FILE, columns=["tenant", "item_id", "available"])
        event_items, missing = _missing_items(lake_root, day, written)
        duplicate_keys = written.height - written.select("tenant", "item_id").n_unique()
        reconciled = all(summary["reconciled"] for summary in summaries.values())
        record: CatalogRecord = {
            "day": day.isoformat(),
            "items": written.height,
            "available_items": int(written["available"].sum()),
            "tenants": dict(sorted(Counter(written["tenant"].to_list()).items())),
            "inputs": inputs,
            "landed_now": sorted(landings),
            "from_previous_day": previous is not None,
            "reconciled": reconciled,
            "duplicate_keys": duplicate_keys,
            "event_items": event_items,
            "missing_items": missing,
            "missing_share": missing / event_items if event_items else 0.0,
            "sha256": file_sha256(stage / DATA_FILE),
            "passed": reconciled and duplicate_keys == 0,
        }
        write_atomic(stage / SUMMARY_FILE, (json.dumps(record, indent=2) + "\n").encode())
        replace_dir(stage, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return CatalogDay(record=record, landings=landings)


def _empty_landing(day: dt.date) -> dict[str, Any]:
    """The landing summary of a day without a landing folder."""
    return {
        "day": day.isoformat(),
        "files": [],
        "lines_read": 0,
        "updates": 0,
        "quarantined": 0,
        "duplicates": 0,
        "blank_lines": 0,
        "reasons": {},
        "reconciled": True,
    }


def _fingerprint(summary: dict[str, Any]) -> str:
    """What identifies a landing: its summary names its files (never changed once landed) and counts."""
    return hashlib.sha256(json.dumps(summary, sort_keys=True).encode()).hexdigest()


def _previous_state(lake_root: Path, day: dt.date, inputs: dict[str, str]) -> pa.Table | None:
    """The state as of the day before, when it was folded from exactly the landings before `day` as they
    are now and its file is unmodified: then the state as of `day` is that state plus the day's updates
    (a daily run costs the day's updates, not the whole history). None otherwise."""
    before = day - dt.timedelta(days=1)
    record = read_catalog_record(lake_root, before)
    expected = {landing: fingerprint for landing, fingerprint in inputs.items() if landing < day.isoformat()}
    if record is None or record.get("inputs") != expected or catalog_problem(lake_root, before) is not None:
        return None
    return read_catalog(lake_root, before)


def _landing_summary(lake_root: Path, day: dt.date, raw_root: Path) -> dict[str, Any] | None:
    """The landing summary of `day` if its partition was landed from the files its folder holds now."""
    summary = read_json_record(partition_dir(lake_root, day, UPDATES) / SUMMARY_FILE)
    if summary is None or not (partition_dir(lake_root, day, UPDATES) / DATA_FILE).is_file():
        return None
    if summary.get("files") != [path.name for path in landing_files(landing_dir(raw_root, day))]:
        return None
    return summary


def fold_updates(lake_root: Path, days: list[dt.date], base: pa.Table | None = None) -> pa.Table:
    """The latest update of every (tenant, item_id) among `base` (a state folded before, whose rows were
    all landed before `days`) and the updates landed on `days`, sorted by tenant and item_id, in
    STATE_SCHEMA."""
    columns = [*STATE_SCHEMA.names, "source_file", "source_line"]
    frames = [
        pl.read_parquet(partition_dir(lake_root, d, UPDATES) / DATA_FILE)
        .with_columns(landed_on=pl.lit(d))
        .select(columns)
        for d in days
    ]
    if base is not None:
        state = cast(pl.DataFrame, pl.from_arrow(base))
        frames.insert(0, state.with_columns(source_file=pl.lit(""), source_line=pl.lit(0, pl.Int64)))
    if not frames:
        return STATE_SCHEMA.empty_table()
    latest = (
        pl.concat(frames)
        .sort(["tenant", "item_id", "updated_at", "landed_on", "source_file", "source_line"])
        .unique(subset=["tenant", "item_id"], keep="last", maintain_order=True)
        .select(STATE_SCHEMA.names)
    )
    return latest.to_arrow().cast(STATE_SCHEMA)


def _missing_items(lake_root: Path, day: dt.date, state: pl.DataFrame) -> tuple[int, int]:
    """(distinct items in canonical_events of `day` of the tenants the catalog has, how many of them the
    catalog lacks)."""
    files = parquet_files(lake_partition_dir(lake_root, "canonical_events", day))
    tenants = state["tenant"].unique()
    if not files or tenants.is_empty():
        return 0, 0
    seen = (
        pl.scan_parquet(files)
        .select("tenant", "item_id")
        .filter(pl.col("tenant").is_in(tenants.implode()))
        .unique()
        .collect()
    )
    missing = seen.join(state.select("tenant", "item_id"), on=["tenant", "item_id"], how="anti")
    return seen.height, missing.height
