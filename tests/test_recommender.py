"""The recommender module without HTTP: seeds, exclusions and warnings over a target loaded from the
artifacts that the real pipeline steps published (`test_serving`'s fixture data)."""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from test_serving import (
    SURFACE,
    TENANT,
    Published,
    assert_same_ranking,
    build_published_home,
    read_published,
    users_with_cooc,
)

from recsys_core.kinds import ARTIFACT_KINDS
from recsys_core.manifest import read_current
from recsys_core.settings import BlendWeights
from recsys_dagster.publishing.protocol import publish
from recsys_dagster.transform.artifact_dir import write_artifact_dir
from recsys_dagster.transform.artifacts import polars_schema
from recsys_serving import blend as blend_module
from recsys_serving import recommender
from recsys_serving.blend import SOURCE_ALS, blend
from recsys_serving.ranking import SOURCE_COOC, SOURCE_POPULARITY
from recsys_serving.recommender import Recommendation, recommend
from recsys_serving.store import LoadedTarget, load_target


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_published_home(tmp_path_factory.mktemp("serving"))


@pytest.fixture(scope="module")
def published(home: Path) -> Published:
    return read_published(home / "artifacts")


@pytest.fixture(scope="module")
def target(home: Path) -> LoadedTarget:
    root = home / "artifacts"
    return load_target(root, TENANT, SURFACE, read_current(root, TENANT, SURFACE))


def as_tuples(result: Recommendation) -> list[tuple[str, float, str]]:
    assert len(result.item_ids) == len(result.scores) == len(result.sources)
    return list(zip(result.item_ids, result.scores, result.sources, strict=True))


def codes(result: Recommendation) -> list[str]:
    return [warning["code"] for warning in result.warnings]


def test_a_known_user_gets_the_blend_of_their_model_factors_and_recent_items(
    target: LoadedTarget, published: Published
) -> None:
    users = [u for u in users_with_cooc(published, 2) if u in published.als_users]
    assert len(users) >= 5
    for user in users[:10]:
        result = recommend(target, user_id=user, k=10, exclude_seen=True)
        assert_same_ranking(as_tuples(result), published.expected(user, 10))
        assert any(SOURCE_ALS in contribution for contribution in result.contributions)
        assert not set(result.item_ids) & set(published.history[user])
        assert result.warnings == []
    # The model alone ranks by the user's factors: the top item is the best-scoring unseen item.
    user = users[0]
    als_only = recommend(target, user_id=user, k=3, exclude_seen=True, weights=BlendWeights(1.0, 0.0, 0.0))
    scores = published.item_factors.astype("float64") @ published.user_factors[published.als_users[user]]
    unseen = [
        i for i in np.argsort(-scores, kind="stable") if published.als_items[i] not in published.history[user]
    ]
    assert als_only.item_ids[0] == published.als_items[unseen[0]]
    assert set(als_only.sources) == {SOURCE_ALS}


def test_a_user_unknown_to_the_model_is_folded_in_from_the_context_items(
    target: LoadedTarget, published: Published
) -> None:
    context = sorted(published.neighbors, key=lambda i: -len(published.neighbors[i]))[:3]
    result = recommend(target, user_id="not-in-the-model", context_items=context, k=10, exclude_seen=True)
    folded = target.als.fold_in([target.item_index[i] for i in context], [1.0] * len(context))
    assert_same_ranking(as_tuples(result), published.expected(None, 10, context=context, folded=folded))
    assert any(SOURCE_ALS in contribution for contribution in result.contributions)
    assert result.warnings == []


def test_fold_in_agrees_with_implicits_recalculate_user(target: LoadedTarget, published: Published) -> None:
    import scipy.sparse as sp
    from implicit.cpu.als import AlternatingLeastSquares

    als = target.als
    params = published.manifest["artifacts"]["als"]
    assert params["version"]
    model = AlternatingLeastSquares(
        factors=als.item_factors.shape[1], regularization=als.regularization, alpha=als.alpha
    )
    model.item_factors = als.item_factors.astype(np.float32)
    model.user_factors = np.zeros((1, als.item_factors.shape[1]), dtype=np.float32)
    items = [target.item_index[i] for i in published.history[sorted(published.history)[0]][:8]]
    weights = [1.0 + (n % 3) for n in range(len(items))]
    row = sp.csr_matrix((weights, ([0] * len(items), items)), shape=(1, target.n_items), dtype=np.float32)
    expected = model.recalculate_user(0, row)
    assert np.allclose(als.fold_in(items, weights), expected, rtol=1e-3, atol=1e-4)


