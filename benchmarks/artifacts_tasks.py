"""Child-process side of the co-occurrence and daily-run benchmarks (see `benchmarks.child`).

Every task imports the same modules (polars, DuckDB, implicit and the pipeline), so the peak RSS of every
measured process carries the same fixed overhead. Settings come from the `env` dict of the parameters, never from
the process environment, so a developer's RECSYS_* variables cannot leak into a measurement.

Measured tasks are `@guarded`: given `memory_limit_mib` and `guard_file`, a watchdog thread stops the
process (exit code GUARD_EXIT) as soon as its resident memory exceeds the limit, after writing to
`guard_file` what it saw and which steps had finished. A step that blows up then becomes a reported
result instead of the kernel's OOM killer picking a victim on a shared machine.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import duckdb
import implicit.cpu.als  # noqa: F401  (the library's import cost, paid here so that it is not timed)
import numpy as np
import polars as pl

from benchmarks.harness import fit_bare_als
from recsys_core.kinds import KINDS
from recsys_core.lake import partition_dir
from recsys_core.settings import Settings, load_settings
from recsys_dagster.evaluation import offline
from recsys_dagster.evaluation.offline import evaluate_day
from recsys_dagster.ingest.canonicalize import canonicalize_partition
from recsys_dagster.ingest.gates import run_gates
from recsys_dagster.ingest.generate import generate_events
from recsys_dagster.publishing.release import publish_as_of, write_build_record
from recsys_dagster.transform import als as als_trainer
from recsys_dagster.transform import artifact_dir
from recsys_dagster.transform import artifacts as window_artifacts
from recsys_dagster.transform.aggregates import (
    DAILY_MODELS,
    build_daily_aggregate,
    build_daily_aggregates,
    daily_aggregate_params,
)
from recsys_dagster.transform.als import interaction_matrix
from recsys_dagster.transform.artifacts import build_window_artifacts, compute_window

# DuckDB's default thread count, which `recsys_dagster.transform.sql.run_sql` uses too (it sets none). Read at
# import, i.e. outside the timed call.
DUCKDB_THREADS = int(duckdb.connect().execute("SELECT current_setting('threads')").fetchone()[0])
POLARS_THREADS = pl.thread_pool_size()


GUARD_EXIT = 86
GUARD_POLL_SECONDS = 0.05
# What the running task is doing, for the memory guard's report.
_progress: dict = {"step": None, "done": {}}


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _start_guard(params: dict) -> None:
    limit_mib, guard_file = params.get("memory_limit_mib"), params.get("guard_file")
    if not limit_mib or not guard_file or _rss_bytes() is None:
        return
    limit, started = limit_mib * 2**20, time.perf_counter()

    def watch() -> None:
        while True:
            rss = _rss_bytes() or 0
            if rss > limit:
                report = {
                    "rss_mib": rss / 2**20,
                    "limit_mib": limit_mib,
                    "seconds": time.perf_counter() - started,
                    "step": _progress["step"],
                    "done": dict(_progress["done"]),
                }
                Path(guard_file).write_text(json.dumps(report))
                print(
                    f"[guard] stopped: resident memory {rss / 2**20:,.0f} MiB > {limit_mib:,} MiB", flush=True
                )
                os._exit(GUARD_EXIT)
            time.sleep(GUARD_POLL_SECONDS)

    threading.Thread(target=watch, name="memory-guard", daemon=True).start()


def guarded(task: Callable[[dict], dict]) -> Callable[[dict], dict]:
    @functools.wraps(task)
    def run(params: dict) -> dict:
        _start_guard(params)
        return task(params)

    return run


def _step(name: str, call: Callable[[], object]) -> object:
    """Run one step, recording it for the guard; returns the step's result."""
    _progress["step"] = name
    started = time.perf_counter()
    result = call()
    _progress["done"][name] = time.perf_counter() - started
    _progress["step"] = None
    return result


def _settings(params: dict) -> Settings:
    return load_settings(params["env"])


def _days(params: dict) -> list[dt.date]:
    return [dt.date.fromisoformat(day) for day in params["days"]]


def _threads() -> dict:
    return {"duckdb_threads": DUCKDB_THREADS, "polars_threads": POLARS_THREADS}


# ------------------------------------------------------------------------------------ data preparation


