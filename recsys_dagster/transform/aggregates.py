"""Daily aggregates: one SQL model of dbt_like_sql/ applied to canonical_events partitions.

A range of days is built with one query per batch of up to `DAYS_PER_QUERY` days (a backfill then pays
DuckDB's fixed costs once per batch instead of once per day, and bounds memory by the batch); the result is
split by its `day` column and each day's partition is replaced atomically. Building days one at a time or in
one batch writes byte-identical files: every model orders its rows by day first, then by its keys.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from recsys_core.lake import AGGREGATE_FILE, parquet_files, partition_dir
from recsys_core.settings import PipelineConfig
from recsys_core.storage import files_sha256, replace_file
from recsys_dagster.transform.lineage import write_aggregate_lineage
from recsys_dagster.transform.sql import run_sql

DAYS_PER_QUERY = 7


@dataclass(frozen=True)
class DailyAggregate:
    """One daily aggregate: the SQL model `dbt_like_sql/<name>.sql` over a day's canonical events."""

    name: str
    description: str
    # The model's parameters besides `paths`, from the configuration.
    params: Callable[[PipelineConfig], dict[str, Any]]


DAILY_AGGREGATES: Mapping[str, DailyAggregate] = {
    aggregate.name: aggregate
    for aggregate in (
        DailyAggregate(
            "item_daily",
            "Per item and event type: events, events counted by their value (event_value_scales), distinct "
            "sessions and users, last event time.",
            lambda config: {"value_scales": config.value_scale_rows()},
        ),
        DailyAggregate(
            "pair_daily",
            "Session co-occurrence pair counts (sessions capped at artifacts.cooc.max_session_items "
            "distinct items), with per-item and total session counts for normalisation.",
            lambda config: {
                "event_types": list(config.interest_weights()),
                "max_session_items": config.artifacts.cooc.max_session_items,
            },
        ),
        DailyAggregate(
            "user_item_daily",
            "Per known user and item: event-type-weighted interactions (scaled by value where "
            "event_value_scales says), event count, last event time.",
            lambda config: {
                "weights": config.interest_weight_rows(),
                "value_scales": config.value_scale_rows(),
            },
        ),
    )
}
DAILY_MODELS: tuple[str, ...] = tuple(DAILY_AGGREGATES)


def daily_aggregate_params(model: str, config: PipelineConfig) -> dict[str, Any]:
    """The SQL parameters (besides `paths`) of a daily aggregate model."""
    if model not in DAILY_AGGREGATES:
        raise ValueError(f"unknown daily aggregate {model!r}: choose one of {', '.join(DAILY_MODELS)}")
    return DAILY_AGGREGATES[model].params(config)


def build_daily_aggregates(
    model: str, lake_root: Path, days: Iterable[dt.date], params: dict | None = None
) -> list[dict]:
    """Run `dbt_like_sql/<model>.sql` over canonical_events of `days` into lake/<model>/dt=<day>/.

    Returns, per day in the order given, the day, its row count, output path and the content hash of the
    canonical files it read, which is recorded beside the partition (`lineage.write_aggregate_lineage`).
    A day whose canonical partition has not been materialized fails the whole call before anything is
    written. This computes; whether the canonical input may be used is the caller's to confirm
    (`lineage.require_canonical`).
    """
    days = sorted(set(days))
    sources = {day: _canonical_files(lake_root, day) for day in days}
    # Hashed before they are read: the record names the content the query saw.
    hashes = {day: files_sha256(map(Path, sources[day]), with_names=True) for day in days}
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
            written = _write_partition(frame.filter(pl.col("day") == day), lake_root, model, day)
            write_aggregate_lineage(lake_root, model, day, hashes[day])
            built.append({"day": day, "canonical_hash": hashes[day]} | written)
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