def test_context_items_replace_the_history_as_seeds(target: LoadedTarget, published: Published) -> None:
    user = users_with_cooc(published, 2)[0]
    from_history = recommend(target, user_id=user, k=10, exclude_seen=True)
    context = next(
        item
        for item in sorted(published.neighbors, key=lambda i: -len(published.neighbors[i]))
        if item not in published.history[user]
    )
    result = recommend(target, user_id=user, context_items=[context], k=10, exclude_seen=True)
    assert_same_ranking(as_tuples(result), published.expected(user, 10, context=[context]))
    cooc = [
        item
        for item, contribution in zip(result.item_ids, result.contributions, strict=True)
        if SOURCE_COOC in contribution
    ]
    assert cooc and set(cooc) <= {n for n, _ in published.neighbors[context]}
    assert context not in result.item_ids
    assert result.item_ids != from_history.item_ids
    assert result.warnings == []


def test_unknown_context_items_are_reported_and_the_known_ones_still_seed(
    target: LoadedTarget, published: Published
) -> None:
    context = max(sorted(published.neighbors), key=lambda i: len(published.neighbors[i]))
    result = recommend(target, context_items=["no-such-item", context], k=5, exclude_seen=True)
    assert SOURCE_COOC in result.contributions[0]
    assert result.warnings == [
        {
            "code": recommender.CONTEXT_ITEMS_UNKNOWN,
            "message": "1 context item(s) are not in the served catalog and were ignored",
            "items": ["no-such-item"],
        }
    ]


def test_seeds_without_neighbours_fall_back_to_popular_items(
    target: LoadedTarget, published: Published
) -> None:
    # Without the model (weight 0 here, or a manifest without als) a seed with no neighbours leaves only
    # the popular list.
    no_model = BlendWeights(als=0.0, cooc=0.3, popularity=0.05)
    lonely = next(item for item, _ in published.popular if item not in published.neighbors)
    result = recommend(target, context_items=[lonely], k=5, exclude_seen=True, weights=no_model)
    expected = published.expected(None, 5, context=[lonely], weights=no_model)
    assert [item for item, _, _ in expected] == [item for item, _ in published.popular if item != lonely][:5]
    assert as_tuples(result) == expected
    assert codes(result) == [recommender.NO_COOC_CANDIDATES]


def test_an_unknown_user_gets_popular_items_and_a_warning(target: LoadedTarget, published: Published) -> None:
    top = published.expected(None, 7)
    assert [item for item, _, _ in top] == [item for item, _ in published.popular[:7]]
    unknown = recommend(target, user_id="never-seen-user", k=7, exclude_seen=True)
    assert as_tuples(unknown) == top and set(unknown.sources) == {SOURCE_POPULARITY}
    assert codes(unknown) == [recommender.UNKNOWN_USER]
    anonymous = recommend(target, k=7, exclude_seen=True)
    assert as_tuples(anonymous) == top
    assert codes(anonymous) == [recommender.ANONYMOUS]


def test_exclude_seen_decides_whether_history_items_come_back(
    target: LoadedTarget, published: Published
) -> None:
    # Context items are the seeds, so the history is left out only by exclude_seen.
    context = max(sorted(published.neighbors), key=lambda i: len(published.neighbors[i]))
    came_back = 0
    for user in sorted(published.history)[:40]:
        history = set(published.history[user]) - {context}
        kept_out = recommend(target, user_id=user, context_items=[context], k=50, exclude_seen=True)
        assert not set(kept_out.item_ids) & history
        allowed = recommend(target, user_id=user, context_items=[context], k=50, exclude_seen=False)
        assert context not in allowed.item_ids
        came_back += bool(set(allowed.item_ids) & history)
    assert came_back > 0, "with exclude_seen=False some users should get history items back"


def test_a_short_list_says_how_many_items_were_left(target: LoadedTarget, published: Published) -> None:
    user = max(sorted(published.history), key=lambda u: len(published.history[u]))
    left = len(recommend(target, user_id=user, k=target.n_items, exclude_seen=True))
    assert 0 < left < target.n_items
    one_short = recommend(target, user_id=user, k=left + 1, exclude_seen=True)
    assert len(one_short) == left
    assert not set(one_short.item_ids) & set(published.history[user])
    assert one_short.warnings[-1] == {
        "code": recommender.FEWER_ITEMS,
        "message": f"only {left} items left to recommend",
    }
    exactly = recommend(target, user_id=user, k=left, exclude_seen=True)
    assert exactly.item_ids == one_short.item_ids
    assert recommender.FEWER_ITEMS not in codes(exactly)


