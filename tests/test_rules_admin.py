"""The admin API (GET/PUT /v1/admin/rules) over a real HTTP server on a copy of the serving tests'
published home: off without RECSYS_ADMIN_TOKEN, the bearer token, publishing as the CLI does (a new
manifest in the registry, `recsys history` and `recsys status`), dry runs that publish nothing, refused
documents, and a server process that never loads Dagster."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_serving import SURFACE, TENANT, build_published_home, live_server, settings_for

from recsys_cli import cli
from recsys_core.manifest import read_current, read_registry
from recsys_core.rules import RULES_KIND
from recsys_core.settings import ConfigError, load_settings
from recsys_serving.app import create_app
from recsys_serving.middleware import MAX_BODY_BYTES

TOKEN = "s3cret-admin-token-0123456789abcdef"
PROBLEM = "application/problem+json"
RULES_URL = f"/v1/admin/rules?tenant={TENANT}&surface={SURFACE}"
# The example, as a merchandiser writes it.
RULES = """rules:
  - {id: summer-pin, action: pin, items: [i42], position: 1, reason: summer campaign,
     from: "2026-06-01T00:00:00Z", until: "2026-09-01T00:00:00Z"}
  - {id: recall-7, action: block, items: [i7], reason: product recall}
  - {id: push-shoes, action: boost, items: [i10, i11], factor: 2.0}
  - {id: vip-list, action: replace, items: [i1, i2, i3], audience: {users: [u9]}}
