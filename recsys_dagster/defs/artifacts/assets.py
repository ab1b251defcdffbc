"""Window artifacts (popularity, cooc, user_history) as of each day, from the trailing daily aggregates."""

import dagster as dg

from recsys_core.settings import Settings
from recsys_dagster.defs.shared import (
    OWNERS,
    RecsysResource,
    daily_partitions,
    markdown_table,
    partition_days,
)
from recsys_dagster.publishing.release import write_build_record
from recsys_dagster.transform.artifacts import AGGREGATE_OF, KINDS, build_window_artifacts, window_size

DESCRIPTIONS = {
    "popularity": "Top-N items per tenant/surface by event-type-weighted counts over the trailing window.",
    "cooc": "Each item's top-K neighbours by normalised session co-occurrence over the trailing window.",
    "user_history": "Each user's most recent distinct items in the trailing window (exclude-seen, context).",
}


def build_window_artifact_asset(kind: str, settings: Settings) -> dg.AssetsDefinition:
    days = window_size(kind, settings.pipeline)

    @dg.asset(
        name=kind,
        description=f"{DESCRIPTIONS[kind]} Window: {days} days. Format: docs/reference/artifacts.md",
        ins={
            AGGREGATE_OF[kind]: dg.AssetIn(
                partition_mapping=dg.TimeWindowPartitionMapping(start_offset=-(days - 1), end_offset=0),
                dagster_type=dg.Nothing,
            )
        },
        partitions_def=daily_partitions(settings),
        backfill_policy=dg.BackfillPolicy.single_run(),
        kinds={"duckdb", "parquet"},
        group_name="artifacts",
        owners=OWNERS,
    )
    def window_artifact(context: dg.AssetExecutionContext, recsys: RecsysResource) -> dg.MaterializeResult:
        cfg = recsys.settings
        rows, latest = [], []
        for as_of in partition_days(context):
            builds = build_window_artifacts(
                kind, cfg.lake_root, cfg.artifact_root, as_of, cfg.pipeline, run_id=context.run.run_id
            )
            write_build_record(cfg.lake_root, kind, as_of, builds)
            for build in builds:
                rows.append(
                    {
                        "as_of": as_of.isoformat(),
                        "tenant": build.tenant,
                        "surface": build.surface,
                        "rows": build.rows,
                        "version": build.version[:12],
                        "missing days": len(build.missing_days),
                    }
                )
                context.log.info(
                    f"{kind} {as_of} {build.tenant}/{build.surface}: {build.rows:,} rows, version {build.version[:12]}"
                )
            latest = builds
        metadata = {
            "dagster/row_count": sum(r["rows"] for r in rows),
            "builds": dg.MetadataValue.md(markdown_table(rows, list(rows[0]) if rows else ["as_of"])),
            "window_days": days,
        }
        for build in latest[:3]:
            label = f"{build.tenant}/{build.surface}"
            metadata[f"path {label}"] = dg.MetadataValue.path(str(build.path))
            if build.top:
                metadata[f"top rows {label}"] = dg.MetadataValue.md(
                    markdown_table(list(build.top), list(build.top[0]))
                )
        return dg.MaterializeResult(metadata=metadata)

    return window_artifact


def build_artifacts(settings: Settings) -> dg.Definitions:
    return dg.Definitions(assets=[build_window_artifact_asset(kind, settings) for kind in KINDS])
