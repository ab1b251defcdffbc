"""The runs of a SQLite Dagster instance, read without opening the instance.

Opening it (`DagsterInstance.from_config`) creates its tables when they are missing: done while another
process (a `recsys run` just started) opens the same instance for the first time, both create them, and
one fails ("table already exists", "more than one head" from the migration tool). Reading the run table
read-only races nothing.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path


def run_ids(dagster_home: Path, status: str) -> list[str]:
    """The ids of the runs with `status` (e.g. STARTED); none while the run table does not exist yet."""
    database = dagster_home / "history" / "runs.db"
    if not database.exists():
        return []
    try:
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5) as connection:
            rows = connection.execute("SELECT run_id FROM runs WHERE status = ?", (status,)).fetchall()
    except sqlite3.OperationalError:  # no table yet, or a writer holds the database
        return []
    return [run_id for (run_id,) in rows]
