"""The API's cross-cutting concerns in one pure ASGI middleware: request id, body size limit, request
metrics, and a direct dispatch of the query-string GET endpoints (the fast path).
"""

from __future__ import annotations

import time

from fastapi import Request
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Mount, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from recsys_serving.metrics import ServingMetrics
from recsys_serving.problems import VALID_REQUEST_ID, Problem, new_request_id, problem_response

MAX_BODY_BYTES = 64 * 1024
# Metric labels only ever take these values (anything else is "OTHER"), so clients cannot blow up
# the number of series.
_KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class MeteredRoute(Route):
    """A Starlette route that records itself in the scope (as FastAPI's own routes do), so that request
    metrics are labelled with its path template."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child_scope = super().matches(scope)
        if match is not Match.NONE:
            child_scope["route"] = self
        return match, child_scope


class MeteredMount(Mount):
    """A Starlette mount that records itself in the scope, so that request metrics are labelled with its
    path prefix (one series for all the files under it, whatever paths clients ask for)."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child_scope = super().matches(scope)
        if match is not Match.NONE:
            child_scope["route"] = self
        return match, child_scope


class RequestContextMiddleware:
    """Request id (X-Request-Id honoured or generated), body size limit, request metrics, fast path.

    Fast path: a GET whose path exactly matches one of `fast_routes` (the query-string endpoints) is
    answered here by the route's endpoint, skipping the router, Starlette's exception middleware and
    FastAPI's per-request exit stack, which together cost more than the ranking itself. Errors are the
    same: a `Problem` becomes problem+json here, anything else propagates to the 500 handler.
    Everything else (POST, path parameters, HEAD, /docs) goes through FastAPI as usual.
    """

    def __init__(
        self,
        app: ASGIApp,
        metrics: ServingMetrics,
        fast_routes: dict[str, Route] | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
        body_limits: dict[str, int] | None = None,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.fast_routes = fast_routes if fast_routes is not None else {}
        self.max_body_bytes = max_body_bytes
        # Paths whose bodies may be larger (the ingestion API's batches) -> their limit.
        self.body_limits = body_limits or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = None
        content_length = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                if VALID_REQUEST_ID.fullmatch(value):
                    request_id = value.decode("ascii")
            elif name == b"content-length":
                content_length = value
        if request_id is None:
            request_id = new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id
        header = (b"x-request-id", request_id.encode("ascii"))
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", ()))
                if not any(name == b"x-request-id" for name, _ in headers):
                    headers.append(header)
                message["headers"] = headers
            await send(message)

        limit = self.body_limits.get(scope["path"], self.max_body_bytes)
        try:
            if content_length is not None and (not content_length.isdigit() or int(content_length) > limit):
                problem = Problem(413, "body_too_large", f"request bodies are limited to {limit} bytes")
                await problem_response(scope, problem)(scope, receive, send_with_id)
                return
            fast = self.fast_routes.get(scope["path"]) if scope["method"] == "GET" else None
            if fast is not None:
                scope["route"] = fast
                try:
                    response = await fast.endpoint(Request(scope, receive))
                except Problem as problem:
                    response = problem_response(scope, problem)
                await response(scope, receive, send_with_id)
                return
            if scope["method"] in _BODY_METHODS:
                receive = self._limited(receive, limit)
            await self.app(scope, receive, send_with_id)
        finally:
            route = scope.get("route")
            # FastAPI's own /docs, /redoc and /openapi.json routes (fixed paths) record only their endpoint.
            path = getattr(route, "path", None) or (scope["path"] if "endpoint" in scope else "<unmatched>")
            method = scope["method"] if scope["method"] in _KNOWN_METHODS else "OTHER"
            self.metrics.observe(path, method, status, time.perf_counter() - started)

    def _limited(self, receive: Receive, limit: int) -> Receive:
        """Stop a chunked body (no Content-Length) at the limit too."""
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise StarletteHTTPException(413, f"request bodies are limited to {limit} bytes")
            return message

        return limited_receive
