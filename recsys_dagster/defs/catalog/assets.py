"""catalog: each tenant's items as of the day, with its checks; content: the content-similarity artifact
built from it. The work is in recsys_dagster.ingest.catalog and recsys_dagster.transform.content."""

import datetime as dt
from typing import Any

import dagster as dg

from recsys_core.catalog import CATALOG, QUARANTINE, UPDATES, partition_dir
from recsys_core.kinds import CONTENT
from recsys_core.lake import read_builds
from recsys_core.settings import Settings
from recsys_dagster.defs.shared import (
    DayLog,
    RecsysResource,
    add_partition_metadata,
    check_outputs,
    daily_asset_options,
    daily_partitions,
    partition_days,
)
from recsys_dagster.defs.transform.artifacts import day_metadata
from recsys_dagster.ingest.catalog import CatalogDay, update_catalog
from recsys_dagster.publishing.release import write_build_record
from recsys_dagster.transform.content import build_content_artifacts

RECONCILED = "catalog_reconciled"
UNIQUE_ITEMS = "catalog_unique_items"
MISSING_ITEMS = "catalog_missing_items"


def build_catalog(settings: Settings) -> dg.Definitions:
    partitions = daily_partitions(settings)
    max_missing = settings.pipeline.catalog.max_missing_share

    @dg.asset(
        name=CATALOG,
        description=(
            "Every item of every tenant's catalog as of the day: the latest of the catalog records landed "
            "on days up to it (raw/catalog/dt=<day>/), unavailable items kept as such. The day's records "
            "are landed into lake/catalog_updates, bad lines into lake/catalog_quarantine with a reason. "
            "Optional: a tenant without a catalog has none. Contract: docs/reference/catalog.md"
        ),
        deps=["canonical_events"],
        kinds={"python", "parquet"},
        **daily_asset_options(settings, "catalog"),
        metadata={"path": dg.MetadataValue.path(str(settings.lake_root / CATALOG))},
        check_specs=[
            dg.AssetCheckSpec(
                RECONCILED,
                asset=CATALOG,
                description="Every landed catalog line is a record, quarantined, a repeat or blank, on every "
                "landing day the state is built from.",
                partitions_def=partitions,
                blocking=True,
            ),
            dg.AssetCheckSpec(
                UNIQUE_ITEMS,
                asset=CATALOG,
                description="One row per (tenant, item_id) in the written state.",
                partitions_def=partitions,
                blocking=True,
            ),
            dg.AssetCheckSpec(
                MISSING_ITEMS,
                asset=CATALOG,
                description=f"At most {max_missing:.1%} of the items in the day's events (of tenants with a "
                "catalog) missing from the catalog (catalog.max_missing_share); warns only.",
                partitions_def=partitions,
            ),
        ],
    )
    def catalog(context: dg.AssetExecutionContext, recsys: RecsysResource):
        cfg = recsys.settings
        log = DayLog(context)
        days: list[CatalogDay] = []
        for day in partition_days(context):
            result = update_catalog(
                cfg.raw_root,
                cfg.lake_root,
                day,
                max_line_bytes=cfg.pipeline.ingest.max_line_bytes,
                max_clock_skew=dt.timedelta(hours=cfg.pipeline.ingest.max_clock_skew_hours),
            )
            record, landing = result.record, result.day_landing
            caught_up = [d for d in record["landed_now"] if d != record["day"]]
            log.info(
                day,
                f"catalog {day}: {record['items']:,} items ({record['available_items']:,} available) of "
                f"{len(record['tenants'])} tenant(s); landed {landing['updates']:,} records, "
                f"{landing['quarantined']:,} quarantined"
                + (f"; also landed earlier day(s) {', '.join(caught_up)}" if caught_up else ""),
            )
            add_partition_metadata(context, day, _metadata(day, result, cfg))
            days.append(result)
        yield dg.MaterializeResult()
        for result in days:
            yield from _check_results(result, max_missing)
        yield from check_outputs(context, CATALOG, (RECONCILED, UNIQUE_ITEMS, MISSING_ITEMS))

    @dg.asset(
        name=CONTENT.name,
        description=(
            f"{CONTENT.description} One per tenant/surface the window artifacts were built for, for tenants "
            "with a catalog (optional in a manifest). Format: docs/reference/artifacts.md"
        ),
        # The catalog gives the items; popularity's build record gives the tenants and surfaces to serve.
        deps=[CATALOG, "popularity"],
        kinds={"python", "parquet"},
        **daily_asset_options(settings, "artifacts"),
    )
    def content(context: dg.AssetExecutionContext, recsys: RecsysResource) -> dg.MaterializeResult:
        cfg = recsys.settings
        log = DayLog(context)
        for as_of in partition_days(context):
            popularity = read_builds(cfg.lake_root, "popularity", as_of)
            if popularity is None:
                raise FileNotFoundError(f"no popularity built as of {as_of}: materialize it before content")
            targets = [(entry["tenant"], entry["surface"]) for entry in popularity["artifacts"]]
            builds = build_content_artifacts(
                cfg.lake_root, cfg.artifact_root, as_of, cfg.pipeline, targets, run_id=context.run.run_id
            )
            record = write_build_record(cfg.lake_root, CONTENT.name, as_of, builds)
            log.info(
                as_of,
                f"content {as_of}: {len(builds)} of {len(targets)} tenant/surface(s) have a catalog; "
                + ", ".join(f"{b.tenant}/{b.surface} {b.rows:,} rows" for b in builds),
            )
            add_partition_metadata(context, as_of, day_metadata(builds, record))
        return dg.MaterializeResult(metadata={"top_k": cfg.pipeline.catalog.content_top_k})

    return dg.Definitions(assets=[catalog, content])


