"""Merchandising rules applied by the API server: published through the manifest, picked up by the poller,
applied to the blend's candidates with the documented precedence, counted in /metrics, rolled back.

HTTP tests run a real uvicorn server over a copy of the serving tests' published home. The server's rules
index is checked against the plain definition (`recsys_core.rules.applicable`) on generated documents and
requests.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
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
from test_serving_workers import eventually, recsys_serve, scrape, value

from recsys_cli import cli
from recsys_core.manifest import read_current, resolve_uri
from recsys_core.rules import (
    RULES_FILE,
    RULES_KIND,
    Request,
    RulesError,
    applicable,
    apply_rules,
    parse_rules,
)
from recsys_dagster.publishing.protocol import publish, rollback
from recsys_dagster.publishing.rules import publish_rules
from recsys_dagster.transform.artifact_dir import write_artifact_dir
from recsys_serving import recommender
from recsys_serving.rules import SCORING_DEPTH, ServedRules
from recsys_serving.store import load_target

POLL = "0.2"
MANIFEST_URL = f"/v1/manifest?tenant={TENANT}&surface={SURFACE}"


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_published_home(tmp_path_factory.mktemp("rules-serving"))


@pytest.fixture
def clone(home: Path, tmp_path: Path) -> Path:
    return private_copy(home, tmp_path)


@pytest.fixture(scope="module")
def published(home: Path) -> Published:
    return read_published(home / "artifacts")


def publish_document(home: Path, rules: list[dict], reason: str = "test rules") -> str:
    """Publish `rules` as `recsys rules publish` does; the new manifest version."""
    document = parse_rules(json.dumps({"rules": rules}), "rules.json")
    outcome = publish_rules(home / "artifacts", TENANT, SURFACE, document, reason=reason, actor="pytest")
    assert outcome.action == "publish", outcome.message
    return outcome.manifest_version


def wait_for_manifest(client: httpx.Client, version: str, limit: float = 10.0) -> float:
    """Seconds until the server serves `version`."""
    started = time.monotonic()
    while time.monotonic() - started < limit:
        if client.get(MANIFEST_URL).json()["manifest_version"] == version:
            return time.monotonic() - started
        time.sleep(0.02)
    raise AssertionError(f"the server did not pick up {version} within {limit} s")


@contextmanager
def server(home: Path, **env: str) -> Iterator[httpx.Client]:
    with (
        live_server(settings_for(home, RECSYS_SERVE_POLL_SECONDS=POLL, **env)) as url,
        httpx.Client(base_url=url, timeout=10) as client,
    ):
        yield client


def user_and_campaign(published: Published) -> tuple[str, str]:
    """A user with co-occurrence candidates, and a campaign item: one the user has seen, which the blend
    never returns to them (only a pin shows it)."""
    user = users_with_cooc(published, 2)[0]
    return user, published.history[user][0]


def listed(client: httpx.Client, **params: object) -> list[tuple[str, list[str]]]:
    response = client.get(recs_url(**params))
    assert response.status_code == 200, response.text
    return [(item["item_id"], item["rules"]) for item in response.json()["items"]]


def ids(client: httpx.Client, **params: object) -> list[str]:
    return [item for item, _ in listed(client, **params)]


# ----------------------------------------------------------------------------------- over HTTP


def test_pin_boost_bury_and_a_vip_list_change_the_list_as_documented(
    clone: Path, published: Published
) -> None:
    user, other, stranger = users_with_cooc(published, 2)[:3]
    with server(clone) as client:
        before = client.get(recs_url(user_id=user, k=10)).json()["items"]
        baseline = [item["item_id"] for item in before]
        assert all(item["rules"] == [] for item in before)
        other_before = ids(client, user_id=other, k=10)
        stranger_before = ids(client, user_id=stranger, k=10)
        # A campaign item the user has seen (so the blend never returns it): only the pin shows it.
        campaign = published.history[user][0]
        assert campaign not in baseline
        vip_items = [i for i, _ in published.popular[-3:]]
        only_user = {"users": [user]}
        version = publish_document(
            clone,
            [
                {
                    "id": "summer-pin",
                    "action": "pin",
                    "items": [campaign],
                    "position": 3,
                    "audience": only_user,
                },
                {
                    "id": "push",
                    "action": "boost",
                    "items": [baseline[5]],
                    "factor": 50.0,
                    "audience": only_user,
                },
                {
                    "id": "sink",
                    "action": "bury",
                    "items": [baseline[0]],
                    "factor": 1e-4,
                    "audience": only_user,
                },
                {"id": "vip-list", "action": "replace", "items": vip_items, "audience": {"users": [other]}},
            ],
        )
        wait_for_manifest(client, version)
        response = client.get(recs_url(user_id=user, k=10))
        assert response.status_code == 200
        body = response.json()["items"]
        # b6 boosted above everything, b1 buried out of the ten, the campaign item at position 3.
        b = baseline
        assert [item["item_id"] for item in body] == [b[5], b[1], campaign, b[2], b[3], b[4], *b[6:10]]
        assert [item["rules"] for item in body] == [["push"], [], ["summer-pin"], *[[]] * 7]
        assert body[0]["score"] == pytest.approx(before[5]["score"] * 50.0, rel=1e-12)
        assert body[0]["score"] == pytest.approx(sum(body[0]["sources"].values()), rel=1e-12)
        assert (body[2]["score"], body[2]["source"], body[2]["sources"]) == (None, "rule", {})
        # The VIP list comes first for that user only, filled from the user's own candidates.
        vip = listed(client, user_id=other, k=10)
        fill = [i for i in other_before if i not in vip_items][:7]
        assert vip == [*[(item, ["vip-list"]) for item in vip_items], *[(item, []) for item in fill]]
        assert ids(client, user_id=stranger, k=10) == stranger_before


def test_a_blocked_item_never_appears_even_when_the_list_runs_short(
    clone: Path, published: Published
) -> None:
    users = users_with_cooc(published, 2)[:15]
    catalog = sorted(published.catalog)
    with server(clone) as client:
        firsts = {ids(client, user_id=user, k=10)[0] for user in users}
        popular_top = [i for i, _ in published.popular[:3]]
        blocked = sorted(firsts | set(popular_top))
        vip_items = [popular_top[0], "vip-only-item"]
        version = publish_document(
            clone,
            [
                {"id": "recall", "action": "block", "items": blocked, "reason": "product recall"},
                {"id": "vip", "action": "replace", "items": vip_items, "audience": {"users": [users[0]]}},
            ],
        )
        wait_for_manifest(client, version)
        for user in [*users, "never-seen-user"]:
            got = ids(client, user_id=user, k=10)
            assert len(got) == 10 and not set(got) & set(blocked), (user, got)
        # A replace list naming a blocked item loses it; the rest of the list fills from the candidates.
        assert ids(client, user_id=users[0], k=3)[0] == "vip-only-item"
        # Block all but three items: an anonymous request gets those three, with the short-list warning.
        kept = [i for i, _ in published.popular if i not in blocked][:3]
        version = publish_document(
            clone, [{"id": "clearance", "action": "block", "items": [i for i in catalog if i not in kept]}]
        )
        wait_for_manifest(client, version)
        body = client.get(recs_url(k=10)).json()
        assert [item["item_id"] for item in body["items"]] == kept
        assert [w["code"] for w in body["warnings"]][-1] == "fewer_items_than_requested"


def test_rules_are_in_force_only_inside_their_window_at_request_time(
    clone: Path, published: Published
) -> None:
    user, campaign = user_and_campaign(published)
    with server(clone) as client:
        start = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=2)
        end = start + dt.timedelta(seconds=2)
        version = publish_document(
            clone,
            [
                {
                    "id": "flash-sale",
                    "action": "pin",
                    "items": [campaign],
                    "position": 1,
                    "from": start.isoformat(),
                    "until": end.isoformat(),
                }
            ],
        )
        wait_for_manifest(client, version)
        assert dt.datetime.now(dt.UTC) < start - dt.timedelta(seconds=0.5), "the publish took too long"
        assert campaign not in ids(client, user_id=user, k=5)
        time.sleep(max(0.0, (start - dt.datetime.now(dt.UTC)).total_seconds()) + 0.2)
        assert listed(client, user_id=user, k=5)[0] == (campaign, ["flash-sale"])
        time.sleep(max(0.0, (end - dt.datetime.now(dt.UTC)).total_seconds()) + 0.2)
        assert campaign not in ids(client, user_id=user, k=5)


def test_published_rules_are_picked_up_within_the_poll_interval_and_rollback_restores(
    clone: Path, published: Published
) -> None:
    user, campaign = user_and_campaign(published)
    with server(clone) as client:
        baseline = ids(client, user_id=user, k=10)
        old = client.get(MANIFEST_URL).json()["manifest_version"]
        new = publish_document(
            clone, [{"id": "summer-pin", "action": "pin", "items": [campaign], "position": 1}]
        )
        started = time.monotonic()
        while ids(client, user_id=user, k=10)[0] != campaign:
            assert time.monotonic() - started < 3, "the rules were not picked up within a few poll intervals"
            time.sleep(0.02)
        manifest = client.get(MANIFEST_URL).json()
        assert manifest["manifest_version"] == new and manifest["artifacts"][RULES_KIND]["served"] is True
        back = rollback(clone / "artifacts", TENANT, SURFACE, steps=1, reason="campaign over", actor="pytest")
        assert back.manifest_version == old
        assert wait_for_manifest(client, old) < 3
        assert ids(client, user_id=user, k=10) == baseline


def test_metrics_count_the_responses_each_rule_changed(clone: Path, published: Published) -> None:
    user, other = users_with_cooc(published, 2)[:2]
    campaign = published.history[user][0]
    with server(clone) as client:
        version = publish_document(
            clone,
            [
                {"id": "pin-a", "action": "pin", "items": [campaign], "position": 1},
                {"id": "vip-b", "action": "replace", "items": ["x1"], "audience": {"users": [other]}},
            ],
        )
        wait_for_manifest(client, version)
        for _ in range(3):
            client.get(recs_url(user_id=user))
        client.get(recs_url(user_id=other))
        client.post("/v1/recommend", json={"tenant": TENANT, "surface": SURFACE, "user_id": other})
        text = client.get("/metrics").text

    def count(rule_id: str) -> float:
        found = re.search(
            rf'recsys_rule_applications_total\{{rule_id="{rule_id}",surface="{SURFACE}",tenant="{TENANT}"\}} (\S+)',
            text,
        )
        assert found, f"no series for {rule_id}"
        return float(found.group(1))

    assert (count("pin-a"), count("vip-b")) == (5.0, 2.0)


def test_rule_counts_add_up_over_the_workers_of_a_server(clone: Path, published: Published) -> None:
    user, campaign = user_and_campaign(published)
    publish_document(clone, [{"id": "pin-a", "action": "pin", "items": [campaign], "position": 1}])
    with recsys_serve(clone, "--workers", "2", TMPDIR=str(clone)) as server:
        for _ in range(30):  # a new connection each time: either worker may accept it
            assert httpx.get(server.url + recs_url(user_id=user, k=3)).json()["items"][0]["rules"] == [
                "pin-a"
            ]
        for _ in range(4):  # whichever worker answers the scrape
            samples = scrape(server.url)
            assert value(samples, "recsys_rule_applications_total", rule_id="pin-a", tenant=TENANT) == 30
        eventually(
            lambda: value(scrape(server.url), "recsys_decision_traces_written_total") == 30,
            "the decision trace counters of the workers do not add up",
        )
        assert server.stop() == 0


def test_a_rules_artifact_that_does_not_validate_is_never_served(clone: Path, published: Published) -> None:
    """Rules that reach the artifact root without `recsys rules publish` (written by hand, a bug, a
    different version) are validated again at load: the previous manifest keeps serving."""
    user, campaign = user_and_campaign(published)
    root = clone / "artifacts"
    with server(clone) as client:
        good = publish_document(clone, [{"id": "pin", "action": "pin", "items": [campaign], "position": 1}])
        wait_for_manifest(client, good)
        contradiction = {
            "rules": [
                {"id": "p", "action": "pin", "items": ["x"], "position": 1},
                {"id": "b", "action": "block", "items": ["x"]},
            ]
        }
        for bad in (b"rules: [", json.dumps(contradiction).encode(), b'{"rules": [{"id": "p"}]}'):
            current = read_current(root, TENANT, SURFACE)
            artifacts = {
                kind: resolve_uri(root, TENANT, SURFACE, uri)
                for kind, uri in current["current"].items()
                if kind != RULES_KIND
            }
            _, artifacts[RULES_KIND] = write_artifact_dir(
                root / TENANT / SURFACE, RULES_KIND, {"tenant": TENANT, "surface": SURFACE}, {RULES_FILE: bad}
            )
            outcome = publish(
                root, TENANT, SURFACE, dt.date.fromisoformat(current["as_of"]), artifacts, actor="pytest"
            )
            assert outcome.action == "publish"
            started = time.monotonic()
            while [f["manifest_version"] for f in client.get("/readyz").json()["failures"]] != [
                outcome.manifest_version
            ]:
                assert time.monotonic() - started < 5, "the failed load was never reported"
                time.sleep(0.05)
            (failure,) = client.get("/readyz").json()["failures"]
            assert "rules artifact" in failure["error"]
            assert client.get(MANIFEST_URL).json()["manifest_version"] == good
            assert listed(client, user_id=user, k=3)[0] == (campaign, ["pin"])
            rollback(root, TENANT, SURFACE, to_version=good, reason="bad rules", actor="pytest")
            wait_for_manifest(client, good)


# --------------------------------------------------------------------- generated documents


_ITEMS = [f"i{n:06d}" for n in range(0, 300, 3)] + ["not-in-catalog"]
_USERS = ["u00001", "u00002", "u00003", "nobody"]
_NOW = dt.datetime(2025, 3, 10, 12, tzinfo=dt.UTC)
_times = st.integers(-3, 3).map(lambda hours: _NOW + dt.timedelta(hours=hours))
_audience = st.none() | st.fixed_dictionaries(
    {},
    optional={
        "users": st.lists(st.sampled_from(_USERS), min_size=1, max_size=2, unique=True),
        "segment": st.sampled_from(["cold_start", "active"]),
        "context_items": st.lists(st.sampled_from(_ITEMS), min_size=1, max_size=2, unique=True),
    },
)


@st.composite
def _rules(draw: st.DrawFn) -> list[dict]:
    rules = []
    for n in range(draw(st.integers(0, 12))):
        action = draw(st.sampled_from(["block", "pin", "replace", "boost", "bury", "boost"]))
        items = draw(
            st.lists(st.sampled_from(_ITEMS), min_size=1, max_size=1 if action == "pin" else 4, unique=True)
        )
        rule: dict = {"id": f"r{n}", "action": action, "items": items}
        if action == "pin":
            rule["position"] = draw(st.integers(1, 12))
        if action in ("boost", "bury"):
            rule["factor"] = draw(st.floats(1.01, 20) if action == "boost" else st.floats(0.01, 0.99))
        audience = draw(_audience)
        if audience:
            rule["audience"] = audience
        start, end = draw(st.none() | _times), draw(st.none() | _times)
        if start is not None:
            rule["from"] = start.isoformat()
        if end is not None and (start is None or end > start):
            rule["until"] = end.isoformat()
        rules.append(rule)
    return rules


@pytest.fixture(scope="module")
def target(home: Path):
    root = home / "artifacts"
    return load_target(root, TENANT, SURFACE, read_current(root, TENANT, SURFACE))


class Catalog:
    """The served target and its id <-> index maps (its repr stays short in hypothesis's reports)."""

    def __init__(self, target) -> None:
        self.target, self.item_ids, self.item_index = target, target.item_ids, target.item_index


@pytest.fixture(scope="module")
def catalog(target) -> Catalog:
    return Catalog(target)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    _rules(),
    st.sampled_from([None, *_USERS]),
    st.integers(0, 6),
    st.lists(st.sampled_from(_ITEMS), max_size=2),
    _times | st.integers(-3, 3).map(lambda h: _NOW + dt.timedelta(hours=h, microseconds=-1)),
    st.integers(1, 12),
)
def test_the_servers_index_selects_exactly_the_rules_that_apply(
    catalog: Catalog,
    rules: list[dict],
    user: str | None,
    history: int,
    context: list[str],
    when: dt.datetime,
    k: int,
) -> None:
    try:
        document = parse_rules(json.dumps({"rules": rules}), "generated.json")
    except RulesError:
        return  # a pin and a block of one item for overlapping audiences: refused, as it should be
    served = ServedRules("v", document, catalog.item_index, 3)
    served_items = [item for item in _ITEMS[::2] if item in catalog.item_index]
    assert len(served_items) >= 12
    candidates = [(item, 1.0 / (n + 1)) for n, item in enumerate(served_items)]
    segment = "cold_start" if history <= 3 else "active"
    expected = apply_rules(
        applicable(document, Request(when, user, segment, frozenset(context))), candidates, k
    )
    selection = served.select(when, user, history, context)
    blocked = {catalog.item_ids[i] for i in selection.blocked}
    # The blend never returns what the selection blocks; the rules then run on what it returns.
    kept = [(item, score) for item, score in candidates if item not in blocked]
    got = apply_rules(selection.rules_for([item for item, _ in kept]), kept, k)
    assert got == expected
    # And the whole recommendation with these rules: never an error, never a blocked item, at most k.
    ruled = dataclasses.replace(catalog.target, rules=served)
    result = recommender.recommend(
        ruled, user_id=user, context_items=context, k=k, exclude_seen=True, rules_at=when
    )
    assert len(result) <= k and not set(result.item_ids) & blocked


