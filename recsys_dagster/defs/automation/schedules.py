"""The daily job (every asset but the on-demand ones, yesterday's partition) and its schedule."""

import dagster as dg

from recsys_dagster.defs.shared import daily_selection

DAILY_JOB = "daily_pipeline"


def build_schedules() -> dg.Definitions:
    job = dg.define_asset_job(
        DAILY_JOB,
        selection=daily_selection(),
        description="Materialize one day through to publishing: ingest, gates, aggregates, artifacts, manifest.",
    )
    schedule = dg.build_schedule_from_partitioned_job(
        job,
        hour_of_day=2,
        minute_of_hour=0,
        name="daily_pipeline_schedule",
        description="At 02:00 UTC, run yesterday's partition through to publishing.",
        default_status=dg.DefaultScheduleStatus.RUNNING,
    )
    return dg.Definitions(jobs=[job], schedules=[schedule])
