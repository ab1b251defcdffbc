"""The HTTP API: `create_app(settings)` builds the FastAPI application.

Routes answer from the `ArtifactStore` snapshot (one reference read per request) with the pure functions
of `recsys_serving.ranking`; responses are encoded with orjson.

Parameters are declared once, in `Param` tables, which both validate requests and document them in the
OpenAPI schema. They are parsed here rather than by FastAPI's per-parameter pydantic dependencies, and
endpoints are plain Starlette routes (documented through a FastAPI router that only feeds the OpenAPI
document): on the hot path that machinery cost more than the ranking itself (docs/benchmarks.md).
Cross-cutting concerns live in one pure ASGI middleware (request id, body size limit, request metrics,
and a direct dispatch of the query-string GET endpoints) and in the exception handlers, which turn every
error into `application/problem+json` with a stable `code`.
"""

from __future__ import annotations

import gc
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus

import orjson
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from recsys_core.settings import Settings, load_settings
from recsys_serving import ranking, recommender
from recsys_serving.exposures import ExposureWriter
from recsys_serving.store import ArtifactStore, LoadedTarget

log = logging.getLogger(__name__)

API_VERSION = "1"
JSON = "application/json"
PROBLEM_JSON = "application/problem+json"
PROBLEM_TYPE_PREFIX = "urn:recsys:problem:"

DEFAULT_K = 10
MAX_K = 100
MAX_ID_CHARS = 256
MAX_CONTEXT_ITEMS = ranking.MAX_CONTEXT_ITEMS
MAX_BODY_BYTES = 64 * 1024
MAX_REQUEST_ID_CHARS = 128
_REQUEST_ID = re.compile(rb"[!-~]{1,%d}" % MAX_REQUEST_ID_CHARS)  # printable ASCII, no spaces
MAX_QUERY_BYTES = 32 * 1024
NAME_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"
# Metric labels only ever take these values (anything else is "OTHER"), so clients cannot blow up
# the number of series.
_KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_INTEGER = re.compile(r"\s*[+-]?[0-9]{1,9}\s*")
_TRUE = frozenset({"true", "1", "yes", "on", "t", "y"})
_FALSE = frozenset({"false", "0", "no", "off", "f", "n"})

Endpoint = Callable[[Request], Awaitable[Response]]

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)

# The warning of GET /v1/items/{item_id}/similar (the others come from the recommender).
NO_NEIGHBORS = "no_neighbors"


# -------------------------------------------------------------------------------------- problems


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


_TITLES = {
    400: "Bad request",
    404: "Not found",
    405: "Method not allowed",
    413: "Request body too large",
    414: "Query string too long",
    422: "Invalid request",
    500: "Internal server error",
    503: "Not ready",
}


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


def _request_id(scope: Scope) -> str:
    state = scope.get("state")
    rid = state.get("request_id") if isinstance(state, dict) else None
    return rid or new_request_id()


