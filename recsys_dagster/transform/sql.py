"""Run the plain `.sql` files of `dbt_like_sql/` with DuckDB.

Each file is one SELECT with named `$parameters`, so it runs unchanged in the DuckDB CLI
(`SET VARIABLE` / a prepared statement) and here. A fresh in-memory connection per call keeps
concurrent runs and backfills from contending for a database file.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

import duckdb
import polars as pl

import dbt_like_sql

SQL_ROOT = Path(dbt_like_sql.__file__).resolve().parent


def sql_path(name: str) -> Path:
    """`name` is relative to dbt_like_sql/, without the `.sql` suffix (e.g. `checks/canonical_null_keys`)."""
    path = SQL_ROOT / f"{name}.sql"
    if not path.is_file():
        raise FileNotFoundError(f"no SQL model {name!r} at {path}")
    return path


def sql_text(name: str) -> str:
    return sql_path(name).read_text(encoding="utf-8")


def sql_version(name: str) -> str:
    """Hash of the file's text: the Dagster code version of anything built from it."""
    return hashlib.sha256(sql_text(name).encode()).hexdigest()[:16]


def params_version(params: dict[str, Any]) -> str:
    """Short hash of SQL parameters (for code versions): equal parameters, equal hash."""
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:12]


def run_sql(name: str, params: dict[str, Any], threads: int | None = None) -> pl.DataFrame:
    """Run one SQL file with its parameters and return every row as a polars frame."""
    con = duckdb.connect(":memory:")
    try:
        con.execute("SET TimeZone = 'UTC'")
        # DuckDB spills large joins to `.tmp` in the working directory by default; use the system temp dir.
        con.execute("SET temp_directory = $dir", {"dir": str(Path(tempfile.gettempdir()) / "recsys-duckdb")})
        if threads:
            con.execute(f"SET threads = {int(threads)}")
        used = {key: value for key, value in params.items() if f"${key}" in sql_text(name)}
        return con.sql(sql_text(name), params=used).pl()
    finally:
        con.close()
