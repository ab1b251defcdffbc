"""The Dagster code location: settings from the environment, then one Definitions per domain."""

import datetime as dt

import dagster as dg

from recsys_core.settings import load_settings
from recsys_dagster.defs.aggregates.assets import build_aggregates
from recsys_dagster.defs.artifacts.assets import build_artifacts
from recsys_dagster.defs.automation.schedules import build_schedules
from recsys_dagster.defs.automation.sensors import build_sensors
from recsys_dagster.defs.ingest.assets import build_ingest
from recsys_dagster.defs.publishing.assets import build_publishing
from recsys_dagster.defs.shared import RecsysResource

# The daily schedule runs at 02:00 UTC; a day without a successful materialization warns after 26 hours
# and fails after 30 (docs/operations.md has the SLO and runbooks).
DAILY_FRESHNESS = dg.FreshnessPolicy.time_window(
    warn_window=dt.timedelta(hours=26), fail_window=dt.timedelta(hours=30)
)


def build_definitions() -> dg.Definitions:
    settings = load_settings()
    defs = dg.Definitions.merge(
        build_ingest(settings),
        build_aggregates(settings),
        build_artifacts(settings),
        build_publishing(settings),
        build_schedules(),
        build_sensors(),
        dg.Definitions(resources={"recsys": RecsysResource()}),
    )
    return defs.map_resolved_asset_specs(func=lambda spec: dg.apply_freshness_policy(spec, DAILY_FRESHNESS))


defs = build_definitions()