def problem_response(scope: Scope, problem: Problem) -> Response:
    body: dict[str, Any] = {
        "type": PROBLEM_TYPE_PREFIX + problem.code,
        "title": _TITLES.get(problem.status, "Error"),
        "status": problem.status,
        "detail": problem.detail,
        "code": problem.code,
        "instance": scope.get("path", ""),
        "request_id": _request_id(scope),
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


# ------------------------------------------------------------------------------------ parameters


@dataclass(frozen=True, slots=True)
class Param:
    """One request parameter: how it is validated and how the OpenAPI document describes it.

    kinds: `name` (tenant/surface rule), `id` (trimmed, 1-256 characters; blank = absent), `k` (integer
    1-MAX_K), `bool`, `ids` (a list of ids, at most MAX_CONTEXT_ITEMS; repeat the query parameter).
    """

    name: str
    kind: str
    description: str
    required: bool = False
    default: Any = None

    def schema(self) -> dict[str, Any]:
        id_schema = {"type": "string", "minLength": 1, "maxLength": MAX_ID_CHARS}
        if self.kind == "name":
            return {"type": "string", "pattern": NAME_PATTERN}
        if self.kind == "id":
            return id_schema
        if self.kind == "k":
            return {"type": "integer", "minimum": 1, "maximum": MAX_K, "default": self.default}
        if self.kind == "bool":
            return {"type": "boolean", "default": self.default}
        return {"type": "array", "items": id_schema, "maxItems": MAX_CONTEXT_ITEMS}

    def openapi(self, where: str = "query") -> dict[str, Any]:
        spec = {
            "name": self.name,
            "in": where,
            "required": self.required or where == "path",
            "description": self.description,
            "schema": self.schema(),
        }
        if self.kind == "ids":
            spec.update(style="form", explode=True)
        return spec


TENANT = Param("tenant", "name", "Tenant (1-64 characters of A-Z a-z 0-9 . _ -)", required=True)
SURFACE = Param("surface", "name", "Surface, e.g. home, pdp, cart (same rule as tenant)", required=True)
K = Param("k", "k", f"Number of items, 1-{MAX_K}", default=DEFAULT_K)
RECOMMEND_PARAMS = (
    TENANT,
    SURFACE,
    Param("user_id", "id", "The user; an unknown user gets popular items and a warning"),
    K,
    Param(
        "exclude_seen",
        "bool",
        "Leave out all items in the user's history (the seed items, the most recent ones, are always left out)",
        default=True,
    ),
    Param(
        "context_items",
        "ids",
        "Items to recommend from instead of the user's history (e.g. the cart or the page's item); "
        f"repeat the query parameter, at most {MAX_CONTEXT_ITEMS}; never returned themselves",
    ),
    Param("session_id", "id", "Session recorded in the exposure log (default: the request id)"),
)
ITEM_PATH = Param("item_id", "id", "The item id (URL-encoded)", required=True)


class _Invalid(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _convert(param: Param, value: Any) -> Any:
    """One parameter value (query string or JSON) -> its Python value; `_Invalid` if malformed."""
    kind = param.kind
    code = f"invalid_{param.name}"
    if value is None:
        return param.default
    if kind == "name":
        if not isinstance(value, str) or not _NAME.fullmatch(value) or value in (".", ".."):
            raise _Invalid(code, "must be 1-64 characters of A-Z a-z 0-9 . _ - (not '.' or '..')")
        return value
    if kind == "id":
        if not isinstance(value, str):
            raise _Invalid(code, "must be a string")
        value = value.strip()
        if len(value) > MAX_ID_CHARS:
            raise _Invalid(code, f"must be at most {MAX_ID_CHARS} characters after trimming")
        return value or None
    if kind == "k":
        if isinstance(value, str) and _INTEGER.fullmatch(value):
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise _Invalid(code, f"must be an integer from 1 to {MAX_K}")
        if not 1 <= value <= MAX_K:
            raise _Invalid(code, f"must be from 1 to {MAX_K}, got {value}")
        return value
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            lowered = value.strip().lower()
            if lowered in _TRUE:
                return True
            if lowered in _FALSE:
                return False
        raise _Invalid(code, "must be true or false")
    # ids
    if not isinstance(value, list):
        raise _Invalid(code, "must be a list of item ids")
    if len(value) > MAX_CONTEXT_ITEMS:
        raise _Invalid(
            "too_many_context_items", f"at most {MAX_CONTEXT_ITEMS} items are allowed, got {len(value)}"
        )
    cleaned = []
    for item in value:
        if not isinstance(item, str) or not item.strip() or len(item.strip()) > MAX_ID_CHARS:
            raise _Invalid(code, f"each item id must be 1-{MAX_ID_CHARS} characters after trimming")
        cleaned.append(item.strip())
    return cleaned or None


def _parse(params: tuple[Param, ...], values: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Validate every parameter; a `Problem` (422) listing all invalid ones, the first one's code on top."""
    parsed: dict[str, Any] = {}
    errors: list[dict[str, str]] = []
    for param in params:
        value = values.get(param.name)
        if value is None and param.required:
            code = "missing_parameter" if where != "body" else "missing_field"
            errors.append({"field": param.name, "in": where, "code": code, "message": "is required"})
            continue
        try:
            parsed[param.name] = _convert(param, value)
        except _Invalid as exc:
            errors.append({"field": param.name, "in": where, "code": exc.code, "message": exc.message})
    if errors:
        raise _problem_of(errors)
    return parsed


def _problem_of(errors: list[dict[str, str]]) -> Problem:
    detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:5])
    return Problem(422, errors[0]["code"], detail, extra={"errors": errors})


def _query(scope: Scope, params: tuple[Param, ...]) -> dict[str, Any]:
    """The query string as {name: value} (last value wins) and {name: [values]} for list parameters."""
    raw = scope["query_string"]
    if not raw:
        return _parse(params, {}, "query")
    if len(raw) > MAX_QUERY_BYTES:
        raise Problem(414, "query_too_long", f"query strings are limited to {MAX_QUERY_BYTES} bytes")
    lists = {p.name for p in params if p.kind == "ids"}
    values: dict[str, Any] = {}
    # As urllib.parse.parse_qsl(keep_blank_values=True) (UTF-8, invalid sequences replaced), with
    # unquoting skipped for the common plain names and values.
    for part in raw.decode("utf-8", "replace").split("&"):
        if not part:
            continue
        name, _, value = part.partition("=")
        if "%" in name or "+" in name:
            name = unquote_plus(name, errors="replace")
        if "%" in value or "+" in value:
            value = unquote_plus(value, errors="replace")
        if name in lists:
            values.setdefault(name, []).append(value)
        else:
            values[name] = value
    return _parse(params, values, "query")


# ------------------------------------------------------------------------- OpenAPI-only models
# Responses are built as dicts and encoded with orjson; these models only document them.


class ProblemDetail(BaseModel):
    type: str = Field(description="urn:recsys:problem:<code>")
    title: str
    status: int
    detail: str
    code: str = Field(description="Stable error code, e.g. unknown_tenant, unknown_item, invalid_k")
    instance: str = Field(description="The request path")
    request_id: str
    manifest_version: str | None = Field(None, description="When the tenant and surface were resolved")
    errors: list[dict[str, str]] | None = Field(
        None, description="422 only: field, in (query/body/path), code and message of each invalid parameter"
    )


class ResponseWarning(BaseModel):
    code: str = Field(description=", ".join((*recommender.WARNING_CODES, NO_NEIGHBORS)))
    message: str
    items: list[str] | None = Field(None, description="context_items_unknown: the ignored ids")


class ScoredItem(BaseModel):
    item_id: str
    score: float = Field(
        description="cooc: summed recency-weighted co-occurrence score; popularity: the popularity score"
    )
    source: str = Field(description="cooc or popularity")


class ItemsResponse(BaseModel):
    tenant: str
    surface: str
    manifest_version: str
    as_of: str
    request_id: str
    items: list[ScoredItem]
    warnings: list[ResponseWarning]


class RecommendationsResponse(ItemsResponse):
    user_id: str | None
    k: int


class SimilarResponse(ItemsResponse):
    item_id: str


class ArtifactDescription(BaseModel):
    version: str | None
    rows: int | None
    window: dict[str, Any] | None
    served: bool


class ManifestResponse(BaseModel):
    tenant: str
    surface: str
    manifest_version: str
    as_of: str
    updated_at: str = Field(description="When the manifest was published (or rolled back to)")
    loaded_at: str = Field(description="When this server process started serving it")
    age_seconds: float = Field(description="Seconds since updated_at")
    load_seconds: float
    artifacts: dict[str, ArtifactDescription]
    items: int
    users: int
    run_id: str | None
    request_id: str
    load_failure: dict[str, Any] | None = Field(
        None, description="A newer manifest that failed to load (the version above keeps serving)"
    )


class ReadyResponse(BaseModel):
    status: str
    targets: list[dict[str, Any]]
    failures: list[dict[str, Any]] = Field(description="Targets whose current manifest failed to load")
    request_id: str


_PROBLEM = {"model": ProblemDetail, "content": {PROBLEM_JSON: {}}}
_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {**_PROBLEM, "description": "Unknown tenant, surface or item (code unknown_*)"},
    422: {
        **_PROBLEM,
        "description": "Invalid parameters (code invalid_*, missing_*, too_many_context_items)",
    },
}


