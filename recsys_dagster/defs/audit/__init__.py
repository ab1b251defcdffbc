"""Audit: the decision traces the API server writes, landed as a daily table the audit lookups read."""

from recsys_dagster.defs.audit.assets import build_audit as build_defs

__all__ = ["build_defs"]
