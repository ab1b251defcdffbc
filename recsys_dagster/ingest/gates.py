"""Blocking gates on one canonical_events partition (docs/reference/checks.md), as plain functions.

Each gate returns a `GateResult` with the numbers and a sample of offending rows a person can act on.
The results of a partition are stored beside its data (`_checks.json`, tied to the data by content
hash), so that anything downstream, publishing above all, can confirm that the exact partition it
consumes passed, whichever run checked it.

The figures the gates judge come from the `profile` canonicalization recorded in `_summary.json` while it
wrote the rows, when that profile is bound to the files checked (their content hash is the summary's) and
was counted against the same arrival window; otherwise (a partition written before profiles were recorded,
files changed since) from one SQL pass over the files (canonical_profile.sql) and a pandera validation.
Either way a gate that finds something reads the files for its sample.

Lines from the API server's exposure log (landing files `exposures-*.jsonl`) are the product's own record
of what it served, not producer data, and a client of the API decides how many there are: the quarantine,
duplicate, volume and resource-limit gates judge producer lines only, and report the exposure log's
figures beside theirs (metadata `exposure_log`) without judging them.
"""

from __future__ import annotations

import datetime as dt
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow.parquet as pq

from recsys_core.lake import (
    CHECKS_FILE,
    EXPOSURE_LOG_FILES,
    CanonicalProfile,
    ChecksRecord,
    GateRecord,
    SummaryRecord,
    content_hash,
    is_exposure_log_file,
    parquet_files,
    partition_dir,
    read_checks,
    read_summary,
)
from recsys_core.settings import ChecksConfig, ConfigError, IngestConfig
from recsys_core.storage import write_atomic
from recsys_dagster.ingest import contract
from recsys_dagster.transform.sql import run_sql

SAMPLE_ROWS = 10
# The resource limits leave out the exposure log's files (EXPOSURE_LOG_FILES): canonicalization's profile
# does, canonical_profile.sql is given them, canonical_largest_sessions.sql matches the pattern.

GATE_DESCRIPTIONS = {
    "schema": "Columns, types and value rules of the canonical table (pandera).",
    "non_null_keys": "event_id, ts, tenant, surface, session_id and item_id are never null.",
    "unique_event_id": "No event id occurs twice in the partition.",
    "ts_in_range": "Every ts lies in the partition's arrival window.",
    "quarantine_rate": "Share of non-blank lines quarantined is at most checks.max_quarantine_rate.",
    "duplicate_rate": "Share of non-blank lines dropped as duplicates is at most checks.max_duplicate_rate.",
    "volume": "Row count is within [min_ratio, max_ratio] x the median of the trailing days.",
    "resource_limits": "Events, distinct items, sessions and items per session are under the limits.",
}
GATE_NAMES = tuple(GATE_DESCRIPTIONS)
# The configuration keys that move each gate's threshold (any gate can also be listed in checks.warn_only,
# which turns its failure into a warning). The value rules of the contract have none: bad rows are
# quarantined before these gates, so a failure there is a defect, not a threshold.
GATE_SETTINGS: dict[str, tuple[str, ...]] = {
    "ts_in_range": ("ingest.max_lateness_days", "ingest.max_clock_skew_hours"),
    "quarantine_rate": ("checks.max_quarantine_rate",),
    "duplicate_rate": ("checks.max_duplicate_rate",),
    "volume": (
        "checks.volume_min_ratio",
        "checks.volume_max_ratio",
        "checks.volume_min_median_rows",
        "checks.volume_block_recent_days",
    ),
    "resource_limits": (
        "checks.max_events",
        "checks.max_distinct_items",
        "checks.max_sessions",
        "checks.max_items_per_session",
    ),
}


@dataclass
class GateResult:
    name: str
    passed: bool
    blocking: bool
    summary: str
    metadata: dict[str, Any] = field(default_factory=dict)
    sample: list[dict[str, Any]] = field(default_factory=list)

    def to_record(self) -> GateRecord:
        """The result as stored in `_checks.json`."""
        return {
            "name": self.name,
            "passed": self.passed,
            "blocking": self.blocking,
            "summary": self.summary,
            "metadata": self.metadata,
            "sample": self.sample,
        }


