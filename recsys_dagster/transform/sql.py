"""Run the plain `.sql` files of `dbt_like_sql/` with DuckDB.

Each file is one SELECT that reads its parameters as DuckDB variables, `getvariable('name')`, so the same
text runs here and in the DuckDB CLI, pasted after one `SET VARIABLE name = value;` statement per parameter
(`paste_script` writes them; `recsys sql` prints them with the pipeline's values). Prepared statement
parameters (`$name`) would not do: the DuckDB CLI cannot supply them to a pasted query.

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
    """The entries of `params` that the file reads (others are ignored, as several files share one set).

    An unset DuckDB variable reads as NULL, which would quietly empty a result (`rank <= NULL`) rather
    than fail, so a parameter the file reads but `params` lacks is an error here.
    """
    names = set(_VARIABLE.findall(sql_text(name)))
    missing = sorted(names - params.keys())
    if missing:
        raise ValueError(f"SQL model {name!r} reads variable(s) {missing} that were not given")
    return {key: value for key, value in params.items() if key in names}


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


def sql_literal(value: Any) -> str:
    """`value` as a DuckDB literal of the type that binding it as a prepared parameter gives (see run_sql)."""
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    if isinstance(value, bool | int):
        return str(value).lower()
    if isinstance(value, float):
        # A bare 0.1 is a DECIMAL; a cast from the shortest text that round-trips is exactly this double.
        return f"'{value!r}'::DOUBLE"
    if isinstance(value, list):
        return "[" + ", ".join(sql_literal(item) for item in value) + "]"
    if isinstance(value, dict):
        return (
            "{" + ", ".join(f"{sql_literal(key)}: {sql_literal(item)}" for key, item in value.items()) + "}"
        )
    raise TypeError(f"no DuckDB literal for {type(value).__name__} {value!r}")


def paste_script(name: str, params: dict[str, Any]) -> str:
    """Statements to paste into the DuckDB CLI that run one SQL file with `params` as `run_sql` does."""
    # run_sql's time zone: it decides how timestamps are shown, and what casting one to a date gives.
    lines = ["SET TimeZone = 'UTC';"]
    for key, value in sql_variables(name, params).items():
        literal = sql_literal(value)
        if isinstance(value, list) and len(literal) > 80:
            # One item per line: the 30 Parquet files of a window on one line are unreadable.
            literal = "[\n" + ",\n".join(f"    {sql_literal(item)}" for item in value) + "\n]"
        lines.append(f"SET VARIABLE {key} = {literal};")
    return "\n".join(lines) + "\n" + sql_text(name)
