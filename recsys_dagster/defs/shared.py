"""Pieces every domain shares: the settings resource, the daily partitions, metadata helpers."""

import datetime as dt
from collections.abc import Iterable, Iterator, Mapping
from functools import cached_property
from typing import Any

import dagster as dg
from dagster_shared.error import SerializableErrorInfo  # the type of Dagster's error records

from recsys_core.settings import Settings, load_settings

OWNERS = ["team:data-platform"]
# Assets of this group run only when asked for (or on their own schedule): not in the daily job, not in
# `recsys run` without --select, without the daily freshness policy.
ON_DEMAND_GROUP = "tuning"


def daily_selection() -> dg.AssetSelection:
    """Every asset the daily run materializes: all but the on-demand ones."""
    return dg.AssetSelection.all() - dg.AssetSelection.groups(ON_DEMAND_GROUP)


class RecsysResource(dg.ConfigurableResource):
    """Gives assets the product settings (paths, thresholds) read from the environment at run time."""

    @cached_property
    def settings(self) -> Settings:
        return load_settings()


def daily_partitions(settings: Settings) -> dg.DailyPartitionsDefinition:
    return dg.DailyPartitionsDefinition(start_date=settings.start_date.isoformat(), timezone="UTC")


def daily_asset_options(settings: Settings, group: str) -> dict[str, Any]:
    """The options every daily asset of a group shares: its partitions, single-run backfills, owners."""
    return {
        "partitions_def": daily_partitions(settings),
        "backfill_policy": dg.BackfillPolicy.single_run(),
        "group_name": group,
        "owners": OWNERS,
    }


def check_outputs(
    context: dg.AssetExecutionContext, asset: str, checks: Iterable[str]
) -> Iterator[dg.Output]:
    """The empty outputs that close an asset's checks after their per-partition evaluations were yielded
    (an evaluation with a `partition` does not count as the check's output)."""
    for name in checks:
        key = dg.AssetCheckKey(dg.AssetKey(asset), name)
        yield dg.Output(None, output_name=context.assets_def.get_output_name_for_asset_check_key(key))


def partition_days(context: dg.AssetExecutionContext) -> list[dt.date]:
    """The days a (possibly multi-day, single-run backfill) materialization covers, oldest first."""
    return [dt.date.fromisoformat(key) for key in context.partition_keys]


# Each log line is an event the instance stores (about 10 ms on SQLite): in a long range, a line per day would
# cost more than a small day's work. Ranges up to this many days log every day; longer ones every
# LOG_EVERY-th day and the last, as progress (each partition's own figures are in its metadata).
DAYS_LOGGED_IN_FULL = 14
LOG_EVERY = 10


class DayLog:
    """The per-day log lines of a (possibly long) multi-day step."""

    def __init__(self, context: dg.AssetExecutionContext) -> None:
        self._log = context.log
        self._days = partition_days(context)
        self._full = len(self._days) <= DAYS_LOGGED_IN_FULL
        self._reported = 0

    def info(self, day: dt.date, line: str) -> None:
        """A line about `day`."""
        if self._full:
            self._log.info(line)
            return
        position = self._days.index(day) + 1 if day in self._days else 0
        if position % LOG_EVERY == 0 or position == len(self._days):
            self._log.info(f"[day {position}/{len(self._days)}] {line}")

    def progress(self, line: str) -> None:
        """The line of the next day, for work that reports its days in order, one line each."""
        self._reported += 1
        if self._reported <= len(self._days):
            self.info(self._days[self._reported - 1], line)

    def detail(self, line: str) -> None:
        """Debug detail (per file, per query): in short ranges only."""
        if self._full:
            self._log.debug(line)


def add_partition_metadata(
    context: dg.AssetExecutionContext,
    day: dt.date,
    metadata: Mapping[str, Any],
    asset_key: str | None = None,
) -> None:
    """Metadata of one day's materialization only.

    A single-run backfill materializes a range in one step, and whatever the step returns with its
    `MaterializeResult` is recorded on every partition of the range. Figures of one day go here instead:
    Dagster merges them into that partition's materialization event alone.
    """
    context.add_asset_metadata(metadata, asset_key=asset_key, partition_key=day.isoformat())


def user_error(error: SerializableErrorInfo | None) -> SerializableErrorInfo | None:
    """The first error in the chain that is not one of Dagster's own wrappers: the user's exception."""
    while error is not None and error.cause is not None and (error.cls_name or "").startswith("Dagster"):
        error = error.cause
    return error


def markdown_table(rows: Iterable[dict[str, Any]], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, int):
        return f"{value:,}"
    return str(value if value is not None else "").replace("|", "\\|").replace("\n", " ")[:120]
