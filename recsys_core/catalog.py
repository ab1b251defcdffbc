"""The item catalog: what a tenant's items are (title, categories, tags, availability, attributes).

Catalog records arrive as JSON lines under `<raw root>/catalog/dt=YYYY-MM-DD/` (written by `recsys import`
or by any producer); each is an update of one item of one tenant at its `updated_at`. The pipeline lands a
day of them into `lake/catalog_updates/dt=D/` (bad lines into `catalog_quarantine` with a reason, a record
repeated verbatim kept once) and keeps `lake/catalog/dt=D/`: the latest state of every item as of D, from
every update landed on days <= D. A catalog belongs to a tenant and serves all its surfaces, and it is
optional: a tenant without one simply has none. docs/reference/catalog.md is the contract; this module is
its code (pyarrow and the standard library only, so that the API server may read the state too).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypedDict, cast

import pyarrow as pa
import pyarrow.parquet as pq

from recsys_core import lake
from recsys_core.lake import SUMMARY_FILE, read_json_record
from recsys_core.landing import LINE_REASONS, LineError, iso_timestamp, json_object
from recsys_core.names import UnsafePathError, validate_name
from recsys_core.storage import file_sha256

CATALOG_VERSION = 1
# The folder under the raw root, and the lake tables.
CATALOG = "catalog"
UPDATES = "catalog_updates"
QUARANTINE = "catalog_quarantine"
DATA_FILE = "part-00000.parquet"
MAX_ID_CHARS = 256
MAX_TITLE_CHARS = 1024
MAX_LABEL_CHARS = 256
MAX_LABELS = 1000
# An `updated_at` in epoch milliseconds: the years 0001-9999, as for events.
MIN_EPOCH_MS, MAX_EPOCH_MS = -62_135_596_800_000, 253_402_300_799_999

# Reason codes of quarantined catalog lines, in the order they are checked.
REASONS = (
    *LINE_REASONS,
    "unsupported_version",
    "missing_field",
    "bad_type",
    "invalid_name",
    "empty_id",
    "id_too_long",
    "bad_ts",
    "ts_out_of_range",
)

_ITEM_FIELDS = [
    ("tenant", pa.string()),
    ("item_id", pa.string()),
    ("title", pa.string()),
    ("categories", pa.list_(pa.string())),
    ("tags", pa.list_(pa.string())),
    ("available", pa.bool_()),
    ("attributes", pa.string()),  # the record's attributes object, canonical JSON
    ("updated_at", pa.timestamp("us", tz="UTC")),
]
# `catalog_updates`: every valid record of a landing day, in reading order, with where it was read.
UPDATES_SCHEMA = pa.schema([*_ITEM_FIELDS, ("source_file", pa.string()), ("source_line", pa.int64())])
# `catalog`: one row per (tenant, item_id), the latest update as of the day, sorted by tenant and item_id;
# `landed_on` is the landing day of that update.
STATE_SCHEMA = pa.schema([*_ITEM_FIELDS, ("landed_on", pa.date32())])


class CatalogRecord(TypedDict):
    """`lake/catalog/dt=D/_summary.json`: the state as of D and the figures of its checks."""

    day: str
    items: int
    available_items: int
    tenants: dict[str, int]  # items per tenant
    inputs: dict[str, str]  # the landing days whose updates the state folds -> their landing's fingerprint
    landed_now: list[str]  # the days landed by this materialization (D, and any caught up)
    from_previous_day: bool  # folded from the state as of D - 1 plus D's updates, not from every landing
    reconciled: bool  # every landing day used reconciles
    duplicate_keys: int  # rows of the written state whose (tenant, item_id) is not unique
    event_items: int  # distinct (tenant, item_id) in canonical_events D, tenants with a catalog only
    missing_items: int  # of those, the ones the state lacks
    missing_share: float
    sha256: str  # of the state's DATA_FILE
    passed: bool  # the blocking checks: reconciled and no duplicate key


class CatalogError(LineError):
    """A catalog line that breaks the contract; `reason` is one of REASONS."""


def landing_dir(raw_root: Path, day: dt.date) -> Path:
    """The folder catalog records landing on day D are written to."""
    return lake.landing_dir(Path(raw_root) / CATALOG, day)


def landing_days(raw_root: Path, until: dt.date) -> list[dt.date]:
    """The days up to `until` whose landing folder exists, oldest first."""
    days = []
    for folder in (Path(raw_root) / CATALOG).glob("dt=*"):
        try:
            day = dt.date.fromisoformat(folder.name.removeprefix("dt="))
        except ValueError:
            continue
        if day <= until and folder.is_dir():
            days.append(day)
    return sorted(days)


def partition_dir(lake_root: Path, day: dt.date, table: str = CATALOG) -> Path:
    return lake.partition_dir(lake_root, table, day)


def item_line(record: Mapping[str, Any]) -> bytes:
    """One catalog record as a JSON line (compact, keys in the contract's order, no NaN)."""
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode() + b"\n"


def parse_item(
    line: bytes, day: dt.date, max_line_bytes: int, max_clock_skew: dt.timedelta
) -> dict[str, Any]:
    """The `catalog_updates` row of one line of day `day`'s landing folder (without the source columns);
    `CatalogError` if it breaks the contract (docs/reference/catalog.md lists the rules in order)."""
    raw = json_object(line, max_line_bytes, CatalogError)
    if raw.get("v", CATALOG_VERSION) != CATALOG_VERSION:
        raise CatalogError("unsupported_version", f"v={raw.get('v')!r}, expected {CATALOG_VERSION}")
    for name in ("tenant", "item_id", "updated_at"):
        if raw.get(name) is None:
            raise CatalogError("missing_field", name)
    tenant = raw["tenant"]
    if not isinstance(tenant, str):
        raise CatalogError("bad_type", "tenant must be a string")
    row: dict[str, Any] = {
        "tenant": tenant,
        "item_id": _item_id(raw["item_id"]),
        "title": _title(raw.get("title")),
        "categories": _labels(raw, "categories"),
        "tags": _labels(raw, "tags"),
        "available": _available(raw.get("available", True)),
        "attributes": _attributes(raw.get("attributes")),
        "updated_at": _updated_at(raw["updated_at"]),
    }
    try:
        validate_name("tenant", tenant)
    except UnsafePathError as exc:
        raise CatalogError("invalid_name", str(exc)) from None
    latest = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), dt.UTC) + max_clock_skew
    if row["updated_at"] >= latest:
        raise CatalogError(
            "ts_out_of_range", f"updated_at {raw['updated_at']} is after the end of {day}, its landing day"
        )
    return row


