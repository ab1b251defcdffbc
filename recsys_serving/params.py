"""Request parameters, declared once in `Param` tables that both validate requests and document them.

They are parsed here rather than by FastAPI's per-parameter pydantic dependencies: on the hot path that
machinery cost more than the ranking itself (docs/benchmarks.md). The same tables give the OpenAPI
parameters (`query_doc`) and request body schema (`body_doc`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus

from starlette.types import Scope

from recsys_core.names import NAME_PATTERN, is_valid_name
from recsys_serving import ranking
from recsys_serving.problems import JSON, Problem, invalid_request

DEFAULT_K = 10
MAX_K = 100
MAX_ID_CHARS = 256
MAX_CONTEXT_ITEMS = ranking.MAX_CONTEXT_ITEMS
MAX_QUERY_BYTES = 32 * 1024
MAX_LABELS = 100
MAX_LABELS_CHARS = MAX_QUERY_BYTES
_INTEGER = re.compile(r"\s*[+-]?[0-9]{1,9}\s*")
_TRUE = frozenset({"true", "1", "yes", "on", "t", "y"})
_FALSE = frozenset({"false", "0", "no", "off", "f", "n"})
# The wording of the name rule that 422 responses have always carried (recsys_core.names.NAME_RULE says
# "and not" where this says "(not ...)"), kept so that error bodies do not change.
_INVALID_NAME = "must be 1-64 characters of A-Z a-z 0-9 . _ - (not '.' or '..')"


@dataclass(frozen=True, slots=True)
class Param:
    """One request parameter: how it is validated and how the OpenAPI document describes it.

    kinds: `name` (tenant/surface rule), `id` (trimmed, 1-256 characters; blank = absent), `k` (integer
    1-MAX_K), `bool`, `ids` (a list of ids, at most MAX_CONTEXT_ITEMS; repeat the query parameter),
    `labels` (comma-separated catalog categories, or a JSON list; at most MAX_LABELS), `fraction` (a number
    in [0, 1]).
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
        if self.kind == "fraction":
            return {"type": "number", "minimum": 0, "maximum": 1}
        if self.kind == "labels":
            return {"type": "string", "description": "comma-separated", "maxLength": MAX_LABELS_CHARS}
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
_REQUEST_PARAMS = (
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
# Catalog filters and diversity (docs/reference/http-api.md); the configured defaults apply when absent.
CATALOG_PARAMS = (
    Param("categories", "labels", "Only items in one of these catalog categories (comma-separated)"),
    Param("exclude_categories", "labels", "No item in any of these catalog categories (comma-separated)"),
    Param(
        "diversity",
        "fraction",
        "MMR re-ranking by content similarity, 0 (off) to 1 (dissimilarity only); default: catalog.diversity",
    ),
    Param(
        "max_per_category",
        "k",
        f"At most this many items of one catalog category (1-{MAX_K}); default: catalog.max_per_category",
    ),
)
RECOMMEND_PARAMS = (*_REQUEST_PARAMS, *CATALOG_PARAMS)
ITEM_PATH = Param("item_id", "id", "The item id (URL-encoded)", required=True)


class InvalidValue(Exception):
    """A malformed parameter value: its error `code` and `message` (one entry of a 422's `errors`)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def convert(param: Param, value: Any) -> Any:
    """One parameter value (query string or JSON) -> its Python value; `InvalidValue` if malformed."""
    kind = param.kind
    code = f"invalid_{param.name}"
    if value is None:
        return param.default
    if kind == "name":
        if not is_valid_name(value):
            raise InvalidValue(code, _INVALID_NAME)
        return value
    if kind == "id":
        if not isinstance(value, str):
            raise InvalidValue(code, "must be a string")
        value = value.strip()
        if len(value) > MAX_ID_CHARS:
            raise InvalidValue(code, f"must be at most {MAX_ID_CHARS} characters after trimming")
        return value or None
    if kind == "k":
        if isinstance(value, str) and _INTEGER.fullmatch(value):
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise InvalidValue(code, f"must be an integer from 1 to {MAX_K}")
        if not 1 <= value <= MAX_K:
            raise InvalidValue(code, f"must be from 1 to {MAX_K}, got {value}")
        return value
    if kind == "fraction":
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise InvalidValue(code, "must be a number from 0 to 1") from None
        if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value <= 1:
            raise InvalidValue(code, "must be a number from 0 to 1")
        return float(value)
    if kind == "labels":
        labels = value.split(",") if isinstance(value, str) else value
        if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
            raise InvalidValue(code, "must be comma-separated category names")
        cleaned = [label.strip() for label in labels if label.strip()]
        if len(cleaned) > MAX_LABELS or any(len(label) > MAX_ID_CHARS for label in cleaned):
            raise InvalidValue(code, f"at most {MAX_LABELS} categories of 1-{MAX_ID_CHARS} characters each")
        return cleaned or None
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            lowered = value.strip().lower()
            if lowered in _TRUE:
                return True
            if lowered in _FALSE:
                return False
        raise InvalidValue(code, "must be true or false")
    # ids
    if not isinstance(value, list):
        raise InvalidValue(code, "must be a list of item ids")
    if len(value) > MAX_CONTEXT_ITEMS:
        raise InvalidValue(
            "too_many_context_items", f"at most {MAX_CONTEXT_ITEMS} items are allowed, got {len(value)}"
        )
    cleaned = []
    for item in value:
        if not isinstance(item, str) or not item.strip() or len(item.strip()) > MAX_ID_CHARS:
            raise InvalidValue(code, f"each item id must be 1-{MAX_ID_CHARS} characters after trimming")
        cleaned.append(item.strip())
    return cleaned or None


def parse(params: tuple[Param, ...], values: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Validate every parameter; a `Problem` (422) listing all invalid ones, the first one's code on top."""
    parsed: dict[str, Any] = {}
    errors: list[dict[str, str]] = []
    for param in params:
        value = values.get(param.name)
        if value is None:
            if param.required:
                code = "missing_parameter" if where != "body" else "missing_field"
                errors.append({"field": param.name, "in": where, "code": code, "message": "is required"})
            else:
                # An absent parameter is its default, without a call: most requests give few of them.
                parsed[param.name] = param.default
            continue
        try:
            parsed[param.name] = convert(param, value)
        except InvalidValue as exc:
            errors.append({"field": param.name, "in": where, "code": exc.code, "message": exc.message})
    if errors:
        raise invalid_request(errors)
    return parsed


def parse_query(scope: Scope, params: tuple[Param, ...]) -> dict[str, Any]:
    """The query string as {name: value} (last value wins) and {name: [values]} for list parameters."""
    raw = scope["query_string"]
    if not raw:
        return parse(params, {}, "query")
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
    return parse(params, values, "query")


def query_doc(*params: Param) -> dict[str, Any]:
    """OpenAPI `parameters` of an endpoint that takes `params` in its query string."""
    return {"parameters": [p.openapi() for p in params]}


def body_doc(params: tuple[Param, ...]) -> dict[str, Any]:
    """OpenAPI `requestBody` of an endpoint that takes `params` as a JSON object."""
    schema = {
        "type": "object",
        "title": "RecommendRequest",
        "additionalProperties": False,
        "required": [p.name for p in params if p.required],
        "properties": {p.name: {**p.schema(), "description": p.description} for p in params},
    }
    return {"requestBody": {"required": True, "content": {JSON: {"schema": schema}}}}
