"""The item catalog in serving, end to end: events generated and a catalog imported with `recsys import`,
`recsys run` publishes the content artifact with the others, a real HTTP server answers. Unavailable items
are never served (every endpoint, every source, with rules), a new item without events is recommended by
content, category filters hold, `diversity` changes the category mix, rules target catalog attributes.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import polars as pl
import pytest
from conftest import use_home
from test_serving import live_server, private_copy

from recsys_cli import cli
from recsys_core.catalog import item_line
from recsys_core.manifest import read_current, resolve_uri, target_dir
from recsys_core.rules import Match, matches, parse_rules
from recsys_core.settings import BlendWeights, load_settings
from recsys_dagster.evaluation.diversity import DIVERSITY_SETTINGS, diversity_tradeoff
from recsys_dagster.evaluation.holdout import temporal_holdout
from recsys_dagster.evaluation.offline import read_evaluation, window_interactions
from recsys_dagster.publishing.protocol import publish
from recsys_dagster.publishing.rules import publish_rules
from recsys_dagster.transform.artifact_dir import write_artifact_dir
from recsys_serving import recommender
from recsys_serving.diversity import intra_list_diversity, mmr_order
from recsys_serving.store import load_target

TENANT, SURFACE = "demo", "home"
CATEGORIES = ("drama", "comedy", "horror", "western", "sci-fi", "musical")
NEW_ITEM = "new-drama-1"
ENV = {"RECSYS_SERVE_POLL_SECONDS": "0.2"}


def recsys(*args: object) -> int:
    return cli.main([str(a) for a in args])


def category_of(n: int) -> str:
    return CATEGORIES[n % len(CATEGORIES)]


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Two days of generated events over 120 items and a catalog of them: six categories, every seventh
    item unavailable, every fourth of brand `acme`, and one new drama nobody has interacted with."""
    home = tmp_path_factory.mktemp("catalog-serving") / "home"
    end = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)
    with pytest.MonkeyPatch.context() as patch:
        use_home(patch, home)
        events = {"--days": 2, "--events-per-day": 3000, "--users": 200, "--items": 120}
        assert recsys("generate", "--end", end, *(str(a) for pair in events.items() for a in pair)) == 0
        items = sorted(
            {
                json.loads(line)["item_id"]
                for path in (home / "raw").glob("dt=*/*.jsonl")
                for line in path.read_text().splitlines()
            }
        )
        records = [
            {
                "item_id": item,
                "title": f"{category_of(n)} story {item}",
                "categories": [category_of(n)],
                "tags": ["classic"] if n % 3 == 0 else [],
                "available": n % 7 != 3,
                "attributes": {"brand": "acme" if n % 4 == 0 else "other"},
                "updated_at": f"{end.isoformat()}T00:00:00Z",
            }
            for n, item in enumerate(items)
        ]
        records.append(
            {
                "item_id": NEW_ITEM,
                "title": "drama story premiere",
                "categories": ["drama"],
                "tags": [],
                "available": True,
                "attributes": {},
                "updated_at": f"{end.isoformat()}T00:00:00Z",
            }
        )
        source = home.parent / "catalog.jsonl"
        source.write_bytes(b"".join(item_line(record) for record in records))
        assert recsys("import", "--tenant", TENANT, source) == cli.EXIT_OK
        assert recsys("run", "--start", end - dt.timedelta(days=1), "--end", end, "--quiet") == cli.EXIT_OK
        manifest = read_current(home / "artifacts", TENANT, SURFACE)
        assert manifest is not None and "content" in manifest["current"]
        (home / "catalog.json").write_text(json.dumps({r["item_id"]: r for r in records}))
        yield home


@pytest.fixture(scope="module")
def catalog(home: Path) -> dict[str, dict]:
    loaded: dict[str, dict] = json.loads((home / "catalog.json").read_text())
    return loaded


@contextmanager
def server(home: Path) -> Iterator[httpx.Client]:
    settings = load_settings({"RECSYS_HOME": str(home), **ENV})
    with live_server(settings) as url, httpx.Client(base_url=url, timeout=10) as client:
        yield client


def get(client: httpx.Client, path: str, **params: object) -> dict:
    response = client.get(path, params={"tenant": TENANT, "surface": SURFACE, **params})
    assert response.status_code == 200, response.text
    body: dict = response.json()
    return body


