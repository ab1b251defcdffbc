"""Transform: daily aggregates of canonical events, and window artifacts computed from them."""

import dagster as dg

from recsys_core.settings import Settings
from recsys_dagster.defs.transform.aggregates import build_aggregates
from recsys_dagster.defs.transform.artifacts import build_artifacts


def build_defs(settings: Settings) -> dg.Definitions:
    return dg.Definitions.merge(build_aggregates(settings), build_artifacts(settings))