@dataclass(frozen=True)
class ExposureLogFigures:
    """What one partition holds from the server's exposure log files."""

    files: int = 0
    lines: int = 0  # per file, the last line number that either table holds
    rows: int = 0
    quarantined: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    @property
    def duplicates(self) -> int:
        # The server writes no blank lines: a line neither kept nor quarantined was a duplicate. A duplicate
        # after a file's last kept line is not seen here, and so stays counted against the producers.
        return self.lines - self.rows - self.quarantined

    @classmethod
    def from_profile(cls, profile: CanonicalProfile) -> ExposureLogFigures:
        recorded = profile["exposure_log"]
        return cls(
            recorded["files"],
            recorded["lines"],
            recorded["rows"],
            recorded["quarantined"],
            recorded["reasons"],
        )

    def to_metadata(self) -> dict[str, Any]:
        """Flat keys beside a gate's own figures (the Dagster UI shows numbers, not nested objects)."""
        return {
            "exposure_log_files": self.files,
            "exposure_log_lines": self.lines,
            "exposure_log_rows": self.rows,
            "exposure_log_quarantined": self.quarantined,
            "exposure_log_duplicates": self.duplicates,
            "exposure_log_by_reason": self.reasons,
        }


def check_warn_only(checks: ChecksConfig) -> None:
    unknown = sorted(set(checks.warn_only) - set(GATE_NAMES))
    if unknown:
        raise ConfigError(f"checks.warn_only: unknown check(s) {unknown}; known: {list(GATE_NAMES)}")


def arrival_window(day: dt.date, ingest: IngestConfig) -> tuple[dt.datetime, dt.datetime]:
    """[start, end) of the event times a partition of arrival day `day` may hold (the ts_in_range gate)."""
    return contract.arrival_window(day, ingest.max_lateness_days, ingest.max_clock_skew_hours)


def run_gates(lake_root: Path, day: dt.date, ingest: IngestConfig, checks: ChecksConfig) -> list[GateResult]:
    """Evaluate every gate on the canonical partition of `day` and record the results beside it."""
    check_warn_only(checks)
    folder = partition_dir(lake_root, "canonical_events", day)
    paths = [str(p) for p in parquet_files(folder)]
    summary = read_summary(lake_root, day)
    if summary is None or not paths:
        raise FileNotFoundError(f"canonical_events partition {day} has not been materialized ({folder})")
    window_start, window_end = arrival_window(day, ingest)
    window = {"window_start": window_start.isoformat(), "window_end": window_end.isoformat()}
    recorded = recorded_profile(folder, summary, window)
    if recorded is not None:
        exposures = ExposureLogFigures.from_profile(recorded)
        profile: dict[str, Any] = dict(recorded)
    else:
        # One pass for every row gate's figure; a gate's own query runs only to sample what it found.
        exposures = exposure_log_figures(lake_root, day, summary, paths)
        profile = run_sql(
            "checks/canonical_profile",
            {"paths": paths, "exposure_files": exposure_log_files(summary)} | window,
        ).row(0, named=True)
    producer_lines = summary["lines_read"] - summary["blank_lines"] - exposures.lines
    producer_reasons = {
        reason: count - exposures.reasons.get(reason, 0)
        for reason, count in summary["reasons"].items()
        if count > exposures.reasons.get(reason, 0)
    }
    results = [
        _schema(paths, recorded),
        _rows_gate(
            "non_null_keys",
            profile["null_key_rows"],
            "checks/canonical_null_keys",
            paths,
            {},
            "rows with a null key",
        ),
        _rows_gate(
            "unique_event_id",
            profile["duplicate_id_rows"],
            "checks/canonical_duplicate_event_ids",
            paths,
            {},
            "event ids occurring more than once",
        ),
        _rows_gate(
            "ts_in_range",
            profile["ts_out_of_range_rows"],
            "checks/canonical_ts_out_of_range",
            paths,
            window,
            f"events outside [{window_start:%Y-%m-%d %H:%M}, {window_end:%Y-%m-%d %H:%M}) UTC",
        ),
        _rate_gate(
            "quarantine_rate",
            summary["quarantined"] - exposures.quarantined,
            producer_lines,
            checks.max_quarantine_rate,
            producer_reasons,
        ),
        _rate_gate(
            "duplicate_rate",
            max(0, summary["duplicates"] - exposures.duplicates),
            producer_lines,
            checks.max_duplicate_rate,
            {},
        ),
        _volume(lake_root, day, summary["canonical_rows"] - exposures.rows, checks),
        _resource_limits(profile, paths, checks),
    ]
    backfilled = day < dt.datetime.now(dt.UTC).date() - dt.timedelta(days=checks.volume_block_recent_days)
    if exposures.files:
        for result in results:
            if result.name in ("quarantine_rate", "duplicate_rate", "volume", "resource_limits"):
                result.summary += (
                    f"; producer events only ({exposures.lines:,} exposure log lines not judged)"
                )
                result.metadata |= exposures.to_metadata()
    for result in results:
        result.blocking = result.name not in checks.warn_only
        if result.name == "volume" and backfilled and not result.passed:
            result.blocking = False
            result.summary += (
                f"; {day} is more than checks.volume_block_recent_days = {checks.volume_block_recent_days} "
                "day(s) old, backfilled history: warns only"
            )
    record: ChecksRecord = {
        "day": day.isoformat(),
        "content_hash": summary["content_hash"],
        "checked_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "figures_from": "profile" if recorded is not None else "files",
        "passed": all(r.passed for r in results if r.blocking),
        "results": [r.to_record() for r in results],
    }
    write_atomic(folder / CHECKS_FILE, (json.dumps(record, indent=2, default=str) + "\n").encode())
    return results


