"""Materialize a date range in-process with the same definitions the Dagster UI loads.

Runs are recorded in the Dagster instance under DAGSTER_HOME, so they show up in the UI next to the
ones launched from there.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

import dagster as dg

# Creating a run the way the UI does (with its code location's origin) has no public API: these are the
# pieces `dagster job launch` uses, pinned with the dagster version in uv.lock.
from dagster._core.definitions.assets.graph.base_asset_graph import BaseAssetGraph
from dagster._core.definitions.assets.job.asset_job import IMPLICIT_ASSET_JOB_NAME
from dagster._core.definitions.repository_definition.valid_definitions import SINGLETON_REPOSITORY_NAME
from dagster._core.definitions.selector import JobSubsetSelector
from dagster._core.execution.api import execute_run
from dagster._core.remote_origin import InProcessCodeLocationOrigin
from dagster._core.remote_representation.code_location import CodeLocation
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
from dagster._utils.hosted_user_process import recon_job_from_origin

from recsys_core.settings import Settings
from recsys_dagster.defs.automation.schedules import DAILY_JOB
from recsys_dagster.defs.shared import user_error

# The code location as workspace.yaml names it. The CLI loads it from `current_definitions` below rather
# than from the module's `defs`, which a process builds once, at import, from the environment it had then.
LOCATION_NAME = "recsys"


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


@dg.definitions
def current_definitions() -> dg.Definitions:
    """The code location's definitions, built from the environment of the moment they are loaded."""
    from recsys_dagster.definitions import build_definitions

    return build_definitions()


class SelectionError(ValueError):
    """The --select string is not valid Dagster selection syntax or selects nothing."""


def _selected_keys(asset_graph: BaseAssetGraph, selection: str) -> frozenset[dg.AssetKey]:
    try:
        # A multi-asset (canonical_events + quarantine) can only run whole: widen the selection to it.
        parsed = dg.AssetSelection.from_string(selection).required_multi_asset_neighbors()
        keys = parsed.resolve(asset_graph)
    except dg.DagsterError as exc:
        raise SelectionError(str(exc)) from exc
    if not keys:
        raise SelectionError(f"{selection!r} selects no asset")
    return frozenset(keys)


@contextlib.contextmanager
def code_location(instance: dg.DagsterInstance) -> Iterator[CodeLocation]:
    """The code location the UI loads (workspace.yaml), loaded in this process.

    Runs created from it carry the same location, repository and job names as the UI's, so the UI finds
    their job, shows them on its timeline and can re-execute them.
    """
    with code_location_origin().create_location(instance) as location:
        yield location


def code_location_origin() -> InProcessCodeLocationOrigin:
    return InProcessCodeLocationOrigin(
        loadable_target_origin=LoadableTargetOrigin(
            executable_path=sys.executable, module_name=__name__, attribute="current_definitions"
        ),
        location_name=LOCATION_NAME,
    )


def materialize_range(
    settings: Settings,
    start: dt.date,
    end: dt.date,
    selection: str | None = None,
    log_level: str = "INFO",
) -> RunOutcome:
    """One run over the partitions [start, end]: the daily job, or the selected assets (Dagster syntax).

    The run is created in the instance the way the UI launches one (a run of `daily_pipeline`, or of the
    implicit asset job with an asset selection, as the UI's "Materialize" creates), then executed here.
    """
    instance = prepare_instance(settings)
    run_config = {"loggers": {"console": {"config": {"log_level": log_level}}}}
    with code_location(instance) as location:
        repository = location.get_repository(SINGLETON_REPOSITORY_NAME)
        keys = _selected_keys(repository.asset_graph, selection) if selection else None
        remote_job = location.get_job(
            JobSubsetSelector(
                location_name=location.name,
                repository_name=repository.name,
                job_name=IMPLICIT_ASSET_JOB_NAME if keys else DAILY_JOB,
                op_selection=None,
                asset_selection=keys,
            )
        )
        plan = location.get_execution_plan(
            remote_job, run_config, step_keys_to_execute=None, known_state=None, instance=instance
        )
        run = instance.create_run(
            job_name=remote_job.name,
            run_id=None,
            run_config=run_config,
            resolved_op_selection=None,
            step_keys_to_execute=None,
            op_selection=None,
            status=None,
            root_run_id=None,
            parent_run_id=None,
            tags={
                "dagster/asset_partition_range_start": start.isoformat(),
                "dagster/asset_partition_range_end": end.isoformat(),
                "recsys/launched_by": "cli",
            },
            job_snapshot=remote_job.job_snapshot,
            execution_plan_snapshot=plan.execution_plan_snapshot,
            parent_job_snapshot=remote_job.parent_job_snapshot,
            remote_job_origin=remote_job.get_remote_origin(),
            job_code_origin=remote_job.get_python_origin(),
            asset_selection=keys,
            asset_check_selection=None,
            asset_graph=repository.asset_graph,
        )
    job = recon_job_from_origin(remote_job.get_python_origin())
    result = execute_run(job.get_subset(asset_selection=keys) if keys else job, run, instance)
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
            # One entry per check: each day's evaluation is its own (the CLI lists the days and reasons).
            name = f"{evaluation.asset_key.to_user_string()}:{evaluation.check_name}"
            failed = evaluation.severity == dg.AssetCheckSeverity.ERROR
            names = outcome.failed_checks if failed else outcome.warned_checks
            if name not in names:
                names.append(name)
    return outcome
