"""The endpoints: parameters in (`params`), an answer from the store's current snapshot out, as orjson.

Each endpoint is served by a plain Starlette route (FastAPI's per-request dependency solving doubled the
latency of a small endpoint) and documented by an identical FastAPI route on a router that only feeds
the OpenAPI document. GET routes without path parameters are also dispatched directly by
`RequestContextMiddleware`.

The endpoints are methods of `Endpoints`, bound to one app's store, exposure writer and metrics: several
apps can live in one process, and reading an attribute of `self` is nearly free, where each look-up in
`request.app.state` costs about half a microsecond on the hot path.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.routing import Route
from starlette.types import Scope

from recsys_core.settings import BlendWeights, CatalogConfig
from recsys_serving import ranking, recommender
from recsys_serving.exposures import ExposureWriter
from recsys_serving.metrics import ServingMetrics
from recsys_serving.middleware import MeteredRoute
from recsys_serving.params import (
    CATALOG_PARAMS,
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
from recsys_serving.problems import PROBLEM_JSON, EncodedJSONResponse, Problem, invalid_request
from recsys_serving.schemas import (
    BODY_ERRORS,
    NO_NEIGHBORS,
    NOT_READY,
    QUERY_ERRORS,
    SERVICE_ERRORS,
    HealthResponse,
    ItemsResponse,
    ManifestResponse,
    ReadyResponse,
    RecommendationsResponse,
    SimilarResponse,
)
from recsys_serving.store import ArtifactStore, LoadedTarget
from recsys_serving.traces import Decision, DecisionWriter

EndpointMethod = TypeVar("EndpointMethod", bound=Callable[..., Any])


class PrometheusText(Response):
    """GET /metrics: the Prometheus text exposition format (documented as such in the OpenAPI)."""

    media_type = CONTENT_TYPE_LATEST


@dataclass(frozen=True, slots=True)
class _RouteSpec:
    method: str
    path: str
    doc: dict[str, Any]  # FastAPI route arguments that only document it (tags, summary, responses, ...)


def _route(method: str, path: str, **doc: Any) -> Callable[[EndpointMethod], EndpointMethod]:
    """Mark an `Endpoints` method as the endpoint of `method path` (`include_routes` serves it)."""

    def mark(endpoint: EndpointMethod) -> EndpointMethod:
        endpoint.route_spec = _RouteSpec(method, path, doc)  # type: ignore[attr-defined]
        return endpoint

    return mark


def include_routes(app: FastAPI, endpoints: Endpoints) -> dict[str, Route]:
    """Serve the marked methods of `endpoints` on `app` as plain Starlette routes, in the order they are
    defined, and document them in its OpenAPI.

    Returns the GET routes without path parameters by path, for `RequestContextMiddleware`'s fast path.
    """
    documented = APIRouter()
    fast_routes: dict[str, Route] = {}
    for function in vars(Endpoints).values():
        spec: _RouteSpec | None = getattr(function, "route_spec", None)
        if spec is None:
            continue
        endpoint = getattr(endpoints, function.__name__)
        route = MeteredRoute(spec.path, endpoint, methods=[spec.method], name=function.__name__)
        # Ahead of FastAPI's /docs and /openapi.json routes: the router tries routes in order.
        app.router.routes.insert(len(documented.routes), route)
        if spec.method == "GET" and "{" not in spec.path:
            fast_routes[spec.path] = route
        documented.add_api_route(spec.path, endpoint, methods=[spec.method], response_model=None, **spec.doc)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            # The FastAPI routes and routers the app includes (the audit endpoint, when enabled) document
            # themselves; the plain routes above are documented by `documented`'s twins.
            app.openapi_schema = _errors_as_problem_json(
                get_openapi(
                    title=app.title,
                    version=app.version,
                    summary=app.summary,
                    description=app.description,
                    routes=[*documented.routes, *app.routes],
                )
            )
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return fast_routes


def _errors_as_problem_json(spec: dict[str, Any]) -> dict[str, Any]:
    """Error responses carry only application/problem+json, with the schema FastAPI put under the route's
    media type (application/json, or the Prometheus text type of /metrics); responses in status order."""
    for operations in spec.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.get("responses", {})
            for status, response in responses.items():
                content = response.get("content", {})
                if status[:1] in "45":
                    problem = content.pop(PROBLEM_JSON, {})
                    for media_type in list(content):
                        problem.update(content.pop(media_type))
                    content[PROBLEM_JSON] = problem
            operation["responses"] = dict(sorted(responses.items()))
    return spec


# The request parameters a decision trace records (tenant, surface and user have fields of their own).
_TRACED_PARAMS = ("k", "exclude_seen", "context_items", "session_id")
# and these when the request gives them.
_TRACED_IF_GIVEN = tuple(p.name for p in CATALOG_PARAMS)


def _scored_items(item_ids: list[str], scores: list[float], sources: list[str]) -> list[dict[str, Any]]:
    return [
        {"item_id": item_id, "score": score, "source": source}
        for item_id, score, source in zip(item_ids, scores, sources, strict=True)
    ]


def _ranked_items(
    target: LoadedTarget, items: list[int], scores: list[float], source: str
) -> list[dict[str, Any]]:
    """Vocabulary indexes from one source as response items."""
    ids = target.item_ids
    return _scored_items([ids[i] for i in items], scores, [source] * len(items))


def _respond(target: LoadedTarget, body: dict[str, Any]) -> Response:
    return EncodedJSONResponse(orjson.dumps(body), manifest_version=target.manifest_version)


class Endpoints:
    """The API's endpoints over one app's store, exposure writer (None: no exposure log), metrics and
    decision trace writer (None: no traces)."""

    def __init__(
        self,
        store: ArtifactStore,
        exposures: ExposureWriter | None,
        metrics: ServingMetrics,
        weights: BlendWeights,
        decisions: DecisionWriter | None = None,
        catalog: CatalogConfig | None = None,
    ) -> None:
        catalog = catalog or CatalogConfig()
        # The diversity re-ranking of requests that do not ask for one.
        self.diversity = catalog.diversity
        self.max_per_category = catalog.max_per_category or None
        self.store = store
        self.exposures = exposures
        self.metrics = metrics
        self.weights = weights
        self.decisions = decisions

    def _resolve(self, tenant: str, surface: str) -> LoadedTarget:
        snapshot = self.store.snapshot
        target = snapshot.targets.get((tenant, surface))
        if target is not None:
            return target
        if tenant not in snapshot.tenants:
            served = ", ".join(sorted(snapshot.tenants)) or "none"
            raise Problem(404, "unknown_tenant", f"tenant {tenant!r} is not served (served: {served})")
        surfaces = sorted(s for t, s in snapshot.targets if t == tenant)
        raise Problem(
            404,
            "unknown_surface",
            f"surface {surface!r} is not served for tenant {tenant!r} (served: {', '.join(surfaces)})",
        )

    def _recommendations(self, scope: Scope, args: dict[str, Any], endpoint: str) -> Response:
        """GET /v1/recommendations and POST /v1/recommend once their parameters are parsed."""
        tenant, surface, user_id, k = args["tenant"], args["surface"], args["user_id"], args["k"]
        target = self._resolve(tenant, surface)
        request_id = scope["state"]["request_id"]
        now = dt.datetime.now(dt.UTC)
        result = recommender.recommend(
            target,
            user_id=user_id,
            context_items=args["context_items"],
            k=k,
            exclude_seen=args["exclude_seen"],
            weights=target.blend or self.weights,
            rules_at=now,
            categories=args["categories"],
            exclude_categories=args["exclude_categories"],
            diversity=self.diversity if args["diversity"] is None else args["diversity"],
            max_per_category=args["max_per_category"] or self.max_per_category,
        )
        for warning in result.warnings:
            self.metrics.fallback(tenant, surface, warning["code"])
        rule_ids = result.rule_ids
        if rule_ids:
            self.metrics.rules_applied(tenant, surface, rule_ids)
        else:
            # One shared empty list: the items' `rules` when no rule touched any of them.
            rule_ids = [[]] * len(result.item_ids)
        decisions = self.decisions
        if decisions is not None and decisions.sampled(request_id):
            params = {name: args[name] for name in _TRACED_PARAMS}
            params.update((name, args[name]) for name in _TRACED_IF_GIVEN if args[name] is not None)
            decisions.record(
                Decision(
                    now.timestamp(),
                    request_id,
                    tenant,
                    surface,
                    user_id,
                    endpoint,
                    params,
                    target.manifest_version,
                    target.artifact_versions,
                    result,
                )
            )
        if self.exposures is not None and result.item_ids:
            self.exposures.record(
                tenant=tenant,
                surface=surface,
                session_id=args["session_id"] or request_id,
                user_id=user_id,
                request_id=request_id,
                item_ids=result.item_ids,
            )
        return _respond(
            target,
            {
                "tenant": tenant,
                "surface": surface,
                "user_id": user_id,
                "k": k,
                "manifest_version": target.manifest_version,
                "as_of": target.as_of,
                "request_id": request_id,
                "items": [
                    {
                        "item_id": item_id,
                        "score": score,
                        "source": source,
                        "sources": contribution,
                        "rules": rules,
                    }
                    for item_id, score, source, contribution, rules in zip(
                        result.item_ids,
                        result.scores,
                        result.sources,
                        result.contributions,
                        rule_ids,
                        strict=True,
                    )
                ],
                "warnings": result.warnings,
            },
        )

    @_route(
        "GET",
        "/v1/recommendations",
        tags=["recommendations"],
        summary="Personalised top-k for a user and/or context items",
        responses={200: {"model": RecommendationsResponse}, **QUERY_ERRORS},
        openapi_extra=query_doc(*RECOMMEND_PARAMS),
    )
    async def get_recommendations(self, request: Request) -> Response:
        """Co-occurrence neighbours of the user's most recent items (or of the context items), weighted
        by recency, then popular items to fill; the user's seen items are excluded by default; ties are
        broken by item id. An unknown user (or none) gets popular items with a warning."""
        return self._recommendations(
            request.scope, parse_query(request.scope, RECOMMEND_PARAMS), "recommendations"
        )

    @_route(
        "POST",
        "/v1/recommend",
        tags=["recommendations"],
        summary="Personalised top-k, the same parameters in a JSON body",
        responses={200: {"model": RecommendationsResponse}, **BODY_ERRORS},
        openapi_extra=body_doc(RECOMMEND_PARAMS),
    )
    async def post_recommend(self, request: Request) -> Response:
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
        return self._recommendations(request.scope, parse(RECOMMEND_PARAMS, body, "body"), "recommend")

    @_route(
        "GET",
        "/v1/items/{item_id:path}/similar",
        tags=["items"],
        summary="Items that co-occur with an item",
        responses={200: {"model": SimilarResponse}, **QUERY_ERRORS},
        openapi_extra={
            "parameters": [ITEM_PATH.openapi("path"), TENANT.openapi(), SURFACE.openapi(), K.openapi()]
        },
    )
    async def get_similar(self, request: Request) -> Response:
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
        target = self._resolve(args["tenant"], args["surface"])
        index = target.item_index.get(item_id)
        if index is None:
            raise Problem(
                404,
                "unknown_item",
                f"item {item_id!r} is not in the catalog served for {target.tenant}/{target.surface}",
                manifest_version=target.manifest_version,
            )
        items, scores, sources = recommender.similar(target, index, args["k"])
        warnings = []
        if not items:
            warnings.append(
                {
                    "code": NO_NEIGHBORS,
                    "message": "the item has no co-occurrence neighbours (pairs seen in fewer sessions than "
                    "artifacts.cooc.min_support are not kept)",
                }
            )
        return _respond(
            target,
            {
                "tenant": target.tenant,
                "surface": target.surface,
                "item_id": item_id,
                "k": args["k"],
                "manifest_version": target.manifest_version,
                "as_of": target.as_of,
                "request_id": scope["state"]["request_id"],
                "items": _scored_items([target.item_ids[i] for i in items], scores, sources),
                "warnings": warnings,
            },
        )

    @_route(
        "GET",
        "/v1/popular",
        tags=["items"],
        summary="Most popular items",
        responses={200: {"model": ItemsResponse}, **QUERY_ERRORS},
        openapi_extra=query_doc(TENANT, SURFACE, K),
    )
    async def get_popular(self, request: Request) -> Response:
        """Popular items in published rank order (score desc, item id asc)."""
        scope = request.scope
        args = parse_query(scope, (TENANT, SURFACE, K))
        target = self._resolve(args["tenant"], args["surface"])
        catalog = target.catalog
        unavailable = catalog.unavailable if catalog is not None else frozenset()
        items, scores = ranking.popular(target, args["k"], unavailable)
        return _respond(
            target,
            {
                "tenant": target.tenant,
                "surface": target.surface,
                "k": args["k"],
                "manifest_version": target.manifest_version,
                "as_of": target.as_of,
                "request_id": scope["state"]["request_id"],
                "items": _ranked_items(target, items, scores, ranking.SOURCE_POPULARITY),
                "warnings": [],
            },
        )

    @_route(
        "GET",
        "/v1/manifest",
        tags=["service"],
        summary="What is served for a tenant and surface, and since when",
        responses={200: {"model": ManifestResponse}, **QUERY_ERRORS},
        openapi_extra=query_doc(TENANT, SURFACE),
    )
    async def get_manifest(self, request: Request) -> Response:
        args = parse_query(request.scope, (TENANT, SURFACE))
        target = self._resolve(args["tenant"], args["surface"])
        body = target.describe()
        body["request_id"] = request.scope["state"]["request_id"]
        body["load_failure"] = next(
            (
                status.describe()
                for status in self.store.statuses()
                if (status.tenant, status.surface) == (target.tenant, target.surface) and status.failing
            ),
            None,
        )
        return _respond(target, body)

    @_route(
        "GET",
        "/healthz",
        tags=["service"],
        summary="The process is alive",
        responses={200: {"model": HealthResponse}, **SERVICE_ERRORS},
    )
    async def healthz(self, request: Request) -> Response:
        body = {"status": "ok", "request_id": request.scope["state"]["request_id"]}
        return EncodedJSONResponse(orjson.dumps(body))

    @_route(
        "GET",
        "/readyz",
        tags=["service"],
        summary="Ready when at least one manifest is loaded; lists load failures",
        responses={200: {"model": ReadyResponse}, **NOT_READY, **SERVICE_ERRORS},
    )
    async def readyz(self, request: Request) -> Response:
        now = time.time()
        targets = [target.describe(now) for _, target in sorted(self.store.snapshot.targets.items())]
        failures = [status.describe() for status in self.store.statuses() if status.failing]
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

    @_route(
        "GET",
        "/metrics",
        tags=["service"],
        summary="Prometheus metrics (text exposition format)",
        response_class=PrometheusText,
        responses={200: {"description": "The metrics, in the Prometheus text format"}, **SERVICE_ERRORS},
    )
    async def prometheus_metrics(self, request: Request) -> Response:
        return PrometheusText(self.metrics.render())