def recorded_profile(folder: Path, summary: SummaryRecord, window: dict[str, str]) -> CanonicalProfile | None:
    """The summary's profile if the gates may judge it instead of the files: it was recorded, for the files
    in `folder` as they are now (their content hash is the summary's), against the arrival `window`."""
    profile = summary.get("profile")
    if profile is None or content_hash(folder) != summary["content_hash"]:
        return None
    if (profile["window_start"], profile["window_end"]) != (window["window_start"], window["window_end"]):
        return None
    return profile


def exposure_log_files(summary: SummaryRecord) -> list[str]:
    """The landing files of a partition that are the API server's exposure log."""
    return [source for source in summary["files"] if is_exposure_log_file(source)]


def exposure_log_figures(
    lake_root: Path, day: dt.date, summary: SummaryRecord, paths: list[str]
) -> ExposureLogFigures:
    """The exposure log's share of the partition of `day` (`paths`: its canonical Parquet files)."""
    if not exposure_log_files(summary):
        return ExposureLogFigures()
    exposure_files = pl.col("source_file").str.contains(EXPOSURE_LOG_FILES)
    kept = pl.scan_parquet(paths).select("source_file", "source_line").filter(exposure_files).collect()
    quarantine_paths = parquet_files(partition_dir(lake_root, "quarantine", day))
    rejected = (
        pl.scan_parquet(quarantine_paths)
        .select("source_file", "source_line", "reason")
        .filter(exposure_files)
    ).collect()
    lines = (
        pl.concat([kept, rejected.drop("reason")]).group_by("source_file").agg(pl.col("source_line").max())
    )
    reasons = rejected.group_by("reason").len().sort("reason")
    return ExposureLogFigures(
        files=lines.height,
        lines=int(lines["source_line"].sum()),
        rows=kept.height,
        quarantined=rejected.height,
        reasons=dict(zip(reasons["reason"].to_list(), reasons["len"].to_list(), strict=True)),
    )


def _producer_rows(lake_root: Path, day: dt.date) -> int | None:
    """Canonical rows of `day` that are not from the exposure log (None: the day was not materialized).

    The figure is taken from the day's checks when they were run on its current data, and only counted
    again for a day that holds exposure log files and was checked before the gates recorded it."""
    summary = read_summary(lake_root, day)
    if summary is None:
        return None
    if "profile" in summary:
        return summary["canonical_rows"] - summary["profile"]["exposure_log"]["rows"]
    record = read_checks(lake_root, day)
    if record is not None and record["content_hash"] == summary["content_hash"]:
        volume = next((r for r in record["results"] if r["name"] == "volume"), None)
        if volume is not None and "exposure_log_rows" in volume["metadata"]:
            return summary["canonical_rows"] - volume["metadata"]["exposure_log_rows"]
    paths = [str(p) for p in parquet_files(partition_dir(lake_root, "canonical_events", day))]
    return summary["canonical_rows"] - exposure_log_figures(lake_root, day, summary, paths).rows


def _sample(frame: pl.DataFrame) -> list[dict[str, Any]]:
    return [{k: _plain(v) for k, v in row.items()} for row in frame.head(SAMPLE_ROWS).iter_rows(named=True)]


def _plain(value: Any) -> Any:
    return value.isoformat() if isinstance(value, dt.datetime | dt.date) else value


def _schema(paths: list[str], profile: CanonicalProfile | None) -> GateResult:
    """Columns and types from the files' Parquet footers, value rules from the profile's count of the rows
    written; the files themselves are validated (pandera) without a profile, or when either finds a fault,
    for the failure cases."""
    if profile is not None and not profile["value_rule_rows"]:
        rows = 0
        for path in paths:
            metadata = pq.read_metadata(path)
            columns = pl.DataFrame(metadata.schema.to_arrow_schema().empty_table()).schema
            if list(columns.items()) != list(contract.CANONICAL_SCHEMA.items()):
                return _validated_schema(paths)
            rows += metadata.num_rows
        return GateResult("schema", True, True, f"{rows:,} rows match the canonical schema", {"rows": rows})
    return _validated_schema(paths)


