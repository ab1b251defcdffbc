"""Child-process side of the backfill benchmark (see `benchmarks.backfill`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# What a user's environment could set that would change the runs measured here.
_RECSYS_VARIABLES = (
    "RECSYS_CONFIG",
    "RECSYS_RAW_ROOT",
    "RECSYS_LAKE_ROOT",
    "RECSYS_ARTIFACT_ROOT",
    "DAGSTER_HOME",
)


def _recsys(home: str, start_date: str, *args: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in _RECSYS_VARIABLES}
    env |= {"RECSYS_HOME": home, "RECSYS_START_DATE": start_date}
    command = [str(Path(sys.executable).with_name("recsys")), *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")


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
