"""Bearer-token protection of the API's optional route groups (the admin API, the ingestion API).

Each group has its own token in the settings; `check_bearer` compares the request's
`Authorization: Bearer` token with it in constant time and raises `Unauthorized` otherwise, which
`unauthorized` answers as 401 problem+json with a `WWW-Authenticate` challenge naming the group's realm.
Neither token is ever logged or echoed.
"""

from __future__ import annotations

import hmac

from fastapi import Request
from fastapi.responses import Response

from recsys_serving.problems import Problem, problem_response


class Unauthorized(Problem):
    """A request to a protected route without the right bearer token (answered with WWW-Authenticate)."""

    def __init__(self, detail: str, realm: str) -> None:
        super().__init__(401, "unauthorized", detail)
        self.realm = realm


def check_bearer(request: Request, expected: str | None, group: str) -> None:
    """Raise `Unauthorized` unless the request carries `Authorization: Bearer <expected>`; `group` names the
    routes in the message and the realm (`recsys-<group>`). Compared in constant time."""
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    realm = f"recsys-{group}"
    if scheme.lower() != "bearer" or not given.strip():
        raise Unauthorized(f"this {group} route needs an Authorization: Bearer <token> header", realm)
    if expected is None or not hmac.compare_digest(given.strip().encode(), expected.encode()):
        raise Unauthorized(f"the bearer token is not the {group} token", realm)


async def unauthorized(request: Request, exc: Exception) -> Response:
    """The exception handler of `Unauthorized`: 401 problem+json with the realm's challenge."""
    assert isinstance(exc, Unauthorized)
    response = problem_response(request.scope, exc)
    response.headers["www-authenticate"] = f'Bearer realm="{exc.realm}"'
    return response
