"""The HTTP API: `create_app(settings)` builds the FastAPI application.

Routes answer from the `ArtifactStore` snapshot (one reference read per request): parameters are parsed
from `Param` tables (`params`), recommendations come from `recommender` over the pure functions of
`ranking`, and responses are encoded with orjson. Endpoints are plain Starlette routes (documented
through a FastAPI router that only feeds the OpenAPI document). Cross-cutting concerns live in one pure
ASGI middleware (`middleware`: request id, body size limit, request metrics, and a direct dispatch of
the query-string GET endpoints) and in the exception handlers, which turn every error into
`application/problem+json` with a stable `code` (`problems`).
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Route
from starlette.types import Scope

from recsys_core.settings import Settings, load_settings
from recsys_serving import ranking, recommender
from recsys_serving.exposures import ExposureWriter
from recsys_serving.metrics import ServingMetrics
from recsys_serving.middleware import MeteredRoute, RequestContextMiddleware
from recsys_serving.params import (
    ITEM_PATH,
    RECOMMEND_PARAMS,
    SURFACE,
    TENANT,
    InvalidValue,
    K,
    body_doc,
    convert,
    parse,
    parse_query,
    query_doc,
)
from recsys_serving.problems import EncodedJSONResponse, Problem, invalid_request, problem_response
from recsys_serving.schemas import (
    ERROR_RESPONSES,
    NO_NEIGHBORS,
    PROBLEM_RESPONSE,
    ItemsResponse,
    ManifestResponse,
    ReadyResponse,
    RecommendationsResponse,
    SimilarResponse,
)
from recsys_serving.store import ArtifactStore, LoadedTarget

log = logging.getLogger(__name__)

API_VERSION = "1"
# Codes of the errors raised by Starlette itself (routing, body limit) rather than by an endpoint.
_HTTP_ERROR_CODES = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large", 400: "bad_request"}

Endpoint = Callable[[Request], Awaitable[Response]]


# ------------------------------------------------------------------------------------------- app


def create_app(settings: Settings | None = None) -> FastAPI:
    """The API over the manifests under `settings.artifact_root` (default: `load_settings()`).

    The artifacts are loaded when the app starts (lifespan), before it accepts connections; a daemon
    thread then polls for new manifests every `settings.serve_poll_seconds`. With
    `settings.exposure_log`, recommendation responses are logged to `settings.raw_root`.
    """
    settings = settings or load_settings()
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
        return problem_response(request.scope, invalid_request(errors or fallback))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no route {request.method} {request.url.path}; the API is described at /docs"
        code = _HTTP_ERROR_CODES.get(exc.status_code, f"http_{exc.status_code}")
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
            starlette_route = MeteredRoute(path, endpoint, methods=[method], name=endpoint.__name__)
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
        responses={200: {"model": RecommendationsResponse}, **ERROR_RESPONSES},
        openapi_extra=query_doc(*RECOMMEND_PARAMS),
    )
    async def get_recommendations(request: Request) -> Response:
        """Co-occurrence neighbours of the user's most recent items (or of the context items), weighted
        by recency, then popular items to fill; the user's seen items are excluded by default; ties are
        broken by item id. An unknown user (or none) gets popular items with a warning."""
        return recommend(request.scope, parse_query(request.scope, RECOMMEND_PARAMS))

    @route(
        "POST",
        "/v1/recommend",
        tags=["recommendations"],
        summary="Personalised top-k, the same parameters in a JSON body",
        responses={200: {"model": RecommendationsResponse}, **ERROR_RESPONSES},
        openapi_extra=body_doc(RECOMMEND_PARAMS),
    )
    async def post_recommend(request: Request) -> Response:
        """As GET /v1/recommendations, with the parameters as a JSON object (`context_items` a list)."""
        raw = await request.body()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise invalid_request(
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
            raise invalid_request(
                [{"field": "body", "in": "body", "code": "invalid_body", "message": "must be a JSON object"}]
            )
        known = {p.name for p in RECOMMEND_PARAMS}
        unknown = sorted(str(key) for key in body if key not in known)
        if unknown:
            raise invalid_request(
                [
                    {"field": key, "in": "body", "code": "unknown_field", "message": "is not a parameter"}
                    for key in unknown
                ]
            )
        return recommend(request.scope, parse(RECOMMEND_PARAMS, body, "body"))

    @route(
        "GET",
        "/v1/items/{item_id:path}/similar",
        tags=["items"],
        summary="Items that co-occur with an item",
        responses={200: {"model": SimilarResponse}, **ERROR_RESPONSES},
        openapi_extra={
            "parameters": [ITEM_PATH.openapi("path"), TENANT.openapi(), SURFACE.openapi(), K.openapi()]
        },
    )
    async def get_similar(request: Request) -> Response:
        """The item's co-occurrence neighbours in published rank order (score, then count, then id)."""
        scope = request.scope
        args = parse_query(scope, (TENANT, SURFACE, K))
        try:
            item_id = convert(ITEM_PATH, scope["path_params"]["item_id"])
        except InvalidValue as exc:
            item_id, error = None, exc.message
        else:
            error = "is required"
        if item_id is None:
            raise invalid_request(
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
        responses={200: {"model": ItemsResponse}, **ERROR_RESPONSES},
        openapi_extra=query_doc(TENANT, SURFACE, K),
    )
    async def get_popular(request: Request) -> Response:
        """Popular items in published rank order (score desc, item id asc)."""
        scope = request.scope
        args = parse_query(scope, (TENANT, SURFACE, K))
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
        responses={200: {"model": ManifestResponse}, **ERROR_RESPONSES},
        openapi_extra=query_doc(TENANT, SURFACE),
    )
    async def get_manifest(request: Request) -> Response:
        args = parse_query(request.scope, (TENANT, SURFACE))
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
        responses={200: {"model": ReadyResponse}, 503: {**PROBLEM_RESPONSE, "description": "Nothing loaded"}},
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