@pytest.mark.parametrize("popular", [None, 12], ids=["as published", "12 popular items"])
def test_the_blend_scores_only_what_can_reach_the_top_and_agrees_with_the_exhaustive_sum_bit_for_bit(
    target: LoadedTarget, published: Published, popular: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With few popular items and small blocks, most of this small catalog is left to the ALS bound.
    computed: list[int] = []
    if popular is not None:
        monkeypatch.setattr(blend_module, "_ROWS", 16)
        monkeypatch.setattr(blend_module, "_STEP_ROWS", 16)
        extend = blend_module._AlsScores._extend

        def spy(self: blend_module._AlsScores, end: int) -> None:
            extend(self, end)
            computed.append(self._computed)

        monkeypatch.setattr(blend_module._AlsScores, "_extend", spy)
        prior = np.zeros(target.n_items)
        prior[target.popular_items[:popular]] = target.popularity_prior[target.popular_items[:popular]]
        target = dataclasses.replace(
            target,
            popular_items=target.popular_items[:popular],
            popular_scores=target.popular_scores[:popular],
            popularity_prior=prior,
        )
    assert target.als is not None
    rng = np.random.default_rng(3)
    users = sorted(published.als_users)[:25]
    cases: list[tuple[np.ndarray | None, list[int], set[int]]] = []
    for user in users:
        history = target.history_with_weights(user)
        items = history[0] if history else []
        vector = target.als.user_vector(user)
        cases.append((vector, items[:5], set(items)))
        cases.append((vector, [], set()))
        assert vector is not None
        cases.append((-vector, items[:2], set(items[:2])))  # a user every item scores below 0 for, or most
    for _ in range(10):
        seeds = rng.choice(target.n_items, size=3, replace=False).tolist()
        cases.append((target.als.fold_in(seeds, [1.0] * 3), seeds, set(seeds)))
    cases.append((None, [], set()))
    for weights in (
        BlendWeights(),
        BlendWeights(1.0, 0.0, 0.0),
        BlendWeights(1.0, 0.3, 0.0),
        BlendWeights(0.0, 1.0, 0.5),
        BlendWeights(0.2, 1.0, 1.0),
    ):
        for vector, seeds, excluded in cases:
            for k in (1, 10, 40, target.n_items):
                args = {
                    "user_vector": vector,
                    "seeds": seeds,
                    "excluded": excluded,
                    "k": k,
                    "weights": weights,
                }
                fast = blend(target, **args)
                exhaustive = blend(target, exhaustive=True, **args)
                assert (fast.items, fast.scores, fast.contributions, fast.sources_used) == (
                    exhaustive.items,
                    exhaustive.scores,
                    exhaustive.contributions,
                    exhaustive.sources_used,
                )
    if popular is not None:
        assert min(computed) < target.n_items  # some requests did not score every item


def test_equal_blended_scores_follow_the_popularity_ranking_then_the_item_id(tmp_path: Path) -> None:
    """Hand-made artifacts with equal scores, published through the real publishing code: the popularity
    artifact ranks c, b, a (equal scores, ordered by their reach, not by id)."""
    root = tmp_path / "artifacts"
    meta = {"tenant": "ties", "surface": "home", "as_of": "2026-11-21"}
    popularity = pl.DataFrame(
        {
            "rank": [1, 2, 3, 4],
            "item_id": ["p", "c", "b", "a"],
            "score": [9.0, 5.0, 5.0, 5.0],
            "events": [9] + [5] * 3,
        },
        schema=polars_schema(ARTIFACT_KINDS["popularity"]),
    )
    # Seed s: a, c and z are equally close neighbours.
    neighbors = pl.DataFrame(
        {
            "item_id": ["s"] * 3,
            "rank": [1, 2, 3],
            "neighbor_id": ["a", "c", "z"],
            "score": [0.5] * 3,
            "count": [3] * 3,
        },
        schema=polars_schema(ARTIFACT_KINDS["cooc"]),
    )
    paths = {
        kind: write_artifact_dir(root / "ties" / "home", kind, {**meta, "kind": kind}, {name: frame})[1]
        for kind, name, frame in (
            ("popularity", "items.parquet", popularity),
            ("cooc", "neighbors.parquet", neighbors),
        )
    }
    assert publish(root, "ties", "home", dt.date(2026, 11, 21), paths).action == "publish"
    target = load_target(root, "ties", "home", read_current(root, "ties", "home"))

    # Popular items only: c, b and a tie at 5/9 of p's score and keep the published order.
    assert recommend(target, k=4, exclude_seen=False).item_ids == ["p", "c", "b", "a"]
    # Neighbours only: c is popular before a; z, not popular at all, comes last.
    cooc_only = BlendWeights(als=0.0, cooc=1.0, popularity=0.0)
    assert recommend(target, context_items=["s"], k=3, exclude_seen=False, weights=cooc_only).item_ids == [
        "c",
        "a",
        "z",
    ]
    for exhaustive in (False, True):
        blended = blend(
            target,
            user_vector=None,
            seeds=[target.item_index["s"]],
            excluded={target.item_index["s"]},
            k=2,
            weights=cooc_only,
            exhaustive=exhaustive,
        )
        assert [target.item_ids[i] for i in blended.items] == ["c", "a"]
