"""The run queue: two runs that materialize the same day never execute at once, and at most
RECSYS_MAX_CONCURRENT_RUNS runs are in progress.

Runs reach the instance two ways, and both follow one rule.

- Runs launched from the UI, by schedules, sensors and backfills are submitted to the instance's run
  coordinator, `DayQueuedRunCoordinator` (named by the generated dagster.yaml). It queues them for the
  daemon, which launches a queued run once fewer than `max_concurrent_runs` are in progress and no run in
  progress holds one of its days.
- `recsys run` executes its runs in its own process (`runner.materialize_ranges`) and takes its days
  before it starts a run (`recsys_core.day_locks`), waiting while another run holds one.

What a run holds: the days of its partition or partition range. Each is a run tag `recsys/day-slot-<day>`,
added when the run is submitted (or, by `recsys run`, created); the daemon counts them on the runs in
progress, the CLI's included. One key per day, not one key `recsys/day` limited per unique value
(`applyLimitPerUniqueValue`): a run has one value per key, and a single-run backfill holds every day of its
range. Dagster's tag limits name their keys in advance, and days are not known in advance, so the
coordinator adds a limit of one run for each day key of the queued runs whenever the daemon reads the
queue's configuration (before each pass over the queue).

The queue alone leaves a gap: the daemon decides to launch a run from the runs in progress it read a
moment before, and a `recsys run` can take the same day in between (its run is not yet recorded). The
executor of every run therefore takes the run's days too (`day_holding_executor`), in the process that
executes it, before the first step: a run launched into that gap waits, recorded as started with a log
line saying for what, instead of writing the day alongside the other run.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import dagster as dg
from dagster._core.execution.context.system import PlanOrchestrationContext
from dagster._core.execution.plan.plan import ExecutionPlan
from dagster._core.execution.retries import RetryMode
from dagster._core.execution.step_dependency_config import StepDependencyConfig
from dagster._core.storage.dagster_run import IN_PROGRESS_RUN_STATUSES
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
    PARTITION_NAME_TAG,
)

from recsys_core.day_locks import holding_days
from recsys_core.settings import load_settings

DAY_TAG_PREFIX = "recsys/day-slot-"
# The value of a day tag: the key says which day.
DAY_TAG_VALUE = "held"


def run_days(tags: Mapping[str, str]) -> tuple[dt.date, dt.date] | None:
    """The first and last day of a run's daily partition or partition range, from its tags; None for a
    run without one (an unpartitioned asset, a partition key that is not a day)."""
    first = tags.get(ASSET_PARTITION_RANGE_START_TAG, tags.get(PARTITION_NAME_TAG))
    last = tags.get(ASSET_PARTITION_RANGE_END_TAG, first)
    try:
        days = dt.date.fromisoformat(first or ""), dt.date.fromisoformat(last or "")
    except ValueError:
        return None
    return days if days[0] <= days[1] else None


def day_tags(first: dt.date, last: dt.date) -> dict[str, str]:
    """One tag per day from `first` to `last`: the days a run holds while it is in progress."""
    count = (last - first).days + 1
    return {day_tag(first + dt.timedelta(days=n)): DAY_TAG_VALUE for n in range(count)}


def day_tag(day: dt.date) -> str:
    return f"{DAY_TAG_PREFIX}{day.isoformat()}"


def runs_holding(
    instance: dg.DagsterInstance, days: Sequence[dt.date], other_than: str | None = None
) -> list[dg.DagsterRun]:
    """The runs in progress (but `other_than`) that hold one of `days`, oldest first."""
    keys = {day_tag(day) for day in days}
    runs = instance.get_runs(dg.RunsFilter(statuses=IN_PROGRESS_RUN_STATUSES), ascending=True)
    return [run for run in runs if run.run_id != other_than and keys.intersection(run.tags)]


def waiting_message(instance: dg.DagsterInstance, days: Sequence[dt.date], run_id: str | None = None) -> str:
    """A line saying what a run (`run_id`, or one not created yet) waits for: the runs holding `days`."""
    held = _day_span(days)
    holders = runs_holding(instance, days, other_than=run_id)
    if not holders:
        # A run that took the days and has not been recorded yet, or has just ended.
        return f"waiting for another run that holds {held} to end"
    described = ", ".join(f"{run.run_id} ({_run_span(run)})" for run in holders)
    return f"waiting for run {described} to end: it holds {held}"


def _day_span(days: Sequence[dt.date]) -> str:
    first, last = min(days), max(days)
    return str(first) if first == last else f"{first}..{last}"


def _run_span(run: dg.DagsterRun) -> str:
    days = run_days(run.tags)
    return "no days" if days is None else _day_span(days)


class DayQueuedRunCoordinator(dg.QueuedRunCoordinator):
    """Dagster's run queue, where two runs holding the same day are never in progress together.

    Its configuration is the QueuedRunCoordinator's (`max_concurrent_runs`, `tag_concurrency_limits`, ...).
    """

    def submit_run(self, context: dg.SubmitRunContext) -> dg.DagsterRun:
        run = context.dagster_run
        days = run_days(run.tags)
        if days is not None:
            self._instance.add_run_tags(run.run_id, day_tags(*days))
            tagged = self._instance.get_run_by_id(run.run_id)
            assert tagged is not None, f"run {run.run_id} vanished while it was submitted"
            context = dg.SubmitRunContext(tagged, context.workspace)
        return super().submit_run(context)

    def get_run_queue_config(self) -> Any:
        """The configured queue, plus a limit of one run for each day a queued run holds.

        The daemon reads this before each pass over the queue; a queued run's day is then blocked while a
        run in progress (launched from the queue or by `recsys run`) holds it.
        """
        config = super().get_run_queue_config()
        queued = self._instance.get_runs(dg.RunsFilter(statuses=[dg.DagsterRunStatus.QUEUED]))
        keys = sorted({key for run in queued for key in run.tags if key.startswith(DAY_TAG_PREFIX)})
        day_limits = [{"key": key, "limit": 1} for key in keys]
        return config._replace(tag_concurrency_limits=[*config.tag_concurrency_limits, *day_limits])


class _DayHoldingExecutor(dg.Executor):
    """Executes a run with another executor while its process holds the run's days (module docstring)."""

    def __init__(self, executor: dg.Executor) -> None:
        self._executor = executor

    @property
    def retries(self) -> RetryMode:
        return self._executor.retries

    @property
    def step_dependency_config(self) -> StepDependencyConfig:
        return self._executor.step_dependency_config

    def execute(
        self, plan_context: PlanOrchestrationContext, execution_plan: ExecutionPlan
    ) -> Iterator[dg.DagsterEvent]:
        run = plan_context.dagster_run
        days = run_days(run.tags)
        if days is None:
            yield from self._executor.execute(plan_context, execution_plan)
            return

        def announce(busy: list[dt.date]) -> None:
            plan_context.log.info(waiting_message(plan_context.instance, busy, run.run_id))

        with holding_days(load_settings(), *days, on_wait=announce):
            yield from self._executor.execute(plan_context, execution_plan)


def day_holding_executor(executor: dg.ExecutorDefinition) -> dg.ExecutorDefinition:
    """`executor` (same name and configuration) whose runs hold their days while they execute."""
    creation: Callable[[dg.InitExecutorContext], dg.Executor] | None = executor.executor_creation_fn
    assert creation is not None, f"executor {executor.name} cannot create an executor"
    return dg.ExecutorDefinition(
        name=executor.name,
        config_schema=executor.config_schema,  # type: ignore[arg-type]  # taken as is, already converted
        requirements=executor.get_requirements,
        executor_creation_fn=lambda context: _DayHoldingExecutor(creation(context)),
        description=executor.description,
    )
