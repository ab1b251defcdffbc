"""Decision traces: why a response held what it held, as data the pipeline lands like any other events.

The API server writes one trace per recommendation response (a JSON line) under
`<raw root>/decisions/dt=YYYY-MM-DD/`; the pipeline's `decisions` asset turns a day of them into
`<lake root>/decisions/dt=YYYY-MM-DD/part-00000.parquet` (bad lines into `decisions_quarantine` with a
reason, a repeated request id kept once), and the audit lookups (`GET /v1/audit/decisions`,
`recsys audit`) read that table. docs/reference/decisions.md is the contract; this module is its code,
shared by the server (which writes), the pipeline (which lands) and the lookups (which read), so it uses
only pyarrow and the standard library.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds

from recsys_core import lake
from recsys_core.landing import (
    LINE_REASONS,
    LineError,
    iso_timestamp,
    json_object,
)
from recsys_core.names import UnsafePathError, validate_name

TRACE_VERSION = 1
DECISIONS = "decisions"
QUARANTINE = "decisions_quarantine"
DATA_FILE = "part-00000.parquet"
MAX_ID_CHARS = 256

# Reason codes of quarantined trace lines, in the order they are checked.
REASONS = (
    *LINE_REASONS,
    "unsupported_version",
    "missing_field",
    "bad_type",
    "invalid_name",
    "bad_ts",
    "wrong_day",
)

_ITEM = pa.struct([("item_id", pa.string()), ("score", pa.float64()), ("rule_ids", pa.list_(pa.string()))])
_CANDIDATE = pa.struct(
    [("item_id", pa.string()), ("score", pa.float64()), ("sources", pa.map_(pa.string(), pa.float64()))]
)
# The canonical `decisions` table, one row per response; rows sorted by (tenant, surface, ts, request_id).
SCHEMA = pa.schema(
    [
        ("request_id", pa.string()),
        ("ts", pa.timestamp("us", tz="UTC")),
        ("tenant", pa.string()),
        ("surface", pa.string()),
        ("user_id", pa.string()),
        ("endpoint", pa.string()),
        ("params", pa.string()),  # the request's parameters, canonical JSON
        ("manifest_version", pa.string()),
        ("artifacts", pa.map_(pa.string(), pa.string())),  # kind -> version served
        ("rules_version", pa.string()),
        ("candidates", pa.list_(_CANDIDATE)),
        ("rules_applied", pa.list_(pa.string())),
        ("items", pa.list_(_ITEM)),
    ]
)


class TraceError(LineError):
    """A trace line that breaks the contract; `reason` is one of REASONS."""


def landing_dir(raw_root: Path, day: dt.date) -> Path:
    """The folder the server writes day D's traces to."""
    return lake.landing_dir(Path(raw_root) / DECISIONS, day)


def partition_dir(lake_root: Path, day: dt.date, table: str = DECISIONS) -> Path:
    return lake.partition_dir(lake_root, table, day)