def record_key(row: Mapping[str, Any]) -> tuple[str, ...]:
    """Every field of a landed record: two lines with the same key say the same thing (a repeat)."""
    return (
        row["tenant"],
        row["item_id"],
        row["updated_at"].isoformat(),
        row["title"],
        json.dumps(row["categories"]),
        json.dumps(row["tags"]),
        str(row["available"]),
        row["attributes"],
    )


def _item_id(value: object) -> str:
    # Numeric ids are read as their digits, as for events, so that an item is the same item in both.
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise CatalogError("bad_type", "item_id must be a string (or an integer)")
    item_id = value.strip()
    if not item_id:
        raise CatalogError("empty_id", "item_id is empty")
    if len(item_id) > MAX_ID_CHARS:
        raise CatalogError("id_too_long", f"item_id has {len(item_id):,} characters, limit is {MAX_ID_CHARS}")
    return item_id


def _title(value: object) -> str:
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > MAX_TITLE_CHARS:
        raise CatalogError("bad_type", f"title must be a string of at most {MAX_TITLE_CHARS} characters")
    return value.strip()


def _labels(raw: Mapping[str, Any], name: str) -> list[str]:
    """A list of labels, trimmed, each kept once in its first position."""
    value = raw.get(name)
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_LABELS:
        raise CatalogError("bad_type", f"{name} must be a list of at most {MAX_LABELS} strings")
    labels: dict[str, None] = {}
    for entry in value:
        label = entry.strip() if isinstance(entry, str) else ""
        if not label or len(label) > MAX_LABEL_CHARS:
            raise CatalogError(
                "bad_type", f"{name} must hold non-empty strings of at most {MAX_LABEL_CHARS} characters"
            )
        labels.setdefault(label)
    return list(labels)


def _available(value: object) -> bool:
    if not isinstance(value, bool):
        raise CatalogError("bad_type", "available must be true or false")
    return value


def _attributes(value: object) -> str:
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise CatalogError("bad_type", "attributes must be an object")
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _updated_at(value: object) -> dt.datetime:
    if isinstance(value, int) and not isinstance(value, bool):
        if not MIN_EPOCH_MS <= value <= MAX_EPOCH_MS:
            raise CatalogError("bad_ts", f"updated_at {value} is out of the years 0001-9999")
        return dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(milliseconds=value)
    return iso_timestamp(value, "updated_at", CatalogError)


def read_catalog_record(lake_root: Path, day: dt.date) -> CatalogRecord | None:
    """The `_summary.json` of the catalog state as of `day`; None if it was never materialized."""
    return cast(CatalogRecord | None, read_json_record(partition_dir(lake_root, day) / SUMMARY_FILE))


def catalog_problem(lake_root: Path, day: dt.date) -> str | None:
    """None if the catalog state as of `day` exists, is unmodified and passed its blocking checks; else
    why not and what to re-run."""
    record = read_catalog_record(lake_root, day)
    rerun = f'recsys run --start {day} --end {day} --select "key:catalog"'
    if record is None:
        return f"catalog {day} is missing: materialize it first ({rerun})"
    found = file_sha256(partition_dir(lake_root, day) / DATA_FILE)
    if found != record["sha256"]:
        return f"catalog {day}: {DATA_FILE} changed after it was written; re-materialize it ({rerun})"
    if not record["passed"]:
        return f"catalog {day} failed its blocking checks (see its _summary.json); fix the landing and re-run ({rerun})"
    return None


def read_catalog(lake_root: Path, day: dt.date) -> pa.Table:
    """The catalog state as of `day` (sorted by tenant and item_id)."""
    return pq.read_table(partition_dir(lake_root, day) / DATA_FILE, schema=STATE_SCHEMA)
