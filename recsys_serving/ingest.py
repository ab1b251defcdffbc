"""The ingestion API: events and catalog records over HTTP, into the landing zone the pipeline reads
(docs/reference/http-api.md#ingestion-api).

`create_app` includes it only when `RECSYS_INGEST_TOKEN` is set (`Settings.ingest_token`): without a token
its routes do not exist (404) and are not in /openapi.json. Every route checks the bearer token
(`bearer.check_bearer`, constant time, never logged).

- `POST /v1/events`, body `{"events": [...]}`: at most `RECSYS_INGEST_MAX_EVENTS` contract-v1 events.
- `POST /v1/admin/items?tenant=T`, body `{"items": [...]}`: catalog records of tenant T.

Each element is encoded as one compact JSON line and checked with the contract the pipeline lands that feed
with: `recsys_core.event_contract` (`parse_line`, then `validate_event` against the arrival day the line
is written to) or `recsys_core.catalog.parse_item`. Rejected elements come back with the reason codes the
quarantine would give them; accepted lines are appended to
`<raw root>/dt=D/ingest-<host>-<pid>-<seq>.jsonl` (events) or `<raw root>/catalog/dt=D/...` (items) by
an `IngestLog`, and 202 is answered only once they are on disk.

Durability is a group commit: a request's lines are queued with a future; the log's thread writes every
queued request's lines in one append, fsyncs the file once and then resolves all their futures. Concurrent
requests therefore share one fsync instead of paying one each. The file keeps its hidden in-progress name
until it is published (size, age, a new day, shutdown), exactly like the exposure log: the pipeline reads
only published files, and a file left behind by a crashed server is published, cut back to its last
complete line, by the next server started on the same host over the same raw root.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response

from recsys_core.catalog import CATALOG, CatalogError, parse_item
from recsys_core.event_contract import Rejection, parse_line, validate_event
from recsys_core.names import UnsafePathError, validate_name
from recsys_core.settings import Settings
from recsys_serving.bearer import Unauthorized, check_bearer, unauthorized
from recsys_serving.landing import LandingWriter
from recsys_serving.problems import PROBLEM_JSON, EncodedJSONResponse, Problem, invalid_request

EVENTS_PATH = "/v1/events"
ITEMS_PATH = "/v1/admin/items"
FILE_PREFIX = "ingest-"
SECURITY_SCHEME = "ingestToken"
# Reason code of a catalog record posted for tenant T that names another tenant (HTTP only: a landing
# file has no tenant of its own to compare with).
TENANT_MISMATCH = "tenant_mismatch"
_SCHEMA_REF = "#/components/schemas/"


class NotStored(Exception):
    """A request's lines could not be made durable (queue full, daily cap, failed write or fsync)."""


@dataclass(frozen=True, slots=True)
class _Batch:
    ts: float
    lines: tuple[bytes, ...]
    done: Future[None]


class IngestLog(LandingWriter[_Batch]):
    """Appends the accepted lines of ingestion requests to a landing folder; `append` resolves once they
    are fsync'd (group commit: one fsync for every request written together)."""

    FILE_PREFIX = FILE_PREFIX
    LOG_NAME = "ingest log"
    RECORDS = "lines"
    CAP_VARIABLE = "RECSYS_INGEST_MAX_BYTES_PER_DAY"
    OVER_CAP_METRIC = "503 answers (code not_stored)"

    def append(self, lines: list[bytes], ts: float) -> Future[None]:
        """Queue the lines of one request (each ending in a newline) for the UTC day of `ts`; the future
        resolves when they are on disk, or fails with `NotStored`."""
        done: Future[None] = Future()
        if self._enqueue(_Batch(ts, tuple(lines), done)):
            self._wake.set()
        else:
            done.set_exception(NotStored("too many requests are waiting to be written; retry later"))
        return done

    def _lines_of(self, record: _Batch) -> int:
        return len(record.lines)

    def _render(self, record: _Batch, moment: dt.datetime) -> list[bytes]:
        return list(record.lines)

    def _settle(self, written: list[_Batch], refused: list[_Batch]) -> None:
        reason = (
            "the lines were not written (the day's cap of the ingestion log is reached, or a write failed)"
        )
        if written:
            try:
                # One fsync for every request written in this round: the group commit.
                for handle in self._files.values():
                    os.fsync(handle.handle.fileno())
            except OSError as exc:
                self.write_errors += 1
                refused, written = refused + written, []
                reason = f"the landing file could not be synced to disk ({exc.strerror})"
        for batch in written:
            batch.done.set_result(None)
        for batch in refused:
            batch.done.set_exception(NotStored(reason))


