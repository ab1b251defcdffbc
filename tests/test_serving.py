"""The HTTP API (recsys_serving) over a manifest published by the real pipeline steps.

A session fixture runs the plain-Python pipeline (generate, canonicalize, gates, daily aggregates, window
artifacts, publish) into a temporary RECSYS_HOME. Tests that publish, roll back or damage artifacts work on
a copy of it. Endpoints are exercised over HTTP against a real uvicorn server on 127.0.0.1, and with
Starlette's TestClient where a test needs to drive the poller by hand.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import polars as pl
import pytest
import uvicorn
from fastapi.testclient import TestClient

from recsys_core.kinds import KINDS
from recsys_core.manifest import ManifestError, read_current, resolve_uri
from recsys_core.settings import BlendWeights, Settings, load_settings
from recsys_dagster.evaluation.offline import evaluate_day
from recsys_dagster.ingest.canonicalize import canonicalize_partition, landing_files
from recsys_dagster.ingest.gates import run_gates
from recsys_dagster.ingest.generate import generate_events
from recsys_dagster.publishing.protocol import publish, rollback
from recsys_dagster.publishing.release import publish_as_of, write_build_record
from recsys_dagster.transform.aggregates import DAILY_MODELS, build_daily_aggregate, daily_aggregate_params
from recsys_dagster.transform.artifact_dir import write_artifact_dir
from recsys_dagster.transform.artifacts import build_window_artifacts
from recsys_serving import ranking
from recsys_serving.app import create_app
from recsys_serving.exposures import IN_PROGRESS_SUFFIX, ExposureWriter
from recsys_serving.params import MAX_CONTEXT_ITEMS, MAX_K
from recsys_serving.server import serve
from recsys_serving.store import ArtifactStore, load_target

TENANT, SURFACE = "demo", "home"
DAY = dt.date(2025, 3, 10)  # published by the fixture
DEFAULT_BLEND = BlendWeights()
FIRST = DAY - dt.timedelta(days=2)
LAST = DAY + dt.timedelta(days=2)  # the lake holds two more days, published by the tests that need them
PROBLEM = "application/problem+json"
_BUILT: dict[str, Path] = {}


# ----------------------------------------------------------------------------------- fixtures


def settings_for(home: Path, **env: str) -> Settings:
    return load_settings({"RECSYS_HOME": str(home), "RECSYS_START_DATE": FIRST.isoformat(), **env})


def build_published_home(root: Path) -> Path:
    """RECSYS_HOME with DAY published and the lake ready up to LAST (built once per process)."""
    if "home" in _BUILT:
        return _BUILT["home"]
    home = root / "home"
    settings = settings_for(home)
    generate_events(
        settings.raw_root,
        end_date=LAST,
        days=(LAST - FIRST).days + 1,
        events_per_day=5000,
        seed=1,
        n_users=500,
        n_items=300,
    )
    day = FIRST
    while day <= LAST:
        canonicalize_partition(settings.raw_root, settings.lake_root, day, settings.pipeline.ingest)
        results = run_gates(settings.lake_root, day, settings.pipeline.ingest, settings.pipeline.checks)
        assert all(r.passed for r in results if r.blocking), [r.summary for r in results if not r.passed]
        for model in DAILY_MODELS:
            build_daily_aggregate(
                model, settings.lake_root, day, daily_aggregate_params(model, settings.pipeline)
            )
        day += dt.timedelta(days=1)
    outcomes = publish_day(settings, DAY)
    assert [o.outcome.action for o in outcomes] == ["publish"]
    _BUILT["home"] = home
    return home


def build_day(settings: Settings, day: dt.date) -> None:
    for kind in KINDS:
        builds = build_window_artifacts(
            kind, settings.lake_root, settings.artifact_root, day, settings.pipeline
        )
        write_build_record(settings.lake_root, kind, day, builds)


def publish_day(settings: Settings, day: dt.date) -> list:
    """Build, evaluate and publish `day`, as the pipeline's artifact, evaluation and publishing steps do."""
    build_day(settings, day)
    evaluate_day(settings, day)
    return publish_as_of(settings, day)


@pytest.fixture(scope="session")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_published_home(tmp_path_factory.mktemp("serving"))


def private_copy(home: Path, tmp_path: Path) -> Path:
    """A copy of the published home under `tmp_path`."""
    copy = tmp_path / "home"
    shutil.copytree(home, copy, symlinks=True)
    return copy


@pytest.fixture
def clone(home: Path, tmp_path: Path) -> Path:
    """A private copy of the published home, for tests that publish, roll back or damage it."""
    return private_copy(home, tmp_path)


@dataclass(frozen=True)
class Published:
    """The published artifacts read back independently of the server, as plain Python."""

    manifest: dict
    popular: list[tuple[str, float]]
    neighbors: dict[str, list[tuple[str, float]]]
    history: dict[str, list[str]]
    history_weights: dict[str, list[float]]
    als_users: dict[str, int]
    als_items: list[str]
    user_factors: np.ndarray
    item_factors: np.ndarray

    def expected(
        self,
        user: str | None,
        k: int,
        *,
        exclude_seen: bool = True,
        context: list[str] | None = None,
        weights: BlendWeights = DEFAULT_BLEND,
        folded: np.ndarray | None = None,
    ) -> list[tuple[str, float, str]]:
        """The documented blend, re-implemented: each source's scores over the catalog divided by its best,
        weighted and summed; `folded` is the user vector of a user the model does not know."""
        history = self.history.get(user, []) if user else []
        known = self.catalog
        seeds = list(dict.fromkeys(i for i in context or [] if i in known)) or history[:20]
        excluded = set(seeds) | (set(history) if exclude_seen else set())
        parts: dict[str, dict[str, float]] = {}
        vector = self.user_factors[self.als_users[user]] if user in self.als_users else folded
        if vector is not None and weights.als > 0:
            scores = self.item_factors.astype(np.float64) @ np.asarray(vector, dtype=np.float64)
            raw = dict(zip(self.als_items, scores.tolist(), strict=True))
            top = max([0.0, *raw.values()])
            if top > 0:
                parts["als"] = {i: max(v, 0.0) / top for i, v in raw.items()}
        votes: dict[str, float] = defaultdict(float)
        for position, seed in enumerate(seeds):
            for neighbor, score in self.neighbors.get(seed, []):
                votes[neighbor] += score * 0.85**position
        best_vote = max([v for i, v in votes.items() if i not in excluded], default=0.0)
        if best_vote > 0 and weights.cooc > 0:
            parts["cooc"] = {i: v / best_vote for i, v in votes.items() if i not in excluded}
        best_pop = max([s for _, s in self.popular], default=0.0)
        if best_pop > 0 and weights.popularity > 0:
            parts["popularity"] = {i: max(s, 0.0) / best_pop for i, s in reversed(self.popular)}
        weight = {"als": weights.als, "cooc": weights.cooc, "popularity": weights.popularity}
        rows = []
        for item in sorted(known - excluded):
            total = 0.0
            contributions = {}
            for source, values in parts.items():
                value = values.get(item, 0.0)
                total += weight[source] * value
                if value > 0:
                    contributions[source] = weight[source] * value
            if total > 0:
                main = max(
                    ("als", "cooc", "popularity"),
                    key=lambda s: (contributions.get(s, 0.0), s == "als", s == "cooc"),
                )
                rows.append((-total, item, main))
        # Equal scores: in the popularity artifact's order (its items before any other), then by id.
        popular_rank = {item: rank for rank, (item, _) in enumerate(self.popular)}
        rows.sort(key=lambda row: (row[0], popular_rank.get(row[1], len(popular_rank)), row[1]))
        return [(item, -negated, main) for negated, item, main in rows[:k]]

    @property
    def catalog(self) -> set[str]:
        items = {i for i, _ in self.popular} | set(self.neighbors)
        items |= {n for rows in self.neighbors.values() for n, _ in rows}
        return items | {i for rows in self.history.values() for i in rows} | set(self.als_items)


