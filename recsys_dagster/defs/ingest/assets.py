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
from recsys_dagster.ingest.canonicalize import canonicalize_partition
from recsys_dagster.ingest.gates import GATE_DESCRIPTIONS, check_warn_only, run_gates


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
        summaries, gate_rows, failures = [], [], {name: [] for name in GATE_DESCRIPTIONS}
        results_by_gate: dict[str, list] = {name: [] for name in GATE_DESCRIPTIONS}
        for day in days:
            summary = canonicalize_partition(
                cfg.raw_root, cfg.lake_root, day, cfg.pipeline.ingest, context.log.debug
            )
            results = run_gates(cfg.lake_root, day, cfg.pipeline.ingest, cfg.pipeline.checks)
            summaries.append(summary)
            for result in results:
                results_by_gate[result.name].append((day, result))
                if not result.passed:
                    failures[result.name].append(day.isoformat())
            failed = [r.name for r in results if not r.passed]
            gate_rows.append({"day": day.isoformat(), "failed checks": ", ".join(failed) or "none"})
            context.log.info(
                f"{day}: {summary.canonical_rows:,} events, {summary.quarantined:,} quarantined, "
                f"{summary.duplicates:,} duplicates, {summary.blank_lines:,} blank "
                f"of {summary.lines_read:,} lines; checks: {'failed ' + ', '.join(failed) if failed else 'passed'}"
            )
        reasons: dict[str, int] = {}
        for summary in summaries:
            for code, count in summary.reasons.items():
                reasons[code] = reasons.get(code, 0) + count
        rows = [
            {
                "day": s.day,
                "lines": s.lines_read,
                "events": s.canonical_rows,
                "quarantined": s.quarantined,
                "duplicates": s.duplicates,
                "blank": s.blank_lines,
                "reconciled": s.reconciled,
            }
            for s in summaries
        ]
        totals = {key: sum(getattr(s, attr) for s in summaries) for key, attr in _TOTALS.items()}
        last = partition_dir(cfg.lake_root, "canonical_events", days[-1])
        yield dg.MaterializeResult(
            asset_key="canonical_events",
            metadata={
                "dagster/row_count": totals["events"],
                **{k: dg.MetadataValue.int(v) for k, v in totals.items()},
                "reconciled": all(s.reconciled for s in summaries),
                "per_day": dg.MetadataValue.md(markdown_table(rows, list(rows[0]))),
                "files_read": sum(len(s.files) for s in summaries),
                "path": dg.MetadataValue.path(str(last)),
            },
        )
        yield dg.MaterializeResult(
            asset_key="quarantine",
            metadata={
                "dagster/row_count": totals["quarantined"],
                "by_reason": dg.MetadataValue.md(
                    markdown_table(
                        [
                            {"reason": k, "lines": v}
                            for k, v in sorted(reasons.items(), key=lambda kv: -kv[1])
                        ],
                        ["reason", "lines"],
                    )
                ),
                "path": dg.MetadataValue.path(str(partition_dir(cfg.lake_root, "quarantine", days[-1]))),
            },
        )
        for name, per_day in results_by_gate.items():
            failed_days = failures[name]
            worst = next((r for _, r in per_day if not r.passed), per_day[-1][1])
            metadata = {
                "summary": worst.summary
                if len(days) == 1
                else f"{len(failed_days)} of {len(days)} day(s) failed",
                "failed_days": ", ".join(failed_days) or "none",
                "details": dg.MetadataValue.md(
                    markdown_table(
                        [
                            {"day": d.isoformat(), "passed": r.passed, "summary": r.summary}
                            for d, r in per_day
                        ],
                        ["day", "passed", "summary"],
                    )
                ),
            }
            if worst.sample:
                metadata["sample"] = dg.MetadataValue.md(markdown_table(worst.sample, list(worst.sample[0])))
            yield dg.AssetCheckResult(
                asset_key="canonical_events",
                check_name=name,
                passed=not failed_days,
                severity=dg.AssetCheckSeverity.WARN if name in warn_only else dg.AssetCheckSeverity.ERROR,
                metadata=metadata,
            )

    return dg.Definitions(assets=[canonical_events])


_TOTALS = {
    "lines_read": "lines_read",
    "events": "canonical_rows",
    "quarantined": "quarantined",
    "duplicates": "duplicates",
    "blank_lines": "blank_lines",
}
