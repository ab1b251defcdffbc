"""Ingest of a range of arrival days: canonicalize each day, run its gates, and fold the outcomes.

`ingest_days` is what the `canonical_events` asset runs. Each day's `DayIngest` holds the figures of that
day's materialization and check results; the fold (`IngestReport`) sums a range for the run's summary line.
All of it is plain data, testable without Dagster.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from recsys_core.settings import Settings
from recsys_dagster.ingest.canonicalize import PartitionSummary, canonicalize_partition
from recsys_dagster.ingest.gates import GATE_NAMES, GateResult, run_gates

# Reconciliation totals: name in the report -> PartitionSummary attribute.
_TOTALS = {
    "lines_read": "lines_read",
    "events": "canonical_rows",
    "quarantined": "quarantined",
    "duplicates": "duplicates",
    "blank_lines": "blank_lines",
}


@dataclass(frozen=True)
class DayIngest:
    """One arrival day: what canonicalization counted and how each gate judged the result."""

    day: dt.date
    summary: PartitionSummary
    gates: Sequence[GateResult]

    @property
    def failed_gates(self) -> list[str]:
        return [result.name for result in self.gates if not result.passed]

    def log_line(self) -> str:
        s, failed = self.summary, self.failed_gates
        checks = "failed " + ", ".join(failed) if failed else "passed"
        return (
            f"{self.day}: {s.canonical_rows:,} events, {s.quarantined:,} quarantined, "
            f"{s.duplicates:,} duplicates, {s.blank_lines:,} blank of {s.lines_read:,} lines; checks: {checks}"
        )


@dataclass(frozen=True)
class IngestReport:
    days: Sequence[DayIngest]

    def totals(self) -> dict[str, int]:
        return {key: sum(getattr(d.summary, attr) for d in self.days) for key, attr in _TOTALS.items()}

    @property
    def reconciled(self) -> bool:
        return all(d.summary.reconciled for d in self.days)

    @property
    def files_read(self) -> int:
        return sum(len(d.summary.files) for d in self.days)

    def failed_days(self) -> dict[str, list[str]]:
        """The days each gate failed on, for the gates that failed on any day of the range."""
        failed: dict[str, list[str]] = {}
        for d in self.days:
            for name in d.failed_gates:
                failed.setdefault(name, []).append(d.day.isoformat())
        return {name: failed[name] for name in GATE_NAMES if name in failed}


def ingest_days(
    settings: Settings,
    days: Sequence[dt.date],
    *,
    progress: Callable[[str], None] | None = None,
    detail: Callable[[str], None] | None = None,
) -> IngestReport:
    """Canonicalize every day (oldest first) and run its gates; the results are stored beside each
    partition (`_summary.json`, `_checks.json`) as well as returned. `progress` gets one line per day,
    `detail` one per landing file read."""
    ingested = []
    for day in days:
        summary = canonicalize_partition(
            settings.raw_root, settings.lake_root, day, settings.pipeline.ingest, detail
        )
        gates = run_gates(settings.lake_root, day, settings.pipeline.ingest, settings.pipeline.checks)
        ingested.append(DayIngest(day, summary, gates))
        if progress:
            progress(ingested[-1].log_line())
    return IngestReport(ingested)
