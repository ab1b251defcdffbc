"""Catalog: each tenant's items as of the day, landed from catalog records, and the content artifact built
from it."""

from recsys_dagster.defs.catalog.assets import build_catalog as build_defs

__all__ = ["build_defs"]