def recs(client: httpx.Client, **params: object) -> list[dict]:
    items: list[dict] = get(client, "/v1/recommendations", **params)["items"]
    return items


def users(home: Path) -> list[str]:
    return sorted(
        {
            json.loads(line).get("user_id") or ""
            for path in (home / "raw").glob("dt=*/*.jsonl")
            for line in path.read_text().splitlines()
        }
        - {""}
    )[:40]


def test_an_unavailable_item_is_never_served_by_any_endpoint_source_or_rule(
    home: Path, catalog: dict[str, dict]
) -> None:
    unavailable = {item for item, record in catalog.items() if not record["available"]}
    some = sorted(unavailable)[0]
    # A pin and a boost of unavailable items: rules cannot bring them back.
    document = parse_rules(
        json.dumps(
            {
                "rules": [
                    {"id": "pin-unavailable", "action": "pin", "items": [some], "position": 1},
                    {
                        "id": "boost-unavailable",
                        "action": "boost",
                        "items": sorted(unavailable),
                        "factor": 50,
                    },
                    {
                        "id": "replace-list",
                        "action": "replace",
                        "items": [some, NEW_ITEM],
                        "audience": {"users": ["u-vip"]},
                    },
                ]
            }
        ),
        "rules.json",
    )
    assert (
        publish_rules(home / "artifacts", TENANT, SURFACE, document, reason="t", actor="pytest").action
        == "publish"
    )
    served: set[str] = set()
    with server(home) as client:
        served.update(i["item_id"] for i in get(client, "/v1/popular", k=100)["items"])
        for user in [*users(home), "u-vip", "somebody-new"]:
            for params in (
                {},
                {"exclude_seen": "false"},
                {"context_items": sorted(unavailable)[:3]},
                {"diversity": 0.5},
            ):
                listed = recs(client, user_id=user, k=30, **params)
                assert len(listed) == 30
                served.update(i["item_id"] for i in listed)
        vip = [i["item_id"] for i in recs(client, user_id="u-vip", k=5)]
        assert vip[0] == NEW_ITEM  # the replace list, without its unavailable item
        for item in catalog:
            response = client.get(
                f"/v1/items/{item}/similar", params={"tenant": TENANT, "surface": SURFACE, "k": 20}
            )
            assert response.status_code == 200
            served.update(i["item_id"] for i in response.json()["items"])
    assert served and not served & unavailable


def test_a_new_item_without_events_is_recommended_through_content_next_to_similar_items(
    home: Path, catalog: dict[str, dict]
) -> None:
    with server(home) as client:
        similar = get(client, f"/v1/items/{NEW_ITEM}/similar", k=10)["items"]
        assert len(similar) == 10
        assert {i["source"] for i in similar} == {"content"}
        assert all(catalog[i["item_id"]]["categories"] == ["drama"] for i in similar)
        # A visitor on the new item's page: its content neighbours, said to come from content.
        listed = recs(client, context_items=NEW_ITEM, k=10)
        assert len(listed) == 10
        content = [i for i in listed if i["source"] == "content"]
        assert content and all("content" in i["sources"] for i in content)
        assert all(catalog[i["item_id"]]["categories"] == ["drama"] for i in content)


def test_category_filters_hold_and_still_give_k_items(home: Path, catalog: dict[str, dict]) -> None:
    with server(home) as client:
        for user in users(home)[:15]:
            only = recs(client, user_id=user, k=10, categories="comedy,western")
            assert len(only) == 10
            assert all(catalog[i["item_id"]]["categories"][0] in ("comedy", "western") for i in only)
            without = recs(client, user_id=user, k=10, exclude_categories="drama,comedy")
            assert len(without) == 10
            assert not any(catalog[i["item_id"]]["categories"][0] in ("drama", "comedy") for i in without)
        response = client.get(
            "/v1/recommendations", params={"tenant": TENANT, "surface": SURFACE, "diversity": "1.5"}
        )
        assert response.status_code == 422 and response.json()["errors"][0]["code"] == "invalid_diversity"


