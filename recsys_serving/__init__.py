"""recsys_serving: the HTTP API over the published artifacts (`create_app` in `recsys_serving.app`).

Imports no Dagster: it shares only `recsys_dagster.manifest` and `recsys_dagster.settings` with the
pipeline, both plain Python.
"""
