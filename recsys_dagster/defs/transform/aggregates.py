"""One daily-partitioned asset per SQL model file in dbt_like_sql/ (the file's hash is its code version)."""

import dagster as dg

from recsys_core.settings import Settings
from recsys_dagster.defs.shared import (
    OWNERS,
    DayLog,
    RecsysResource,
    add_partition_metadata,
    daily_partitions,
    partition_days,
)
from recsys_dagster.transform.aggregates import DAILY_AGGREGATES, DailyAggregate, build_daily_aggregates
from recsys_dagster.transform.lineage import require_canonical
from recsys_dagster.transform.sql import params_version, sql_path, sql_version


def build_daily_aggregate_asset(aggregate: DailyAggregate, settings: Settings) -> dg.AssetsDefinition:
    model = aggregate.name

    @dg.asset(
        name=model,
        deps=["canonical_events"],
        description=f"{aggregate.description} SQL: dbt_like_sql/{sql_path(model).name}",
        partitions_def=daily_partitions(settings),
        backfill_policy=dg.BackfillPolicy.single_run(),
        # The SQL text and the parameters it is run with both shape the output.
        code_version=f"{sql_version(model)}-{params_version(aggregate.params(settings.pipeline))}",
        kinds={"duckdb", "parquet"},
        group_name="aggregates",
        owners=OWNERS,
    )
    def daily_aggregate(context: dg.AssetExecutionContext, recsys: RecsysResource) -> dg.MaterializeResult:
        cfg = recsys.settings
        days = partition_days(context)
        # Only the current, unmodified content of days whose blocking gates passed is aggregated.
        require_canonical(cfg.lake_root, days)
        built = build_daily_aggregates(model, cfg.lake_root, days, aggregate.params(cfg.pipeline))
        log = DayLog(context)
        for built_day in built:
            day, rows = built_day["day"], built_day["rows"]
            log.info(day, f"{model} {day.isoformat()}: {rows:,} rows")
            add_partition_metadata(
                context,
                day,
                {
                    "dagster/row_count": dg.MetadataValue.int(rows),
                    "path": dg.MetadataValue.path(built_day["path"]),
                    "canonical_content_hash": built_day["canonical_hash"],
                },
            )
        return dg.MaterializeResult()

    return daily_aggregate


def build_aggregates(settings: Settings) -> dg.Definitions:
    return dg.Definitions(
        assets=[build_daily_aggregate_asset(aggregate, settings) for aggregate in DAILY_AGGREGATES.values()]
    )
