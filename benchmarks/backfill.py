"""Backfill benchmark: real rating history, many small days, through `recsys run` as a user runs it.

The MovieLens ratings are imported (`recsys import`, untimed) and the last BACKFILL_DAYS days of them are
run with `recsys run --start --end --quiet` in its own process on a fresh RECSYS_HOME: the wall time is what
a user waits. The split comes from the Dagster runs it recorded: each run's duration and events, and each
step's (asset's) duration. There is no bare-library baseline for a whole backfill; the sum of the steps
against the wall time shows what is work and what is overhead (start-up, run creation, events).
"""

from __future__ import annotations

import shutil

from benchmarks.harness import (
    Benchmark,
    BenchmarkError,
    Options,
    Section,
    machine_description,
    markdown_table,
    measure,
    text_table,
)
from benchmarks.quality import RATINGS, find_data

NAME = "backfill"
TASKS = "benchmarks.backfill_tasks"
# The last 215 days of the MovieLens sample's ratings (a few hundred ratings a day, some days none).
START, END = "2018-02-22", "2018-09-24"
BACKFILL_DAYS = 215
TARGET_SECONDS = 60.0


def run(options: Options) -> Section:
    ratings = find_data(RATINGS)
    if ratings is None:
        raise BenchmarkError(f"{RATINGS} not found: set RECSYS_SHARED_DATA to the folder holding it")
    machine = machine_description()
    home = options.workdir / NAME / "home"
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    measure(f"{TASKS}:import_ratings", {"home": str(home), "start": START, "ratings": str(ratings)})
    print(f"[{NAME}] {BACKFILL_DAYS} days of MovieLens ratings: recsys run ...", flush=True)
    measured = measure(f"{TASKS}:backfill", {"home": str(home), "start": START, "end": END})
    shutil.rmtree(home)
    print(f"[{NAME}] {measured.seconds:.1f} s", flush=True)
    return _render(measured.seconds, measured.output["runs"], machine)


def _render(seconds: float, runs: list[dict], machine: str) -> Section:
    run_headers = ["run", "job", "seconds", "events"]
    run_rows = [
        [str(i), run["job"], f"{run['seconds']:.1f}", f"{run['events']:,}"] for i, run in enumerate(runs, 1)
    ]
    step_headers = ["run", "step (asset)", "seconds"]
    step_rows = [
        [str(i), step, f"{step_seconds:.1f}"]
        for i, run in enumerate(runs, 1)
        for step, step_seconds in run["steps"].items()
    ]
    in_steps = sum(s for run in runs for s in run["steps"].values())
    verdict = (
        f"{'met' if seconds <= TARGET_SECONDS else 'NOT MET'} ({seconds:.1f} s; {in_steps:.1f} s inside the "
        f"steps, {sum(run['seconds'] for run in runs):.1f} s inside the runs)"
    )
    target = [[f"backfill of {BACKFILL_DAYS} days of real rating history <= {TARGET_SECONDS:.0f} s", verdict]]
    title = f"Backfill: {BACKFILL_DAYS} days of MovieLens ratings ({START}..{END}) through `recsys run`"
    text = "\n".join(
        [
            title,
            text_table(run_headers, run_rows),
            "",
            text_table(step_headers, step_rows),
            "",
            text_table(["target", "result"], target),
        ]
    )
    markdown = "\n".join(
        [
            f"## {title}",
            "",
            machine,
            "",
            "`recsys import` of `ml-latest-small/ratings.csv` (untimed), then `recsys run --start "
            f"{START} --end {END} --quiet` in its own process on a fresh RECSYS_HOME (SQLite Dagster "
            "instance). A range runs as two Dagster runs: ingestion and the daily aggregates of the earlier "
            "days, then the daily job as of the last day (docs/reference/cli.md#recsys-run). Split from the "
            "runs' events:",
            "",
            markdown_table(run_headers, run_rows),
            "",
            markdown_table(step_headers, step_rows),
            "",
            markdown_table(["target", "result"], target),
            "",
            "- A day's ingestion records 2 materializations and 8 check results, and each asset of a range one "
            "planned materialization per day before the run starts: about 4,000 stored events. With Dagster's "
            "default SQLite event log each cost 5-10 ms (a connection opened and closed per event, each close "
            "checkpointing and flushing the write-ahead log to disk): 61.8 s for this backfill before recsys's "
            "storage kept the connections open and committed without a flush per event "
            "(docs/operations.md#dagster-instance-on-postgresql).",
        ]
    )
    return Section(text=text, markdown=markdown)


BENCHMARK = Benchmark(
    name=NAME,
    description=f"{BACKFILL_DAYS} days of MovieLens ratings through recsys run (per-run and per-asset split)",
    run=run,
)
