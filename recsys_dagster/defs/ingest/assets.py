"""canonical_events + quarantine (one pass over the landing files) and their blocking checks."""

from typing import Any

import dagster as dg

from recsys_core.lake import partition_dir
from recsys_core.settings import Settings
from recsys_dagster.defs.shared import (
    OWNERS,
    DayLog,
    RecsysResource,
    add_partition_metadata,
    daily_partitions,
    markdown_table,
    partition_days,
)
from recsys_dagster.ingest.gates import GATE_DESCRIPTIONS, GateResult, check_warn_only
from recsys_dagster.ingest.partitions import DayIngest, IngestReport, ingest_days

CANONICAL = dg.AssetKey("canonical_events")
# Gate figures that are ratios (plotted as floats even when a value happens to be whole); the others count.
_RATIO_FIGURES = {"rate", "limit", "ratio", "trailing_median", "min_ratio", "max_ratio"}


def build_ingest(settings: Settings) -> dg.Definitions:
    check_warn_only(settings.pipeline.checks)
    warn_only = set(settings.pipeline.checks.warn_only)
    partitions = daily_partitions(settings)

    @dg.multi_asset(
        specs=[
            dg.AssetSpec(
                "canonical_events",
                description=(
                    "Valid, deduplicated events that arrived on the day, one Parquet partition per UTC day, "
                    "in reading order, with lineage (source_file, source_line). Contract: docs/reference/event-contract.md"
                ),
                kinds={"polars", "parquet"},
                group_name="ingest",
                owners=OWNERS,
                metadata={"path": dg.MetadataValue.path(str(settings.lake_root / "canonical_events"))},
            ),
            dg.AssetSpec(
                "quarantine",
                description="Every raw line that is not a valid event, with a reason code, detail and the raw text.",
                kinds={"parquet"},
                group_name="ingest",
                owners=OWNERS,
                metadata={"path": dg.MetadataValue.path(str(settings.lake_root / "quarantine"))},
            ),
        ],
        partitions_def=partitions,
        backfill_policy=dg.BackfillPolicy.single_run(),
        check_specs=[
            # Partitioned like the asset: each day's result is recorded against that day's partition.
            dg.AssetCheckSpec(
                name,
                asset=CANONICAL,
                description=text,
                blocking=name not in warn_only,
                partitions_def=partitions,
            )
            for name, text in GATE_DESCRIPTIONS.items()
        ],
    )
    def canonical_events(context: dg.AssetExecutionContext, recsys: RecsysResource):
        """Read the raw landing files of each day, quarantine bad lines, deduplicate, gate."""
        cfg = recsys.settings
        log = DayLog(context)
        report = ingest_days(cfg, partition_days(context), progress=log.progress, detail=log.detail)
        for day in report.days:
            add_partition_metadata(context, day.day, _canonical_metadata(day, cfg), "canonical_events")
            add_partition_metadata(context, day.day, _quarantine_metadata(day, cfg), "quarantine")
        if len(report.days) > 1:
            context.log.info(_range_line(report))
        yield dg.MaterializeResult(asset_key="canonical_events")
        yield dg.MaterializeResult(asset_key="quarantine")
        # `AssetCheckResult` has no partition: it takes the run's partition key, which a range run lacks.
        # An `AssetCheckEvaluation` names its partition; the check's output is then reported once.
        for day in report.days:
            for gate in day.gates:
                yield dg.AssetCheckEvaluation(
                    asset_key=CANONICAL,
                    check_name=gate.name,
                    passed=gate.passed,
                    metadata=_gate_metadata(gate),
                    severity=dg.AssetCheckSeverity.WARN
                    if gate.name in warn_only
                    else dg.AssetCheckSeverity.ERROR,
                    description=gate.summary,
                    blocking=gate.name not in warn_only,
                    partition=day.day.isoformat(),
                )
        for name in GATE_DESCRIPTIONS:
            key = dg.AssetCheckKey(CANONICAL, name)
            yield dg.Output(None, output_name=context.assets_def.get_output_name_for_asset_check_key(key))

    return dg.Definitions(assets=[canonical_events])


