"""Window artifacts as of each day, from the trailing daily aggregates: one asset per kind of recsys_core.kinds."""

from typing import Any

import dagster as dg

from recsys_core.kinds import ARTIFACT_KINDS, ArtifactKind
from recsys_core.settings import Settings
from recsys_dagster.defs.shared import (
    OWNERS,
    RecsysResource,
    daily_partitions,
    markdown_table,
    partition_days,
)
from recsys_dagster.publishing.release import write_build_record
from recsys_dagster.transform.artifacts import build_window_artifacts


def build_window_artifact_asset(kind: ArtifactKind, settings: Settings) -> dg.AssetsDefinition:
    days = kind.window_days(settings.pipeline)

    @dg.asset(
        name=kind.name,
        description=f"{kind.description} Window: {days} days. Format: docs/reference/artifacts.md",
        ins={
            kind.aggregate: dg.AssetIn(
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
        rows: list[dict[str, Any]] = []
        latest = []
        for as_of in partition_days(context):
            builds = build_window_artifacts(
                kind.name, cfg.lake_root, cfg.artifact_root, as_of, cfg.pipeline, run_id=context.run.run_id
            )
            write_build_record(cfg.lake_root, kind.name, as_of, builds)
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
                    f"{kind.name} {as_of} {build.tenant}/{build.surface}: {build.rows:,} rows, version {build.version[:12]}"
                )
            latest = builds
        metadata: dict[str, dg.MetadataValue | str | int] = {
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
    return dg.Definitions(
        assets=[build_window_artifact_asset(kind, settings) for kind in ARTIFACT_KINDS.values()]
    )
