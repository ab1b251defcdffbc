"""The HTTP API: `create_app(settings)` wires the FastAPI application together.

Routes (`routes`) answer from the `ArtifactStore` snapshot (one reference read per request): parameters
are parsed from `Param` tables (`params`), recommendations come from `recommender` over the pure
functions of `ranking`, and responses are encoded with orjson. Cross-cutting concerns live in one pure
ASGI middleware (`middleware`: request id, body size limit, request metrics, and a direct dispatch of
the query-string GET endpoints) and in the exception handlers below, which turn every error into
`application/problem+json` with a stable `code` (`problems`).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.resources import files

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from recsys_core.settings import Settings, load_settings
from recsys_serving.audit import audit_router
from recsys_serving.exposures import ExposureWriter
from recsys_serving.metrics import ServingMetrics, shared_metrics_dir
from recsys_serving.middleware import MeteredMount, RequestContextMiddleware
from recsys_serving.problems import Problem, invalid_request, problem_response
from recsys_serving.routes import Endpoints, include_routes
from recsys_serving.store import ArtifactStore
from recsys_serving.traces import DecisionWriter

log = logging.getLogger(__name__)

API_VERSION = "1"
# The Swagger UI and ReDoc pages load their scripts and styles from here, served from the files of the
# `fastapi-offline` distribution: the pages work without internet access (FastAPI's defaults use a CDN).
DOCS_ASSETS = "/docs/static"
_ASSET_DIR = files("fastapi_offline") / "static"
# Codes of the errors raised by Starlette itself (routing, body limit) rather than by an endpoint.
_HTTP_ERROR_CODES = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large", 400: "bad_request"}


def create_app(settings: Settings | None = None) -> FastAPI:
    """The API over the manifests under `settings.artifact_root` (default: `load_settings()`).

    The artifacts are loaded when the app starts (lifespan), before it accepts connections; a daemon
    thread then polls for new manifests every `settings.serve_poll_seconds`. With
    `settings.exposure_log`, recommendation responses are logged to `settings.raw_root`, and with a
    `settings.decision_sample_rate` above 0 they are traced there too (`traces`). In a worker of
    `recsys serve --workers N`, /metrics reports all the workers (`metrics.shared_metrics_dir`). The audit
    endpoint is served only with an admin token configured.
    """
    settings = settings or load_settings()
    store = ArtifactStore(
        settings.artifact_root,
        settings.serve_poll_seconds,
        weights=settings.pipeline.blend,
        cold_start_max_interactions=settings.pipeline.guardrails.cold_start_max_interactions,
    )
    exposures = (
        ExposureWriter(settings.raw_root, max_bytes_per_day=settings.exposure_max_bytes_per_day)
        if settings.exposure_log
        else None
    )
    decisions = (
        DecisionWriter(
            settings.raw_root,
            sample_rate=settings.decision_sample_rate,
            max_bytes_per_day=settings.decision_max_bytes_per_day,
        )
        if settings.decision_sample_rate > 0
        else None
    )
    metrics = ServingMetrics(store, exposures, shared_metrics_dir(), decisions)
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
        lifespan=_lifespan,
        # Starlette's redirect of /path/ to /path builds an absolute URL from the request's Host header,
        # which a client chooses: a path with a trailing slash is answered 404 instead.
        redirect_slashes=False,
        docs_url=None,
        redoc_url=None,
        exception_handlers={
            Problem: _problem,
            RequestValidationError: _invalid,
            StarletteHTTPException: _http_error,
            Exception: _unexpected,
        },
    )
    app.state.settings = settings
    app.state.store = store
    app.state.exposures = exposures
    app.state.decisions = decisions
    app.state.metrics = metrics
    fast_routes = include_routes(
        app,
        Endpoints(store, exposures, metrics, settings.pipeline.blend, decisions, settings.pipeline.catalog),
    )
    _include_docs(app)
    if settings.admin_token is not None:
        # Only then: the admin API (rules publishing) is not even imported by a server without it.
        from recsys_serving.admin import include_admin

        include_admin(app, audit_router(decisions, settings.lake_root))
    app.state.ingest_logs = []
    limits: dict[str, int] = {}
    if settings.ingest_token is not None:
        from recsys_serving.ingest import body_limits, include_ingest

        app.state.ingest_logs = include_ingest(app, settings)
        limits = body_limits(settings)
    app.add_middleware(RequestContextMiddleware, metrics=metrics, fast_routes=fast_routes, body_limits=limits)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    store: ArtifactStore = app.state.store
    exposures: ExposureWriter | None = app.state.exposures
    decisions: DecisionWriter | None = app.state.decisions
    metrics: ServingMetrics = app.state.metrics
    await run_in_threadpool(store.refresh)
    # Loaded artifacts live as long as they are served: keep the collector from rescanning them.
    gc.collect()
    gc.freeze()
    store.start()
    writers = (exposures, decisions, *app.state.ingest_logs)
    for writer in writers:
        if writer is not None:
            writer.start()
    metrics.start()
    try:
        yield
    finally:
        # The server runs this once every in-flight request has been answered (or the shutdown grace
        # period is over), so the exposure log and the decision traces hold every response sent.
        store.stop()
        for writer in writers:
            if writer is not None:
                await run_in_threadpool(writer.close)
        await run_in_threadpool(metrics.stop)
        # Frozen objects are never collected, not even when the interpreter exits: give them back to the
        # collector, so that what this process held before the app started (in the test suite, DuckDB
        # connections of the pipeline) is freed rather than reported as leaked at exit.
        gc.unfreeze()


def _include_docs(app: FastAPI) -> None:
    """/docs (Swagger UI) and /redoc over /openapi.json, their assets served under DOCS_ASSETS.

    URLs are prefixed with the request's root path, so that the pages also work behind a proxy that
    mounts the API under a prefix.
    """
    openapi_url = app.openapi_url or "/openapi.json"

    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=root + openapi_url,
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{root}{DOCS_ASSETS}/favicon.png",
        )

    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(
            openapi_url=root + openapi_url,
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{DOCS_ASSETS}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{DOCS_ASSETS}/favicon.png",
            with_google_fonts=False,
        )

    app.add_api_route("/docs", swagger_ui, methods=["GET"], include_in_schema=False)
    app.add_api_route("/redoc", redoc, methods=["GET"], include_in_schema=False)
    app.router.routes.append(
        MeteredMount(DOCS_ASSETS, app=StaticFiles(directory=str(_ASSET_DIR)), name="docs_assets")
    )


# ----------------------------------------------------------------------------- exception handlers


async def _problem(request: Request, exc: Problem) -> Response:
    return problem_response(request.scope, exc)


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


async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if exc.status_code == 404 and detail == "Not Found":
        detail = f"no route {request.method} {request.url.path}; the API is described at /docs"
    code = _HTTP_ERROR_CODES.get(exc.status_code, f"http_{exc.status_code}")
    response = problem_response(request.scope, Problem(exc.status_code, code, detail))
    for name, value in (exc.headers or {}).items():
        response.headers[name] = value
    return response


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return problem_response(request.scope, Problem(500, "internal_error", "unexpected server error"))
