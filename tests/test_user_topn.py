"""The `user_topn` artifact: the served blend precomputed per ALS-known user, over the artifacts that the
real pipeline steps published (`test_serving`'s fixture data), and answered by the API from it."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import httpx
import numpy as np
import polars as pl
import pytest
from fastapi.testclient import TestClient
from test_serving import (
    DAY,
    SURFACE,
    TENANT,
    Published,
    as_tuples,
    assert_same_ranking,
    build_published_home,
    live_server,
    read_published,
    recs_url,
    settings_for,
)

from recsys_core.kinds import USER_TOPN
from recsys_core.manifest import read_current, read_meta, resolve_uri
from recsys_core.settings import BlendWeights
from recsys_dagster.publishing.protocol import publish
from recsys_dagster.publishing.release import derived_problems
from recsys_dagster.transform.artifact_dir import write_artifact_dir
from recsys_dagster.transform.artifacts import build_window_artifacts
from recsys_serving.app import create_app
from recsys_serving.params import MAX_K
from recsys_serving.recommender import Recommendation, _precomputed, recommend
from recsys_serving.store import LoadedTarget, load_target

OTHER_WEIGHTS = BlendWeights(als=1.0, cooc=1.0, popularity=0.2)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_published_home(tmp_path_factory.mktemp("serving"))


@pytest.fixture(scope="module")
def served(home: Path) -> tuple[LoadedTarget, Published]:
    """The published target as the server loads it, and its artifacts read back independently."""
    root = home / "artifacts"
    return load_target(root, TENANT, SURFACE, read_current(root, TENANT, SURFACE)), read_published(root)


@pytest.fixture
def published(served: tuple[LoadedTarget, Published]) -> Published:
    return served[1]


@pytest.fixture
def clone(home: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "home"
    shutil.copytree(home, copy, symlinks=True)
    return copy


def current_paths(root: Path) -> dict[str, Path]:
    manifest = read_current(root, TENANT, SURFACE)
    return {kind: resolve_uri(root, TENANT, SURFACE, uri) for kind, uri in manifest["current"].items()}


def assert_same_answer(precomputed: Recommendation, live: Recommendation) -> None:
    assert precomputed.item_ids == live.item_ids
    assert precomputed.sources == live.sources
    assert precomputed.warnings == live.warnings
    # The batch scores ALS in one matrix product, the live path one user at a time: the last bits may differ.
    assert precomputed.scores == pytest.approx(live.scores, rel=1e-12)
    for ours, theirs in zip(precomputed.contributions, live.contributions, strict=True):
        assert ours.keys() == theirs.keys()
        assert list(ours.values()) == pytest.approx(list(theirs.values()), rel=1e-12)


def test_the_precomputed_answer_is_the_live_blend(served: tuple[LoadedTarget, Published]) -> None:
    target, published = served
    topn = target.user_topn
    assert topn is not None and topn.depth == MAX_K
    assert topn.weights == target.blend == BlendWeights()
    # Every user the model knows whose blend has a personal source is listed (here: all of them).
    assert set(topn.user_index) == set(published.als_users)
    live_target = dataclasses.replace(target, user_topn=None)
    for user in sorted(topn.user_index):
        for k in (1, 10, MAX_K):
            assert _precomputed(topn, user, k, BlendWeights()) is not None  # the lookup answers
            precomputed = recommend(target, user_id=user, k=k, exclude_seen=True, weights=BlendWeights())
            live = recommend(live_target, user_id=user, k=k, exclude_seen=True, weights=BlendWeights())
            assert_same_answer(precomputed, live)
        assert not set(precomputed.item_ids) & set(published.history.get(user, []))
    # And both are the documented blend, re-implemented independently of the server.
    user = sorted(topn.user_index)[0]
    result = recommend(target, user_id=user, k=10, exclude_seen=True)
    assert_same_ranking(
        list(zip(result.item_ids, result.scores, result.sources, strict=True)), published.expected(user, 10)
    )


def test_requests_the_lists_do_not_cover_use_the_live_blend(served: tuple[LoadedTarget, Published]) -> None:
    target, published = served
    topn = target.user_topn
    assert topn is not None
    user = sorted(topn.user_index)[0]
    assert _precomputed(topn, user, MAX_K + 1, BlendWeights()) is None
    assert _precomputed(topn, user, 10, OTHER_WEIGHTS) is None
    assert _precomputed(topn, "nobody", 10, BlendWeights()) is None
    live_target = dataclasses.replace(target, user_topn=None)
    context = [published.history[user][0]]
    for args in (
        {"exclude_seen": False},
        {"exclude_seen": True, "context_items": context},
        {"exclude_seen": True, "weights": OTHER_WEIGHTS},
    ):
        assert recommend(target, user_id=user, k=10, **args) == recommend(
            live_target, user_id=user, k=10, **args
        )


def test_building_twice_gives_the_same_version(clone: Path, home: Path) -> None:
    settings = settings_for(clone)
    published_version = current_paths(clone / "artifacts")[USER_TOPN.name].name
    (build,) = build_window_artifacts(
        USER_TOPN.name, settings.lake_root, settings.artifact_root, DAY, settings.pipeline
    )
    assert build.version == published_version
    assert build.rows == len(read_published(home / "artifacts").als_users)
    meta = read_meta(build.path)
    assert meta["params"] == {"top_n": MAX_K, "blend": dataclasses.asdict(BlendWeights())}
    assert meta["inputs"]["artifacts"] == {
        kind: path.name for kind, path in current_paths(clone / "artifacts").items() if kind != USER_TOPN.name
    }
    assert meta["inputs"]["canonical_events"], "publishing re-verifies the canonical days behind the lists"


def test_a_manifest_without_user_topn_still_serves(clone: Path, published: Published) -> None:
    root = clone / "artifacts"
    older = {kind: path for kind, path in current_paths(root).items() if kind != USER_TOPN.name}
    outcome = publish(root, TENANT, SURFACE, DAY, older, blend=published.manifest["blend"])
    assert outcome.action == "publish", outcome.message
    target = load_target(root, TENANT, SURFACE, read_current(root, TENANT, SURFACE))
    assert target.user_topn is None
    assert target.describe()["user_topn"] == {
        "served": False,
        "reason": "the manifest has no user_topn artifact",
    }
    user = sorted(published.als_users)[0]
    with TestClient(create_app(settings_for(clone))) as client:
        body = client.get(recs_url(user_id=user, k=10)).json()
    assert body["manifest_version"] == outcome.manifest_version
    assert_same_ranking(as_tuples(body), published.expected(user, 10))


def test_lists_computed_with_other_weights_are_not_served(clone: Path, published: Published) -> None:
    root = clone / "artifacts"
    paths = current_paths(root)
    # Published with other weights than the lists were computed with: the live blend, and the status says so.
    outcome = publish(root, TENANT, SURFACE, DAY, paths, blend=dataclasses.asdict(OTHER_WEIGHTS))
    assert outcome.action == "publish", outcome.message
    manifest = read_current(root, TENANT, SURFACE)
    target = load_target(root, TENANT, SURFACE, manifest)
    assert target.user_topn is None
    assert "computed with blend weights" in target.user_topn_note
    user = sorted(published.als_users)[0]
    with TestClient(create_app(settings_for(clone))) as client:
        body = client.get(recs_url(user_id=user, k=10)).json()
        status = client.get(f"/v1/manifest?tenant={TENANT}&surface={SURFACE}").json()
    assert status["user_topn"]["served"] is False and "live blend" in status["user_topn"]["reason"]
    assert_same_ranking(as_tuples(body), published.expected(user, 10, weights=OTHER_WEIGHTS))

    # A manifest without weights is ranked with the server's: the lists serve only when those match.
    publish(root, TENANT, SURFACE, DAY, paths)
    manifest = read_current(root, TENANT, SURFACE)
    assert "blend" not in manifest
    assert load_target(root, TENANT, SURFACE, manifest, weights=OTHER_WEIGHTS).user_topn is None
    assert load_target(root, TENANT, SURFACE, manifest, weights=BlendWeights()).user_topn is not None


def test_publishing_refuses_lists_that_do_not_fit_the_manifest(home: Path) -> None:
    paths = current_paths(home / "artifacts")
    assert derived_problems(paths, dataclasses.asdict(BlendWeights())) == []
    (weights,) = derived_problems(paths, dataclasses.asdict(OTHER_WEIGHTS))
    assert "user_topn was computed with blend weights" in weights
    other_cooc = paths["cooc"].parent / ("0" * 64)
    (versions,) = derived_problems(paths | {"cooc": other_cooc}, dataclasses.asdict(BlendWeights()))
    assert f"not the cooc {'0' * 12} published with it" in versions


def test_the_api_answers_a_known_user_from_user_topn(clone: Path, published: Published) -> None:
    """A user's list rewritten in reverse order (a valid artifact computed from the same inputs) is what a
    real server returns: the answer comes from user_topn, not from a blend."""
    root = clone / "artifacts"
    paths = current_paths(root)
    folder = paths[USER_TOPN.name]
    user = sorted(published.als_users)[0]
    row = pl.read_parquet(folder / USER_TOPN.table)["user_id"].to_list().index(user)
    offsets = np.load(folder / "offsets.npy")
    items = np.load(folder / "items.npy")
    contributions = np.load(folder / "contributions.npy")
    start, end = offsets[row], offsets[row + 1]
    items[start:end] = items[start:end][::-1]
    contributions[start:end] = contributions[start:end][::-1]
    meta = {key: value for key, value in read_meta(folder).items() if key not in ("version", "files", "rows")}
    files = {name: pl.read_parquet(folder / name) for name in (USER_TOPN.table, "item_ids.parquet")} | {
        "offsets.npy": offsets,
        "items.npy": items,
        "contributions.npy": contributions,
    }
    _, rewritten = write_artifact_dir(root / TENANT / SURFACE, USER_TOPN.name, meta, files)
    outcome = publish(
        root, TENANT, SURFACE, DAY, paths | {USER_TOPN.name: rewritten}, blend=published.manifest["blend"]
    )
    assert outcome.action == "publish", outcome.message
    expected = published.expected(user, MAX_K)
    with live_server(settings_for(clone)) as url, httpx.Client(base_url=url, timeout=10) as client:
        status = client.get(f"/v1/manifest?tenant={TENANT}&surface={SURFACE}").json()
        body = client.get(recs_url(user_id=user, k=MAX_K)).json()
        short = client.get(recs_url(user_id=user, k=3)).json()
        other = sorted(published.als_users)[1]
        untouched = client.get(recs_url(user_id=other, k=10)).json()
    assert status["manifest_version"] == outcome.manifest_version
    assert status["user_topn"]["served"] is True and status["user_topn"]["top_n"] == MAX_K
    assert [item["item_id"] for item in body["items"]] == [item for item, _, _ in expected][::-1]
    assert [item["score"] for item in body["items"]] == pytest.approx(
        [score for _, score, _ in expected][::-1], rel=1e-12
    )
    assert [item["item_id"] for item in short["items"]] == [item for item, _, _ in expected][::-1][:3]
    assert body["warnings"] == [] and all(item["sources"] for item in body["items"])
    assert_same_ranking(as_tuples(untouched), published.expected(other, 10))
