"""Daily aggregates: one SQL model of dbt_like_sql/ applied to one canonical_events partition."""

from __future__ import annotations

import datetime as dt
import os
import uuid
from pathlib import Path

from recsys_dagster.canonicalize import partition_dir
from recsys_dagster.sql import run_sql


def build_daily_aggregate(model: str, lake_root: Path, day: dt.date, params: dict | None = None) -> dict:
    """Run `dbt_like_sql/<model>.sql` over canonical_events of `day` into lake/<model>/dt=<day>/.

    The partition is replaced atomically (temp file, then rename). Returns row count and output path.
    """
    source = partition_dir(lake_root, "canonical_events", day)
    paths = sorted(str(p) for p in source.glob("*.parquet"))
    if not paths:
        raise FileNotFoundError(f"canonical_events partition {day} has not been materialized ({source})")
    frame = run_sql(model, {"paths": paths, "day": day.isoformat()} | (params or {}))
    target = partition_dir(lake_root, model, day)
    target.mkdir(parents=True, exist_ok=True)
    tmp = target / f".part-00000.parquet.{uuid.uuid4().hex[:8]}.tmp"
    frame.write_parquet(tmp, compression="zstd", statistics=True)
    os.replace(tmp, target / "part-00000.parquet")
    return {"rows": frame.height, "path": str(target / "part-00000.parquet")}
