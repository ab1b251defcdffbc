"""OpenAPI-only models: they document the responses, which are built as dicts and encoded with orjson.

Nothing validates or serializes through them at run time; `routes.py` names them in `responses=`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from recsys_serving.middleware import MAX_BODY_BYTES
from recsys_serving.params import MAX_QUERY_BYTES
from recsys_serving.problems import PROBLEM_JSON
from recsys_serving.recommender import WARNING_CODES

# The warning of GET /v1/items/{item_id}/similar (the others come from the recommender).
NO_NEIGHBORS = "no_neighbors"


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
    code: str = Field(description=", ".join((*WARNING_CODES, NO_NEIGHBORS)))
    message: str
    items: list[str] | None = Field(None, description="context_items_unknown: the ignored ids")


class ScoredItem(BaseModel):
    item_id: str
    score: float = Field(
        description="recommendations: the blended score (sum of `sources`); similar: the co-occurrence "
        "score; popular: the popularity score"
    )
    source: str = Field(description="als, cooc or popularity: the source that contributed most")


class BlendedItem(ScoredItem):
    score: float | None = Field(  # type: ignore[assignment]  # a rule may place an item without a score
        description="The blended score (sum of `sources`), after any boost or bury; null for an item a "
        "merchandising rule placed that the blend did not score"
    )
    source: str = Field(
        description="als, cooc or popularity: the source that contributed most; rule: placed by a rule "
        "without a score"
    )
    sources: dict[str, float] = Field(
        description="Each contributing source (als, cooc, popularity) and its weighted share of `score`"
    )
    rules: list[str] = Field(
        description="The ids of the merchandising rules that changed this item (pin, replace, boost, bury), "
        "in the rules document's order; empty when none did"
    )


class ItemsResponse(BaseModel):
    tenant: str
    surface: str
    k: int = Field(description="The requested k (the list may be shorter)")
    manifest_version: str
    as_of: str
    request_id: str
    items: list[ScoredItem]
    warnings: list[ResponseWarning]


class RecommendationsResponse(ItemsResponse):
    user_id: str | None
    items: list[BlendedItem]  # type: ignore[assignment]  # a ScoredItem with its sources


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
    blend: dict[str, float] | None = Field(
        None, description="The blend weights published with the manifest (null: the server's configured ones)"
    )
    request_id: str
    load_failure: dict[str, Any] | None = Field(
        None, description="A newer manifest that failed to load (the version above keeps serving)"
    )


class HealthResponse(BaseModel):
    status: str = Field(description="ok")
    request_id: str


class ReadyResponse(BaseModel):
    status: str
    targets: list[dict[str, Any]]
    failures: list[dict[str, Any]] = Field(description="Targets whose current manifest failed to load")
    request_id: str


# `responses=` entries of the endpoints. Every error is problem+json: `routes.include_routes` moves the
# schema FastAPI puts under application/json to application/problem+json, the only type errors have.
Responses = dict[int | str, dict[str, Any]]


def _problem(status: int, description: str) -> Responses:
    return {status: {"model": ProblemDetail, "content": {PROBLEM_JSON: {}}, "description": description}}


NOT_READY = _problem(503, "Nothing loaded (code not_ready)")
_NOT_FOUND = _problem(404, "Unknown tenant, surface or item (code unknown_*)")
_INVALID = _problem(
    422, "Invalid parameters (code invalid_*, missing_*, unknown_field, too_many_context_items)"
)
_METHOD_NOT_ALLOWED = _problem(405, "Another method than the documented one (code method_not_allowed)")
_BODY_TOO_LARGE = _problem(413, f"Request body over {MAX_BODY_BYTES:,} bytes (code body_too_large)")
_QUERY_TOO_LONG = _problem(414, f"Query string over {MAX_QUERY_BYTES:,} bytes (code query_too_long)")
# The endpoints that take a query string, the one that takes a JSON body, and those that take neither.
QUERY_ERRORS: Responses = {**_NOT_FOUND, **_METHOD_NOT_ALLOWED, **_QUERY_TOO_LONG, **_INVALID}
BODY_ERRORS: Responses = {**_NOT_FOUND, **_METHOD_NOT_ALLOWED, **_BODY_TOO_LARGE, **_INVALID}
SERVICE_ERRORS: Responses = _METHOD_NOT_ALLOWED
