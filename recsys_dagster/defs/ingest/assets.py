"""canonical_events + quarantine (one pass over the landing files) and their blocking checks."""

import dagster as dg

from recsys_core.lake import partition_dir
from recsys_core.settings import Settings
from recsys_dagster.defs.shared import (
    OWNERS,
    RecsysResource,
    daily_partitions,
    markdown_table,
    partition_days,
)
from recsys_dagster.ingest.gates import GATE_DESCRIPTIONS, check_warn_only
from recsys_dagster.ingest.partitions import IngestReport, ingest_days


def build_ingest(settings: Settings) -> dg.Definitions:
    check_warn_only(settings.pipeline.checks)
    warn_only = set(settings.pipeline.checks.warn_only)

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
        partitions_def=daily_partitions(settings),
        backfill_policy=dg.BackfillPolicy.single_run(),
        check_specs=[
            dg.AssetCheckSpec(
                name, asset="canonical_events", description=text, blocking=name not in warn_only
            )
            for name, text in GATE_DESCRIPTIONS.items()
        ],
    )
    def canonical_events(context: dg.AssetExecutionContext, recsys: RecsysResource):
        """Read the raw landing files of each day, quarantine bad lines, deduplicate, gate."""
        cfg = recsys.settings
        days = partition_days(context)
        report = ingest_days(cfg, days, progress=context.log.info, detail=context.log.debug)
        yield from _results(report, cfg, warn_only)

    return dg.Definitions(assets=[canonical_events])


def _results(report: IngestReport, settings: Settings, warn_only: set[str]):
    """The materializations of both assets and one result per check, from the ingest report."""
    totals = report.totals()
    last_day = report.days[-1].day
    rows = report.per_day_rows()
    yield dg.MaterializeResult(
        asset_key="canonical_events",
        metadata={
            "dagster/row_count": totals["events"],
            **{k: dg.MetadataValue.int(v) for k, v in totals.items()},
            "reconciled": report.reconciled,
            "per_day": dg.MetadataValue.md(markdown_table(rows, list(rows[0]))),
            "files_read": report.files_read,
            "path": dg.MetadataValue.path(
                str(partition_dir(settings.lake_root, "canonical_events", last_day))
            ),
        },
    )
    reasons = [{"reason": k, "lines": v} for k, v in report.reasons().items()]
    yield dg.MaterializeResult(
        asset_key="quarantine",
        metadata={
            "dagster/row_count": totals["quarantined"],
            "by_reason": dg.MetadataValue.md(markdown_table(reasons, ["reason", "lines"])),
            "path": dg.MetadataValue.path(str(partition_dir(settings.lake_root, "quarantine", last_day))),
        },
    )
    for gate in report.gate_outcomes():
        metadata: dict[str, dg.MetadataValue | str] = {
            "summary": gate.summary,
            "failed_days": ", ".join(gate.failed_days) or "none",
            "details": dg.MetadataValue.md(markdown_table(gate.per_day, ["day", "passed", "summary"])),
        }
        if gate.sample:
            metadata["sample"] = dg.MetadataValue.md(markdown_table(gate.sample, list(gate.sample[0])))
        yield dg.AssetCheckResult(
            asset_key="canonical_events",
            check_name=gate.name,
            passed=gate.passed,
            severity=dg.AssetCheckSeverity.WARN if gate.name in warn_only else dg.AssetCheckSeverity.ERROR,
            metadata=metadata,
        )