def read_published(artifact_root: Path) -> Published:
    manifest = read_current(artifact_root, TENANT, SURFACE)
    assert manifest is not None

    def folder(kind: str) -> Path:
        return resolve_uri(artifact_root, TENANT, SURFACE, manifest["current"][kind])

    popular = pl.read_parquet(folder("popularity") / "items.parquet").sort("rank")
    neighbors: dict[str, list[tuple[str, float]]] = defaultdict(list)
    for row in (
        pl.read_parquet(folder("cooc") / "neighbors.parquet").sort("item_id", "rank").iter_rows(named=True)
    ):
        neighbors[row["item_id"]].append((row["neighbor_id"], row["score"]))
    history: dict[str, list[str]] = defaultdict(list)
    history_weights: dict[str, list[float]] = defaultdict(list)
    for row in (
        pl.read_parquet(folder("user_history") / "history.parquet")
        .sort("user_id", "rank")
        .iter_rows(named=True)
    ):
        history[row["user_id"]].append(row["item_id"])
        history_weights[row["user_id"]].append(row["weight"])
    als = folder("als")
    return Published(
        manifest=manifest,
        popular=list(zip(popular["item_id"], popular["score"], strict=True)),
        neighbors=dict(neighbors),
        history=dict(history),
        history_weights=dict(history_weights),
        als_users={u: i for i, u in enumerate(pl.read_parquet(als / "users.parquet")["user_id"])},
        als_items=pl.read_parquet(als / "items.parquet")["item_id"].to_list(),
        user_factors=np.load(als / "user_factors.npy"),
        item_factors=np.load(als / "item_factors.npy"),
    )


@pytest.fixture(scope="session")
def published(home: Path) -> Published:
    return read_published(home / "artifacts")


@contextlib.contextmanager
def live_server(settings: Settings) -> Iterator[str]:
    """A real uvicorn server on 127.0.0.1 (free port) in a thread; yields its base URL."""
    app = create_app(settings)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


@pytest.fixture(scope="module")
def api(home: Path) -> Iterator[httpx.Client]:
    """An HTTP client of a real server over the published home (never modified)."""
    with live_server(settings_for(home)) as url, httpx.Client(base_url=url, timeout=10) as client:
        yield client


def recs_url(**params: object) -> str:
    return "/v1/recommendations?" + "&".join(
        f"{name}={v}"
        for name, value in {"tenant": TENANT, "surface": SURFACE, **params}.items()
        for v in (value if isinstance(value, list) else [value])
    )


def as_tuples(body: dict) -> list[tuple[str, float, str]]:
    return [(i["item_id"], i["score"], i["source"]) for i in body["items"]]


def assert_same_ranking(actual: list[tuple[str, float, str]], expected: list[tuple[str, float, str]]) -> None:
    assert [(i, s) for i, _, s in actual] == [(i, s) for i, _, s in expected]
    # ALS scores are dot products computed by BLAS: the reference may differ in the last bits.
    assert [score for _, score, _ in actual] == pytest.approx([score for _, score, _ in expected], rel=1e-9)


def users_with_cooc(published: Published, minimum: int) -> list[str]:
    """Users whose most recent items have at least `minimum` co-occurrence neighbours between them."""
    return [
        user
        for user in sorted(published.history)
        if sum(len(published.neighbors.get(seed, [])) for seed in published.history[user][:20]) >= minimum
    ]


# ---------------------------------------------------------------------------------------- store


def test_loaded_target_matches_published_artifacts(home: Path, published: Published) -> None:
    root = home / "artifacts"
    target = load_target(root, TENANT, SURFACE, read_current(root, TENANT, SURFACE))
    assert target.manifest_version == published.manifest["manifest_version"]
    assert target.item_ids == sorted(published.catalog)
    assert target.item_index == {item: i for i, item in enumerate(target.item_ids)}
    assert [target.item_ids[i] for i in target.popular_items] == [i for i, _ in published.popular]
    assert target.popular_scores.tolist() == [s for _, s in published.popular]
    assert target.popular_items.dtype.name == "int32" and target.cooc_neighbors.dtype.name == "int32"
    for item, rows in published.neighbors.items():
        neighbors, scores = target.neighbors(target.item_index[item])
        assert [
            (target.item_ids[n], s) for n, s in zip(neighbors.tolist(), scores.tolist(), strict=True)
        ] == rows
    assert sum(len(rows) for rows in published.neighbors.values()) == len(target.cooc_neighbors)
    assert target.n_users == len(published.history)
    for user, items in published.history.items():
        assert [target.item_ids[i] for i in target.history(user)] == items
    assert target.history("nobody") is None


def test_store_refresh_is_idempotent_and_reports_no_failure(home: Path) -> None:
    store = ArtifactStore(home / "artifacts", poll_seconds=60)
    assert store.refresh() is True
    first = store.get(TENANT, SURFACE)
    assert store.refresh() is False, "an unchanged manifest must not be reloaded"
    assert store.get(TENANT, SURFACE) is first
    (status,) = store.statuses()
    assert (status.loads, status.failures, status.failing) == (1, 0, False)
    assert store.get(TENANT, "other") is None


# -------------------------------------------------------------------------------- recommendations


def test_a_known_user_gets_the_calibrated_blend_with_each_sources_share(
    api: httpx.Client, published: Published
) -> None:
    users = users_with_cooc(published, 2)
    assert len(users) >= 5, "the fixture data should give several users co-occurrence candidates"
    for user in users[:10]:
        response = api.get(recs_url(user_id=user, k=10))
        assert response.status_code == 200, response.text
        body = response.json()
        expected = published.expected(user, 10)
        assert_same_ranking(as_tuples(body), expected)
        for item in body["items"]:
            assert item["score"] == pytest.approx(sum(item["sources"].values()), rel=1e-12)
            assert item["source"] == max(item["sources"], key=item["sources"].get)
        assert not {i for i, _, _ in as_tuples(body)} & set(published.history[user])
        assert body["warnings"] == []
        assert body["manifest_version"] == published.manifest["manifest_version"]
        assert response.headers["x-manifest-version"] == body["manifest_version"]


