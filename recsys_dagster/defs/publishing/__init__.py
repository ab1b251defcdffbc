"""Publishing: the day's artifacts validated, gate-confirmed and published per tenant and surface."""

from recsys_dagster.defs.publishing.assets import build_publishing as build_defs

__all__ = ["build_defs"]
