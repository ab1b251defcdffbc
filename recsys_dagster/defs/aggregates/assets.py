"""One daily-partitioned asset per SQL model file in dbt_like_sql/ (the file's hash is its code version)."""

import dagster as dg

from recsys_core.settings import Settings
from recsys_dagster.defs.shared import (
    OWNERS,
    RecsysResource,
    daily_partitions,
    markdown_table,
    partition_days,
)
from recsys_dagster.transform.aggregates import build_daily_aggregates
from recsys_dagster.transform.artifacts import daily_aggregate_params
from recsys_dagster.transform.sql import params_version, sql_path, sql_version

DAILY_MODELS = {
    "item_daily": "Per item and event type: events, distinct sessions and users, last event time.",
    "pair_daily": (
        "Session co-occurrence pair counts (sessions capped at artifacts.cooc.max_session_items distinct items), "
        "with per-item and total session counts for normalisation."
    ),
    "user_item_daily": "Per known user and item: event-type-weighted interactions, event count, last event time.",
}


def build_daily_aggregate_asset(model: str, description: str, settings: Settings) -> dg.AssetsDefinition:
    @dg.asset(
        name=model,
        deps=["canonical_events"],
        description=f"{description} SQL: dbt_like_sql/{sql_path(model).name}",
        partitions_def=daily_partitions(settings),
        backfill_policy=dg.BackfillPolicy.single_run(),
        # The SQL text and the parameters it is run with both shape the output.
        code_version=f"{sql_version(model)}-{params_version(daily_aggregate_params(model, settings.pipeline))}",
        kinds={"duckdb", "parquet"},
        group_name="aggregates",
        owners=OWNERS,
    )
    def daily_aggregate(context: dg.AssetExecutionContext, recsys: RecsysResource) -> dg.MaterializeResult:
        cfg = recsys.settings
        built = build_daily_aggregates(
            model, cfg.lake_root, partition_days(context), daily_aggregate_params(model, cfg.pipeline)
        )
        rows = [{"day": b["day"].isoformat(), "rows": b["rows"]} for b in built]
        for row in rows:
            context.log.info(f"{model} {row['day']}: {row['rows']:,} rows")
        return dg.MaterializeResult(
            metadata={
                "dagster/row_count": sum(r["rows"] for r in rows),
                "per_day": dg.MetadataValue.md(markdown_table(rows, ["day", "rows"])),
                "path": dg.MetadataValue.path(built[-1]["path"]),
            }
        )

    return daily_aggregate


def build_aggregates(settings: Settings) -> dg.Definitions:
    return dg.Definitions(
        assets=[build_daily_aggregate_asset(model, text, settings) for model, text in DAILY_MODELS.items()]
    )
