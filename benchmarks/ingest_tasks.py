"""Child-process side of the ingest benchmark (see `benchmarks.child`).

Both measured tasks import the same modules here, so their peak RSS carries the same fixed overhead.
"""

from __future__ import annotations

import datetime as dt
import resource
from pathlib import Path

import polars as pl

from benchmarks.harness import run_recsys
from recsys_core.settings import ChecksConfig, IngestConfig
from recsys_dagster.ingest import contract
from recsys_dagster.ingest.canonicalize import canonicalize_partition
from recsys_dagster.ingest.gates import run_gates
from recsys_dagster.ingest.generate import generate_events


def generate(params: dict) -> dict:
    """One arrival day of `size` synthetic events under `raw_root`."""
    report = generate_events(
        Path(params["raw_root"]),
        end_date=dt.date.fromisoformat(params["day"]),
        days=1,
        events_per_day=params["size"],
        seed=params["seed"],
    )
    return {
        "files": len(report.files),
        "total_events": report.total_events,
        "duplicate_lines": report.duplicate_lines,
        "late_events": report.late_events,
    }


def baseline(params: dict) -> dict:
    """Bare polars parse-and-write: `read_ndjson` of every landing file, one `write_parquet`.

    The reader is given the contract's field types: without a schema it infers one from the first 100
    lines and silently drops fields first seen later (a purchase's `value`), i.e. parses less than recsys.
    """
    frames = [pl.read_ndjson(path, schema=contract.PARSED_SCHEMA) for path in params["files"]]
    frame = pl.concat(frames, how="vertical", rechunk=False)
    frame.write_parquet(Path(params["out_dir"]) / "part-00000.parquet", compression="zstd", statistics=True)
    return {"files": len(frames), "lines_read": frame.height, "rows_out": frame.height}


def recsys(params: dict) -> dict:
    """`canonicalize_partition` of the day with the default `IngestConfig`."""
    summary = canonicalize_partition(
        Path(params["raw_root"]),
        Path(params["lake_root"]),
        dt.date.fromisoformat(params["day"]),
        IngestConfig(),
    )
    return {
        "files": len(summary.files),
        "lines_read": summary.lines_read,
        "rows_out": summary.canonical_rows,
        "quarantined": summary.quarantined,
        "duplicates": summary.duplicates,
        "blank_lines": summary.blank_lines,
        "output_files": len(summary.output_files),
        "reconciled": summary.reconciled,
    }


def checks(params: dict) -> dict:
    """The blocking gates of the canonicalized day (`run_gates`), as the canonical_events asset runs them."""
    results = run_gates(
        Path(params["lake_root"]), dt.date.fromisoformat(params["day"]), IngestConfig(), ChecksConfig()
    )
    return {"gates": len(results), "passed": all(r.passed for r in results if r.blocking)}


def whole_run(params: dict) -> dict:
    """`recsys run --start DAY --select key:canonical_events --quiet` as a user runs it, in its own process:
    start-up, the Dagster run and its events, canonicalization and the checks (the day re-materialized
    when it already is)."""
    variables = {"RECSYS_HOME": params["home"], "RECSYS_RAW_ROOT": params["raw_root"]}
    day = params["day"]
    run_recsys(
        variables | {"RECSYS_START_DATE": day},
        "run",
        "--start",
        day,
        "--select",
        "key:canonical_events",
        "--quiet",
    )
    return {"peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}
