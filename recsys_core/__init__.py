"""recsys_core: what the pipeline and the API server both stand on.

The artifact and manifest format (`manifest`), the artifact kinds (`kinds`), the lake layout (`lake`), the
file I/O primitives every write goes through (`storage`), the tenant/surface name rule (`names`) and the
settings (`settings`). It imports neither Dagster nor FastAPI, nor DuckDB, polars or pandera: an API-only
install carries none of them.
"""
