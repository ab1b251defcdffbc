"""`GET /v1/audit/decisions`: the decision traces of a tenant and surface, by request id or by user and time.

Answers from the traces this worker keeps in memory (`traces.DecisionWriter.recent`: the last moments,
before the pipeline has landed them) and from the `decisions` table of the lake
(`recsys_core.decisions.find_decisions`: every landed day), merged newest first, one trace per request id.
Both give the landed form, so a trace reads the same wherever it was found.

It is an admin endpoint: `audit_router` gives it as a FastAPI router, which the app includes only when an
admin token is configured.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from recsys_core.decisions import find_decisions
from recsys_serving.params import SURFACE, TENANT, Param, parse_query, query_doc
from recsys_serving.problems import EncodedJSONResponse, invalid_request
from recsys_serving.schemas import QUERY_ERRORS
from recsys_serving.traces import DecisionWriter

PATH = "/v1/audit/decisions"
DEFAULT_LIMIT = 20
REQUEST_ID = Param("request_id", "id", "The response's request id (its X-Request-Id)")
USER_ID = Param("user_id", "id", "Every traced response of this user (instead of request_id)")
SINCE = Param("since", "id", "With user_id: from this time (ISO 8601; a date is its midnight UTC; inclusive)")
UNTIL = Param(
    "until", "id", "With user_id: up to this time (ISO 8601; a date is its midnight UTC; exclusive)"
)
LIMIT = Param("limit", "k", "The newest traces to return, 1-100", default=DEFAULT_LIMIT)
AUDIT_PARAMS = (TENANT, SURFACE, REQUEST_ID, USER_ID, SINCE, UNTIL, LIMIT)


class DecisionsResponse(BaseModel):
    tenant: str
    surface: str
    decisions: list[dict[str, Any]] = Field(
        description="Traces newest first, in the shape of docs/reference/decisions.md (landed form)"
    )
    request_id: str


def audit_router(decisions: DecisionWriter | None, lake_root: Path) -> APIRouter:
    """The audit endpoint over a server's trace writer (None: traces off, the lake only) and the lake."""
    router = APIRouter()

    @router.get(
        PATH,
        tags=["audit"],
        summary="Decision traces by request id, or by user and time",
        responses={200: {"model": DecisionsResponse}, **QUERY_ERRORS},
        openapi_extra=query_doc(*AUDIT_PARAMS),
    )
    async def audit_decisions(request: Request) -> Response:
        """The traces of one response (`request_id`) or of one user's responses (`user_id`, optionally
        between `since` and `until`), from this server's memory and from the lake, newest first."""
        args = parse_query(request.scope, AUDIT_PARAMS)
        request_id, user_id = args["request_id"], args["user_id"]
        since, until = _moment(SINCE, args["since"]), _moment(UNTIL, args["until"])
        _check_lookup(request_id, user_id, since, until)
        query = {"request_id": request_id, "user_id": user_id, "since": since, "until": until}
        tenant, surface = args["tenant"], args["surface"]
        found = list(decisions.recent(tenant, surface, **query)) if decisions is not None else []
        found += await run_in_threadpool(
            find_decisions, lake_root, tenant, surface, **query, limit=args["limit"]
        )
        body = {
            "tenant": tenant,
            "surface": surface,
            "decisions": _newest_once(found)[: args["limit"]],
            "request_id": request.scope["state"]["request_id"],
        }
        return EncodedJSONResponse(orjson.dumps(body))

    return router


def _moment(param: Param, value: str | None) -> dt.datetime | None:
    """An ISO 8601 time (UTC when it has no zone) or date (its midnight UTC); 422 otherwise."""
    if value is None:
        return None
    try:
        moment = dt.datetime.fromisoformat(value)
    except ValueError:
        raise invalid_request(
            [
                {
                    "field": param.name,
                    "in": "query",
                    "code": f"invalid_{param.name}",
                    "message": "must be an ISO 8601 date or time, e.g. 2026-12-03 or 2026-12-03T10:00:00Z",
                }
            ]
        ) from None
    return moment if moment.utcoffset() is not None else moment.replace(tzinfo=dt.UTC)


def _check_lookup(
    request_id: str | None, user_id: str | None, since: dt.datetime | None, until: dt.datetime | None
) -> None:
    """Exactly one of request_id and user_id; a time range only with user_id."""
    message = None
    if request_id is None and user_id is None:
        message = "give request_id, or user_id (with since and until if wanted)"
    elif request_id is not None and (user_id is not None or since is not None or until is not None):
        message = "request_id goes alone: user_id, since and until look traces up by user instead"
    if message is not None:
        field = "request_id" if request_id is None else "user_id"
        raise invalid_request([{"field": field, "in": "query", "code": "invalid_lookup", "message": message}])


def _newest_once(traces: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`traces` newest first (ties by request id), each request id once."""
    unique = {trace["request_id"]: trace for trace in traces}
    return sorted(unique.values(), key=lambda trace: (trace["ts"], trace["request_id"]), reverse=True)
