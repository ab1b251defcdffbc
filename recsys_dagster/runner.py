"""Materialize a date range in-process with the same definitions the Dagster UI loads.

Runs are recorded in the Dagster instance under DAGSTER_HOME, so they show up in the UI next to the
ones launched from there.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass, field

import dagster as dg

from recsys_core.settings import Settings
from recsys_dagster.defs.shared import daily_selection, user_error

CLI_JOB = "recsys_cli_run"


@dataclass
class RunOutcome:
    run_id: str
    success: bool
    failed_steps: list[str] = field(default_factory=list)
    failed_checks: list[str] = field(default_factory=list)
    warned_checks: list[str] = field(default_factory=list)
    skipped_steps: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.success and not self.failed_checks


def prepare_instance(settings: Settings) -> dg.DagsterInstance:
    """The persistent instance under DAGSTER_HOME (created with the embedded defaults if missing)."""
    home = settings.dagster_home
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists():
        # A failed check must not re-run a whole backfill range: no automatic retries of failed runs. No
        # telemetry, and no newsletter sign-up dialog on the UI's first page (`nux`).
        config.write_text(
            "telemetry:\n  enabled: false\nrun_retries:\n  enabled: false\nnux:\n  enabled: false\n"
        )
    os.environ["DAGSTER_HOME"] = str(home)
    return dg.DagsterInstance.get()


class SelectionError(ValueError):
    """The --select string is not valid Dagster selection syntax or selects nothing."""


def _asset_selection(defs: dg.Definitions, selection: str | None) -> dg.AssetSelection:
    if not selection:
        return daily_selection()
    try:
        # A multi-asset (canonical_events + quarantine) can only run whole: widen the selection to it.
        parsed = dg.AssetSelection.from_string(selection).required_multi_asset_neighbors()
        keys = parsed.resolve(defs.resolve_asset_graph())
    except dg.DagsterError as exc:
        raise SelectionError(str(exc)) from exc
    if not keys:
        raise SelectionError(f"{selection!r} selects no asset")
    return parsed


def materialize_range(
    settings: Settings,
    start: dt.date,
    end: dt.date,
    selection: str | None = None,
    log_level: str = "INFO",
) -> RunOutcome:
    """One run over the partitions [start, end] of the selected assets (default: all)."""
    from recsys_dagster.definitions import build_definitions

    defs = build_definitions()
    job = dg.define_asset_job(CLI_JOB, selection=_asset_selection(defs, selection))
    job_def = dg.Definitions.merge(defs, dg.Definitions(jobs=[job])).resolve_job_def(CLI_JOB)
    instance = prepare_instance(settings)
    result = job_def.execute_in_process(
        instance=instance,
        tags={
            "dagster/asset_partition_range_start": start.isoformat(),
            "dagster/asset_partition_range_end": end.isoformat(),
            "recsys/launched_by": "cli",
        },
        run_config={"loggers": {"console": {"config": {"log_level": log_level}}}},
        raise_on_error=False,
    )
    outcome = RunOutcome(run_id=result.run_id, success=result.success)
    for event in result.all_events:
        if event.event_type == dg.DagsterEventType.STEP_FAILURE:
            outcome.failed_steps.append(event.step_key or "?")
            error = event.step_failure_data.error if event.event_specific_data else None
            error = user_error(error)
            if error is not None:
                outcome.errors.append(f"{event.step_key}: {error.message.strip()}")
        elif event.event_type == dg.DagsterEventType.STEP_SKIPPED:
            outcome.skipped_steps.append(event.step_key or "?")
    for evaluation in result.get_asset_check_evaluations():
        if not evaluation.passed:
            name = f"{evaluation.asset_key.to_user_string()}:{evaluation.check_name}"
            if evaluation.severity == dg.AssetCheckSeverity.ERROR:
                outcome.failed_checks.append(name)
            else:
                outcome.warned_checks.append(name)
    return outcome
