"""Run the plain `.sql` files of `dbt_like_sql/` with DuckDB.

Each file is one SELECT that reads its parameters as DuckDB variables, `getvariable('name')`, so the same
text runs here and in the DuckDB CLI, pasted after one `SET VARIABLE name = value;` statement per parameter
(docs/index.md shows one). Prepared statement parameters (`$name`) would not do: the CLI cannot supply them.

Here each variable is set from a prepared parameter, so values are never spliced into SQL text. A fresh
in-memory connection per call keeps concurrent runs and backfills from contending for a database file, and
the variables of one call from reaching another.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from pathlib import Path
from typing import Any

import duckdb
import polars as pl

import dbt_like_sql

SQL_ROOT = Path(dbt_like_sql.__file__).resolve().parent
_VARIABLE = re.compile(r"getvariable\('(\w+)'\)")


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


def sql_variables(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """The entries of `params` the file reads, in the order it first reads them.

    An unset DuckDB variable reads as NULL, which would quietly empty a result (`rank <= NULL`) rather
    than fail, so a parameter the file reads but `params` lacks is an error here.
    """
    names = list(dict.fromkeys(_VARIABLE.findall(sql_text(name))))
    missing = [key for key in names if key not in params]
    if missing:
        raise ValueError(f"SQL model {name!r} reads variable(s) {missing} that were not given")
    return {key: params[key] for key in names}


def run_sql(name: str, params: dict[str, Any], threads: int | None = None) -> pl.DataFrame:
    """Run one SQL file with its parameters and return every row as a polars frame."""
    variables = sql_variables(name, params)
    con = duckdb.connect(":memory:")
    try:
        con.execute("SET TimeZone = 'UTC'")
        # DuckDB spills large joins to `.tmp` in the working directory by default; use the system temp dir.
        con.execute("SET temp_directory = $dir", {"dir": str(Path(tempfile.gettempdir()) / "recsys-duckdb")})
        if threads:
            con.execute(f"SET threads = {int(threads)}")
        for key, value in variables.items():
            # `key` is a bare word (the pattern's \w+), safe to write into the statement.
            con.execute(f"SET VARIABLE {key} = ?", [value])
        return con.sql(sql_text(name)).pl()
    finally:
        con.close()