def test_diversity_changes_the_category_mix_of_a_list(home: Path, catalog: dict[str, dict]) -> None:
    def mix(items: list[dict]) -> int:
        return len({catalog[i["item_id"]]["categories"][0] for i in items})

    plain, diverse, changed = [], [], 0
    with server(home) as client:
        for user in users(home)[:20]:
            base = recs(client, user_id=user, k=10)
            mmr = recs(client, user_id=user, k=10, diversity=0.7)
            capped = recs(client, user_id=user, k=10, max_per_category=2)
            assert (
                max(sum(catalog[i["item_id"]]["categories"][0] == c for i in capped) for c in CATEGORIES) <= 2
            )
            plain.append(mix(base))
            diverse.append(mix(mmr))
            changed += [i["item_id"] for i in base] != [i["item_id"] for i in mmr]
    assert changed > 0
    assert np.mean(diverse) > np.mean(plain)


def test_rules_target_catalog_attributes(home: Path, catalog: dict[str, dict]) -> None:
    document = parse_rules(
        json.dumps(
            {
                "rules": [
                    {"id": "no-horror", "action": "block", "match": {"categories": ["horror"]}},
                    {
                        "id": "acme-up",
                        "action": "boost",
                        "match": {"attributes": {"brand": "acme"}},
                        "factor": 100,
                    },
                ]
            }
        ),
        "rules.json",
    )
    assert (
        publish_rules(home / "artifacts", TENANT, SURFACE, document, reason="t", actor="pytest").action
        == "publish"
    )
    with server(home) as client:
        for user in users(home)[:15]:
            listed = recs(client, user_id=user, k=10)
            assert not any(catalog[i["item_id"]]["categories"] == ["horror"] for i in listed)
            boosted = [i for i in listed if "acme-up" in i["rules"]]
            assert boosted and all(catalog[i["item_id"]]["attributes"]["brand"] == "acme" for i in boosted)
            # The boosted items come first.
            assert [i["item_id"] for i in listed[: len(boosted)]] == [i["item_id"] for i in boosted]


def test_a_match_selects_by_category_tag_and_exact_attribute_values() -> None:
    match = Match(categories=("a", "b"), attributes={"in_stock": True, "size": 1})
    assert matches(match, ["b"], [], {"in_stock": True, "size": 1})
    assert not matches(match, ["c"], [], {"in_stock": True, "size": 1})
    assert not matches(match, ["a"], [], {"in_stock": 1, "size": 1})  # 1 is not True
    assert not matches(match, ["a"], [], {"in_stock": True})
    assert matches(Match(tags=("x",)), [], ["x", "y"], {})
    assert not matches(Match(tags=("x",)), [], ["y"], {})


def test_mmr_trades_relevance_for_dissimilarity_and_keeps_fixed_positions() -> None:
    # Items 0 and 1 are near copies, 2 is different and a little less relevant.
    similarity = np.array([[1.0, 0.95, 0.0], [0.95, 1.0, 0.0], [0.0, 0.0, 1.0]])
    categories = [("a",), ("a",), ("b",)]
    scores = [1.0, 0.9, 0.8]
    assert mmr_order(scores, similarity, categories, diversity=0.0, max_per_category=None, k=3) == [0, 1, 2]
    assert mmr_order(scores, similarity, categories, diversity=0.5, max_per_category=None, k=3) == [0, 2, 1]
    assert mmr_order(scores, similarity, categories, diversity=0.0, max_per_category=1, k=3) == [0, 2]
    assert mmr_order(
        scores, similarity, categories, diversity=0.5, max_per_category=None, k=3, fixed={0: 1}
    ) == [1, 2, 0]
    assert intra_list_diversity(similarity[np.ix_([0, 2], [0, 2])]) == 1.0
    with pytest.raises(ValueError, match="diversity"):
        mmr_order(scores, similarity, categories, diversity=1.5, max_per_category=None, k=3)


