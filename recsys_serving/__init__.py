"""recsys_serving: the HTTP API over the published artifacts (`create_app` in `recsys_serving.app`).

Imports no Dagster: it shares only `recsys_core` (the artifact format and the settings) with the pipeline.
"""
