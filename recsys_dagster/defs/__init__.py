"""Dagster wiring only, one package per domain (each exposes `build_defs(settings)`); the work lives in the
plain modules of recsys_dagster (ingest/, transform/, publishing/, automation/)."""
