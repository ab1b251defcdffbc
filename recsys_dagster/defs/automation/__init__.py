"""Automation: the daily schedule, and the freshness and run-failure alert sensors."""

import dagster as dg

from recsys_core.settings import Settings
from recsys_dagster.defs.automation.schedules import build_schedules
from recsys_dagster.defs.automation.sensors import build_sensors


def build_defs(settings: Settings) -> dg.Definitions:
    return dg.Definitions.merge(build_schedules(), build_sensors())