@dataclass(frozen=True, slots=True)
class _Checked:
    """A request's elements after the contract: the lines to land and the rejected ones."""

    lines: list[bytes]
    rejected: list[dict[str, Any]]


def check_events(events: list[Any], day: dt.date, settings: Settings) -> _Checked:
    """Each posted event as one JSON line, checked as the pipeline checks a line of arrival day `day`."""
    ingest = settings.pipeline.ingest
    lines: list[bytes] = []
    rejected: list[dict[str, Any]] = []
    for index, event in enumerate(events):
        line = orjson.dumps(event)
        parsed = parse_line(line, ingest.max_line_bytes)
        assert parsed is not None  # None is a blank line's, and orjson encodes no value as blank
        outcome = (
            parsed
            if isinstance(parsed, Rejection)
            else validate_event(
                parsed,
                day,
                event_types=ingest.event_types,
                max_lateness_days=ingest.max_lateness_days,
                max_clock_skew_hours=ingest.max_clock_skew_hours,
            )
        )
        if isinstance(outcome, Rejection):
            rejected.append({"index": index, "reason": outcome.reason, "detail": outcome.detail})
        else:
            lines.append(line + b"\n")
    return _Checked(lines, rejected)


def check_items(items: list[Any], tenant: str, day: dt.date, settings: Settings) -> _Checked:
    """Each posted catalog record of `tenant` as one JSON line (the tenant filled in when absent), checked
    as the pipeline checks a line of the catalog's landing day `day`."""
    ingest = settings.pipeline.ingest
    skew = dt.timedelta(hours=ingest.max_clock_skew_hours)
    lines: list[bytes] = []
    rejected: list[dict[str, Any]] = []
    for index, item in enumerate(items):
        if isinstance(item, dict) and item.get("tenant", tenant) != tenant:
            rejected.append(
                {
                    "index": index,
                    "reason": TENANT_MISMATCH,
                    "detail": f"the record names tenant {str(item['tenant'])[:80]!r}, the request {tenant!r}",
                }
            )
            continue
        line = orjson.dumps({"tenant": tenant, **item} if isinstance(item, dict) else item)
        try:
            parse_item(line, day, ingest.max_line_bytes, skew)
        except CatalogError as exc:
            rejected.append({"index": index, "reason": exc.reason, "detail": exc.detail})
            continue
        lines.append(line + b"\n")
    return _Checked(lines, rejected)


async def _require_ingest(request: Request) -> None:
    settings: Settings = request.app.state.settings
    check_bearer(request, settings.ingest_token, "ingest")


