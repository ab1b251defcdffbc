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
import json
import re
from pathlib import Path
from typing import Any, NotRequired, TypedDict, cast

from recsys_core.storage import files_sha256

SUMMARY_FILE = "_summary.json"
CHECKS_FILE = "_checks.json"
BUILDS_FILE = "builds.json"
# The one file of a daily aggregate partition.
AGGREGATE_FILE = "part-00000.parquet"
# Landing files of the API server's exposure log (recsys_serving.exposures names them so): the product's own
# record of what it served, which the gates do not judge as producer data (docs/reference/checks.md).
EXPOSURE_LOG_FILES = r"(^|/)exposures-[^/]*\.jsonl(\.gz)?$"


def is_exposure_log_file(source: str) -> bool:
    """Whether a landing file (as `source_file` names it) is the API server's exposure log."""
    return re.search(EXPOSURE_LOG_FILES, source) is not None


# ------------------------------------------------------------------------------------------ records
# The record files as the pipeline writes them; the types describe the files, they do not shape them.


class ExposureLogProfile(TypedDict):
    """The exposure log's share of a partition, as the gates report it beside their own figures."""

    files: int  # exposure files with a line kept or quarantined
    lines: int  # per file, the last line number that either table holds
    rows: int
    quarantined: int
    reasons: dict[str, int]


class CanonicalProfile(TypedDict):
    """`profile` of `_summary.json`: the figures of the written rows that the gates judge, counted by
    canonicalization as it wrote them (the same figures dbt_like_sql/checks/canonical_profile.sql computes
    from the files). The resource figures count producer rows only (not the exposure log's)."""

    window_start: str  # the arrival window ts_out_of_range_rows was counted against, [start, end) UTC
    window_end: str
    null_key_rows: int
    duplicate_id_rows: int
    ts_out_of_range_rows: int
    value_rule_rows: int  # rows breaking a value rule of the canonical schema (the schema gate's rules)
    events: int
    distinct_items: int
    sessions: int
    items_per_session: int
    exposure_log: ExposureLogProfile


class SummaryRecord(TypedDict):
    """`_summary.json`: what canonicalization did with every line of a day (docs/reference/event-contract.md)."""

    day: str
    files: list[str]
    bytes_read: int
    lines_read: int
    canonical_rows: int
    quarantined: int
    duplicates: int
    blank_lines: int
    reasons: dict[str, int]
    output_files: list[str]
    content_hash: str
    seconds: float | None  # null in the file, so that identical input gives an identical file
    reconciled: bool
    profile: NotRequired[CanonicalProfile]  # absent in partitions written before it was recorded


class GateRecord(TypedDict):
    """One gate's result in `_checks.json`."""

    name: str
    passed: bool
    blocking: bool
    summary: str
    metadata: dict[str, Any]
    sample: list[dict[str, Any]]


class ChecksRecord(TypedDict):
    """`_checks.json`: the gate results of a canonical_events partition (docs/reference/checks.md)."""

    day: str
    content_hash: str  # the `_summary.json` content hash of the data checked
    checked_at: str
    # Where the figures came from: "profile" (the summary's, bound to the files by their content hash) or
    # "files" (counted from the files, for a partition without a usable profile).
    figures_from: NotRequired[str]
    passed: bool  # every blocking gate passed
    results: list[GateRecord]


class BuildWindow(TypedDict):
    start: str
    end: str


class BuiltArtifact(TypedDict):
    """One artifact directory of a build record."""

    tenant: str
    surface: str
    version: str
    path: str
    rows: int
    window: BuildWindow
    missing_days: list[str]


class BuildRecord(TypedDict):
    """`builds.json`: the artifact versions of one kind built as of a day, per tenant and surface."""

    kind: str
    as_of: str
    artifacts: list[BuiltArtifact]


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


class RecordError(ValueError):
    """A record file of the lake exists but is not JSON (cut short by a full disk, edited by hand)."""


def read_json_record(path: Path) -> dict[str, Any] | None:
    """A JSON record file of the lake (summary, checks, builds); None if it does not exist.

    The records are written by the pipeline only, and read back as written, without validation; one that
    is not JSON raises RecordError naming the file.
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        record: dict[str, Any] | None = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RecordError(
            f"{path} cannot be read: not JSON ({exc}); re-materialize the partition it belongs to"
        ) from exc
    return record


def read_summary(lake_root: Path, day: dt.date) -> SummaryRecord | None:
    """The `_summary.json` of a canonical_events partition; None if it was never materialized."""
    record = read_json_record(partition_dir(lake_root, "canonical_events", day) / SUMMARY_FILE)
    return cast(SummaryRecord | None, record)


def read_builds(lake_root: Path, kind: str, as_of: dt.date) -> BuildRecord | None:
    """The `builds.json` of an artifact kind as of a day: the versions built per tenant and surface."""
    return cast(BuildRecord | None, read_json_record(partition_dir(lake_root, kind, as_of) / BUILDS_FILE))


def read_checks(lake_root: Path, day: dt.date) -> ChecksRecord | None:
    """The `_checks.json` (gate results) of a canonical_events partition; None if it was never checked."""
    record = read_json_record(partition_dir(lake_root, "canonical_events", day) / CHECKS_FILE)
    return cast(ChecksRecord | None, record)


def confirm_gates_passed(lake_root: Path, day: dt.date) -> str | None:
    """None if the partition's blocking gates passed on its current data, else why not."""
    record = read_checks(lake_root, day)
    if record is None:
        return f"canonical_events {day}: no gate results (the partition was never checked)"
    summary = read_summary(lake_root, day)
    if summary is None or record["content_hash"] != summary["content_hash"]:
        return f"canonical_events {day}: data changed after it was checked; re-materialize it"
    failed = [r["name"] for r in record["results"] if r["blocking"] and not r["passed"]]
    if failed:
        return f"canonical_events {day}: blocking check(s) failed: {', '.join(failed)}"
    return None


def content_hash(folder: Path) -> str:
    """SHA-256 over the names and bytes of a partition's Parquet files."""
    return files_sha256(parquet_files(folder), with_names=True)
