"""Materialize a date range in-process with the same definitions the Dagster UI loads.

Runs are recorded in the Dagster instance under DAGSTER_HOME, so they show up in the UI next to the
ones launched from there. Each run carries the host and process that execute it, so that a run whose
process was killed is marked failed by the next start (`fail_orphaned_runs`) instead of showing as
started forever. A run first takes its days: it waits while another run, from the queue or another
`recsys run`, holds one of them (`recsys_dagster.run_queue`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import socket
import sys
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg
import yaml

# Creating a run the way the UI does (with its code location's origin) has no public API: these are the
# pieces `dagster job launch` uses, pinned with the dagster version in uv.lock.
from dagster._core.definitions.assets.graph.base_asset_graph import BaseAssetGraph
from dagster._core.definitions.assets.job.asset_job import IMPLICIT_ASSET_JOB_NAME
from dagster._core.definitions.repository_definition.valid_definitions import SINGLETON_REPOSITORY_NAME
from dagster._core.definitions.selector import JobSubsetSelector
from dagster._core.events import JobFailureData, RunFailureReason
from dagster._core.execution.api import execute_run
from dagster._core.remote_origin import InProcessCodeLocationOrigin
from dagster._core.remote_representation.code_location import CodeLocation
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
from dagster._utils.hosted_user_process import recon_job_from_origin

from recsys_core.day_locks import holding_days
from recsys_core.object_store import pull_trees, push_trees
from recsys_core.settings import Settings
from recsys_dagster.defs.automation.schedules import DAILY_JOB
from recsys_dagster.defs.shared import user_error
from recsys_dagster.run_queue import DayQueuedRunCoordinator, day_tags, waiting_message

# The code location as workspace.yaml names it. The CLI loads it from `current_definitions` below rather
# than from the module's `defs`, which a process builds once, at import, from the environment it had then.
LOCATION_NAME = "recsys"

# The generated instance configuration (dagster.yaml). A failed check must not re-run a whole backfill
# range: no automatic retries of failed runs. No telemetry, and no newsletter sign-up dialog on the UI's
# first page (`nux`). Run monitoring: the daemon (`recsys ui`) fails runs that never start, hang while
# cancelling, or are still running after a day. The default run launcher cannot tell whether a started
# run's process is alive, so the day is what ends a run whose process died with the UI's; a killed
# `recsys run` is caught sooner, by the next one (`fail_orphaned_runs`). `instance_config` adds the run
# queue (`run_queue_config`) and the storage: SQLite files under DAGSTER_HOME whose event log does not flush
# the disk per event (`recsys_dagster.sqlite_storage`), or with RECSYS_POSTGRES_URL, PostgreSQL.
INSTANCE_CONFIG = """\
telemetry:
  enabled: false
run_retries:
  enabled: false
nux:
  enabled: false
run_monitoring:
  enabled: true
  start_timeout_seconds: 180
  cancel_timeout_seconds: 180
  max_runtime_seconds: 86400
"""
# What earlier versions generated: replaced by the current configuration (a file edited by hand is left alone).
EARLIER_INSTANCE_CONFIGS = (
    "telemetry:\n  enabled: false\nrun_retries:\n  enabled: false\nnux:\n  enabled: false\n",
)
# Without PostgreSQL: Dagster's SQLite files under DAGSTER_HOME (the default layout, so an instance keeps its
# history), with an event log that keeps its connections open and does not flush the disk per event.
SQLITE_STORAGE = """\
storage:
  custom:
    module: recsys_dagster.sqlite_storage
    class: KeptOpenSqliteStorage
    config:
      base_dir:
        env: DAGSTER_HOME
