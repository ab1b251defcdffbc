"""The admin API: merchandising rules over HTTP, behind a bearer token (docs/reference/http-api.md#admin-api).

`create_app` includes it only when `RECSYS_ADMIN_TOKEN` is set (`Settings.admin_token`): without a token
its routes do not exist (404) and are not in /openapi.json. Every admin route depends on `require_admin`,
which compares the request's `Authorization: Bearer` token with the configured one in constant time and
answers 401 problem+json otherwise; neither token is ever logged or echoed.

`PUT /v1/admin/rules` validates and publishes a rules document exactly as `recsys rules publish` does
(`recsys_dagster.publishing.rules.publish_rules`: a content-addressed `rules` artifact in a new manifest,
with who and why in the registry), or with `dry_run=true` answers with the dry-run report
(`rules_dry_run`) and publishes nothing. Publishing is the one pipeline module the server imports: it is
plain Python over files, and the server still never loads Dagster (tests/test_rules_admin.py checks it).
The server picks a published manifest up like any other, at its next poll.
"""

from __future__ import annotations

import re
from typing import Any

import orjson
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from recsys_core.manifest import Manifest, ManifestError, read_current
from recsys_core.rules import RulesDocument, RulesError, parse_rules, rules_in_force
from recsys_core.settings import ConfigError, Settings
from recsys_serving.bearer import Unauthorized, check_bearer, unauthorized
from recsys_serving.middleware import MAX_BODY_BYTES
from recsys_serving.params import SURFACE, TENANT, Param, parse_query, query_doc
from recsys_serving.problems import (
    PROBLEM_JSON,
    EncodedJSONResponse,
    Problem,
    invalid_request,
)
from recsys_serving.rules_dry_run import dry_run
from recsys_serving.store import ArtifactStore

try:
    from recsys_dagster.publishing.protocol import PublishError
    from recsys_dagster.publishing.rules import publish_rules
except ImportError as missing:  # an API-only install (recsys[serving]) has no artifact writer
    raise ConfigError(
        f"RECSYS_ADMIN_TOKEN: the admin API publishes rules and needs the full install ({missing})"
    ) from missing

RULES_PATH = "/v1/admin/rules"
ACTOR_HEADER = "x-recsys-actor"
DEFAULT_ACTOR = "admin-api"
# An actor is recorded in the registry and shown by `recsys history`: one short line of visible text.
_ACTOR = re.compile(r"[ -~]{1,128}")
SECURITY_SCHEME = "adminToken"
REASON = Param("reason", "id", "Why the rules change (recorded in the registry); required unless dry_run")
DRY_RUN = Param(
    "dry_run", "bool", "Publish nothing: answer with the dry-run report of the document", default=False
)
RULES_YAML = "application/yaml"
_SCHEMA_REF = "#/components/schemas/"


def require_admin(request: Request) -> None:
    """The dependency of every admin route: the request carries `Authorization: Bearer <token>` with the
    configured admin token. Compared in constant time; a missing or wrong token raises `Unauthorized`."""
    settings: Settings = request.app.state.settings
    check_bearer(request, settings.admin_token, "admin")


def include_admin(app: FastAPI, audit: APIRouter) -> None:
    """Serve the admin routes on `app`, each behind `require_admin`, and document them in its OpenAPI:
    the rules routes and `audit` (GET /v1/audit/decisions, recsys_serving/audit.py)."""
    router = APIRouter(dependencies=[Depends(require_admin)])
    router.include_router(rules_router())
    router.include_router(audit)
    app.include_router(router)
    app.add_exception_handler(Unauthorized, unauthorized)
    _document(app, router)


def _document(app: FastAPI, router: APIRouter) -> None:
    """Add the admin routes and their security scheme to the app's OpenAPI document (which `routes`
    builds from the public endpoints only)."""
    public = app.openapi
    merged = False

    def openapi() -> dict[str, Any]:
        nonlocal merged
        spec = public()
        if not merged:
            admin = get_openapi(title=app.title, version=app.version, routes=router.routes)
            spec["paths"].update(admin["paths"])
            components = spec.setdefault("components", {})
            schemas = components.setdefault("schemas", {})
            schemas.update(admin.get("components", {}).get("schemas", {}))
            document = RulesDocument.model_json_schema(by_alias=True, ref_template=_SCHEMA_REF + "{model}")
            schemas.update(document.pop("$defs", {}))
            schemas["RulesDocument"] = document
            components["securitySchemes"] = {SECURITY_SCHEME: {"type": "http", "scheme": "bearer"}}
            merged = True
        return spec

    app.openapi = openapi  # type: ignore[method-assign]


def _problems(*entries: tuple[int, str]) -> dict[int | str, dict[str, Any]]:
    schema = {"$ref": _SCHEMA_REF + "ProblemDetail"}
    return {
        status: {"description": description, "content": {PROBLEM_JSON: {"schema": schema}}}
        for status, description in entries
    }


_UNAUTHORIZED = (401, "No or a wrong bearer token (code unauthorized)")
_NOT_PUBLISHED = (404, "Nothing published for the tenant and surface (code not_published, unknown_*)")
_INVALID = (422, "Invalid parameters (code invalid_*, missing_*) or rules document (code invalid_rules)")
_DOC: dict[str, Any] = {"tags": ["admin"], "response_model": None}


