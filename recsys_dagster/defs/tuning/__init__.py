"""Tuning: the on-demand (and optionally weekly) search for ALS parameters and blend weights."""

from recsys_dagster.defs.tuning.assets import build_tuning as build_defs

__all__ = ["build_defs"]
