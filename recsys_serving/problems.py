"""Errors as `application/problem+json` (RFC 9457) with a stable `code`, and the request id they carry.

Every error, raised by an endpoint (`Problem`), by the router (404, 405) or unexpected (500), is rendered
by `problem_response`: in the middleware on the fast path, else in the exception handlers of `create_app`.
"""

from __future__ import annotations

import os
import re
from typing import Any

import orjson
from fastapi.responses import Response
from starlette.types import Scope

JSON = "application/json"
PROBLEM_JSON = "application/problem+json"
PROBLEM_TYPE_PREFIX = "urn:recsys:problem:"

MAX_REQUEST_ID_CHARS = 128
# A client's X-Request-Id is kept when it is printable ASCII without spaces (safe to echo in a header).
VALID_REQUEST_ID = re.compile(rb"[!-~]{1,%d}" % MAX_REQUEST_ID_CHARS)

_TITLES = {
    400: "Bad request",
    401: "Unauthorized",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    413: "Request body too large",
    414: "Query string too long",
    422: "Invalid request",
    500: "Internal server error",
    503: "Not ready",
}


class Problem(Exception):
    """An error answered as application/problem+json (RFC 9457) with a stable `code`."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        *,
        manifest_version: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.manifest_version = manifest_version
        self.extra = extra or {}


def invalid_request(errors: list[dict[str, str]]) -> Problem:
    """A 422 listing every invalid parameter (field, in, code, message), the first one's code on top."""
    detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:5])
    return Problem(422, errors[0]["code"], detail, extra={"errors": errors})


class EncodedJSONResponse(Response):
    """A response whose body is already encoded JSON (orjson), its raw headers built directly.

    FastAPI's ORJSONResponse is deprecated; Starlette's generic header assembly is a measurable share
    of a fast request.
    """

    def __init__(
        self,
        body: bytes,
        *,
        status_code: int = 200,
        media_type: str = JSON,
        manifest_version: str | None = None,
        request_id: str | None = None,
    ) -> None:
        self.status_code = status_code
        self.media_type = media_type
        self.background = None
        self.body = body
        self.raw_headers = [(b"content-length", b"%d" % len(body)), (b"content-type", media_type.encode())]
        if manifest_version is not None:
            self.raw_headers.append((b"x-manifest-version", manifest_version.encode("ascii")))
        if request_id is not None:
            self.raw_headers.append((b"x-request-id", request_id.encode("ascii")))


def new_request_id() -> str:
    """32 random hex digits (the form of a UUID4 without its dashes and version bits)."""
    return os.urandom(16).hex()


def request_id_of(scope: Scope) -> str:
    """The request id the middleware put in the scope (a new one for an error raised before it ran)."""
    state = scope.get("state")
    request_id = state.get("request_id") if isinstance(state, dict) else None
    return request_id or new_request_id()


def problem_response(scope: Scope, problem: Problem) -> Response:
    """The problem+json response of `problem` for the request of `scope`."""
    body: dict[str, Any] = {
        "type": PROBLEM_TYPE_PREFIX + problem.code,
        "title": _TITLES.get(problem.status, "Error"),
        "status": problem.status,
        "detail": problem.detail,
        "code": problem.code,
        "instance": scope.get("path", ""),
        "request_id": request_id_of(scope),
    }
    if problem.manifest_version:
        body["manifest_version"] = problem.manifest_version
    body.update(problem.extra)
    return EncodedJSONResponse(
        orjson.dumps(body),
        status_code=problem.status,
        media_type=PROBLEM_JSON,
        manifest_version=problem.manifest_version or None,
        request_id=body["request_id"],
    )