def _security(extra: dict[str, Any]) -> dict[str, Any]:
    return {**extra, "security": [{SECURITY_SCHEME: []}]}


def rules_router() -> APIRouter:
    """GET and PUT /v1/admin/rules."""
    router = APIRouter()

    @router.get(
        RULES_PATH,
        summary="The rules in force for a tenant and surface, and their version",
        responses=_problems(_UNAUTHORIZED, _NOT_PUBLISHED, _INVALID),
        openapi_extra=_security(query_doc(TENANT, SURFACE)),
        **_DOC,
    )
    def get_rules(request: Request) -> Response:
        """The current manifest's rules document (`rules: []` when it has none) and its version."""
        args = parse_query(request.scope, (TENANT, SURFACE))
        settings: Settings = request.app.state.settings
        manifest = _current(settings, args["tenant"], args["surface"])
        try:
            in_force = rules_in_force(settings.artifact_root, manifest)
        except RulesError as exc:
            raise Problem(500, "rules_unreadable", str(exc)) from None
        document = in_force[1].model_dump(mode="json", by_alias=True, exclude_none=True) if in_force else None
        return _json(
            request,
            {
                "tenant": args["tenant"],
                "surface": args["surface"],
                "manifest_version": manifest["manifest_version"],
                "as_of": manifest["as_of"],
                "rules_version": in_force[0] if in_force else None,
                "document": document or {"rules": []},
            },
        )

    @router.put(
        RULES_PATH,
        summary="Validate and publish a rules document (or dry-run it)",
        responses={
            **_problems(
                _UNAUTHORIZED,
                _NOT_PUBLISHED,
                (409, "The publish was refused (code publish_refused)"),
                (413, f"Request body over {MAX_BODY_BYTES:,} bytes (code body_too_large)"),
                _INVALID,
            )
        },
        openapi_extra=_security(
            {
                **query_doc(TENANT, SURFACE, REASON, DRY_RUN),
                "requestBody": {
                    "required": True,
                    "description": "The rules document, YAML or JSON (docs/reference/rules.md)",
                    "content": {
                        RULES_YAML: {"schema": {"type": "string"}},
                        "application/json": {"schema": {"$ref": _SCHEMA_REF + "RulesDocument"}},
                    },
                },
            }
        ),
        **_DOC,
    )
    async def put_rules(request: Request) -> Response:
        """Publish the body as the rules of the tenant and surface, as `recsys rules publish` does; who
        is the `X-Recsys-Actor` header (default admin-api). With `dry_run=true`: the dry-run report."""
        args = parse_query(request.scope, (TENANT, SURFACE, REASON, DRY_RUN))
        actor = _actor(request)
        body = await request.body()
        try:
            document = parse_rules(body, "body")
        except RulesError as exc:
            raise invalid_request(
                [
                    {
                        "field": "body",
                        "in": "body",
                        "code": "invalid_rules",
                        "message": str(exc).removeprefix("body: "),
                    }
                ]
            ) from None
        settings: Settings = request.app.state.settings
        tenant, surface = args["tenant"], args["surface"]
        if args["dry_run"]:
            store: ArtifactStore = request.app.state.store
            target = store.get(tenant, surface)
            if target is None:
                raise Problem(
                    404, "not_published", f"{tenant}/{surface} is not served: nothing to dry-run against"
                )
            report = await run_in_threadpool(dry_run, settings, target, document)
            return _json(request, report.as_dict())
        if args["reason"] is None:
            raise invalid_request(
                [{"field": "reason", "in": "query", "code": "missing_parameter", "message": "is required"}]
            )
        _current(settings, tenant, surface)
        try:
            outcome = await run_in_threadpool(
                publish_rules,
                settings.artifact_root,
                tenant,
                surface,
                document,
                reason=args["reason"],
                actor=actor,
            )
        except PublishError as exc:
            raise Problem(404, "not_published", str(exc)) from None
        if outcome.action not in ("publish", "noop"):
            raise Problem(409, "publish_refused", outcome.message, extra={"action": outcome.action})
        return _json(
            request,
            {
                "tenant": tenant,
                "surface": surface,
                "action": outcome.action,
                "manifest_version": outcome.manifest_version,
                "previous": outcome.previous,
                "message": outcome.message,
                "actor": actor,
                "rules": len(document.rules),
            },
        )

    return router


def _current(settings: Settings, tenant: str, surface: str) -> Manifest:
    """The current manifest of a tenant and surface, or a 404 problem."""
    try:
        manifest = read_current(settings.artifact_root, tenant, surface)
    except ManifestError as exc:
        raise Problem(500, "manifest_unreadable", str(exc)) from None
    if manifest is None:
        raise Problem(404, "not_published", f"nothing is published for {tenant}/{surface}")
    return manifest


def _actor(request: Request) -> str:
    actor = request.headers.get(ACTOR_HEADER, "").strip()
    if not actor:
        return DEFAULT_ACTOR
    if not _ACTOR.fullmatch(actor):
        raise invalid_request(
            [
                {
                    "field": "X-Recsys-Actor",
                    "in": "header",
                    "code": "invalid_actor",
                    "message": "must be 1-128 printable ASCII characters",
                }
            ]
        )
    return actor


def _json(request: Request, body: dict[str, Any]) -> Response:
    return EncodedJSONResponse(
        orjson.dumps({**body, "request_id": request.scope["state"]["request_id"]}),
        request_id=None,
    )
