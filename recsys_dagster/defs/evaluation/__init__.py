"""Evaluation: the offline evaluation of each day's models, and the quality gate publishing relies on."""

from recsys_dagster.defs.evaluation.assets import build_evaluation as build_defs

__all__ = ["build_defs"]