def generate(params: dict) -> dict:
    """`days` arrival days of `events_per_day` synthetic events each, ending at `end_day`."""
    report = generate_events(
        Path(params["raw_root"]),
        end_date=dt.date.fromisoformat(params["end_day"]),
        days=params["days"],
        events_per_day=params["events_per_day"],
        seed=params["seed"],
        n_users=params["n_users"],
        n_items=params["n_items"],
    )
    return {"files": len(report.files), "total_events": report.total_events}


def prepare_days(params: dict) -> dict:
    """Canonicalize each day (and run its gates if asked), then build the listed daily aggregates of them all.

    With `generate` (the sizes and seed of `generate_events`), each day's landing files are generated first
    and removed once canonicalized, so that many days of events never sit on disk as JSON at once.
    """
    settings = _settings(params)
    generating = params.get("generate")
    rows = 0
    for day in _days(params):
        if generating:
            generate_events(settings.raw_root, end_date=day, days=1, **generating)
        summary = canonicalize_partition(settings.raw_root, settings.lake_root, day, settings.pipeline.ingest)
        if not summary.reconciled:
            raise RuntimeError(f"{day}: canonicalization did not reconcile: {summary.to_json()}")
        if generating:
            shutil.rmtree(settings.raw_root / f"dt={day.isoformat()}")
        rows += summary.canonical_rows
        if params["gates"]:
            results = run_gates(settings.lake_root, day, settings.pipeline.ingest, settings.pipeline.checks)
            failed = [r.name for r in results if r.blocking and not r.passed]
            if failed:
                raise RuntimeError(f"{day}: blocking gates failed: {failed}")
        print(f"[prepare] {day}: {summary.canonical_rows:,} canonical rows", flush=True)
    for model in params["models"]:
        build_daily_aggregates(
            model, settings.lake_root, _days(params), daily_aggregate_params(model, settings.pipeline)
        )
    return {"canonical_rows": rows}


# ------------------------------------------------------------------------------- co-occurrence tasks

# The query a competent engineer would write straight on the canonical events of the window: the distinct
# items of each session (interest events only), every pair within a session counted once per session,
# cosine-normalised by the sessions of each item, the top $top_k neighbours of each item. Same minimum
# support, ranking tie-breaks and output columns and order as the recsys artifact, so both sides produce the
# same table; unlike recsys it needs no per-day intermediate and does not cap long sessions.
BASELINE_SQL = """
COPY (
    WITH session_items AS (
        SELECT DISTINCT tenant, surface, session_id, item_id
        FROM read_parquet({paths})
        WHERE event_type IN ({event_types})
    ),
    item_sessions AS (
        SELECT tenant, surface, item_id, count(*) AS n
        FROM session_items
        GROUP BY ALL
    ),
    pairs AS (
        SELECT a.tenant, a.surface, a.item_id AS item_a, b.item_id AS item_b, count(*) AS c
        FROM session_items AS a
        JOIN session_items AS b
          ON a.tenant = b.tenant AND a.surface = b.surface AND a.session_id = b.session_id
         AND a.item_id < b.item_id
        GROUP BY ALL
        HAVING count(*) >= {min_support}
    ),
    scored AS (
        SELECT p.tenant, p.surface, p.item_a, p.item_b, p.c, p.c / sqrt(na.n * nb.n) AS score
        FROM pairs AS p
        JOIN item_sessions AS na ON p.tenant = na.tenant AND p.surface = na.surface AND p.item_a = na.item_id
        JOIN item_sessions AS nb ON p.tenant = nb.tenant AND p.surface = nb.surface AND p.item_b = nb.item_id
    ),
    directed AS (
        SELECT tenant, surface, item_a AS item_id, item_b AS neighbor_id, score, c AS count FROM scored
        UNION ALL
        SELECT tenant, surface, item_b AS item_id, item_a AS neighbor_id, score, c AS count FROM scored
    )
    SELECT
        tenant,
        surface,
        item_id,
        row_number() OVER (
            PARTITION BY tenant, surface, item_id ORDER BY score DESC, count DESC, neighbor_id
        ) AS rank,
        neighbor_id,
        score,
        count
    FROM directed
    QUALIFY rank <= {top_k}
    ORDER BY tenant, surface, item_id, rank
) TO {out} (FORMAT parquet, COMPRESSION zstd)
"""


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def baseline_sql(paths: list[str], event_types: list[str], min_support: int, top_k: int, out: str) -> str:
    return BASELINE_SQL.format(
        paths="[" + ", ".join(_literal(p) for p in paths) + "]",
        event_types=", ".join(_literal(t) for t in event_types),
        min_support=int(min_support),
        top_k=int(top_k),
        out=_literal(out),
    )