def _check_results(result: CatalogDay, max_missing: float) -> list[dg.AssetCheckEvaluation]:
    record, landing = result.record, result.day_landing
    key, day = dg.AssetKey(CATALOG), record["day"]
    share = record["missing_share"]
    return [
        dg.AssetCheckEvaluation(
            asset_key=key,
            check_name=RECONCILED,
            passed=record["reconciled"],
            metadata={
                "lines": landing["lines_read"],
                "records": landing["updates"],
                "quarantined": landing["quarantined"],
                "landing_days": len(record["inputs"]),
            },
            description=None
            if record["reconciled"]
            else "line counts of a landing day do not add up: see lake/catalog_updates/dt=*/_summary.json",
            blocking=True,
            partition=day,
        ),
        dg.AssetCheckEvaluation(
            asset_key=key,
            check_name=UNIQUE_ITEMS,
            passed=record["duplicate_keys"] == 0,
            metadata={"items": record["items"], "duplicate_keys": record["duplicate_keys"]},
            description=f"{record['duplicate_keys']:,} rows repeat a (tenant, item_id)",
            blocking=True,
            partition=day,
        ),
        dg.AssetCheckEvaluation(
            asset_key=key,
            check_name=MISSING_ITEMS,
            passed=share <= max_missing,
            metadata={
                "share": share,
                "limit": max_missing,
                "missing_items": record["missing_items"],
                "event_items": record["event_items"],
            },
            severity=dg.AssetCheckSeverity.WARN,
            description=f"{share:.2%} of {record['event_items']:,} items in the day's events are not in "
            f"the catalog (limit {max_missing:.1%})",
            partition=day,
        ),
    ]


def _metadata(day: dt.date, result: CatalogDay, settings: Settings) -> dict[str, Any]:
    record, landing = result.record, result.day_landing
    return {
        "dagster/row_count": dg.MetadataValue.int(record["items"]),
        "items": dg.MetadataValue.int(record["items"]),
        "available_items": dg.MetadataValue.int(record["available_items"]),
        "tenants": dg.MetadataValue.int(len(record["tenants"])),
        "landed_records": dg.MetadataValue.int(landing["updates"]),
        "quarantined": dg.MetadataValue.int(landing["quarantined"]),
        "duplicates": dg.MetadataValue.int(landing["duplicates"]),
        "lines_read": dg.MetadataValue.int(landing["lines_read"]),
        "missing_share": dg.MetadataValue.float(record["missing_share"]),
        "path": dg.MetadataValue.path(str(partition_dir(settings.lake_root, day))),
        "updates_path": dg.MetadataValue.path(str(partition_dir(settings.lake_root, day, UPDATES))),
        "quarantine_path": dg.MetadataValue.path(str(partition_dir(settings.lake_root, day, QUARANTINE))),
    }