def test_exclude_seen_controls_whether_history_items_come_back(
    api: httpx.Client, published: Published
) -> None:
    # Context items are the seeds here, so the user's history is only excluded by exclude_seen.
    context = [max(sorted(published.neighbors), key=lambda i: len(published.neighbors[i]))]
    came_back = 0
    for user in sorted(published.history)[:40]:
        history = set(published.history[user]) - set(context)
        for flag, exclude in (("true", True), ("false", False)):
            response = api.get(recs_url(user_id=user, context_items=context, k=MAX_K, exclude_seen=flag))
            assert response.status_code == 200
            assert_same_ranking(
                as_tuples(response.json()),
                published.expected(user, MAX_K, exclude_seen=exclude, context=context),
            )
            returned = {i for i, _, _ in as_tuples(response.json())}
            assert context[0] not in returned, "seeds are never recommended"
            if exclude:
                assert not returned & history
            else:
                came_back += bool(returned & history)
    assert came_back >= 10, "with exclude_seen=false, seen items should come back for many users"


def test_get_and_post_agree_and_are_deterministic(api: httpx.Client, published: Published) -> None:
    user = users_with_cooc(published, 1)[0]
    first = api.get(recs_url(user_id=user, k=25)).json()
    again = api.get(recs_url(user_id=user, k=25)).json()
    posted = api.post(
        "/v1/recommend", json={"tenant": TENANT, "surface": SURFACE, "user_id": user, "k": 25}
    ).json()
    assert as_tuples(first) == as_tuples(again) == as_tuples(posted)
    assert len({first["request_id"], again["request_id"], posted["request_id"]}) == 3


def test_context_items_seed_the_blend_and_unknown_ones_are_reported(
    api: httpx.Client, published: Published
) -> None:
    seeds = [item for item in sorted(published.neighbors) if len(published.neighbors[item]) >= 2][:2]
    context = [*seeds, "no-such-item"]
    response = api.get(recs_url(user_id="u00000", context_items=context, k=10))
    assert response.status_code == 200
    body = response.json()
    assert_same_ranking(as_tuples(body), published.expected("u00000", 10, context=context))
    assert "cooc" in body["items"][0]["sources"]  # the context items' neighbours take part
    assert not {i for i, _, _ in as_tuples(body)} & set(seeds)
    (warning,) = body["warnings"]
    assert warning["code"] == "context_items_unknown" and warning["items"] == ["no-such-item"]
    posted = api.post(
        "/v1/recommend",
        json={"tenant": TENANT, "surface": SURFACE, "user_id": "u00000", "context_items": context},
    ).json()
    assert as_tuples(posted) == as_tuples(body)


def test_cold_start_gets_popularity_with_a_warning(api: httpx.Client, published: Published) -> None:
    top = published.expected(None, 7)
    assert [i for i, _, _ in top] == [i for i, _ in published.popular[:7]]
    assert {source for _, _, source in top} == {"popularity"}
    unknown = api.get(recs_url(user_id="never-seen-user", k=7))
    assert unknown.status_code == 200
    assert as_tuples(unknown.json()) == top
    assert [w["code"] for w in unknown.json()["warnings"]] == ["unknown_user_popularity_fallback"]
    anonymous = api.get(recs_url(k=7))
    assert anonymous.status_code == 200
    assert as_tuples(anonymous.json()) == top
    assert [w["code"] for w in anonymous.json()["warnings"]] == ["anonymous_popularity_fallback"]
    only_unknown_context = api.get(recs_url(context_items=["nope-1", "nope-2"], k=7)).json()
    assert as_tuples(only_unknown_context) == top
    assert [w["code"] for w in only_unknown_context["warnings"]] == [
        "context_items_unknown",
        "anonymous_popularity_fallback",
    ]


def test_similar_and_popular_follow_the_published_order(api: httpx.Client, published: Published) -> None:
    item = max(sorted(published.neighbors), key=lambda i: len(published.neighbors[i]))
    body = api.get(f"/v1/items/{item}/similar?tenant={TENANT}&surface={SURFACE}&k=3").json()
    assert as_tuples(body) == [(n, s, "cooc") for n, s in published.neighbors[item][:3]]
    assert body["item_id"] == item and body["k"] == 3
    lonely = next(i for i, _ in published.popular if i not in published.neighbors)
    empty = api.get(f"/v1/items/{lonely}/similar?tenant={TENANT}&surface={SURFACE}").json()
    assert empty["items"] == [] and [w["code"] for w in empty["warnings"]] == ["no_neighbors"]
    popular = api.get(f"/v1/popular?tenant={TENANT}&surface={SURFACE}&k={MAX_K}").json()
    assert as_tuples(popular) == [(i, s, "popularity") for i, s in published.popular[:MAX_K]]
    default = api.get(f"/v1/popular?tenant={TENANT}&surface={SURFACE}").json()
    assert len(default["items"]) == 10 and default["k"] == 10


def test_item_responses_share_one_shape(api: httpx.Client, published: Published) -> None:
    """Every list of items comes with the same envelope: the request's tenant, surface and k, then the
    manifest that answered; only the endpoint's own input (user_id, item_id) is added."""
    item = published.popular[0][0]
    query = f"tenant={TENANT}&surface={SURFACE}&k=4"
    bodies = {
        "recommendations": api.get(f"/v1/recommendations?{query}&user_id=u00001").json(),
        "recommend": api.post("/v1/recommend", json={"tenant": TENANT, "surface": SURFACE, "k": 4}).json(),
        "similar": api.get(f"/v1/items/{item}/similar?{query}").json(),
        "popular": api.get(f"/v1/popular?{query}").json(),
    }
    common = ["tenant", "surface", "k", "manifest_version", "as_of", "request_id", "items", "warnings"]
    own = {"recommendations": ["user_id"], "recommend": ["user_id"], "similar": ["item_id"], "popular": []}
    for name, body in bodies.items():
        assert sorted(body) == sorted(common + own[name]), name
        assert [key for key in body if key in common] == common, name
        assert body["k"] == 4 and len(body["items"]) <= 4, name


def test_manifest_health_readiness_and_metrics(api: httpx.Client, published: Published) -> None:
    manifest = api.get(f"/v1/manifest?tenant={TENANT}&surface={SURFACE}")
    assert manifest.status_code == 200
    body = manifest.json()
    assert body["manifest_version"] == published.manifest["manifest_version"]
    assert body["as_of"] == DAY.isoformat() and body["updated_at"] == published.manifest["updated_at"]
    assert dt.datetime.fromisoformat(body["loaded_at"]) <= dt.datetime.now(dt.UTC)
    assert {k: v["version"] for k, v in body["artifacts"].items()} == {
        k: v["version"] for k, v in published.manifest["artifacts"].items()
    }
    assert body["load_failure"] is None and body["users"] == len(published.history)
    assert api.get("/healthz").json()["status"] == "ok"
    ready = api.get("/readyz")
    assert ready.status_code == 200 and ready.json()["failures"] == []
    assert [t["manifest_version"] for t in ready.json()["targets"]] == [body["manifest_version"]]

    api.get(recs_url(user_id="u00001"))
    api.get(recs_url(user_id="no-such-user"))  # a fallback, whatever ran before on this server
    api.get("/v1/popular?tenant=nope&surface=home")
    metrics = api.get("/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    assert re.search(
        r'recsys_http_requests_total\{method="GET",route="/v1/recommendations",status="200"\} [1-9]', text
    )
    assert re.search(
        r'recsys_http_requests_total\{method="GET",route="/v1/popular",status="404"\} [1-9]', text
    )
    assert (
        'recsys_http_request_duration_seconds_bucket{le="0.01",method="GET",route="/v1/recommendations"'
        in text
    )
    version = published.manifest["manifest_version"]
    assert (
        f'recsys_manifest_info{{as_of="{DAY}",manifest_version="{version}",surface="home",tenant="demo"}} 1.0'
        in text
    )
    assert 'recsys_manifest_age_seconds{surface="home",tenant="demo"}' in text
    assert 'recsys_manifest_load_failures_total{surface="home",tenant="demo"} 0.0' in text
    assert re.search(
        r'recsys_recommendation_fallbacks_total\{reason="[a-z_]+",surface="home",tenant="demo"\}', text
    )


