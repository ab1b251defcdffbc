"""Window artifacts as of each day, from the trailing daily aggregates (a derived kind: from the same day's
artifacts of its input kinds): one asset per kind of recsys_core.kinds."""

from pathlib import Path
from typing import Any

import dagster as dg

from recsys_core.kinds import ARTIFACT_KINDS, ArtifactKind
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
from recsys_dagster.publishing.release import write_build_record
from recsys_dagster.transform.artifacts import ArtifactBuild, build_window_artifacts, window_days
from recsys_dagster.transform.lineage import require_aggregates

MAX_TARGETS_SHOWN = 3


def build_window_artifact_asset(kind: ArtifactKind, settings: Settings) -> dg.AssetsDefinition:
    days = kind.window_days(settings.pipeline)
    if kind.aggregate is None:
        ins = {name: dg.AssetIn(dagster_type=dg.Nothing) for name in kind.derived_from}
    else:
        ins = {
            kind.aggregate: dg.AssetIn(
                partition_mapping=dg.TimeWindowPartitionMapping(start_offset=-(days - 1), end_offset=0),
                dagster_type=dg.Nothing,
            )
        }

    @dg.asset(
        name=kind.name,
        description=f"{kind.description} Window: {days} days. Format: docs/reference/artifacts.md",
        ins=ins,
        partitions_def=daily_partitions(settings),
        backfill_policy=dg.BackfillPolicy.single_run(),
        kinds={"duckdb", "parquet"} if kind.aggregate is not None else {"numpy", "parquet"},
        group_name="artifacts",
        owners=OWNERS,
    )
    def window_artifact(context: dg.AssetExecutionContext, recsys: RecsysResource) -> dg.MaterializeResult:
        cfg = recsys.settings
        log = DayLog(context)
        for as_of in partition_days(context):
            if kind.aggregate is not None:
                # The window's aggregates (and item_daily, which lists the tenants and surfaces) must be
                # unmodified and built from the current, passed canonical content of their days.
                require_aggregates(
                    cfg.lake_root, {kind.aggregate, "item_daily"}, window_days(as_of, days), cfg.start_date
                )
            builds = build_window_artifacts(
                kind.name, cfg.lake_root, cfg.artifact_root, as_of, cfg.pipeline, run_id=context.run.run_id
            )
            record = write_build_record(cfg.lake_root, kind.name, as_of, builds)
            for build in builds:
                log.info(
                    as_of,
                    f"{kind.name} {as_of} {build.tenant}/{build.surface}: {build.rows:,} rows, "
                    f"version {build.version[:12]}",
                )
            add_partition_metadata(context, as_of, day_metadata(builds, record))
        return dg.MaterializeResult(metadata={"window_days": days})

    return window_artifact


def day_metadata(builds: list[ArtifactBuild], record: Path) -> dict[str, Any]:
    """What one as-of day built: its build record, and per tenant and surface the version, path and rows."""
    rows = [
        {
            "tenant": build.tenant,
            "surface": build.surface,
            "rows": build.rows,
            "version": build.version[:12],
            "missing days": len(build.missing_days),
        }
        for build in builds
    ]
    metadata: dict[str, Any] = {
        "dagster/row_count": dg.MetadataValue.int(sum(build.rows for build in builds)),
        "builds": dg.MetadataValue.md(markdown_table(rows, list(rows[0]) if rows else ["tenant"])),
        "build_record": dg.MetadataValue.path(str(record)),
    }
    if builds:
        metadata["window"] = f"{builds[0].window_start}..{builds[0].window_end}"
    # Versions, paths and first rows of the first targets (the table above lists every one).
    for build in builds[:MAX_TARGETS_SHOWN]:
        label = f"{build.tenant}/{build.surface}"
        metadata[f"version {label}"] = build.version
        metadata[f"path {label}"] = dg.MetadataValue.path(str(build.path))
        metadata[f"rows {label}"] = dg.MetadataValue.int(build.rows)
        if build.top:
            metadata[f"top rows {label}"] = dg.MetadataValue.md(
                markdown_table(list(build.top), list(build.top[0]))
            )
    return metadata


def build_artifacts(settings: Settings) -> dg.Definitions:
    return dg.Definitions(
        assets=[build_window_artifact_asset(kind, settings) for kind in ARTIFACT_KINDS.values()]
    )