@guarded
def cooc_baseline(params: dict) -> dict:
    """The bare DuckDB statement over the window's canonical Parquet files, written to one Parquet file."""
    settings = _settings(params)
    cooc = settings.pipeline.artifacts.cooc
    paths = sorted(
        str(p)
        for day in _days(params)
        for p in partition_dir(settings.lake_root, "canonical_events", day).glob("*.parquet")
    )
    sql = baseline_sql(
        paths, list(settings.pipeline.interest_weights()), cooc.min_support, cooc.top_k, params["out"]
    )
    con = duckdb.connect(":memory:")
    try:
        rows = con.execute(sql).fetchone()[0]
    finally:
        con.close()
    return {"rows": rows, "input_files": len(paths)} | _threads()


@guarded
def cooc_recsys(params: dict) -> dict:
    """recsys: pair_daily of `build_days` (one batched build, as a backfill run does), then the cooc window
    artifact as of the last window day from the window's pair_daily partitions; each step timed."""
    settings = _settings(params)
    lake = settings.lake_root
    as_of = dt.date.fromisoformat(params["as_of"])
    params_ = daily_aggregate_params("pair_daily", settings.pipeline)
    built = _step(
        "pair_daily",
        lambda: build_daily_aggregates(
            "pair_daily", lake, [dt.date.fromisoformat(d) for d in params["build_days"]], params_
        ),
    )

    def window() -> list:
        builds = build_window_artifacts("cooc", lake, settings.artifact_root, as_of, settings.pipeline)
        write_build_record(lake, "cooc", as_of, builds)
        return builds

    builds = _step("cooc", window)
    return {
        "steps": dict(_progress["done"]),
        "pair_daily_rows": sum(b["rows"] for b in built),
        "rows": sum(b.rows for b in builds),
        "paths": [str(b.path / "neighbors.parquet") for b in builds],
        "missing_days": sorted({d for b in builds for d in b.missing_days}),
    } | _threads()


# ------------------------------------------------------------------------------------ daily-run task


@guarded
def daily_run(params: dict) -> dict:
    """One day's incremental run, each step timed: canonicalize, gates, the three daily aggregates, the
    four window artifacts (with their build records), the evaluation and publish.

    The evaluation is split in two steps: `evaluation_build`, its rebuild of every kind as of D minus the
    held-out days (the calls of `build_window_artifacts` it makes, timed by wrapping the function it looks
    up), and `evaluation`, the rest (loading, scoring through the served ranking, guardrails, report)."""
    settings = _settings(params)
    day = dt.date.fromisoformat(params["day"])
    pipeline, lake = settings.pipeline, settings.lake_root

    summary = _step(
        "canonicalize", lambda: canonicalize_partition(settings.raw_root, lake, day, pipeline.ingest)
    )
    results = _step("gates", lambda: run_gates(lake, day, pipeline.ingest, pipeline.checks))
    for model in DAILY_MODELS:
        params_ = daily_aggregate_params(model, pipeline)
        _step(model, lambda model=model, params_=params_: build_daily_aggregate(model, lake, day, params_))
    artifacts: dict[str, dict] = {}
    for kind in KINDS:

        def build(kind: str = kind) -> list:
            builds = build_window_artifacts(kind, lake, settings.artifact_root, day, pipeline)
            write_build_record(lake, kind, day, builds)
            return builds

        builds = _step(kind, build)
        artifacts[kind] = {
            "rows": sum(b.rows for b in builds),
            "days_used": params["window_days"] - len(builds[0].missing_days) if builds else 0,
        }
    rebuild: dict[str, float] = {}
    offline.build_window_artifacts = _timed(build_window_artifacts, "evaluation_build", rebuild)
    evaluations = _step("evaluation", lambda: evaluate_day(settings, day))
    _progress["done"]["evaluation"] -= rebuild.get("evaluation_build", 0.0)
    _progress["done"]["evaluation_build"] = rebuild.get("evaluation_build", 0.0)
    outcomes = _step("publish", lambda: publish_as_of(settings, day))
    return {
        "steps": dict(_progress["done"]),
        "canonical_rows": summary.canonical_rows,
        "failed_gates": [r.name for r in results if r.blocking and not r.passed],
        "artifacts": artifacts,
        "evaluation": [
            {
                "passed": e.passed,
                "note": e.note,
                "users": e.result.users.get("all", 0) if e.result is not None else 0,
                "models": len(e.result.models) if e.result is not None else 0,
            }
            for e in evaluations
        ],
        "publish": [o.outcome.action for o in outcomes],
    } | _threads()


