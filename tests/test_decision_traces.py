"""Decision traces written by the API server, and the audit endpoint that reads them back.

A real uvicorn server over a copy of the serving tests' published home (with rules published) answers
recommendations; its traces are looked up through `GET /v1/audit/decisions` from memory, then landed by
the pipeline's `decisions` step after the server stopped and found again, from the lake, by a new server.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from test_rules_serving import publish_document, user_and_campaign
from test_serving import (
    SURFACE,
    TENANT,
    Published,
    build_published_home,
    live_server,
    private_copy,
    read_published,
    recs_url,
    settings_for,
    users_with_cooc,
)

from recsys_core.decisions import find_decisions, landing_dir
from recsys_core.manifest import read_current
from recsys_core.rules import RULES_KIND
from recsys_dagster.ingest.decisions import land_decisions
from recsys_serving.app import create_app
from recsys_serving.traces import DecisionWriter

TOKEN = "s3cret-admin-token"
AUDIT = f"/v1/audit/decisions?tenant={TENANT}&surface={SURFACE}"
# The audit endpoint is an admin route: every lookup carries the admin token.
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
MAX_LINE = 1 << 20


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_published_home(tmp_path_factory.mktemp("decision-traces"))


@pytest.fixture(scope="module")
def published(home: Path) -> Published:
    return read_published(home / "artifacts")


@pytest.fixture
def clone(home: Path, tmp_path: Path, published: Published) -> Path:
    """A private copy of the published home with a pin for the first user and a boost for everyone."""
    copy = private_copy(home, tmp_path)
    user, campaign = user_and_campaign(published)
    popular = published.popular[5][0]
    publish_document(
        copy,
        [
            {
                "id": "pin-campaign",
                "action": "pin",
                "items": [campaign],
                "position": 2,
                "audience": {"users": [user]},
            },
            {"id": "push", "action": "boost", "items": [popular], "factor": 3.0},
        ],
    )
    return copy


@contextmanager
def server(home: Path, **env: str) -> Iterator[httpx.Client]:
    settings = settings_for(home, RECSYS_ADMIN_TOKEN=TOKEN, **env)
    with live_server(settings) as url, httpx.Client(base_url=url, timeout=10) as client:
        yield client


def audit(client: httpx.Client, **params: str) -> list[dict]:
    response = client.get(
        AUDIT + "".join(f"&{name}={value}" for name, value in params.items()), headers=ADMIN
    )
    assert response.status_code == 200, response.text
    return response.json()["decisions"]


def scrape(client: httpx.Client, name: str) -> float:
    found = re.search(rf"^{name} (\S+)$", client.get("/metrics").text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def test_a_trace_looked_up_by_request_id_is_the_response_that_was_returned(
    clone: Path, published: Published
) -> None:
    user, campaign = user_and_campaign(published)
    manifest = read_current(clone / "artifacts", TENANT, SURFACE)
    started = dt.datetime.now(dt.UTC)
    with server(clone) as client:
        got = client.get(recs_url(user_id=user, k=5, session_id="s-1"), headers={"X-Request-Id": "req-get-1"})
        posted = client.post(
            "/v1/recommend",
            json={"tenant": TENANT, "surface": SURFACE, "user_id": user, "k": 3, "exclude_seen": False},
            headers={"X-Request-Id": "req-post-2"},
        )
        assert got.status_code == posted.status_code == 200
        (trace,) = audit(client, request_id="req-get-1")
        body = got.json()
        assert [i["rules"] for i in body["items"]][1] == ["pin-campaign"], "the pin should show in the trace"
        assert trace["items"] == [
            {"item_id": i["item_id"], "score": i["score"], "rule_ids": i["rules"]} for i in body["items"]
        ]
        assert (trace["request_id"], trace["tenant"], trace["surface"], trace["user_id"]) == (
            "req-get-1",
            TENANT,
            SURFACE,
            user,
        )
        assert trace["endpoint"] == "recommendations"
        assert trace["params"] == {"k": 5, "exclude_seen": True, "context_items": None, "session_id": "s-1"}
        assert trace["manifest_version"] == body["manifest_version"] == manifest["manifest_version"]
        assert trace["artifacts"] == {kind: entry["version"] for kind, entry in manifest["artifacts"].items()}
        assert trace["rules_version"] == manifest["artifacts"][RULES_KIND]["version"]
        assert "pin-campaign" in trace["rules_applied"]
        assert started <= dt.datetime.fromisoformat(trace["ts"]) <= dt.datetime.now(dt.UTC)
        # The candidates the rules were applied to: 2k of them (a boost is in force), with each source's share.
        assert len(trace["candidates"]) == 10 and campaign not in [c["item_id"] for c in trace["candidates"]]
        for candidate in trace["candidates"]:
            assert candidate["score"] == pytest.approx(sum(candidate["sources"].values()), rel=1e-12)
        unruled = {i["item_id"]: i["score"] for i in body["items"] if not i["rules"]}
        scored = {c["item_id"]: c["score"] for c in trace["candidates"]}
        assert all(scored[item] == score for item, score in unruled.items())

        (posted_trace,) = audit(client, request_id="req-post-2")
        assert posted_trace["endpoint"] == "recommend" and posted_trace["params"]["exclude_seen"] is False
        assert [i["item_id"] for i in posted_trace["items"]] == [i["item_id"] for i in posted.json()["items"]]
        # By user: newest first; a time range that excludes them finds nothing.
        assert [t["request_id"] for t in audit(client, user_id=user)] == ["req-post-2", "req-get-1"]
        assert audit(client, user_id=user, until=started.date().isoformat()) == []
        assert audit(client, request_id="no-such-request") == []


def test_traces_survive_a_restart_landed_by_the_pipeline(clone: Path, published: Published) -> None:
    users = users_with_cooc(published, 2)[:4]
    with server(clone) as client:
        sent = {}
        for n, user in enumerate(users):
            response = client.get(recs_url(user_id=user, k=4), headers={"X-Request-Id": f"before-{n}"})
            sent[f"before-{n}"] = response.json()
        before = {request_id: audit(client, request_id=request_id) for request_id in sent}
        deadline = time.monotonic() + 10
        while scrape(client, "recsys_decision_traces_written_total") < len(users):
            assert time.monotonic() < deadline, "the traces were not written"
            time.sleep(0.1)
    # Stopped: the trace files are published under their visible names, and the pipeline lands the day.
    raw_root, lake_root = clone / "raw", clone / "lake"
    day = dt.datetime.fromisoformat(before["before-0"][0]["ts"]).date()
    folder = landing_dir(raw_root, day)
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []
    summary = land_decisions(raw_root, lake_root, day, MAX_LINE)
    assert (summary["traces"], summary["quarantined"], summary["reconciled"]) == (len(users), 0, True)

    with server(clone) as client:
        for request_id, (trace,) in before.items():
            assert audit(client, request_id=request_id) == [trace]
            assert find_decisions(lake_root, TENANT, SURFACE, request_id=request_id) == [trace]
            assert [i["item_id"] for i in trace["items"]] == [i["item_id"] for i in sent[request_id]["items"]]
        # A new response (in memory) and the landed ones (in the lake), each once, newest first.
        client.get(recs_url(user_id=users[0], k=4), headers={"X-Request-Id": "after-0"})
        assert [t["request_id"] for t in audit(client, user_id=users[0])] == ["after-0", "before-0"]


def test_a_trace_in_memory_and_in_the_lake_is_answered_once(clone: Path, published: Published) -> None:
    user = users_with_cooc(published, 2)[0]
    settings = settings_for(clone, RECSYS_ADMIN_TOKEN=TOKEN)
    with TestClient(create_app(settings)) as client:
        client.get(recs_url(user_id=user), headers={"X-Request-Id": "twice"})
        writer: DecisionWriter = client.app.state.decisions
        writer.flush(publish_all=True)
        (from_memory,) = client.get(AUDIT + "&request_id=twice", headers=ADMIN).json()["decisions"]
        land_decisions(clone / "raw", clone / "lake", dt.datetime.now(dt.UTC).date(), MAX_LINE)
        assert find_decisions(clone / "lake", TENANT, SURFACE, request_id="twice") == [from_memory]
        assert client.get(AUDIT + "&request_id=twice", headers=ADMIN).json()["decisions"] == [from_memory]


def test_the_audit_endpoint_exists_only_with_an_admin_token(clone: Path) -> None:
    with TestClient(create_app(settings_for(clone))) as client:
        assert client.get(AUDIT + "&request_id=x").status_code == 404
        assert "/v1/audit/decisions" not in client.get("/openapi.json").json()["paths"]
    with TestClient(create_app(settings_for(clone, RECSYS_ADMIN_TOKEN=TOKEN))) as client:
        assert client.get(AUDIT + "&request_id=x").status_code == 401
        assert client.get(AUDIT + "&request_id=x", headers=ADMIN).status_code == 200
        documented = client.get("/openapi.json").json()["paths"]["/v1/audit/decisions"]["get"]
        assert {p["name"] for p in documented["parameters"]} >= {"tenant", "surface", "request_id", "user_id"}
        assert TOKEN not in repr(client.app.state.settings)


@pytest.mark.parametrize(
    ("query", "code"),
    [
        ("", "invalid_lookup"),
        ("&request_id=r&user_id=u", "invalid_lookup"),
        ("&request_id=r&since=2026-01-01", "invalid_lookup"),
        ("&user_id=u&since=yesterday", "invalid_since"),
        ("&user_id=u&limit=0", "invalid_limit"),
    ],
)
def test_bad_audit_lookups_are_refused(clone: Path, query: str, code: str) -> None:
    with TestClient(create_app(settings_for(clone, RECSYS_ADMIN_TOKEN=TOKEN))) as client:
        response = client.get(AUDIT + query, headers=ADMIN)
        assert response.status_code == 422 and response.json()["code"] == code, response.text
        missing = client.get(f"/v1/audit/decisions?surface={SURFACE}&request_id=r", headers=ADMIN)
        assert missing.status_code == 422 and missing.json()["code"] == "missing_parameter"


def test_sampling_traces_a_fixed_share_of_request_ids(clone: Path, published: Published) -> None:
    user = users_with_cooc(published, 2)[0]
    request_ids = [f"req-{n}" for n in range(200)]
    with server(clone, RECSYS_DECISION_SAMPLE_RATE="0.5") as client:
        for request_id in request_ids:
            client.get(recs_url(user_id=user, k=2), headers={"X-Request-Id": request_id})
        traced = {t["request_id"] for t in audit(client, user_id=user, limit="100")}
        traced |= {rid for rid in request_ids if rid not in traced and audit(client, request_id=rid)}
    expected = {rid for rid in request_ids if zlib.crc32(rid.encode()) < 2**31}
    assert traced == expected and 70 < len(expected) < 130
    written = sorted((clone / "raw" / "decisions").rglob("*"))
    with TestClient(create_app(settings_for(clone, RECSYS_DECISION_SAMPLE_RATE="0"))) as client:
        assert client.app.state.decisions is None
        assert client.get(recs_url(user_id=user)).status_code == 200
    assert sorted((clone / "raw" / "decisions").rglob("*")) == written


def test_trace_lines_follow_the_contract(clone: Path, published: Published) -> None:
    """The files the server writes are JSON lines the landing accepts whole: none quarantined."""
    user = users_with_cooc(published, 2)[0]
    with TestClient(create_app(settings_for(clone))) as client:
        for n in range(5):
            who = {"user_id": user} if n % 2 else {}
            client.get(recs_url(**who, k=3, context_items=[published.popular[0][0]]))
    (path,) = (clone / "raw" / "decisions").rglob("decisions-*.jsonl")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 5 and all(line["v"] == 1 for line in lines)
    assert [line["user_id"] for line in lines] == [None, user, None, user, None]