def _query_doc(*params: Param) -> dict[str, Any]:
    return {"parameters": [p.openapi() for p in params]}


def _body_doc(params: tuple[Param, ...]) -> dict[str, Any]:
    schema = {
        "type": "object",
        "title": "RecommendRequest",
        "additionalProperties": False,
        "required": [p.name for p in params if p.required],
        "properties": {p.name: {**p.schema(), "description": p.description} for p in params},
    }
    return {"requestBody": {"required": True, "content": {JSON: {"schema": schema}}}}


# --------------------------------------------------------------------------------------- metrics


class ServingMetrics:
    """Prometheus metrics of one app (its own registry, so several apps can live in one process)."""

    def __init__(self, store: ArtifactStore, exposures: ExposureWriter | None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "recsys_http_requests",
            "HTTP requests by route template, method and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "recsys_http_request_duration_seconds",
            "HTTP request latency in seconds by route template, method and status",
            ["route", "method", "status"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.fallbacks = Counter(
            "recsys_recommendation_fallbacks",
            "Recommendation responses that degraded (fallback or short list), by tenant, surface and code",
            ["tenant", "surface", "reason"],
            registry=self.registry,
        )
        self.registry.register(_StateCollector(store, exposures))
        self._request_children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self._fallback_children: dict[tuple[str, str, str], Any] = {}

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        key = (route, method, status)
        children = self._request_children.get(key)
        if children is None:
            labels = (route, method, str(status))
            children = (self.requests.labels(*labels), self.latency.labels(*labels))
            self._request_children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def fallback(self, tenant: str, surface: str, reason: str) -> None:
        # Labels come from served targets and fixed codes only, so cardinality stays bounded.
        key = (tenant, surface, reason)
        child = self._fallback_children.get(key)
        if child is None:
            child = self._fallback_children[key] = self.fallbacks.labels(*key)
        child.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StateCollector:
    """Served manifests, load failures and the exposure log, read from their owners at scrape time."""

    def __init__(self, store: ArtifactStore, exposures: ExposureWriter | None) -> None:
        self.store = store
        self.exposures = exposures

    def describe(self) -> list:
        return []

    def collect(self) -> Any:
        now = time.time()
        labels = ["tenant", "surface"]
        info = GaugeMetricFamily(
            "recsys_manifest_info",
            "The manifest served per tenant and surface (value 1)",
            labels=[*labels, "manifest_version", "as_of"],
        )
        age = GaugeMetricFamily(
            "recsys_manifest_age_seconds", "Seconds since the served manifest was published", labels=labels
        )
        loaded = GaugeMetricFamily(
            "recsys_manifest_loaded_timestamp_seconds",
            "Unix time the served manifest was loaded",
            labels=labels,
        )
        items = GaugeMetricFamily("recsys_manifest_items", "Items in the served vocabulary", labels=labels)
        users = GaugeMetricFamily("recsys_manifest_users", "Users with a served history", labels=labels)
        for (tenant, surface), target in sorted(self.store.snapshot.targets.items()):
            info.add_metric([tenant, surface, target.manifest_version, target.as_of], 1)
            age.add_metric([tenant, surface], max(0.0, now - target.updated_at_epoch))
            loaded.add_metric([tenant, surface], target.loaded_at)
            items.add_metric([tenant, surface], target.n_items)
            users.add_metric([tenant, surface], target.n_users)
        loads = CounterMetricFamily("recsys_manifest_loads", "Manifest versions loaded", labels=labels)
        failures = CounterMetricFamily(
            "recsys_manifest_load_failures", "Failed attempts to load a manifest", labels=labels
        )
        failing = GaugeMetricFamily(
            "recsys_manifest_load_failing",
            "1 while the current manifest cannot be loaded (the last good version keeps serving)",
            labels=labels,
        )
        for status in self.store.statuses():
            key = [status.tenant, status.surface]
            loads.add_metric(key, status.loads)
            failures.add_metric(key, status.failures)
            failing.add_metric(key, 1 if status.failing else 0)
        polls = CounterMetricFamily("recsys_manifest_poll_errors", "Manifest poll passes that failed")
        polls.add_metric([], self.store.poll_errors)
        yield from (info, age, loaded, items, users, loads, failures, failing, polls)
        if self.exposures is not None:
            ex = self.exposures
            for name, help_text, value in (
                (
                    "recsys_exposure_events_written",
                    "Exposure events written to raw landing",
                    ex.events_written,
                ),
                (
                    "recsys_exposure_responses_dropped",
                    "Responses not logged: queue full",
                    ex.responses_dropped,
                ),
                ("recsys_exposure_write_errors", "Failed exposure log writes", ex.write_errors),
                ("recsys_exposure_files_published", "Exposure files made visible", ex.files_published),
            ):
                family = CounterMetricFamily(name, help_text)
                family.add_metric([], value)
                yield family
            pending = GaugeMetricFamily("recsys_exposure_pending_responses", "Responses queued for the log")
            pending.add_metric([], ex.pending)
            yield pending


# ------------------------------------------------------------------------------------ middleware


class _Route(Route):
    """A Starlette route that records itself in the scope (as FastAPI's own routes do) for metrics."""

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
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.fast_routes = fast_routes if fast_routes is not None else {}
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = None
        content_length = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                if _REQUEST_ID.fullmatch(value):
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

        try:
            if content_length is not None and (
                not content_length.isdigit() or int(content_length) > self.max_body_bytes
            ):
                problem = Problem(
                    413, "body_too_large", f"request bodies are limited to {self.max_body_bytes} bytes"
                )
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
                receive = self._limited(receive)
            await self.app(scope, receive, send_with_id)
        finally:
            route = scope.get("route")
            # FastAPI's own /docs, /redoc and /openapi.json routes (fixed paths) record only their endpoint.
            path = getattr(route, "path", None) or (scope["path"] if "endpoint" in scope else "<unmatched>")
            method = scope["method"] if scope["method"] in _KNOWN_METHODS else "OTHER"
            self.metrics.observe(path, method, status, time.perf_counter() - started)

    def _limited(self, receive: Receive) -> Receive:
        """Stop a chunked body (no Content-Length) at the limit too."""
        received = 0
        limit = self.max_body_bytes

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise StarletteHTTPException(413, f"request bodies are limited to {limit} bytes")
            return message

        return limited_receive


# ------------------------------------------------------------------------------------------- app


def create_app(settings: Settings | None = None) -> FastAPI:
    """The API over the manifests under `settings.artifact_root` (default: `load_settings()`).

    The artifacts are loaded when the app starts (lifespan), before it accepts connections; a daemon
    thread then polls for new manifests every `settings.serve_poll_seconds`. With
    `settings.exposure_log`, recommendation responses are logged to `settings.raw_root`.
    """
    settings = settings or load_settings()
    # `*_created` series double the size of /metrics and no dashboard here uses them.
    disable_created_metrics()
    store = ArtifactStore(settings.artifact_root, settings.serve_poll_seconds)
    exposures = ExposureWriter(settings.raw_root) if settings.exposure_log else None
    metrics = ServingMetrics(store, exposures)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(store.refresh)
        # Loaded artifacts live as long as they are served: keep the collector from rescanning them.
        gc.collect()
        gc.freeze()
        store.start()
        if exposures is not None:
            exposures.start()
        try:
            yield
        finally:
            store.stop()
            if exposures is not None:
                await run_in_threadpool(exposures.close)

    app = FastAPI(
        title="recsys API",
        version=API_VERSION,
        summary="Recommendations from the published recsys artifacts",
        description=(
            "Answers from the current manifest of each tenant and surface, hot-swapped when a new one is "
            "published. Every response carries `X-Request-Id` (the client's, when it sends a valid one of "
            "at most 128 printable ASCII characters, else a generated one); responses about a tenant and "
            "surface also carry `X-Manifest-Version`. Errors are `application/problem+json` with a stable "
            "`code`."
        ),
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.store = store
    app.state.exposures = exposures
    app.state.metrics = metrics
    # Filled as routes are registered below (the middleware stack is built on the first request).
    fast_routes: dict[str, Route] = {}
    app.add_middleware(RequestContextMiddleware, metrics=metrics, fast_routes=fast_routes)

    # ---------------------------------------------------------------------------- errors

    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> Response:
        return problem_response(request.scope, exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        errors = [
            {
                "field": ".".join(str(part) for part in error.get("loc", ())[1:]) or "request",
                "in": str(error.get("loc", ("request",))[0]),
                "code": "invalid_parameter",
                "message": str(error.get("msg", "invalid")),
            }
            for error in exc.errors()
        ]
        fallback = [{"field": "request", "in": "request", "code": "invalid_parameter", "message": "invalid"}]
        return problem_response(request.scope, _problem_of(errors or fallback))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        codes = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large", 400: "bad_request"}
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no route {request.method} {request.url.path}; the API is described at /docs"
        code = codes.get(exc.status_code, f"http_{exc.status_code}")
        response = problem_response(request.scope, Problem(exc.status_code, code, detail))
        for name, value in (exc.headers or {}).items():
            response.headers[name] = value
        return response

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem_response(request.scope, Problem(500, "internal_error", "unexpected server error"))

    # --------------------------------------------------------------------------- helpers

    def resolve(tenant: str, surface: str) -> LoadedTarget:
        snapshot = store.snapshot
        target = snapshot.targets.get((tenant, surface))
        if target is not None:
            return target
        if tenant not in snapshot.tenants:
            raise Problem(404, "unknown_tenant", f"tenant {tenant!r} is not served")
        surfaces = sorted(s for t, s in snapshot.targets if t == tenant)
        raise Problem(
            404,
            "unknown_surface",
            f"surface {surface!r} is not served for tenant {tenant!r} (served: {', '.join(surfaces)})",
        )

    def scored_items(item_ids: list[str], scores: list[float], sources: list[str]) -> list[dict]:
        return [
            {"item_id": item_id, "score": score, "source": source}
            for item_id, score, source in zip(item_ids, scores, sources, strict=True)
        ]

    def ranked_items(target: LoadedTarget, items: list[int], scores: list[float], source: str) -> list[dict]:
        """Vocabulary indexes from one source as response items."""
        ids = target.item_ids
        return scored_items([ids[i] for i in items], scores, [source] * len(items))

    def respond(target: LoadedTarget, body: dict[str, Any]) -> Response:
        return EncodedJSONResponse(orjson.dumps(body), manifest_version=target.manifest_version)

    def recommend(scope: Scope, args: dict[str, Any]) -> Response:
        tenant, surface, user_id, k = args["tenant"], args["surface"], args["user_id"], args["k"]
        target = resolve(tenant, surface)
        request_id = scope["state"]["request_id"]
        result = recommender.recommend(
            target,
            user_id=user_id,
            context_items=args["context_items"],
            k=k,
            exclude_seen=args["exclude_seen"],
        )
        for warning in result.warnings:
            metrics.fallback(tenant, surface, warning["code"])
        if exposures is not None and result.item_ids:
            exposures.record(
                tenant=tenant,
                surface=surface,
                session_id=args["session_id"] or request_id,
                user_id=user_id,
                request_id=request_id,
                item_ids=result.item_ids,
            )
        return respond(
            target,
            {
                "tenant": tenant,
                "surface": surface,
                "user_id": user_id,
                "k": k,
                "manifest_version": target.manifest_version,
                "as_of": target.as_of,
                "request_id": request_id,
                "items": scored_items(result.item_ids, result.scores, result.sources),
                "warnings": result.warnings,
            },
        )

    # ---------------------------------------------------------------------------- routes
    # Each endpoint is served by a plain Starlette route (FastAPI's per-request dependency solving
    # doubled the latency of a small endpoint) and documented by an identical FastAPI route on a router
    # that only feeds the OpenAPI document. GET routes without path parameters are also dispatched
    # directly by RequestContextMiddleware.
    documented = APIRouter()

    def route(method: str, path: str, **doc: Any) -> Callable[[Endpoint], Endpoint]:
        def register(endpoint: Endpoint) -> Endpoint:
            starlette_route = _Route(path, endpoint, methods=[method], name=endpoint.__name__)
            # Ahead of FastAPI's /docs and /openapi.json routes: the router tries routes in order.
            app.router.routes.insert(len(documented.routes), starlette_route)
            if method == "GET" and "{" not in path:
                fast_routes[path] = starlette_route
            documented.add_api_route(path, endpoint, methods=[method], response_model=None, **doc)
            return endpoint

        return register

    @route(
        "GET",
        "/v1/recommendations",
        tags=["recommendations"],
        summary="Personalised top-k for a user and/or context items",
        responses={200: {"model": RecommendationsResponse}, **_ERRORS},
        openapi_extra=_query_doc(*RECOMMEND_PARAMS),
    )
    async def get_recommendations(request: Request) -> Response:
        """Co-occurrence neighbours of the user's most recent items (or of the context items), weighted
        by recency, then popular items to fill; the user's seen items are excluded by default; ties are
        broken by item id. An unknown user (or none) gets popular items with a warning."""
        return recommend(request.scope, _query(request.scope, RECOMMEND_PARAMS))

    @route(
        "POST",
        "/v1/recommend",
        tags=["recommendations"],
        summary="Personalised top-k, the same parameters in a JSON body",
        responses={200: {"model": RecommendationsResponse}, **_ERRORS},
        openapi_extra=_body_doc(RECOMMEND_PARAMS),
    )
    async def post_recommend(request: Request) -> Response:
        """As GET /v1/recommendations, with the parameters as a JSON object (`context_items` a list)."""
        raw = await request.body()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise _problem_of(
                [
                    {
                        "field": "body",
                        "in": "body",
                        "code": "invalid_json",
                        "message": f"not valid JSON ({exc})",
                    }
                ]
            ) from None
        if not isinstance(body, dict):
            raise _problem_of(
                [{"field": "body", "in": "body", "code": "invalid_body", "message": "must be a JSON object"}]
            )
        known = {p.name for p in RECOMMEND_PARAMS}
        unknown = sorted(str(key) for key in body if key not in known)
        if unknown:
            raise _problem_of(
                [
                    {"field": key, "in": "body", "code": "unknown_field", "message": "is not a parameter"}
                    for key in unknown
                ]
            )
        return recommend(request.scope, _parse(RECOMMEND_PARAMS, body, "body"))

    @route(
        "GET",
        "/v1/items/{item_id:path}/similar",
        tags=["items"],
        summary="Items that co-occur with an item",
        responses={200: {"model": SimilarResponse}, **_ERRORS},
        openapi_extra={
            "parameters": [ITEM_PATH.openapi("path"), TENANT.openapi(), SURFACE.openapi(), K.openapi()]
        },
    )
    async def get_similar(request: Request) -> Response:
        """The item's co-occurrence neighbours in published rank order (score, then count, then id)."""
        scope = request.scope
        args = _query(scope, (TENANT, SURFACE, K))
        try:
            item_id = _convert(ITEM_PATH, scope["path_params"]["item_id"])
        except _Invalid as exc:
            item_id, error = None, exc.message
        else:
            error = "is required"
        if item_id is None:
            raise _problem_of(
                [{"field": "item_id", "in": "path", "code": "invalid_item_id", "message": error}]
            )
        target = resolve(args["tenant"], args["surface"])
        index = target.item_index.get(item_id)
        if index is None:
            raise Problem(
                404,
                "unknown_item",
                f"item {item_id!r} is not in the catalog served for {target.tenant}/{target.surface}",
                manifest_version=target.manifest_version,
            )
        items, scores = ranking.similar(target, index, args["k"])
        warnings = []
        if not items:
            warnings.append({"code": NO_NEIGHBORS, "message": "the item has no co-occurrence neighbours"})
        return respond(
            target,
            {
                "tenant": target.tenant,
                "surface": target.surface,
                "item_id": item_id,
                "manifest_version": target.manifest_version,
                "as_of": target.as_of,
                "request_id": scope["state"]["request_id"],
                "items": ranked_items(target, items, scores, ranking.SOURCE_COOC),
                "warnings": warnings,
            },
        )

    @route(
        "GET",
        "/v1/popular",
        tags=["items"],
        summary="Most popular items",
        responses={200: {"model": ItemsResponse}, **_ERRORS},
        openapi_extra=_query_doc(TENANT, SURFACE, K),
    )
    async def get_popular(request: Request) -> Response:
        """Popular items in published rank order (score desc, item id asc)."""
        scope = request.scope
        args = _query(scope, (TENANT, SURFACE, K))
        target = resolve(args["tenant"], args["surface"])
        items, scores = ranking.popular(target, args["k"])
        return respond(
            target,
            {
                "tenant": target.tenant,
                "surface": target.surface,
                "manifest_version": target.manifest_version,
                "as_of": target.as_of,
                "request_id": scope["state"]["request_id"],
                "items": ranked_items(target, items, scores, ranking.SOURCE_POPULARITY),
                "warnings": [],
            },
        )

    @route(
        "GET",
        "/v1/manifest",
        tags=["service"],
        summary="What is served for a tenant and surface, and since when",
        responses={200: {"model": ManifestResponse}, **_ERRORS},
        openapi_extra=_query_doc(TENANT, SURFACE),
    )
    async def get_manifest(request: Request) -> Response:
        args = _query(request.scope, (TENANT, SURFACE))
        target = resolve(args["tenant"], args["surface"])
        body = target.describe()
        body["request_id"] = request.scope["state"]["request_id"]
        body["load_failure"] = next(
            (
                status.describe()
                for status in store.statuses()
                if (status.tenant, status.surface) == (target.tenant, target.surface) and status.failing
            ),
            None,
        )
        return respond(target, body)

    @route("GET", "/healthz", tags=["service"], summary="The process is alive")
    async def healthz(request: Request) -> Response:
        body = {"status": "ok", "request_id": request.scope["state"]["request_id"]}
        return EncodedJSONResponse(orjson.dumps(body))

    @route(
        "GET",
        "/readyz",
        tags=["service"],
        summary="Ready when at least one manifest is loaded; lists load failures",
        responses={200: {"model": ReadyResponse}, 503: {**_PROBLEM, "description": "Nothing loaded"}},
    )
    async def readyz(request: Request) -> Response:
        now = time.time()
        targets = [target.describe(now) for _, target in sorted(store.snapshot.targets.items())]
        failures = [status.describe() for status in store.statuses() if status.failing]
        if not targets:
            raise Problem(
                503,
                "not_ready",
                "no manifest is loaded yet" + (f" ({len(failures)} failed to load)" if failures else ""),
                extra={"targets": [], "failures": failures},
            )
        body = {
            "status": "ready",
            "targets": targets,
            "failures": failures,
            "request_id": request.scope["state"]["request_id"],
        }
        return EncodedJSONResponse(orjson.dumps(body))

    @route("GET", "/metrics", tags=["service"], summary="Prometheus metrics")
    async def prometheus_metrics(request: Request) -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = get_openapi(
                title=app.title,
                version=app.version,
                summary=app.summary,
                description=app.description,
                routes=documented.routes,
            )
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