# ------------------------------------------------------------------------------------------ ALS tasks


def _array_sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array, dtype=np.float32).tobytes()).hexdigest()


@guarded
def als_baseline(params: dict) -> dict:
    """A bare `implicit` fit on the matrix the als artifact trains on.

    Untimed (`fit_seconds` and `cpu_seconds`, the CPU time of all its threads, cover the fit only): the window's SQL rows (`compute_window`, the artifact's own
    query) and their CSR matrix (`interaction_matrix`). Timed: the model and its fit, with the artifact's
    parameters and BLAS held to one thread, as the trainer does.
    """
    settings = _settings(params)
    config = settings.pipeline.artifacts.als
    frame, _, _ = compute_window(
        "als", settings.lake_root, dt.date.fromisoformat(params["as_of"]), settings.pipeline
    )
    if frame.select("tenant", "surface").unique().height != 1:
        raise RuntimeError("the als benchmark expects one tenant and surface")
    _, _, matrix = interaction_matrix(frame, config.confidence)
    # The library called directly, as the trainer (`als.fit_factors`) calls it: no recsys code is timed here.
    started, cpu_started = time.perf_counter(), time.process_time()
    model = fit_bare_als(matrix, config)
    fit_seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    return {
        "fit_seconds": fit_seconds,
        "cpu_seconds": cpu_seconds,
        "users": matrix.shape[0],
        "items": matrix.shape[1],
        "nnz": int(matrix.nnz),
        "factors_sha256": {
            "user_factors.npy": _array_sha256(model.user_factors),
            "item_factors.npy": _array_sha256(model.item_factors),
        },
    } | _threads()


# Where the als build spends its time: the module-level functions it calls, replaced by timed wrappers
# (each is looked up by name when called, so the wrapper is what runs). Whatever is not listed is "other".
ALS_STEPS = (
    (window_artifacts, "run_sql", "sql"),
    (window_artifacts, "_scopes", "scopes"),
    (window_artifacts, "_split_by_scope", "split"),
    (als_trainer, "interaction_matrix", "matrix"),
    (als_trainer, "fit_factors", "fit"),
    (artifact_dir, "_write_file", "write"),
    (artifact_dir, "fsync_file", "fsync"),
    (artifact_dir, "file_sha256", "hash"),
)


def _timed(function: Callable, step: str, spent: dict[str, float]) -> Callable:
    @functools.wraps(function)
    def run(*args, **kwargs):
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            spent[step] = spent.get(step, 0.0) + time.perf_counter() - started

    return run


@guarded
def als_recsys(params: dict) -> dict:
    """`build_window_artifacts("als", ...)` as of `as_of` into an empty artifact root, its steps timed."""
    settings = _settings(params)
    spent: dict[str, float] = {}
    for module, name, step in ALS_STEPS:
        setattr(module, name, _timed(getattr(module, name), step, spent))
    started, cpu_started = time.perf_counter(), time.process_time()
    builds = build_window_artifacts(
        "als",
        settings.lake_root,
        settings.artifact_root,
        dt.date.fromisoformat(params["as_of"]),
        settings.pipeline,
    )
    cpu_seconds = time.process_time() - cpu_started
    spent["other"] = time.perf_counter() - started - sum(spent.values())
    (build,) = builds
    return {
        "steps": spent,
        "cpu_seconds": cpu_seconds,
        "version": build.version,
        "path": str(build.path),
        "missing_days": list(build.missing_days),
    } | _threads()