def _validated_schema(paths: list[str]) -> GateResult:
    import pandera.errors  # with contract.canonical_schema_model: only this path needs pandera

    frame = pl.read_parquet(paths)
    try:
        contract.canonical_schema_model().validate(frame, lazy=True)
    except pandera.errors.SchemaErrors as exc:
        cases = exc.failure_cases
        return GateResult(
            "schema",
            False,
            True,
            f"{cases.height} schema violation(s)",
            {"violations": cases.height},
            _sample(cases.select(pl.all().cast(pl.String))),
        )
    except pandera.errors.SchemaError as exc:
        return GateResult("schema", False, True, str(exc)[:300], {"violations": 1})
    return GateResult(
        "schema", True, True, f"{frame.height:,} rows match the canonical schema", {"rows": frame.height}
    )


def _rows_gate(
    name: str, found: int, query: str, paths: list[str], params: dict[str, Any], what: str
) -> GateResult:
    """A gate that fails on any offending row: `found` from the profile, the rows from `query` if any."""
    if not found:
        return GateResult(name, True, True, f"no {what}", {"violations": 0})
    violations = run_sql(query, {"paths": paths} | params)
    count = violations.height
    return GateResult(name, False, True, f"{count:,} {what}", {"violations": count}, _sample(violations))


def _rate_gate(name: str, count: int, considered: int, limit: float, breakdown: dict) -> GateResult:
    rate = count / considered if considered else 0.0
    return GateResult(
        name,
        rate <= limit,
        True,
        f"{rate:.2%} of {considered:,} lines (limit {limit:.2%})",
        {"count": count, "lines": considered, "rate": round(rate, 6), "limit": limit}
        | {"by_reason": breakdown},
    )


def _volume(lake_root: Path, day: dt.date, rows: int, checks: ChecksConfig) -> GateResult:
    history = []
    for back in range(1, checks.volume_trailing_days + 1):
        previous = _producer_rows(lake_root, day - dt.timedelta(days=back))
        if previous:
            history.append(previous)
    meta: dict[str, Any] = {"rows": rows, "history_days": len(history)}
    if len(history) < checks.volume_min_history_days:
        return GateResult(
            "volume",
            True,
            True,
            f"{rows:,} rows; only {len(history)} day(s) of history, need {checks.volume_min_history_days} to compare",
            meta,
        )
    median = statistics.median(history)
    if median < checks.volume_min_median_rows:
        meta["trailing_median"] = median
        return GateResult(
            "volume",
            True,
            True,
            f"{rows:,} rows; the trailing median {median:,.0f} is below checks.volume_min_median_rows "
            f"{checks.volume_min_median_rows:,}: too little volume to judge",
            meta,
        )
    ratio = rows / median
    meta |= {"trailing_median": median, "ratio": round(ratio, 4)}
    meta |= {"min_ratio": checks.volume_min_ratio, "max_ratio": checks.volume_max_ratio}
    passed = checks.volume_min_ratio <= ratio <= checks.volume_max_ratio
    return GateResult(
        "volume",
        passed,
        True,
        f"{rows:,} rows = {ratio:.2f} x the trailing median {median:,.0f} "
        f"(allowed {checks.volume_min_ratio}-{checks.volume_max_ratio})",
        meta,
    )


def _resource_limits(profile: dict[str, Any], paths: list[str], checks: ChecksConfig) -> GateResult:
    """The profile's producer figures against the limits; the largest sessions as the sample when exceeded."""
    limits = {
        "distinct_items": checks.max_distinct_items,
        "events": checks.max_events,
        "items_per_session": checks.max_items_per_session,
        "sessions": checks.max_sessions,
    }
    exceeded = [
        {"measure": measure, "observed": profile[measure], "limit_value": limit}
        for measure, limit in limits.items()
        if profile[measure] > limit
    ]
    if exceeded:
        largest = run_sql("checks/canonical_largest_sessions", {"paths": paths, "max_rows": SAMPLE_ROWS})
        summary = "; ".join(f"{e['measure']} {e['observed']:,} > {e['limit_value']:,}" for e in exceeded)
        return GateResult("resource_limits", False, True, summary, {"exceeded": exceeded}, _sample(largest))
    return GateResult("resource_limits", True, True, "all resource limits respected", {})
