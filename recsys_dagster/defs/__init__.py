"""Dagster wiring only: one folder per domain; the work lives in the plain modules of recsys_dagster."""
