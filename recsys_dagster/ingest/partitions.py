"""Ingest of a range of arrival days: canonicalize each day, run its gates, and fold the outcomes.

`ingest_days` is what the `canonical_events` asset runs; the fold (`IngestReport`) gives the figures its
materialization and check results carry, as plain data, so they are testable without Dagster.
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
class GateOutcome:
    """One gate over the days of a run: passed only if it passed on every day."""

    name: str
    failed_days: list[str]
    summary: str
    per_day: list[dict]
    sample: list[dict]

    @property
    def passed(self) -> bool:
        return not self.failed_days


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

    def per_day_rows(self) -> list[dict]:
        return [
            {
                "day": d.summary.day,
                "lines": d.summary.lines_read,
                "events": d.summary.canonical_rows,
                "quarantined": d.summary.quarantined,
                "duplicates": d.summary.duplicates,
                "blank": d.summary.blank_lines,
                "reconciled": d.summary.reconciled,
            }
            for d in self.days
        ]

    def reasons(self) -> dict[str, int]:
        """Quarantined lines by reason code over all days, most frequent first."""
        counts: dict[str, int] = {}
        for d in self.days:
            for code, count in d.summary.reasons.items():
                counts[code] = counts.get(code, 0) + count
        return dict(sorted(counts.items(), key=lambda kv: -kv[1]))

    def gate_outcomes(self) -> list[GateOutcome]:
        """Each gate over all days; its summary is the day's own for one day, else a count of failures,
        and its sample comes from the first day it failed (else the last day)."""
        outcomes = []
        for name in GATE_NAMES:
            per_day = [(d.day, r) for d in self.days for r in d.gates if r.name == name]
            failed = [day.isoformat() for day, r in per_day if not r.passed]
            worst = next((r for _, r in per_day if not r.passed), per_day[-1][1])
            summary = (
                worst.summary if len(self.days) == 1 else f"{len(failed)} of {len(self.days)} day(s) failed"
            )
            rows = [{"day": day.isoformat(), "passed": r.passed, "summary": r.summary} for day, r in per_day]
            outcomes.append(GateOutcome(name, failed, summary, rows, worst.sample))
        return outcomes


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