def test_request_ids_are_honoured_or_generated_on_every_response(api: httpx.Client) -> None:
    mine = api.get(recs_url(user_id="u00001"), headers={"X-Request-Id": "client-req-42"})
    assert mine.headers["x-request-id"] == "client-req-42" == mine.json()["request_id"]
    for url in (recs_url(), "/healthz", "/readyz", "/metrics", "/v1/popular?tenant=x&surface=y", "/nope"):
        response = api.get(url)
        assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-request-id"]), url
    bad = api.get(recs_url(), headers={"X-Request-Id": "has spaces in it"})
    assert bad.headers["x-request-id"] != "has spaces in it"
    assert bad.json()["request_id"] == bad.headers["x-request-id"]
    too_long = api.get("/healthz", headers={"X-Request-Id": "a" * 129})
    assert len(too_long.headers["x-request-id"]) == 32
    error = api.get("/v1/popular?tenant=demo&surface=home&k=0", headers={"X-Request-Id": "err-1"})
    assert error.headers["x-request-id"] == "err-1" == error.json()["request_id"]


LONG_ID = "x" * 257
ERROR_CASES = [
    ("GET", "/v1/recommendations?tenant=nope&surface=home", None, 404, "unknown_tenant"),
    ("GET", "/v1/recommendations?tenant=demo&surface=nope", None, 404, "unknown_surface"),
    ("GET", "/v1/items/no-such-item/similar?tenant=demo&surface=home", None, 404, "unknown_item"),
    ("GET", "/v1/popular?tenant=demo&surface=checkout", None, 404, "unknown_surface"),
    ("GET", "/v1/manifest?tenant=other&surface=home", None, 404, "unknown_tenant"),
    ("GET", "/v1/recommendations?tenant=demo&surface=home&k=0", None, 422, "invalid_k"),
    ("GET", "/v1/recommendations?tenant=demo&surface=home&k=101", None, 422, "invalid_k"),
    ("GET", "/v1/recommendations?tenant=demo&surface=home&k=ten", None, 422, "invalid_k"),
    ("GET", "/v1/popular?tenant=demo&surface=home&k=1.5", None, 422, "invalid_k"),
    ("GET", "/v1/recommendations?surface=home", None, 422, "missing_parameter"),
    ("GET", "/v1/recommendations?tenant=../etc&surface=home", None, 422, "invalid_tenant"),
    ("GET", "/v1/recommendations?tenant=demo&surface=a%20b", None, 422, "invalid_surface"),
    ("GET", f"/v1/recommendations?tenant=demo&surface=home&user_id={LONG_ID}", None, 422, "invalid_user_id"),
    (
        "GET",
        "/v1/recommendations?tenant=demo&surface=home&exclude_seen=maybe",
        None,
        422,
        "invalid_exclude_seen",
    ),
    (
        "GET",
        "/v1/recommendations?tenant=demo&surface=home&"
        + "&".join(f"context_items=i{n}" for n in range(MAX_CONTEXT_ITEMS + 1)),
        None,
        422,
        "too_many_context_items",
    ),
    (
        "GET",
        "/v1/recommendations?tenant=demo&surface=home&context_items=%20",
        None,
        422,
        "invalid_context_items",
    ),
    ("GET", f"/v1/items/{LONG_ID}/similar?tenant=demo&surface=home", None, 422, "invalid_item_id"),
    ("POST", "/v1/recommend", b"{not json", 422, "invalid_json"),
    ("POST", "/v1/recommend", b"[1, 2]", 422, "invalid_body"),
    ("POST", "/v1/recommend", b'{"tenant": "demo", "surface": "home", "kk": 3}', 422, "unknown_field"),
    ("POST", "/v1/recommend", b'{"tenant": "demo"}', 422, "missing_field"),
    ("POST", "/v1/recommend", b'{"tenant": "demo", "surface": "home", "k": true}', 422, "invalid_k"),
    (
        "POST",
        "/v1/recommend",
        b'{"tenant": "demo", "surface": "home", "context_items": "i1"}',
        422,
        "invalid_context_items",
    ),
    ("POST", "/v1/recommend", b'{"tenant": 7, "surface": "home"}', 422, "invalid_tenant"),
    ("POST", "/v1/recommend", b'{"tenant": "demo", "surface": "nope"}', 404, "unknown_surface"),
    ("POST", "/v1/popular?tenant=demo&surface=home", b"", 405, "method_not_allowed"),
    ("GET", "/v2/recommendations", None, 404, "not_found"),
]