def test_the_offline_tradeoff_reports_diversity_next_to_accuracy_per_setting(home: Path) -> None:

    manifest = read_current(home / "artifacts", TENANT, SURFACE)
    assert manifest is not None
    target = load_target(home / "artifacts", TENANT, SURFACE, manifest)
    as_of = dt.date.fromisoformat(manifest["as_of"])
    rows = window_interactions(home / "lake", as_of, 2)
    holdout = temporal_holdout(rows, holdout_days=1, as_of=as_of)
    off, on, capped = diversity_tradeoff(
        target, holdout, 10, BlendWeights(), settings=((0.0, None), (0.8, None), (0.0, 1))
    )
    assert on.intra_list_diversity > off.intra_list_diversity
    assert on.categories_per_list >= off.categories_per_list
    # At most one item per category: every item of a list adds a category.
    assert capped.intra_list_diversity >= off.intra_list_diversity
    assert all(0 <= row.ndcg <= 1 and 0 < row.category_coverage <= 1 for row in (off, on, capped))
    # `recsys run`'s evaluation recorded the same figures for every configured setting.
    record = read_evaluation(home / "lake", as_of, TENANT, SURFACE)
    assert record is not None and record["result"] is not None
    assert [(row["diversity"], row["max_per_category"]) for row in record["diversity"]] == list(
        DIVERSITY_SETTINGS
    )


def test_an_item_marked_unavailable_disappears_from_every_endpoint_after_the_next_run(
    home: Path, tmp_path: Path, catalog: dict[str, dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    copy = private_copy(home, tmp_path)
    use_home(monkeypatch, copy)
    manifest = read_current(copy / "artifacts", TENANT, SURFACE)
    assert manifest is not None
    end = dt.date.fromisoformat(manifest["as_of"])
    with server(copy) as client:
        popular = [i["item_id"] for i in get(client, "/v1/popular", k=5)["items"]]
        top = popular[0]
        # The catalog says the best seller is out of stock; the next run publishes it.
        update = {**catalog[top], "available": False, "updated_at": f"{end.isoformat()}T12:00:00Z"}
        source = tmp_path / "stock.jsonl"
        source.write_bytes(item_line(update))
        assert recsys("import", "--tenant", TENANT, "--day", end, source) == cli.EXIT_OK
        assert recsys("run", "--start", end, "--end", end, "--quiet") == cli.EXIT_OK
        republished = read_current(copy / "artifacts", TENANT, SURFACE)
        assert republished is not None and republished["manifest_version"] != manifest["manifest_version"]
        deadline = time.monotonic() + 10
        while get(client, "/v1/manifest")["manifest_version"] != republished["manifest_version"]:
            assert time.monotonic() < deadline, "the server did not pick up the new manifest"
            time.sleep(0.05)
        served = {i["item_id"] for i in get(client, "/v1/popular", k=100)["items"]}
        for user in users(copy)[:20]:
            served.update(i["item_id"] for i in recs(client, user_id=user, k=20))
        served.update(i["item_id"] for i in get(client, f"/v1/items/{popular[1]}/similar", k=50)["items"])
        assert served and top not in served


def test_a_content_artifact_without_the_item_table_serves_as_no_catalog(home: Path, tmp_path: Path) -> None:
    copy = private_copy(home, tmp_path)
    root = copy / "artifacts"
    manifest = read_current(root, TENANT, SURFACE)
    assert manifest is not None
    artifacts = {kind: resolve_uri(root, TENANT, SURFACE, uri) for kind, uri in manifest["current"].items()}
    # The content artifact as built before it carried the item table: its neighbour rows only.
    neighbors = pl.read_parquet(artifacts["content"] / "neighbors.parquet")
    meta = json.loads((artifacts["content"] / "meta.json").read_text())
    old_meta = {key: meta[key] for key in ("kind", "tenant", "surface", "as_of", "params", "inputs")}
    artifacts["content"] = write_artifact_dir(
        target_dir(root, TENANT, SURFACE), "content", old_meta, {"neighbors.parquet": neighbors}
    )[1]
    as_of = dt.date.fromisoformat(manifest["as_of"])
    outcome = publish(root, TENANT, SURFACE, as_of, artifacts, blend=manifest.get("blend"), carry=("rules",))
    assert outcome.action == "publish", outcome.message
    republished = read_current(root, TENANT, SURFACE)
    assert republished is not None
    target = load_target(root, TENANT, SURFACE, republished)
    assert target.catalog is None and "content" in target.ignored_kinds
    assert recommender.recommend(target, user_id=users(copy)[0], k=5, exclude_seen=True).item_ids