"""
AUTH = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    copy = tmp_path / "home"
    shutil.copytree(build_published_home(tmp_path.parent / "admin-base"), copy, symlinks=True)
    monkeypatch.setenv("RECSYS_HOME", str(copy))
    return copy


@pytest.fixture
def admin(home: Path) -> Iterator[httpx.Client]:
    settings = settings_for(home, RECSYS_ADMIN_TOKEN=TOKEN, RECSYS_SERVE_POLL_SECONDS="0.1")
    with live_server(settings) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client


def put(client: httpx.Client, body: str | bytes, query: str = "&reason=summer+campaign", **headers: str):
    return client.put(
        RULES_URL + query, content=body, headers={**AUTH, "content-type": "application/yaml", **headers}
    )


def test_without_a_token_the_admin_routes_do_not_exist(home: Path) -> None:
    with live_server(settings_for(home)) as url, httpx.Client(base_url=url) as client:
        for response in (client.get(RULES_URL, headers=AUTH), put(client, RULES)):
            assert response.status_code == 404
            assert response.headers["content-type"] == PROBLEM
        spec = client.get("/openapi.json").json()
    assert not [path for path in spec["paths"] if "admin" in path]
    assert "securitySchemes" not in spec.get("components", {})
    assert read_registry(home / "artifacts", TENANT, SURFACE)[-1]["action"] == "publish"


def test_a_missing_or_wrong_token_is_refused_and_never_logged(
    admin: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for headers in (
        {},
        {"authorization": "Bearer wrong"},
        {"authorization": f"Basic {TOKEN}"},
        {"authorization": "Bearer"},
    ):
        for response in (
            admin.get(RULES_URL, headers=headers),
            admin.put(RULES_URL, content=RULES, headers=headers),
        ):
            assert response.status_code == 401, headers
            assert response.headers["content-type"] == PROBLEM
            assert response.headers["www-authenticate"] == 'Bearer realm="recsys-admin"'
            problem = response.json()
            assert (problem["code"], problem["title"]) == ("unauthorized", "Unauthorized")
            assert TOKEN not in response.text
    assert admin.get(RULES_URL, headers=AUTH).status_code == 200
    assert admin.get(RULES_URL, headers={"authorization": f"bearer {TOKEN}"}).status_code == 200
    assert TOKEN not in caplog.text


def test_the_admin_routes_are_documented_when_enabled(admin: httpx.Client) -> None:
    spec = admin.get("/openapi.json").json()
    rules = spec["paths"]["/v1/admin/rules"]
    assert set(rules) == {"get", "put"}
    assert spec["components"]["securitySchemes"] == {"adminToken": {"type": "http", "scheme": "bearer"}}
    for operation in rules.values():
        assert operation["security"] == [{"adminToken": []}]
        assert {"401", "404", "422"} <= set(operation["responses"])
        assert set(operation["responses"]["401"]["content"]) == {PROBLEM}
    assert [p["name"] for p in rules["put"]["parameters"]] == ["tenant", "surface", "reason", "dry_run"]
    body = rules["put"]["requestBody"]["content"]
    assert body["application/json"]["schema"] == {"$ref": "#/components/schemas/RulesDocument"}
    assert "Rule" in spec["components"]["schemas"] and "/v1/recommendations" in spec["paths"]


def test_put_publishes_a_new_manifest_that_get_history_status_and_serving_see(
    admin: httpx.Client, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = admin.get(RULES_URL, headers=AUTH).json()
    assert (before["rules_version"], before["document"]) == (None, {"rules": []})

    response = put(admin, RULES, **{"x-recsys-actor": "merch@example.com"})
    assert response.status_code == 200, response.text
    published = response.json()
    assert (published["action"], published["previous"], published["rules"]) == (
        "publish",
        before["manifest_version"],
        4,
    )
    current = read_current(home / "artifacts", TENANT, SURFACE)
    assert current is not None and current["manifest_version"] == published["manifest_version"]

    after = admin.get(RULES_URL, headers=AUTH).json()
    assert after["manifest_version"] == published["manifest_version"]
    assert after["rules_version"] == current["current"][RULES_KIND].split("/")[1]
    assert [rule["id"] for rule in after["document"]["rules"]] == [
        "summer-pin",
        "recall-7",
        "push-shoes",
        "vip-list",
    ]
    assert after["document"]["rules"][0]["from"] == "2026-06-01T00:00:00Z"

    # Who and why are in the registry, as `recsys history` and `recsys status` show them.
    assert cli.main(["history", "--tenant", TENANT, "--surface", SURFACE, "--json"]) == cli.EXIT_OK
    last = json.loads(capsys.readouterr().out)["records"][-1]
    assert (last["action"], last["actor"], last["reason"], last["manifest_version"]) == (
        "publish",
        "merch@example.com",
        "summer campaign",
        published["manifest_version"],
    )
    assert cli.main(["status", "--json"]) == cli.EXIT_OK
    status = json.loads(capsys.readouterr().out)
    (target,) = [t for t in status["manifests"] if (t["tenant"], t["surface"]) == (TENANT, SURFACE)]
    assert target["manifest_version"] == published["manifest_version"] and RULES_KIND in target["artifacts"]

    # The same rules in JSON are the same version: nothing new; the actor defaults to admin-api.
    again = admin.put(RULES_URL + "&reason=again", json=yaml.safe_load(RULES), headers=AUTH)
    assert (again.status_code, again.json()["action"], again.json()["actor"]) == (200, "noop", "admin-api")

    # The server serves the new manifest at its next poll.
    deadline = time.monotonic() + 10
    while (
        admin.get(f"/v1/manifest?tenant={TENANT}&surface={SURFACE}").json()["manifest_version"]
        != (published["manifest_version"])
    ):
        assert time.monotonic() < deadline, "the published manifest was not picked up"
        time.sleep(0.05)


def test_a_dry_run_answers_with_the_report_and_publishes_nothing(admin: httpx.Client, home: Path) -> None:
    registry = read_registry(home / "artifacts", TENANT, SURFACE)
    response = put(admin, RULES, query="&dry_run=true")
    assert response.status_code == 200, response.text
    report = response.json()
    # No decision trace is landed: every user with history (fewer than the default sample of 200).
    users = admin.get(f"/v1/manifest?tenant={TENANT}&surface={SURFACE}").json()["users"]
    assert (report["source"], report["requests"]) == ("user_history", min(users, 200))
    assert report["current_rules_version"] is None
    assert [rule["rule_id"] for rule in report["rules"]] == [
        "summer-pin",
        "recall-7",
        "push-shoes",
        "vip-list",
    ]
    assert all(rule["change"] == "added" and rule["requests_current"] == 0 for rule in report["rules"])
    assert report["affected"] <= report["requests"] and report["request_id"]
    assert read_registry(home / "artifacts", TENANT, SURFACE) == registry


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("rules: [{id: p, action: pin, items: [x]", "not valid YAML or JSON"),
        ("- just a list", "expected a mapping with a `rules` list"),
        ("rules: [{id: p, action: pin, items: [x], postion: 1}]", "rule 'p' (rules[0])"),
        (
            "rules: [{id: p, action: pin, items: [x], position: 1}, {id: b, action: block, items: [x]}]",
            "rule 'p' pins 'x' and rule 'b' blocks it",
        ),
        ("[" * 20_000, "nested too deeply"),
        (b"rules: [\xff\xfe]", "not valid YAML or JSON"),
    ],
)
def test_a_bad_document_is_refused_naming_the_problem(
    admin: httpx.Client, home: Path, body: str | bytes, message: str
) -> None:
    before = read_current(home / "artifacts", TENANT, SURFACE)
    for query in ("&reason=x", "&dry_run=true"):
        response = put(admin, body, query=query)
        assert response.status_code == 422, response.text
        assert response.headers["content-type"] == PROBLEM
        problem = response.json()
        assert problem["code"] == "invalid_rules" and message in problem["detail"], problem
    assert read_current(home / "artifacts", TENANT, SURFACE) == before


def test_requests_the_admin_api_refuses(admin: httpx.Client) -> None:
    missing = put(admin, RULES, query="")
    assert (missing.status_code, missing.json()["code"]) == (422, "missing_parameter")
    assert missing.json()["errors"][0]["field"] == "reason"
    actor = put(admin, RULES, **{"x-recsys-actor": "x" * 200})
    assert (actor.status_code, actor.json()["code"]) == (422, "invalid_actor")
    big = put(admin, "rules: []\n" + "#" * MAX_BODY_BYTES)
    assert (big.status_code, big.json()["code"]) == (413, "body_too_large")
    for response in (
        admin.get("/v1/admin/rules?tenant=acme&surface=home", headers=AUTH),
        admin.put("/v1/admin/rules?tenant=acme&surface=home&reason=x", content=RULES, headers=AUTH),
        admin.put("/v1/admin/rules?tenant=acme&surface=home&dry_run=1", content=RULES, headers=AUTH),
    ):
        assert (response.status_code, response.json()["code"]) == (404, "not_published")
    bad_name = admin.get("/v1/admin/rules?tenant=../x&surface=home", headers=AUTH)
    assert (bad_name.status_code, bad_name.json()["code"]) == (422, "invalid_tenant")


# Rules-like documents: the right keys with values of any type, and arbitrary keys.
scalar = st.none() | st.booleans() | st.integers(-5, 2000) | st.floats(allow_nan=False) | st.text(max_size=8)
rule = st.fixed_dictionaries(
    {
        "id": st.one_of(st.text(max_size=6), st.sampled_from(["a", "b"])),
        "action": st.sampled_from(["pin", "block", "boost", "bury", "replace", "nope"]),
        "items": st.lists(st.sampled_from(["i1", "i2", "i3"]) | scalar, max_size=3) | scalar,
    },
    optional={
        "position": scalar,
        "factor": scalar,
        "from": st.sampled_from(["2026-06-01T00:00:00Z", "2026-06-01", "x"]) | scalar,
        "until": st.sampled_from(["2026-09-01T00:00:00Z", "2026-01-01T00:00:00+02:00"]) | scalar,
        "audience": st.fixed_dictionaries(
            {}, optional={"users": st.lists(scalar, max_size=2), "segment": scalar}
        ),
        "other": scalar,
    },
)


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    document=st.one_of(st.fixed_dictionaries({"rules": st.lists(rule, max_size=4)}), scalar),
    raw=st.binary(max_size=64),
)
def test_fuzzed_documents_never_crash_the_server(
    admin_client: TestClient, document: object, raw: bytes
) -> None:
    for body in (json.dumps(document), yaml.safe_dump(document), raw):
        response = admin_client.put(RULES_URL + "&reason=fuzz", content=body, headers=AUTH)
        assert response.status_code in (200, 422), response.text
        assert response.headers["content-type"] == (
            PROBLEM if response.status_code == 422 else "application/json"
        )


@pytest.fixture(scope="module")
def admin_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    root = tmp_path_factory.mktemp("admin-fuzz")
    copy = root / "home"
    shutil.copytree(build_published_home(root.parent / "admin-fuzz-base"), copy, symlinks=True)
    with TestClient(create_app(settings_for(copy, RECSYS_ADMIN_TOKEN=TOKEN))) as client:
        yield client


def test_the_server_with_the_admin_api_never_loads_dagster(home: Path) -> None:
    """A fresh interpreter creates the app with the admin API, publishes rules through it and dry-runs
    them: Dagster is never imported."""
    script = f"""