@pytest.mark.parametrize(("method", "url", "body", "status", "code"), ERROR_CASES)
def test_errors_are_problem_json_with_a_stable_code(
    api: httpx.Client, method: str, url: str, body: bytes | None, status: int, code: str
) -> None:
    response = api.request(method, url, content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    problem = response.json()
    assert problem["code"] == code and problem["status"] == status
    assert problem["type"] == f"urn:recsys:problem:{code}"
    assert problem["detail"] and problem["title"]
    assert problem["request_id"] == response.headers["x-request-id"]
    if status == 422:
        assert problem["errors"] and problem["errors"][0]["code"] == code
    if code == "unknown_item":
        assert response.headers["x-manifest-version"] == problem["manifest_version"]


def test_unknown_tenant_and_surface_name_what_is_served(api: httpx.Client) -> None:
    tenant = api.get("/v1/popular?tenant=acme&surface=home").json()
    assert tenant["detail"] == f"tenant 'acme' is not served (served: {TENANT})"
    surface = api.get(f"/v1/popular?tenant={TENANT}&surface=cart").json()
    assert surface["detail"] == f"surface 'cart' is not served for tenant '{TENANT}' (served: {SURFACE})"


def test_oversized_bodies_and_queries_are_refused(home: Path) -> None:
    with TestClient(create_app(settings_for(home))) as client:
        big = json.dumps({"tenant": TENANT, "surface": SURFACE, "user_id": "u" * 100_000}).encode()
        response = client.post("/v1/recommend", content=big)
        assert response.status_code == 413 and response.json()["code"] == "body_too_large"

        def chunks() -> Iterator[bytes]:
            yield b'{"tenant": "demo", "surface": "home", "user_id": "'
            for _ in range(100):
                yield b"u" * 1000
            yield b'"}'

        streamed = client.post("/v1/recommend", content=chunks())
        assert streamed.status_code == 413 and streamed.headers["content-type"] == PROBLEM

        long_query = client.get(recs_url(padding="x" * 40_000))
        assert long_query.status_code == 414 and long_query.json()["code"] == "query_too_long"


def test_openapi_documents_every_endpoint_and_parameter(home: Path) -> None:
    spec = create_app(settings_for(home)).openapi()
    paths = spec["paths"]
    assert set(paths) == {
        "/v1/recommendations",
        "/v1/recommend",
        "/v1/items/{item_id}/similar",
        "/v1/popular",
        "/v1/manifest",
        "/healthz",
        "/readyz",
        "/metrics",
    }
    recs = paths["/v1/recommendations"]["get"]
    assert [p["name"] for p in recs["parameters"]] == [
        "tenant",
        "surface",
        "user_id",
        "k",
        "exclude_seen",
        "context_items",
        "session_id",
        "categories",
        "exclude_categories",
        "diversity",
        "max_per_category",
    ]
    assert {"200", "404", "422"} <= set(recs["responses"])
    assert PROBLEM in recs["responses"]["422"]["content"]
    body = paths["/v1/recommend"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["required"] == ["tenant", "surface"] and body["additionalProperties"] is False
    assert "item_id" in [p["name"] for p in paths["/v1/items/{item_id}/similar"]["get"]["parameters"]]

    # What each endpoint can answer, and in which content type.
    query_endpoints = ["/v1/recommendations", "/v1/items/{item_id}/similar", "/v1/popular", "/v1/manifest"]
    expected = {path: {"200", "404", "405", "414", "422"} for path in query_endpoints}
    expected |= {
        "/v1/recommend": {"200", "404", "405", "413", "422"},
        "/healthz": {"200", "405"},
        "/readyz": {"200", "405", "503"},
        "/metrics": {"200", "405"},
    }
    problem_schema = {"$ref": "#/components/schemas/ProblemDetail"}
    for path, operations in paths.items():
        (operation,) = operations.values()
        responses = operation["responses"]
        assert set(responses) == expected[path], path
        for status, response in responses.items():
            if status == "200":
                continue
            assert response["content"] == {PROBLEM: {"schema": problem_schema}}, (path, status)
    assert paths["/metrics"]["get"]["responses"]["200"]["content"] == {
        "text/plain; version=1.0.0; charset=utf-8": {"schema": {"type": "string"}}
    }
    for path in ("/v1/recommendations", "/v1/popular", "/healthz"):
        assert set(paths[path]["get"]["responses"]["200"]["content"]) == {"application/json"}, path
    item_models = ("ItemsResponse", "SimilarResponse", "RecommendationsResponse")
    assert all("k" in spec["components"]["schemas"][model]["properties"] for model in item_models)


def test_openapi_matches_what_the_server_sends(api: httpx.Client) -> None:
    """The content types the document declares are the ones on the wire."""
    spec = api.get("/openapi.json").json()
    metrics = api.get("/metrics")
    assert [*spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]] == [
        metrics.headers["content-type"]
    ]
    assert api.delete("/healthz").headers["content-type"] == PROBLEM
    assert api.get(recs_url(padding="x" * 40_000)).headers["content-type"] == PROBLEM


ASSET_TYPES = {".js": "text/javascript", ".css": "text/css", ".png": "image/png"}


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_documentation_pages_load_everything_from_the_server(api: httpx.Client, page: str) -> None:
    """/docs and /redoc work without internet access: every script, style sheet and icon they reference
    is served by the API itself."""
    html = api.get(page)
    assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
    assert "http://" not in html.text and "https://" not in html.text and "//cdn" not in html.text
    urls = re.findall(r'(?:src|href)="([^"]*)"', html.text)
    assert {Path(url).suffix for url in urls} >= ({".js"} if page == "/redoc" else {".js", ".css"})
    for url in urls:
        assert url.startswith("/docs/static/"), url
        asset = api.get(url)
        assert asset.status_code == 200, url
        assert asset.headers["content-type"].startswith(ASSET_TYPES[Path(url).suffix]), url
        assert len(asset.content) > 1000, url
    assert "/openapi.json" in html.text
    missing = api.get("/docs/static/no-such-file.js")
    assert missing.status_code == 404 and missing.headers["content-type"] == PROBLEM
    metrics = api.get("/metrics").text
    assert 'route="/docs/static",status="200"' in metrics and "no-such-file" not in metrics


# ----------------------------------------------------------------------------- loading and swaps


def test_not_ready_until_a_manifest_is_published(home: Path, tmp_path: Path) -> None:
    empty = settings_for(tmp_path / "fresh")
    with TestClient(create_app(empty)) as client:
        response = client.get("/readyz")
        assert response.status_code == 503 and response.json()["code"] == "not_ready"
        assert client.get("/healthz").status_code == 200
        assert client.get(recs_url()).json()["code"] == "unknown_tenant"
        shutil.copytree(home / "artifacts", empty.artifact_root)
        client.app.state.store.refresh()
        assert client.get("/readyz").status_code == 200
        assert client.get(recs_url(user_id="u00001")).status_code == 200


def test_publish_and_rollback_are_picked_up_under_load_without_a_failed_request(
    clone: Path, published: Published
) -> None:
    settings = settings_for(clone, RECSYS_SERVE_POLL_SECONDS="0.2")
    build_day(settings, DAY + dt.timedelta(days=1))
    evaluate_day(settings, DAY + dt.timedelta(days=1))
    old = published.manifest["manifest_version"]
    users = [*sorted(published.history)[:50], "cold-user"]
    stop = threading.Event()
    counts = {"ok": 0, "failed": 0}
    seen: list[str] = []
    problems: list[str] = []
    lock = threading.Lock()

    def hammer(url: str, offset: int) -> None:
        with httpx.Client(base_url=url, timeout=10) as client:
            n = offset
            while not stop.is_set():
                n += 1
                try:
                    response = client.get(recs_url(user_id=users[n % len(users)], k=10))
                    ok = response.status_code == 200
                    body = response.json() if ok else None
                except httpx.HTTPError as exc:
                    ok, body = False, None
                    problems.append(repr(exc))
                with lock:
                    counts["ok" if ok else "failed"] += 1
                    if body is not None:
                        if body["manifest_version"] != response.headers["x-manifest-version"]:
                            problems.append("header and body disagree")
                        if not seen or seen[-1] != body["manifest_version"]:
                            seen.append(body["manifest_version"])

    def wait_for(client: httpx.Client, version: str) -> float:
        started = time.monotonic()
        while time.monotonic() - started < 10:
            if (
                client.get(f"/v1/manifest?tenant={TENANT}&surface={SURFACE}").json()["manifest_version"]
                == version
            ):
                return time.monotonic() - started
            time.sleep(0.02)
        raise AssertionError(f"server did not pick up {version} within 10 s")

    with live_server(settings) as url, httpx.Client(base_url=url, timeout=10) as client:
        threads = [threading.Thread(target=hammer, args=(url, i * 7)) for i in range(2)]
        for thread in threads:
            thread.start()
        try:
            time.sleep(0.5)
            (outcome,) = publish_as_of(settings, DAY + dt.timedelta(days=1))
            assert outcome.outcome.action == "publish"
            new = outcome.outcome.manifest_version
            publish_lag = wait_for(client, new)
            time.sleep(0.5)
            back = rollback(settings.artifact_root, TENANT, SURFACE, steps=1, reason="test", actor="pytest")
            assert back.manifest_version == old
            rollback_lag = wait_for(client, old)
            time.sleep(0.3)
        finally:
            stop.set()
            for thread in threads:
                thread.join(15)
    assert counts["failed"] == 0 and not problems, (counts, problems[:5])
    assert counts["ok"] > 100
    assert seen[0] == old and new in seen and seen[-1] == old, seen
    # "Within a few poll intervals" (0.2 s each), with room for a busy test machine.
    assert publish_lag < 3 and rollback_lag < 3, (publish_lag, rollback_lag)


def _store(client: TestClient) -> ArtifactStore:
    return client.app.state.store


def test_a_corrupt_new_artifact_keeps_the_old_version_serving(clone: Path, published: Published) -> None:
    # A long poll interval: the test drives the poller by hand, so nothing races the tampering.
    settings = settings_for(clone, RECSYS_SERVE_POLL_SECONDS="3600")
    old = published.manifest["manifest_version"]
    with TestClient(create_app(settings)) as client:
        assert client.get(f"/v1/manifest?tenant={TENANT}&surface={SURFACE}").json()["manifest_version"] == old
        (outcome,) = publish_day(settings, DAY + dt.timedelta(days=1))
        new = outcome.outcome.manifest_version
        assert outcome.outcome.action == "publish" and new != old
        manifest = read_current(settings.artifact_root, TENANT, SURFACE)
        damaged = resolve_uri(settings.artifact_root, TENANT, SURFACE, manifest["current"]["cooc"])
        data = bytearray((damaged / "neighbors.parquet").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (damaged / "neighbors.parquet").write_bytes(bytes(data))

        assert _store(client).refresh() is False
        served = client.get(f"/v1/manifest?tenant={TENANT}&surface={SURFACE}").json()
        assert served["manifest_version"] == old
        assert served["load_failure"]["manifest_version"] == new
        assert "sha256 mismatch" in served["load_failure"]["error"]
        recs = client.get(recs_url(user_id="u00001"))
        assert recs.status_code == 200 and recs.json()["manifest_version"] == old

        ready = client.get("/readyz")
        assert ready.status_code == 200
        (failure,) = ready.json()["failures"]
        assert failure["manifest_version"] == new and failure["failures"] == 1
        metrics = client.get("/metrics").text
        assert 'recsys_manifest_load_failures_total{surface="home",tenant="demo"} 1.0' in metrics
        assert 'recsys_manifest_load_failing{surface="home",tenant="demo"} 1.0' in metrics
        assert f'manifest_version="{old}"' in metrics and f'manifest_version="{new}"' not in metrics

        assert _store(client).refresh() is False  # not retried before the back-off
        assert 'load_failures_total{surface="home",tenant="demo"} 1.0' in client.get("/metrics").text

        # manifest.json itself unreadable: still serving, failure reported.
        manifest_path = settings.artifact_root / TENANT / SURFACE / "manifest.json"
        good = manifest_path.read_bytes()
        manifest_path.write_bytes(b'{"v": 1, "truncated')
        _store(client).refresh()
        assert client.get(recs_url()).json()["manifest_version"] == old
        assert "manifest.json unusable" in client.get("/readyz").json()["failures"][0]["error"]
        manifest_path.write_bytes(good)

        # Rolling back to the version being served clears the failure.
        rollback(settings.artifact_root, TENANT, SURFACE, to_version=old, reason="corrupt", actor="pytest")
        _store(client).refresh()
        assert client.get("/readyz").json()["failures"] == []
        assert 'recsys_manifest_load_failing{surface="home",tenant="demo"} 0.0' in client.get("/metrics").text


def test_ties_are_broken_by_item_id(tmp_path: Path) -> None:
    """Hand-made artifacts with equal scores, published through the real publishing code."""
    root = tmp_path / "artifacts"
    target = root / "ties" / "home"
    meta = {"tenant": "ties", "surface": "home", "as_of": DAY.isoformat()}
    frames = {
        "popularity": (
            "items.parquet",
            pl.DataFrame(
                {
                    "rank": [1, 2, 3, 4],
                    "item_id": ["p", "c", "b", "a"],
                    "score": [9.0, 5.0, 5.0, 5.0],
                    "events": [9, 5, 5, 5],
                },
                schema={"rank": pl.Int32, "item_id": pl.String, "score": pl.Float64, "events": pl.Int64},
            ),
        ),
        "cooc": (
            "neighbors.parquet",
            pl.DataFrame(
                {
                    "item_id": ["s", "s", "s", "t", "t"],
                    "rank": [1, 2, 3, 1, 2],
                    "neighbor_id": ["z", "y", "x", "y", "w"],
                    "score": [0.5, 0.5, 0.25, 0.5, 0.25],
                    "count": [3, 3, 2, 3, 2],
                },
                schema={
                    "item_id": pl.String,
                    "rank": pl.Int32,
                    "neighbor_id": pl.String,
                    "score": pl.Float64,
                    "count": pl.Int64,
                },
            ),
        ),
    }
    paths = {}
    for kind, (name, frame) in frames.items():
        _, paths[kind] = write_artifact_dir(target, kind, {**meta, "kind": kind}, {name: frame})
    assert publish(root, "ties", "home", DAY, paths).action == "publish"
    loaded = load_target(root, "ties", "home", read_current(root, "ties", "home"))
    index = loaded.item_index

    def names(ranked: ranking.Ranking) -> list[str]:
        return [loaded.item_ids[i] for i in ranked.items]

    for vectorized in (False, True):
        result = ranking.recommend(loaded, [index["s"]], 10, [index["s"]], vectorized=vectorized)
        # y and z tie at 0.5 (y first by id), then x; popularity fills in published order (p, c, b, a).
        assert names(result) == ["y", "z", "x", "p", "c", "b", "a"]
        assert result.n_cooc == 3 and result.sources()[:4] == ["cooc", "cooc", "cooc", "popularity"]
        both = [index["t"], index["s"]]
        # t is the more recent seed (weight 1), s weighs 0.85: y = 0.5 + 0.425, z = 0.425, w = 0.25, x = 0.2125.
        blended = ranking.recommend(loaded, both, 4, both, vectorized=vectorized)
        assert names(blended) == ["y", "z", "w", "x"]
        assert blended.scores == pytest.approx([0.925, 0.425, 0.25, 0.2125])
    # No history artifact in this manifest: every user is unknown, served from popularity.
    assert loaded.kinds == ("popularity", "cooc") and loaded.n_users == 0


def test_python_and_numpy_blends_agree_bit_for_bit(home: Path, published: Published) -> None:
    root = home / "artifacts"
    target = load_target(root, TENANT, SURFACE, read_current(root, TENANT, SURFACE))
    with_neighbors = [i for i in range(target.n_items) if target.cooc_ptr[i + 1] > target.cooc_ptr[i]]
    cases = [(target.history(user)[:20], target.history(user)) for user in sorted(published.history)]
    # Context-style seed lists, up to 50 items, with and without neighbours, most with many votes.
    for size in (1, 3, 10, 25, 50):
        for offset in range(0, len(with_neighbors), 17):
            seeds = (with_neighbors[offset:] + list(range(target.n_items)))[:size]
            cases.append((seeds, seeds))
    checked = 0
    for seeds, exclude in cases:
        for k in (1, 10, 100):
            python = ranking.recommend(target, seeds, k, exclude, vectorized=False)
            vector = ranking.recommend(target, seeds, k, exclude, vectorized=True)
            assert (python.items, python.scores, python.n_cooc) == (
                vector.items,
                vector.scores,
                vector.n_cooc,
            )
            checked += python.n_cooc > 0
    assert checked > 100


# ---------------------------------------------------------------------------------- exposure log


def test_exposure_log_lines_are_accepted_by_canonicalization(home: Path, tmp_path: Path) -> None:
    raw_root = tmp_path / "raw"
    settings = settings_for(home, RECSYS_EXPOSURE_LOG="true", RECSYS_RAW_ROOT=str(raw_root))
    bodies = []
    with TestClient(create_app(settings)) as client:
        for n, user in enumerate(["u00001", "u00002", "never-seen", None]):
            params = (
                {"k": 5} | ({"user_id": user} if user else {}) | ({"session_id": "s-1"} if n == 0 else {})
            )
            bodies.append(client.get(recs_url(**params)).json())
        bodies.append(
            client.post(
                "/v1/recommend", json={"tenant": TENANT, "surface": SURFACE, "user_id": "u00003", "k": 3}
            ).json()
        )
        client.get(f"/v1/popular?tenant={TENANT}&surface={SURFACE}")  # not a recommendation: not logged
        writer: ExposureWriter = client.app.state.exposures
    # Leaving the client shuts the app down, which publishes the open file. (The decision traces, in their
    # own folder, are tests/test_decision_traces.py's.)
    files = sorted(path for path in raw_root.rglob("*") if path.relative_to(raw_root).parts[0] != "decisions")
    assert not [f for f in files if f.name.startswith(".")], "no hidden in-progress file may be left"
    (day_dir,) = [f for f in files if f.is_dir()]
    (log_file,) = [f for f in files if f.is_file()]
    assert re.fullmatch(rf"exposures-[A-Za-z0-9._-]+-{os.getpid()}-\d+\.jsonl", log_file.name)
    lines = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert len(lines) == sum(len(b["items"]) for b in bodies) == writer.events_written
    expected = [
        (b["request_id"], rank, item["item_id"], b["user_id"])
        for b in bodies
        for rank, item in enumerate(b["items"])
    ]
    assert [(e["request_id"], e["rank"], e["item_id"], e.get("user_id")) for e in lines] == expected
    assert {e["session_id"] for e in lines if e["request_id"] == bodies[0]["request_id"]} == {"s-1"}
    assert all(
        e["session_id"] == e["request_id"] for e in lines if e["request_id"] != bodies[0]["request_id"]
    )
    for event in lines:
        assert event["v"] == 1 and event["event_type"] == "exposure"
        assert (event["tenant"], event["surface"]) == (TENANT, SURFACE)
        assert day_dir.name == f"dt={event['ts'][:10]}"
    day = dt.date.fromisoformat(day_dir.name[3:])
    summary = canonicalize_partition(raw_root, tmp_path / "lake", day, settings.pipeline.ingest)
    assert summary.quarantined == 0 and summary.duplicates == 0
    assert summary.canonical_rows == len(lines)


LEAK_PROBE = """
import duckdb
from fastapi.testclient import TestClient

from recsys_core.settings import load_settings
from recsys_serving.app import create_app

# A DuckDB connection that only the collector can free: in a reference cycle, alive while the app starts
# (and freezes the collector), unreachable once it has stopped.
holder = {"connection": duckdb.connect()}
holder["self"] = holder
with TestClient(create_app(load_settings())) as client:
    assert client.get("/healthz").status_code == 200
del holder
print("stopped")
"""


def test_a_stopped_app_leaves_nothing_for_the_interpreter_to_report_as_leaked(tmp_path: Path) -> None:
    """The app freezes the collector while it serves; once stopped, what was frozen is collectable again,
    so DuckDB's bindings do not print "nanobind: leaked ..." after the test suite's summary."""
    env = {**os.environ, "RECSYS_HOME": str(tmp_path / "home")}
    result = subprocess.run(
        [sys.executable, "-c", LEAK_PROBE], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0 and result.stdout == "stopped\n", result.stderr
    assert "leaked" not in result.stderr


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_exposure_writer_rotates_by_size_and_day_and_never_shows_partial_files(tmp_path: Path) -> None:
    writer = ExposureWriter(
        tmp_path, host="h", pid=1234, max_bytes=4000, max_age_seconds=3600, flush_seconds=60
    )
    day1 = dt.datetime(2025, 3, 10, 23, 59, 59, tzinfo=dt.UTC).timestamp()

    def record(numbers: range) -> None:
        for n in numbers:
            writer.record(
                tenant="t",
                surface="s",
                session_id=f"s{n}",
                user_id="u",
                request_id=f"r{n}",
                item_ids=["a", "b", "c"],
                ts=day1,
            )

    record(range(6))
    writer.flush()
    visible = sorted(p.name for p in (tmp_path / "dt=2025-03-10").iterdir() if not p.name.startswith("."))
    hidden = sorted(p.name for p in (tmp_path / "dt=2025-03-10").iterdir() if p.name.startswith("."))
    assert visible == [] and hidden == [f".exposures-h-1234-1{IN_PROGRESS_SUFFIX}"]
    assert landing_files(tmp_path, dt.date(2025, 3, 10)) == [], "the pipeline must not see the open file"
    record(range(6, 12))
    writer.flush()  # over max_bytes now: published
    assert [p.name for p in landing_files(tmp_path, dt.date(2025, 3, 10))] == ["exposures-h-1234-1.jsonl"]
    writer.record(
        tenant="t", surface="s", session_id="x", user_id=None, request_id="r-late", item_ids=["a"], ts=day1
    )
    writer.record(
        tenant="t",
        surface="s",
        session_id="y",
        user_id=None,
        request_id="r-next",
        item_ids=["b"],
        ts=day1 + 2,
    )
    writer.flush()  # a new day began: the day-1 file is complete and published, day 2 stays open
    assert [p.name for p in landing_files(tmp_path, dt.date(2025, 3, 10))] == [
        "exposures-h-1234-1.jsonl",
        "exposures-h-1234-2.jsonl",
    ]
    assert landing_files(tmp_path, dt.date(2025, 3, 11)) == []
    writer.close()
    (day2,) = landing_files(tmp_path, dt.date(2025, 3, 11))
    assert [json.loads(line)["request_id"] for line in day2.read_text().splitlines()] == ["r-next"]
    total = sum(len(p.read_text().splitlines()) for p in tmp_path.rglob("exposures-*.jsonl"))
    assert total == writer.events_written == 12 * 3 + 2
    assert "user_id" not in json.loads(day2.read_text())


def test_exposure_writer_never_overwrites_and_publishes_orphans(tmp_path: Path) -> None:
    today = dt.datetime.now(dt.UTC).date()
    folder = tmp_path / f"dt={today.isoformat()}"
    folder.mkdir()
    dead = _dead_pid()
    orphan = folder / f".exposures-h-{dead}-7{IN_PROGRESS_SUFFIX}"
    complete = (
        b'{"v":1,"ts":"2025-01-01T00:00:00Z","tenant":"t","surface":"s","session_id":"a","item_id":"i"}\n'
    )
    orphan.write_bytes(complete + b'{"v":1,"ts":"2025-01-0')  # the process died mid-line
    # A file from an earlier process with the same host and pid (a restarted container is pid 1 again).
    (folder / "exposures-h-1-1.jsonl").write_bytes(b"earlier\n")
    writer = ExposureWriter(tmp_path, host="h", pid=1, flush_seconds=0.05)
    writer.start()
    writer.record(tenant="t", surface="s", session_id="s", user_id="u", request_id="r", item_ids=["a"])
    writer.close()
    names = sorted(p.name for p in folder.iterdir())
    assert not [n for n in names if n.startswith(".")], names
    assert (folder / "exposures-h-1-1.jsonl").read_bytes() == b"earlier\n"
    contents = sorted((folder / n).read_bytes() for n in names if n != "exposures-h-1-1.jsonl")
    assert complete in contents, "the orphan's complete lines are published, its torn tail is cut"
    assert len(names) == 3


def test_exposure_queue_is_bounded(tmp_path: Path) -> None:
    writer = ExposureWriter(tmp_path, max_pending=2)
    accepted = [
        writer.record(
            tenant="t", surface="s", session_id="s", user_id=None, request_id=str(n), item_ids=["a"]
        )
        for n in range(4)
    ]
    assert accepted == [True, True, False, False] and writer.responses_dropped == 2
    writer.close()
    assert writer.events_written == 2


# ---------------------------------------------------------------------------------------- serve


def test_serve_runs_uvicorn_workers_with_the_app_factory(home: Path) -> None:
    with pytest.raises(ValueError, match="workers"):
        serve("127.0.0.1", 8000, 0)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code = f"from recsys_serving.server import serve; serve('127.0.0.1', {port}, 2, log_level='warning')"
    env = os.environ | {"RECSYS_HOME": str(home), "RECSYS_START_DATE": FIRST.isoformat()}
    process = subprocess.Popen([sys.executable, "-c", code], env=env)
    try:
        deadline = time.monotonic() + 45
        while True:
            assert process.poll() is None, "serve() exited early"
            try:
                response = httpx.get(
                    f"http://127.0.0.1:{port}/v1/popular?tenant={TENANT}&surface={SURFACE}&k=2"
                )
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "serve() did not answer in time"
                time.sleep(0.2)
        assert response.status_code == 200 and len(response.json()["items"]) == 2
    finally:
        process.send_signal(signal.SIGINT)  # the supervisor stops its workers
        assert process.wait(30) == 0


def test_a_manifest_published_without_als_still_serves(clone: Path, published: Published) -> None:
    """A manifest from before the `als` kind existed: loaded as is, recommendations from cooc and popularity."""
    root = clone / "artifacts"
    current = read_current(root, TENANT, SURFACE)
    older = {
        kind: resolve_uri(root, TENANT, SURFACE, uri)
        for kind, uri in current["current"].items()
        if kind != "als"
    }
    outcome = publish(root, TENANT, SURFACE, DAY, older)
    assert outcome.action == "publish", outcome.message
    target = load_target(root, TENANT, SURFACE, read_current(root, TENANT, SURFACE))
    assert target.als is None and "als" not in target.kinds
    user = users_with_cooc(published, 2)[0]
    with TestClient(create_app(settings_for(clone))) as client:
        body = client.get(recs_url(user_id=user, k=10)).json()
    assert body["manifest_version"] == outcome.manifest_version
    assert body["items"] and {s for item in body["items"] for s in item["sources"]} <= {"cooc", "popularity"}
    assert any(item["source"] == "cooc" for item in body["items"])


def test_each_manifest_is_served_with_the_blend_weights_it_was_published_with(
    clone: Path, published: Published
) -> None:
    """The pipeline publishes the weights its evaluation scored (tuned ones included); the server ranks a
    manifest with them rather than with its own configuration, and picks them up with the manifest."""
    assert published.manifest["blend"] == dataclasses.asdict(BlendWeights())
    root = clone / "artifacts"
    current = read_current(root, TENANT, SURFACE)
    paths = {kind: resolve_uri(root, TENANT, SURFACE, uri) for kind, uri in current["current"].items()}
    cooc_only = BlendWeights(als=0.0, cooc=1.0, popularity=0.0)
    outcome = publish(root, TENANT, SURFACE, DAY, paths, blend=dataclasses.asdict(cooc_only))
    # Same artifacts, other weights: another manifest version.
    assert outcome.action == "publish" and outcome.manifest_version != current["manifest_version"]
    user = users_with_cooc(published, 2)[0]
    with TestClient(create_app(settings_for(clone))) as client:
        body = client.get(recs_url(user_id=user, k=10)).json()
        manifest = client.get(f"/v1/manifest?tenant={TENANT}&surface={SURFACE}").json()
    assert manifest["blend"] == dataclasses.asdict(cooc_only)
    assert body["manifest_version"] == outcome.manifest_version
    assert_same_ranking(as_tuples(body), published.expected(user, 10, weights=cooc_only))
    assert {s for item in body["items"] for s in item["sources"]} == {"cooc"}

    # Weights edited by hand no longer match the manifest version: the manifest is refused on load.
    manifest_file = root / TENANT / SURFACE / "manifest.json"
    edited = json.loads(manifest_file.read_text())
    edited["blend"]["cooc"] = 5.0
    manifest_file.write_text(json.dumps(edited))
    with pytest.raises(ManifestError, match="blend"):
        read_current(root, TENANT, SURFACE)


def test_the_examples_recsys_serve_prints_return_items(home: Path, api: httpx.Client) -> None:
    from recsys_cli.cli import example_requests

    paths = [
        line.split("'")[1] for line in example_requests(settings_for(home), "") if line.startswith("curl")
    ]
    assert {path.split("?")[0].split("/")[-1] for path in paths} >= {"popular", "recommendations", "similar"}
    for path in paths:
        response = api.get(path)
        assert response.status_code == 200, (path, response.text)
        body = response.json()
        if "items" in body:
            assert body["items"], path