def test_validity_bounds_are_exact_at_the_microsecond(target) -> None:
    start = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)
    end = dt.datetime(2026, 9, 1, tzinfo=dt.UTC)
    item = target.item_ids[0]
    document = parse_rules(
        json.dumps(
            {
                "rules": [
                    {"id": "b", "action": "block", "items": [item], "from": start.isoformat()},
                    {"id": "p", "action": "pin", "items": ["x"], "position": 1, "until": end.isoformat()},
                ]
            }
        ),
        "bounds.json",
    )
    served = ServedRules("v", document, target.item_index, 3)
    tick = dt.timedelta(microseconds=1)
    # Asked in an order that crosses the cached intervals both ways.
    for moment, blocked, pinned in (
        (start - tick, False, True),
        (start, True, True),
        (end - tick, True, True),
        (end, True, False),
        (start - tick, False, True),
        (end + tick, True, False),
    ):
        selection = served.select(moment, None, 0, None)
        assert (target.item_index[item] in selection.blocked) is blocked, moment
        assert ([r.id for r in selection.rules_for([])] == ["p"]) is pinned, moment


def test_recommend_applies_rules_only_when_given_the_request_time(target, published) -> None:
    """The offline evaluation calls `recommend` without a time: it measures the models, not the rules."""
    user = users_with_cooc(published, 2)[0]
    plain = recommender.recommend(target, user_id=user, k=10, exclude_seen=True)
    document = parse_rules(
        json.dumps({"rules": [{"id": "b", "action": "block", "items": plain.item_ids[:2]}]}), "r"
    )
    ruled = dataclasses.replace(target, rules=ServedRules("v", document, target.item_index, 3))
    assert recommender.recommend(ruled, user_id=user, k=10, exclude_seen=True).item_ids == plain.item_ids
    at_noon = recommender.recommend(ruled, user_id=user, k=10, exclude_seen=True, rules_at=_NOW)
    assert not set(plain.item_ids[:2]) & set(at_noon.item_ids) and len(at_noon) == 10
    assert at_noon.rules_version == "v"
    # No boost or bury: the blend was asked for k candidates, as without rules.
    assert len(at_noon.candidate_ids) == 10 and SCORING_DEPTH > 1


def test_bad_rules_files_are_refused_by_the_command_line_and_change_nothing(
    clone: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys
) -> None:
    monkeypatch.setenv("RECSYS_HOME", str(clone))
    before = read_current(clone / "artifacts", TENANT, SURFACE)
    for n, text in enumerate(
        ["rules: [", "rules: [{id: p, action: pin, items: [x]}]", "[1, 2]", "rules: [{id: b}]"]
    ):
        path = tmp_path / f"bad-{n}.yaml"
        path.write_text(text)
        target = ["--tenant", TENANT, "--surface", SURFACE]
        assert cli.main(["rules", "publish", *target, str(path), "--reason", "fuzz"]) == cli.EXIT_FAILED
        assert capsys.readouterr().err
    assert read_current(clone / "artifacts", TENANT, SURFACE) == before
