"""Child-process side of the backfill benchmark (see `benchmarks.backfill`)."""

from __future__ import annotations

import os
from pathlib import Path

from benchmarks.harness import run_recsys


def _recsys(home: str, start_date: str, *args: str) -> None:
    run_recsys({"RECSYS_HOME": home, "RECSYS_START_DATE": start_date}, *args)


def import_ratings(params: dict) -> dict:
    """`recsys import` of the MovieLens ratings into a fresh RECSYS_HOME (setup, not timed as the backfill)."""
    _recsys(
        params["home"],
        params["start"],
        "import",
        params["ratings"],
        "--tenant",
        "movielens",
        "--surface",
        "movies",
    )
    return {}


def backfill(params: dict) -> dict:
    """`recsys run --start START --end END --quiet` as a user runs it, then the step times of its runs from
    the Dagster instance it recorded them in."""
    _recsys(
        params["home"], params["start"], "run", "--start", params["start"], "--end", params["end"], "--quiet"
    )
    os.environ["DAGSTER_HOME"] = str(Path(params["home"]) / "dagster")
    import dagster as dg

    instance = dg.DagsterInstance.get()
    runs = []
    for run in reversed(instance.get_runs()):
        started, steps, events = {}, {}, 0
        run_seconds = 0.0
        for entry in instance.all_logs(run.run_id):
            events += 1
            event = entry.dagster_event
            if event is None:
                continue
            if event.event_type == dg.DagsterEventType.STEP_START:
                started[entry.step_key] = entry.timestamp
            elif event.event_type == dg.DagsterEventType.STEP_SUCCESS:
                steps[entry.step_key] = entry.timestamp - started[entry.step_key]
            elif event.event_type == dg.DagsterEventType.RUN_START:
                run_seconds = -entry.timestamp
            elif event.event_type == dg.DagsterEventType.RUN_SUCCESS:
                run_seconds += entry.timestamp
        runs.append({"job": run.job_name, "seconds": run_seconds, "events": events, "steps": steps})
    return {"runs": runs}
