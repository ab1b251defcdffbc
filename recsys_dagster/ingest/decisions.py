"""Landing a day of decision traces: `raw/decisions/dt=D/*.jsonl` -> the `decisions` table of day D.

Every line becomes a row of `decisions` or of `decisions_quarantine` (with a reason code), or is a blank
line or a repeat of a request id already landed that day (the first is kept); `_summary.json` reconciles
the counts (`recsys_dagster.ingest.landing.land_lines`). The contract and the line rules are
`recsys_core.decisions` (docs/reference/decisions.md).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from recsys_core.decisions import DATA_FILE, QUARANTINE, SCHEMA, landing_dir, parse_trace, partition_dir
from recsys_dagster.ingest.landing import land_lines, landing_files


def land_decisions(raw_root: Path, lake_root: Path, day: dt.date, max_line_bytes: int) -> dict[str, Any]:
    """Land day `day`'s trace files; returns the summary also written to `_summary.json`."""
    return land_lines(
        landing_files(landing_dir(raw_root, day)),
        partition_dir(lake_root, day),
        partition_dir(lake_root, day, QUARANTINE),
        day=day,
        schema=SCHEMA,
        parse=lambda line: parse_trace(line, day, max_line_bytes),
        key=lambda row: (row["tenant"], row["surface"], row["request_id"]),
        rows_name="traces",
        max_line_bytes=max_line_bytes,
        data_file=DATA_FILE,
    )