"""
# With RECSYS_POSTGRES_URL set, the generated configuration reads the URL's password from this variable,
# which `prepare_instance` sets for its process and the Dagster processes it starts: the password is not
# written into dagster.yaml.
POSTGRES_PASSWORD_VAR = "RECSYS_POSTGRES_PASSWORD"
# SQLAlchemy 2.1 connects to a plain `postgresql://` URL with psycopg 3, which is not installed: name the
# psycopg2 driver that dagster-postgres is built for.
POSTGRES_SCHEME = "postgresql+psycopg2"
# Run tags naming the process that executes a run of `recsys run`.
HOST_TAG, PID_TAG, PROCESS_STARTED_TAG = "recsys/host", "recsys/pid", "recsys/process_started"


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
    """The persistent instance under DAGSTER_HOME, configured by `write_instance_config`."""
    write_instance_config(settings)
    if settings.postgres_url is not None:
        os.environ[POSTGRES_PASSWORD_VAR] = urllib.parse.unquote(
            urllib.parse.urlsplit(settings.postgres_url).password or ""
        )
    os.environ["DAGSTER_HOME"] = str(settings.dagster_home)
    return dg.DagsterInstance.get()


def write_instance_config(settings: Settings) -> Path:
    """DAGSTER_HOME/dagster.yaml as `instance_config` generates it for the settings, if missing; its path.

    A dagster.yaml that recsys generated (now or in an earlier version, with or without Postgres) is
    replaced by the one the settings call for; one edited by hand is left alone.
    """
    settings.dagster_home.mkdir(parents=True, exist_ok=True)
    config = settings.dagster_home / "dagster.yaml"
    wanted = instance_config(settings.postgres_url, settings.max_concurrent_runs)
    if not config.exists() or (config.read_text() != wanted and _generated(config.read_text())):
        temporary = config.with_name(f".{config.name}.{os.getpid()}.tmp")
        temporary.write_text(wanted)
        temporary.replace(config)
    return config


def instance_config(postgres_url: str | None, max_concurrent_runs: int) -> str:
    """The dagster.yaml recsys generates: INSTANCE_CONFIG, the run queue with its limit of runs in progress,
    and run, event-log and schedule storage in the PostgreSQL database of `postgres_url` if one is given
    (else SQLite files under DAGSTER_HOME, `SQLITE_STORAGE`)."""
    config = INSTANCE_CONFIG + run_queue_config(max_concurrent_runs)
    if postgres_url is None:
        return config + SQLITE_STORAGE
    url = urllib.parse.urlsplit(postgres_url)
    database: dict[str, Any] = {
        "username": urllib.parse.unquote(url.username or ""),
        "hostname": url.hostname,
        "port": url.port or 5432,
        "db_name": url.path.lstrip("/"),
        "scheme": POSTGRES_SCHEME,
    }
    if url.password is not None:
        database["password"] = {"env": POSTGRES_PASSWORD_VAR}
    if url.query:  # e.g. sslmode=require
        database["params"] = dict(urllib.parse.parse_qsl(url.query))
    return config + _postgres_storage(database)


def run_queue_config(max_concurrent_runs: int) -> str:
    """The `run_coordinator` section: runs are queued for the daemon, which launches at most
    `max_concurrent_runs` at once and never two that hold the same day."""
    coordinator = {
        "module": DayQueuedRunCoordinator.__module__,
        "class": DayQueuedRunCoordinator.__name__,
        "config": {"max_concurrent_runs": max_concurrent_runs},
    }
    return yaml.safe_dump({"run_coordinator": coordinator}, sort_keys=False)


def _postgres_storage(database: dict[str, Any]) -> str:
    return yaml.safe_dump({"storage": {"postgres": {"postgres_db": database}}}, sort_keys=False)


def _generated(text: str) -> bool:
    """Whether `text` is a dagster.yaml that recsys generated, for any settings: INSTANCE_CONFIG followed by
    the sections `instance_config` adds (earlier versions had no run queue), exactly as it writes them."""
    if text in EARLIER_INSTANCE_CONFIGS:
        return True
    if not text.startswith(INSTANCE_CONFIG):
        return False
    try:
        sections = yaml.safe_load(text[len(INSTANCE_CONFIG) :]) or {}
        rebuilt = INSTANCE_CONFIG
        if "run_coordinator" in sections:
            rebuilt += run_queue_config(sections["run_coordinator"]["config"]["max_concurrent_runs"])
        if sections.get("storage") == yaml.safe_load(SQLITE_STORAGE)["storage"]:
            rebuilt += SQLITE_STORAGE
        elif "storage" in sections:
            rebuilt += _postgres_storage(sections["storage"]["postgres"]["postgres_db"])
    except (yaml.YAMLError, TypeError, KeyError):
        return False
    return text == rebuilt


def fail_orphaned_runs(instance: dg.DagsterInstance) -> list[str]:
    """Mark failed the unfinished runs of `recsys run` on this host whose process is gone; their ids.

    A killed `recsys run` (SIGKILL, out of memory, a closed terminal) records no end of its run, which then
    shows as started forever and never reaches the run-failure alert. The failure is reported as any run
    failure is, so the alert sensor sees it, with a message saying why.
    """
    host = socket.gethostname()
    unfinished = instance.get_runs(
        dg.RunsFilter(
            statuses=[
                dg.DagsterRunStatus.NOT_STARTED,
                dg.DagsterRunStatus.STARTING,
                dg.DagsterRunStatus.STARTED,
            ],
            tags={HOST_TAG: host},
        )
    )
    failed = []
    for run in unfinished:
        pid = int(run.tags[PID_TAG])
        if _process_running(pid, run.tags.get(PROCESS_STARTED_TAG)):
            continue
        instance.report_run_failed(
            run,
            f"The process that executed this run (recsys run, pid {pid} on {host}) ended without recording "
            "the run's end: it was killed or crashed. Marked failed by the next recsys run on this host.",
            JobFailureData(error=None, failure_reason=RunFailureReason.UNEXPECTED_TERMINATION),
        )
        failed.append(run.run_id)
    return failed


def _process_running(pid: int, started: str | None) -> bool:
    """Whether process `pid` is running and is the one that started at `started` (not a reuse of its pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    state = _process_state(pid)
    return state is None or (state[0] != "Z" and started in (None, state[1]))


def _process_state(pid: int) -> tuple[str, str] | None:
    """(state letter, start time in clock ticks after boot) of a process, from Linux's /proc; else None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name in parentheses may hold spaces: the fields that follow start after the last ")".
    fields = stat.rsplit(")", 1)[1].split()
    return fields[0], fields[19]


def _this_process_tags() -> dict[str, str]:
    state = _process_state(os.getpid())
    started = {PROCESS_STARTED_TAG: state[1]} if state else {}
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid()), **started}


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


def create_run(
    instance: dg.DagsterInstance,
    location: CodeLocation,
    run_config: dict[str, Any],
    start: dt.date,
    end: dt.date,
    selection: str | None,
    tags: dict[str, str],
) -> dg.DagsterRun:
    """A run over [start, end] of the daily job or the selected assets (Dagster syntax), created in the
    instance as the UI creates one, not started, with `tags`."""
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
    return instance.create_run(
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
            **tags,
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


def materialize_ranges(
    settings: Settings,
    ranges: Sequence[tuple[dt.date, dt.date, str | None]],
    log_level: str = "INFO",
    on_wait: Callable[[str], None] | None = None,
) -> list[RunOutcome]:
    """One run per (start, end, selection), in order, until one fails: the daily job over the partitions
    [start, end], or the selected assets (Dagster syntax). Returns the outcomes of the runs made.

    Each run is created in the instance the way the UI launches one (a run of `daily_pipeline`, or of the
    implicit asset job with an asset selection, as the UI's "Materialize" creates), then executed here. The
    runs share one instance and one loaded code location (loading it builds the definitions).

    Before a run is created its days are taken: while another run holds one of them, this waits, and
    `on_wait` gets a line saying for which runs and days.
    """
    instance = prepare_instance(settings)
    run_config = {"loggers": {"console": {"config": {"log_level": log_level}}}}
    outcomes: list[RunOutcome] = []

    def announce(busy: list[dt.date]) -> None:
        if on_wait is not None:
            on_wait(waiting_message(instance, busy))

    with code_location(instance) as location:
        for start, end, selection in ranges:
            with holding_days(settings, start, end, on_wait=announce):
                # The days it holds, as the run queue tags a submitted run: the daemon launches no queued
                # run holding one of them meanwhile.
                tags = {"recsys/launched_by": "cli", **_this_process_tags(), **day_tags(start, end)}
                run = create_run(instance, location, run_config, start, end, selection, tags)
                # With a bucket as the system of record, the run works on the local cache of its trees:
                # brought up to date first, and what the run wrote goes back (publishing commits its own).
                pull_trees(settings.raw_root, settings.lake_root)
                outcomes.append(_execute(instance, run))
                push_trees(settings.lake_root)
            if not outcomes[-1].ok:
                break
    return outcomes


def _execute(instance: dg.DagsterInstance, run: dg.DagsterRun) -> RunOutcome:
    """Execute a run `create_run` made, here; what came of it."""
    keys, origin = run.asset_selection, run.job_code_origin
    assert origin is not None, "create_run records the job's code origin"
    job = recon_job_from_origin(origin)
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