def _canonical_metadata(day: DayIngest, settings: Settings) -> dict[str, Any]:
    """One day's line accounting, its data's hash and the gate figures worth plotting over days."""
    s = day.summary
    figures = {gate.name: gate.metadata for gate in day.gates}
    metadata: dict[str, Any] = {
        "dagster/row_count": dg.MetadataValue.int(s.canonical_rows),
        "lines_read": dg.MetadataValue.int(s.lines_read),
        "events": dg.MetadataValue.int(s.canonical_rows),
        "quarantined": dg.MetadataValue.int(s.quarantined),
        "duplicates": dg.MetadataValue.int(s.duplicates),
        "blank_lines": dg.MetadataValue.int(s.blank_lines),
        "reconciled": dg.MetadataValue.bool(s.reconciled),
        "files_read": dg.MetadataValue.int(len(s.files)),
        "content_hash": s.content_hash,
        "path": dg.MetadataValue.path(str(partition_dir(settings.lake_root, "canonical_events", day.day))),
    }
    for gate, figure, label in (
        ("quarantine_rate", "rate", "quarantine_rate"),
        ("duplicate_rate", "rate", "duplicate_rate"),
        ("volume", "ratio", "volume_ratio"),
    ):
        value = figures.get(gate, {}).get(figure)
        if value is not None:
            metadata[label] = dg.MetadataValue.float(float(value))
    return metadata


def _quarantine_metadata(day: DayIngest, settings: Settings) -> dict[str, Any]:
    reasons = [
        {"reason": code, "lines": count}
        for code, count in sorted(day.summary.reasons.items(), key=lambda kv: (-kv[1], kv[0]))
    ]
    return {
        "dagster/row_count": dg.MetadataValue.int(day.summary.quarantined),
        "by_reason": dg.MetadataValue.md(markdown_table(reasons, ["reason", "lines"])),
        "path": dg.MetadataValue.path(str(partition_dir(settings.lake_root, "quarantine", day.day))),
    }


def _gate_metadata(gate: GateResult) -> dict[str, Any]:
    """The gate's summary, its figures as numbers (the UI plots them over partitions) and a sample."""
    metadata: dict[str, Any] = {"summary": gate.summary}
    for key, value in gate.metadata.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if key in _RATIO_FIGURES:
            metadata[key] = dg.MetadataValue.float(float(value))
        else:
            metadata[key] = dg.MetadataValue.int(int(value))
    by_reason = gate.metadata.get("by_reason")
    if by_reason:
        rows = [{"reason": code, "lines": count} for code, count in by_reason.items()]
        metadata["by_reason"] = dg.MetadataValue.md(markdown_table(rows, ["reason", "lines"]))
    exceeded = gate.metadata.get("exceeded")
    if exceeded:
        metadata["exceeded"] = dg.MetadataValue.md(markdown_table(exceeded, list(exceeded[0])))
    if gate.sample:
        metadata["sample"] = dg.MetadataValue.md(markdown_table(gate.sample, list(gate.sample[0])))
    return metadata


def _range_line(report: IngestReport) -> str:
    """The run's summary over its days (each partition's materialization has its own figures)."""
    totals = report.totals()
    failed = [f"{name} on {', '.join(days)}" for name, days in report.failed_days().items()]
    return (
        f"{len(report.days)} days, {report.files_read:,} files: {totals['events']:,} events, "
        f"{totals['quarantined']:,} quarantined, {totals['duplicates']:,} duplicates, "
        f"{totals['blank_lines']:,} blank of {totals['lines_read']:,} lines; "
        f"checks: {'failed ' + '; '.join(failed) if failed else 'passed'}"
    )
