"""Daily aggregates: one SQL model of dbt_like_sql/ applied to canonical_events partitions.

A range of days is built with one query per batch of up to `DAYS_PER_QUERY` days (a backfill then pays
DuckDB's fixed costs once per batch instead of once per day, and bounds memory by the batch); the result is
split by its `day` column and each day's partition is replaced atomically. Building days one at a time or in
one batch writes byte-identical files: every model orders its rows by day first, then by its keys.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable
from pathlib import Path

import polars as pl

from recsys_core.lake import AGGREGATE_FILE, parquet_files, partition_dir
from recsys_core.storage import replace_file
from recsys_dagster.transform.sql import run_sql

DAYS_PER_QUERY = 7


def build_daily_aggregates(
    model: str, lake_root: Path, days: Iterable[dt.date], params: dict | None = None
) -> list[dict]:
    """Run `dbt_like_sql/<model>.sql` over canonical_events of `days` into lake/<model>/dt=<day>/.

    Returns, per day in the order given, the day, its row count and output path. A day whose canonical
    partition has not been materialized fails the whole call before anything is written.
    """
    days = sorted(set(days))
    sources = {day: _canonical_files(lake_root, day) for day in days}
    built = []
    for start in range(0, len(days), DAYS_PER_QUERY):
        batch = days[start : start + DAYS_PER_QUERY]
        paths = [path for day in batch for path in sources[day]]
        frame = run_sql(model, {"paths": paths} | (params or {}))
        unexpected = set(frame["day"].unique().to_list()) - set(batch)
        if unexpected:
            # Only a `dt=` directory above the lake root could do this (DuckDB reads every `key=value`
            # level of the path as a hive partition column).
            raise ValueError(f"{model}: rows for days {sorted(unexpected)} from partitions of {batch}")
        for day in batch:
            built.append(
                {"day": day} | _write_partition(frame.filter(pl.col("day") == day), lake_root, model, day)
            )
    return built


def build_daily_aggregate(model: str, lake_root: Path, day: dt.date, params: dict | None = None) -> dict:
    """One day of `build_daily_aggregates`."""
    return build_daily_aggregates(model, lake_root, [day], params)[0]


def _canonical_files(lake_root: Path, day: dt.date) -> list[str]:
    source = partition_dir(lake_root, "canonical_events", day)
    paths = [str(p) for p in parquet_files(source)]
    if not paths:
        raise FileNotFoundError(f"canonical_events partition {day} has not been materialized ({source})")
    return paths


def _write_partition(frame: pl.DataFrame, lake_root: Path, model: str, day: dt.date) -> dict:
    target = partition_dir(lake_root, model, day)
    target.mkdir(parents=True, exist_ok=True)
    tmp = target / f".{AGGREGATE_FILE}.{uuid.uuid4().hex[:8]}.tmp"
    frame.write_parquet(tmp, compression="zstd", statistics=True)
    replace_file(tmp, target / AGGREGATE_FILE)
    return {"rows": frame.height, "path": str(target / AGGREGATE_FILE)}