def trace_line(trace: Mapping[str, Any]) -> bytes:
    """One trace as the JSON line the server writes (compact, no NaN)."""
    return json.dumps(trace, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode() + b"\n"


def parse_trace(line: bytes, day: dt.date, max_line_bytes: int) -> dict[str, Any]:
    """The canonical row of one trace line of day `day`'s landing folder; `TraceError` if it breaks the
    contract (docs/reference/decisions.md lists the rules in the order they are checked)."""
    raw = json_object(line, max_line_bytes, TraceError)
    if raw.get("v") != TRACE_VERSION:
        raise TraceError("unsupported_version", f"v={raw.get('v')!r}, expected {TRACE_VERSION}")
    for name in ("request_id", "ts", "tenant", "surface", "manifest_version", "items"):
        if raw.get(name) is None:
            raise TraceError("missing_field", name)
    moment = iso_timestamp(raw["ts"], "ts", TraceError)
    items = [_item(entry) for entry in _list(raw, "items")]
    row: dict[str, Any] = {
        "request_id": _text(raw, "request_id"),
        "ts": moment,
        "tenant": _text(raw, "tenant"),
        "surface": _text(raw, "surface"),
        "user_id": _text(raw, "user_id", optional=True),
        "endpoint": _text(raw, "endpoint", optional=True) or "recommendations",
        "params": json.dumps(_object(raw, "params"), sort_keys=True, separators=(",", ":")),
        "manifest_version": _text(raw, "manifest_version"),
        "artifacts": sorted(_string_map(raw, "artifacts").items()),
        "rules_version": _text(raw, "rules_version", optional=True),
        "candidates": [_candidate(entry) for entry in _list(raw, "candidates")],
        "rules_applied": sorted({rule for item in items for rule in item["rule_ids"]}),
        "items": items,
    }
    for name in ("tenant", "surface"):
        try:
            validate_name(name, row[name])
        except UnsafePathError as exc:
            raise TraceError("invalid_name", str(exc)) from None
    if moment.date() != day:
        raise TraceError("wrong_day", f"ts {raw['ts']} is not on {day}, the day of its folder")
    return row


def _text(raw: Mapping[str, Any], name: str, *, optional: bool = False) -> str | None:
    value = raw.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value or len(value) > MAX_ID_CHARS:
        raise TraceError("bad_type", f"{name} must be a string of 1-{MAX_ID_CHARS} characters")
    return value


def _object(raw: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = raw.get(name, {})
    if not isinstance(value, dict):
        raise TraceError("bad_type", f"{name} must be an object")
    return value


def _string_map(raw: Mapping[str, Any], name: str) -> dict[str, str]:
    value = _object(raw, name)
    if not all(isinstance(v, str) for v in value.values()):
        raise TraceError("bad_type", f"{name} must map names to strings")
    return value


def _list(raw: Mapping[str, Any], name: str) -> list[Any]:
    value = raw.get(name, [])
    if not isinstance(value, list):
        raise TraceError("bad_type", f"{name} must be a list")
    return value


def _score(entry: Mapping[str, Any], what: str) -> float | None:
    score = entry.get("score")
    if score is None:
        return None
    if isinstance(score, bool) or not isinstance(score, int | float) or not math.isfinite(score):
        raise TraceError("bad_type", f"{what} score must be a number")
    return float(score)


def _candidate(entry: object) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise TraceError("bad_type", "a candidate must be an object")
    sources = _object(entry, "sources")
    if not all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in sources.values()
    ):
        raise TraceError("bad_type", "candidate sources must map source names to numbers")
    return {
        "item_id": _text(entry, "item_id"),
        "score": _score(entry, "candidate"),
        "sources": sorted((name, float(v)) for name, v in sources.items()),
    }


def _item(entry: object) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise TraceError("bad_type", "an item must be an object")
    rule_ids = _list(entry, "rule_ids")
    if not all(isinstance(rule, str) for rule in rule_ids):
        raise TraceError("bad_type", "rule_ids must be strings")
    return {"item_id": _text(entry, "item_id"), "score": _score(entry, "item"), "rule_ids": rule_ids}


def find_decisions(
    lake_root: Path,
    tenant: str,
    surface: str,
    *,
    request_id: str | None = None,
    user_id: str | None = None,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    """Landed traces of a tenant and surface, newest first: the one with `request_id`, or those of `user_id`
    between `since` (inclusive) and `until` (exclusive). Only the day partitions the time range covers are
    read; without a range, every landed day."""
    days = list(_partitions(lake_root, since, until))
    if not days:
        return []
    dataset = ds.dataset([str(path) for path in days], schema=SCHEMA, format="parquet")
    condition = (ds.field("tenant") == tenant) & (ds.field("surface") == surface)
    if request_id is not None:
        condition &= ds.field("request_id") == request_id
    if user_id is not None:
        condition &= ds.field("user_id") == user_id
    if since is not None:
        condition &= ds.field("ts") >= pa.scalar(since.astimezone(dt.UTC), SCHEMA.field("ts").type)
    if until is not None:
        condition &= ds.field("ts") < pa.scalar(until.astimezone(dt.UTC), SCHEMA.field("ts").type)
    rows = dataset.to_table(filter=condition).to_pylist()
    rows.sort(key=lambda row: (row["ts"], row["request_id"]), reverse=True)
    return [as_response(row) for row in rows[:limit]]


# The columns of a trace that say what was asked (not what was answered): what a replay needs.
REQUEST_COLUMNS = ("request_id", "ts", "user_id", "params")


def recent_requests(
    lake_root: Path,
    tenant: str,
    surface: str,
    *,
    since: dt.datetime,
    limit: int,
    endpoint: str = "recommendations",
) -> list[dict[str, Any]]:
    """The newest `limit` landed requests of a tenant, surface and endpoint from `since` on, newest first
    (by time, then request id), each with only REQUEST_COLUMNS (`params` parsed). Day partitions are read
    newest first, these columns only, until `limit` are found: a sample of a busy day never loads its
    candidate lists."""
    condition = (
        (ds.field("tenant") == tenant)
        & (ds.field("surface") == surface)
        & (ds.field("endpoint") == endpoint)
        & (ds.field("ts") >= pa.scalar(since.astimezone(dt.UTC), SCHEMA.field("ts").type))
    )
    found: list[dict[str, Any]] = []
    for path in reversed(list(_partitions(lake_root, since, None))):
        if len(found) >= limit:
            break
        table = ds.dataset(str(path), schema=SCHEMA, format="parquet").to_table(
            columns=list(REQUEST_COLUMNS), filter=condition
        )
        newest = table.sort_by([("ts", "descending"), ("request_id", "descending")]).slice(
            0, limit - len(found)
        )
        found.extend({**row, "params": json.loads(row["params"])} for row in newest.to_pylist())
    return found


def _partitions(lake_root: Path, since: dt.datetime | None, until: dt.datetime | None) -> Iterator[Path]:
    first = since.astimezone(dt.UTC).date() if since else None
    last = until.astimezone(dt.UTC).date() if until else None
    for folder in sorted((Path(lake_root) / DECISIONS).glob("dt=*")):
        try:
            day = dt.date.fromisoformat(folder.name.removeprefix("dt="))
        except ValueError:
            continue
        if (
            (first is None or day >= first)
            and (last is None or day <= last)
            and (folder / DATA_FILE).is_file()
        ):
            yield folder / DATA_FILE


def as_response(row: Mapping[str, Any]) -> dict[str, Any]:
    """A landed trace row in the shape the server wrote it (maps as objects, params parsed)."""
    return {
        "v": TRACE_VERSION,
        "request_id": row["request_id"],
        "ts": row["ts"].astimezone(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z"),
        "tenant": row["tenant"],
        "surface": row["surface"],
        "user_id": row["user_id"],
        "endpoint": row["endpoint"],
        "params": json.loads(row["params"]),
        "manifest_version": row["manifest_version"],
        "artifacts": dict(row["artifacts"]),
        "rules_version": row["rules_version"],
        "candidates": [
            {"item_id": c["item_id"], "score": c["score"], "sources": dict(c["sources"])}
            for c in row["candidates"]
        ],
        "rules_applied": list(row["rules_applied"]),
        "items": [
            {"item_id": i["item_id"], "score": i["score"], "rule_ids": list(i["rule_ids"])}
            for i in row["items"]
        ],
    }
