"""Ingest: landing files -> canonical_events + quarantine, gated."""

from recsys_dagster.defs.ingest.assets import build_ingest as build_defs

__all__ = ["build_defs"]