def include_ingest(app: FastAPI, settings: Settings) -> list[IngestLog]:
    """Serve the ingestion routes on `app`, each behind the ingest token, document them in its OpenAPI,
    and give the larger body limit of their batches to the middleware (`body_limits`). Returns the logs
    the app starts and closes with its lifespan."""
    cap = settings.ingest_max_bytes_per_day
    events_log = IngestLog(settings.raw_root, max_bytes_per_day=cap)
    items_log = IngestLog(Path(settings.raw_root) / CATALOG, max_bytes_per_day=cap)
    router = APIRouter(dependencies=[Depends(_require_ingest)])
    limit = settings.ingest_max_events

    def batch_of(document: Any, key: str) -> list[Any]:
        if not isinstance(document, dict) or not isinstance(document.get(key), list):
            raise invalid_request(
                [
                    {
                        "field": "body",
                        "in": "body",
                        "code": "invalid_body",
                        "message": f'expected a JSON object {{"{key}": [...]}}',
                    }
                ]
            )
        batch: list[Any] = document[key]
        if len(batch) > limit:
            raise Problem(
                413,
                f"too_many_{key}",
                f"{len(batch):,} {key} in one request; at most {limit:,} (RECSYS_INGEST_MAX_EVENTS)",
            )
        return batch

    async def land(
        request: Request, key: str, log: IngestLog, check: Callable[[list[Any], dt.date], _Checked]
    ) -> Response:
        """Check the request's batch against the contract of the arrival day and land what passes."""
        batch = batch_of(_json_body(await request.body()), key)
        now = time.time()
        checked = check(batch, dt.datetime.fromtimestamp(now, dt.UTC).date())
        if checked.lines:
            try:
                await asyncio.wrap_future(log.append(checked.lines, now))
            except NotStored as exc:
                raise Problem(
                    503, "not_stored", f"{exc}; nothing of this request was stored, retry it"
                ) from None
        body = {
            "accepted": len(checked.lines),
            "rejected": checked.rejected,
            "request_id": request.scope["state"]["request_id"],
        }
        return EncodedJSONResponse(orjson.dumps(body), status_code=202, request_id=None)

    @router.post(
        EVENTS_PATH,
        summary="Send a batch of contract-v1 events to the landing zone",
        status_code=202,
        responses=_problems("events"),
        openapi_extra=_body_doc("events", "Contract-v1 events (docs/reference/event-contract.md)"),
        **_DOC,
    )
    async def post_events(request: Request) -> Response:
        """Validate each event as the pipeline does; the accepted ones are on disk when 202 is answered,
        the rejected ones are listed with their index, reason code and detail."""
        return await land(
            request, "events", events_log, lambda batch, day: check_events(batch, day, settings)
        )

    @router.post(
        ITEMS_PATH,
        summary="Send a batch of catalog records of a tenant to the landing zone",
        status_code=202,
        responses=_problems("items", "Invalid tenant (code invalid_parameter) or "),
        openapi_extra={
            "parameters": [
                {
                    "name": "tenant",
                    "in": "query",
                    "required": True,
                    "description": "The tenant the records belong to (1-64 characters of A-Z a-z 0-9 . _ -)",
                    "schema": {"type": "string"},
                }
            ],
            **_body_doc("items", "Catalog records (docs/reference/catalog.md)"),
        },
        **_DOC,
    )
    async def post_items(request: Request) -> Response:
        """Validate each record as the catalog landing does; the accepted ones are on disk when 202 is
        answered, the rejected ones are listed with their index, reason code and detail."""
        tenant = request.query_params.get("tenant", "")
        try:
            validate_name("tenant", tenant)
        except UnsafePathError as exc:
            raise invalid_request(
                [{"field": "tenant", "in": "query", "code": "invalid_parameter", "message": str(exc)}]
            ) from None
        return await land(
            request, "items", items_log, lambda batch, day: check_items(batch, tenant, day, settings)
        )

    app.include_router(router)
    app.add_exception_handler(Unauthorized, unauthorized)
    public = app.openapi

    def openapi() -> dict[str, Any]:
        spec = public()
        schemes = spec.setdefault("components", {}).setdefault("securitySchemes", {})
        schemes[SECURITY_SCHEME] = {"type": "http", "scheme": "bearer"}
        return spec

    app.openapi = openapi  # type: ignore[method-assign]
    return [events_log, items_log]


def body_limits(settings: Settings) -> dict[str, int]:
    """The ingestion routes' body size limit, by path, for the middleware."""
    return dict.fromkeys((EVENTS_PATH, ITEMS_PATH), settings.ingest_max_body_bytes)


def _json_body(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise Problem(400, "invalid_json_body", f"the body is not JSON: {exc}") from None


_DOC: dict[str, Any] = {"tags": ["ingestion"], "response_model": None}


def _problems(key: str, invalid: str = "") -> dict[int | str, dict[str, Any]]:
    """The error responses of the route that takes a batch of `key`."""
    schema = {"$ref": _SCHEMA_REF + "ProblemDetail"}
    entries = (
        (400, "The body is not JSON (code invalid_json_body)"),
        (401, "No or a wrong bearer token (code unauthorized)"),
        (413, f"Too many {key} (code too_many_{key}) or a body too large (code body_too_large)"),
        (422, f'{invalid}The body is not {{"{key}": [...]}} (code invalid_body)'),
        (503, "The lines could not be stored (code not_stored): retry the request"),
    )
    return {
        status: {"description": description, "content": {PROBLEM_JSON: {"schema": schema}}}
        for status, description in entries
    }


def _body_doc(key: str, what: str) -> dict[str, Any]:
    return {
        "security": [{SECURITY_SCHEME: []}],
        "requestBody": {
            "required": True,
            "description": what,
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": [key],
                        "properties": {key: {"type": "array", "items": {"type": "object"}}},
                    }
                }
            },
        },
    }