import sys
from fastapi.testclient import TestClient
from recsys_core.settings import ConfigError, load_settings
from recsys_serving.app import create_app

app = create_app()
with TestClient(app) as client:
    headers = {{"authorization": "Bearer {TOKEN}"}}
    published = client.put("{RULES_URL}&reason=x", content={RULES!r}, headers=headers)
    assert published.status_code == 200 and published.json()["action"] == "publish", published.text
    assert client.put("{RULES_URL}&dry_run=true", content={RULES!r}, headers=headers).status_code == 200
loaded = sorted(name for name in sys.modules if name == "dagster" or name.startswith("dagster."))
print("dagster modules:", loaded)
"""
    env = {**os.environ, "RECSYS_HOME": str(home), "RECSYS_ADMIN_TOKEN": TOKEN}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "dagster modules: []"


@pytest.mark.parametrize(
    "value", ["short-token", "a token with spaces in it", "t\u00f6ken-\u00e9t\u00e9-0123456789"]
)
def test_a_malformed_admin_token_is_refused_without_showing_it(value: str) -> None:
    with pytest.raises(ConfigError, match="RECSYS_ADMIN_TOKEN: expected 16-512 printable ASCII") as refused:
        load_settings({"RECSYS_ADMIN_TOKEN": value})
    assert value not in str(refused.value)


def test_the_settings_never_show_the_admin_token() -> None:
    configured = load_settings({"RECSYS_ADMIN_TOKEN": TOKEN})
    assert configured.admin_token == TOKEN and TOKEN not in repr(configured)
    assert load_settings({"RECSYS_ADMIN_TOKEN": ""}).admin_token is None
