"""decisions: a day of the API server's decision traces, landed with its quarantine and checks."""

import datetime as dt
from typing import Any

import dagster as dg

from recsys_core.decisions import DECISIONS, QUARANTINE, partition_dir
from recsys_core.settings import Settings
from recsys_dagster.defs.shared import (
    OWNERS,
    DayLog,
    RecsysResource,
    add_partition_metadata,
    check_outputs,
    daily_partitions,
    partition_days,
)
from recsys_dagster.ingest.decisions import land_decisions

RECONCILED = "decisions_reconciled"
QUARANTINE_RATE = "decisions_quarantine_rate"


def build_audit(settings: Settings) -> dg.Definitions:
    partitions = daily_partitions(settings)
    max_rate = settings.pipeline.checks.max_quarantine_rate

    @dg.asset(
        name=DECISIONS,
        description=(
            "The decision traces the API server wrote on the day (raw/decisions/dt=<day>/), one row per "
            "response: request, artifact and rules versions, candidates with per-source scores, rules "
            "applied, final list. Bad lines go to lake/decisions_quarantine with a reason. Contract: "
            "docs/reference/decisions.md"
        ),
        partitions_def=partitions,
        backfill_policy=dg.BackfillPolicy.single_run(),
        kinds={"python", "parquet"},
        group_name="audit",
        owners=OWNERS,
        metadata={"path": dg.MetadataValue.path(str(settings.lake_root / DECISIONS))},
        check_specs=[
            dg.AssetCheckSpec(
                RECONCILED,
                asset=DECISIONS,
                description="Every line read is a trace, quarantined, a repeated request id or blank.",
                partitions_def=partitions,
                blocking=True,
            ),
            dg.AssetCheckSpec(
                QUARANTINE_RATE,
                asset=DECISIONS,
                description=f"At most {max_rate:.1%} of the lines quarantined (checks.max_quarantine_rate); "
                "warns only: traces feed no model.",
                partitions_def=partitions,
            ),
        ],
    )
    def decisions(context: dg.AssetExecutionContext, recsys: RecsysResource):
        cfg = recsys.settings
        log = DayLog(context)
        summaries = []
        for day in partition_days(context):
            summary = land_decisions(cfg.raw_root, cfg.lake_root, day, cfg.pipeline.ingest.max_line_bytes)
            log.info(
                day,
                f"decisions {day}: {summary['traces']:,} traces, {summary['quarantined']:,} quarantined, "
                f"{summary['duplicates']:,} repeated request ids from {len(summary['files'])} file(s)",
            )
            add_partition_metadata(context, day, _metadata(day, summary, cfg))
            summaries.append(summary)
        yield dg.MaterializeResult()
        for summary in summaries:
            lines = summary["lines_read"] - summary["blank_lines"]
            rate = summary["quarantined"] / lines if lines else 0.0
            yield dg.AssetCheckEvaluation(
                asset_key=dg.AssetKey(DECISIONS),
                check_name=RECONCILED,
                passed=summary["reconciled"],
                metadata={"lines": summary["lines_read"], "traces": summary["traces"]},
                description=None if summary["reconciled"] else "line counts do not add up: see _summary.json",
                blocking=True,
                partition=summary["day"],
            )
            yield dg.AssetCheckEvaluation(
                asset_key=dg.AssetKey(DECISIONS),
                check_name=QUARANTINE_RATE,
                passed=rate <= max_rate,
                metadata={"rate": rate, "limit": max_rate, "quarantined": summary["quarantined"]},
                severity=dg.AssetCheckSeverity.WARN,
                description=f"{rate:.2%} of {lines:,} lines quarantined (limit {max_rate:.1%})",
                partition=summary["day"],
            )
        yield from check_outputs(context, DECISIONS, (RECONCILED, QUARANTINE_RATE))

    return dg.Definitions(assets=[decisions])


def _metadata(day: dt.date, summary: dict[str, Any], settings: Settings) -> dict[str, Any]:
    return {
        "dagster/row_count": dg.MetadataValue.int(summary["traces"]),
        "traces": dg.MetadataValue.int(summary["traces"]),
        "quarantined": dg.MetadataValue.int(summary["quarantined"]),
        "duplicates": dg.MetadataValue.int(summary["duplicates"]),
        "lines_read": dg.MetadataValue.int(summary["lines_read"]),
        "files_read": dg.MetadataValue.int(len(summary["files"])),
        "path": dg.MetadataValue.path(str(partition_dir(settings.lake_root, day))),
        "quarantine_path": dg.MetadataValue.path(str(partition_dir(settings.lake_root, day, QUARANTINE))),
    }
