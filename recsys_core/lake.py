"""The lake layout: where daily partitions, their records and the landing folders live.

```
<raw root>/dt=YYYY-MM-DD/*.jsonl[.gz]                 landing files, per arrival day
<lake root>/<asset>/dt=YYYY-MM-DD/*.parquet           one daily partition of an asset
<lake root>/canonical_events/dt=.../_summary.json     what canonicalization counted (reconciliation, hash)
<lake root>/canonical_events/dt=.../_checks.json      the gate results, tied to the data by content hash
<lake root>/<artifact kind>/dt=.../builds.json        the artifact versions built as of that day
```
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path
from typing import Any

SUMMARY_FILE = "_summary.json"
CHECKS_FILE = "_checks.json"
BUILDS_FILE = "builds.json"
# The one file of a daily aggregate partition.
AGGREGATE_FILE = "part-00000.parquet"


def day_folder(day: dt.date) -> str:
    """The folder name of a day's partition or landing folder: `dt=YYYY-MM-DD`."""
    return f"dt={day.isoformat()}"


def partition_dir(lake_root: Path, asset: str, day: dt.date) -> Path:
    return Path(lake_root) / asset / day_folder(day)


def landing_dir(raw_root: Path, day: dt.date) -> Path:
    return Path(raw_root) / day_folder(day)


def parquet_files(folder: Path) -> list[Path]:
    """The Parquet files of a partition, in name order (the order they were written)."""
    return sorted(Path(folder).glob("*.parquet"))


def read_json_record(path: Path) -> dict[str, Any] | None:
    """A JSON record file of the lake (summary, checks, builds); None if it does not exist."""
    return json.loads(Path(path).read_text()) if Path(path).exists() else None


def read_summary(lake_root: Path, day: dt.date) -> dict[str, Any] | None:
    """The `_summary.json` of a canonical_events partition; None if it was never materialized."""
    return read_json_record(partition_dir(lake_root, "canonical_events", day) / SUMMARY_FILE)


def read_builds(lake_root: Path, kind: str, as_of: dt.date) -> dict[str, Any] | None:
    """The `builds.json` of an artifact kind as of a day: the versions built per tenant and surface."""
    return read_json_record(partition_dir(lake_root, kind, as_of) / BUILDS_FILE)


def read_checks(lake_root: Path, day: dt.date) -> dict[str, Any] | None:
    """The `_checks.json` (gate results) of a canonical_events partition; None if it was never checked."""
    return read_json_record(partition_dir(lake_root, "canonical_events", day) / CHECKS_FILE)


def content_hash(folder: Path) -> str:
    """SHA-256 over the names and bytes of a partition's Parquet files."""
    digest = hashlib.sha256()
    for path in parquet_files(folder):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()
