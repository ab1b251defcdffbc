"""Offline evaluation: the ranking metrics.

Every metric is checked against small examples worked out by hand in the comments; D(i) = 1 / log2(i + 1)
is the discount of position i (D(1) = 1, D(2) = 0.6309, D(3) = 0.5).
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from recsys_core.settings import RANKING_METRICS
from recsys_dagster.evaluation.metrics import (
    catalog_coverage,
    curve_ranks,
    hit_rate_at_k,
    long_tail_share,
    map_at_k,
    ndcg_at_k,
    popularity_head,
    precision_at_k,
    rank_lists,
    recall_at_k,
    score_users,
    training_share_by_rank,
)


def discount(position: int) -> float:
    return 1 / math.log2(position + 1)


D1, D2, D3 = discount(1), discount(2), discount(3)

# --------------------------------------------------------------------------------------------- metrics
# At k = 3:
#   u1: top 3 = a b c, relevant {b, d, z}: hits 0 1 0
#   u2: top 3 = x a (only two), relevant {a}: hits 0 1
#   u3: no recommendations, relevant {a}: nothing
#   u4: no held-out item: not scored; u5: recommendations but not in held_out: not scored
RECOMMENDATIONS = {"u1": ["a", "b", "c", "d"], "u2": ["x", "a"], "u5": ["a", "b"]}
HELD_OUT = {"u1": {"b", "d", "z"}, "u2": {"a"}, "u3": {"a"}, "u4": set()}


def test_per_user_values_by_hand() -> None:
    scores = score_users(RECOMMENDATIONS, HELD_OUT, 3)
    assert scores.lists.users == ("u1", "u2", "u3")
    values = {metric: scores.values[metric].tolist() for metric in RANKING_METRICS}
    assert set(scores.values) == set(RANKING_METRICS)
    # precision: hits / k, k = 3 even for u2's two items.
    assert values["precision"] == pytest.approx([1 / 3, 1 / 3, 0])
    # recall: hits / |relevant|.
    assert values["recall"] == pytest.approx([1 / 3, 1 / 1, 0])
    # nDCG: u1 DCG = D(2), ideal over min(3, 3) = 3 positions; u2 DCG = D(2), ideal over min(3, 1) = 1.
    assert values["ndcg"] == pytest.approx([D2 / (D1 + D2 + D3), D2 / D1, 0])
    # AP: u1 (1 / min(3, 3)) * (precision at 2 = 1/2); u2 (1 / min(3, 1)) * (1/2).
    assert values["map"] == pytest.approx([(1 / 3) * (1 / 2), 1 / 2, 0])
    assert values["hit_rate"] == [1.0, 1.0, 0.0]


def test_means_over_the_scored_users() -> None:
    assert precision_at_k(RECOMMENDATIONS, HELD_OUT, 3) == pytest.approx((1 / 3 + 1 / 3 + 0) / 3)
    assert recall_at_k(RECOMMENDATIONS, HELD_OUT, 3) == pytest.approx((1 / 3 + 1 + 0) / 3)
    assert ndcg_at_k(RECOMMENDATIONS, HELD_OUT, 3) == pytest.approx((D2 / (D1 + D2 + D3) + D2) / 3)
    assert map_at_k(RECOMMENDATIONS, HELD_OUT, 3) == pytest.approx((1 / 6 + 1 / 2) / 3)
    assert hit_rate_at_k(RECOMMENDATIONS, HELD_OUT, 3) == pytest.approx(2 / 3)


def test_ideal_ranking_scores_one_and_only_the_first_k_count() -> None:
    recommendations = {"u": ["a", "b", "c", "x"]}
    held_out = {"u": {"a", "b", "c", "d", "e"}}
    # Three hits in the top 3 with 5 relevant items: a perfect list of 3.
    assert ndcg_at_k(recommendations, held_out, 3) == pytest.approx(1.0)
    assert map_at_k(recommendations, held_out, 3) == pytest.approx(1.0)
    assert precision_at_k(recommendations, held_out, 3) == pytest.approx(1.0)
    assert recall_at_k(recommendations, held_out, 3) == pytest.approx(3 / 5)
    # At k = 4, x is a miss at position 4: AP = (1/4) * (1 + 1 + 1 + 0); IDCG over min(4, 5) = 4.
    assert map_at_k(recommendations, held_out, 4) == pytest.approx(3 / 4)
    assert ndcg_at_k(recommendations, held_out, 4) == pytest.approx(
        (D1 + D2 + D3) / (D1 + D2 + D3 + discount(4))
    )


def test_a_late_hit_and_a_single_relevant_item() -> None:
    # One relevant item found at position 3 of 3: DCG = D(3), IDCG = D(1); AP = (1 / 1) * (1 / 3).
    recommendations, held_out = {"u": ["x", "y", "a"]}, {"u": {"a"}}
    assert ndcg_at_k(recommendations, held_out, 3) == pytest.approx(D3)
    assert map_at_k(recommendations, held_out, 3) == pytest.approx(1 / 3)
    assert hit_rate_at_k(recommendations, held_out, 2) == 0.0


def test_a_repeated_item_in_the_top_k_is_refused() -> None:
    with pytest.raises(ValueError, match=r"user 'u1' list item 'b' more than once"):
        precision_at_k({"u1": ["a", "b", "b"]}, {"u1": {"b"}}, 3)
    with pytest.raises(ValueError, match="more than once"):
        catalog_coverage({"u1": ["a", "a"]}, 2, 10)
    # Past k, nothing is read: a repeat there does not count.
    assert precision_at_k({"u1": ["a", "b", "b"]}, {"u1": {"b"}}, 2) == pytest.approx(1 / 2)


def test_undefined_inputs_are_errors() -> None:
    with pytest.raises(ValueError, match="no scored user"):
        precision_at_k({"u": ["a"]}, {"u": set()}, 1)
    with pytest.raises(ValueError, match="k must be >= 1"):
        precision_at_k({"u": ["a"]}, {"u": {"a"}}, 0)
    with pytest.raises(ValueError, match="catalog_size"):
        catalog_coverage({"u": ["a"]}, 1, 0)


def test_catalog_coverage_and_long_tail_share() -> None:
    # Top 2 of each list: {a, b}, {b, c}, {} -> 3 distinct items of a catalog of 6.
    recommendations = {"u1": ["a", "b", "z"], "u2": ["b", "c"], "u3": []}
    assert catalog_coverage(recommendations, 2, 6) == pytest.approx(3 / 6)
    # Slots a, b, b, c; head {a, b}: 1 of 4 slots in the tail.
    assert long_tail_share(recommendations, 2, frozenset({"a", "b"})) == pytest.approx(1 / 4)
    assert long_tail_share({"u": []}, 2, frozenset({"a"})) == 0.0


def test_popularity_head_is_the_most_popular_items_reaching_the_share() -> None:
    popularity = {"a": 50, "b": 30, "c": 10, "d": 5, "e": 5}  # 100 interactions
    assert popularity_head(popularity, 0.8) == {"a", "b"}  # 50 + 30 = 80 reaches 80
    assert popularity_head(popularity, 0.81) == {"a", "b", "c"}  # 90
    assert popularity_head(popularity, 1.0) == set(popularity)
    # Ties are broken by item id: y and x have one interaction each, x comes first.
    assert popularity_head({"y": 1, "x": 1}, 0.5) == {"x"}
    assert popularity_head({}, 0.8) == frozenset()
    with pytest.raises(ValueError, match="head_share"):
        popularity_head(popularity, 0.0)


def test_long_tail_curves() -> None:
    popularity = {"a": 6, "b": 3, "c": 1}  # ranks a 1, b 2, c 3; 10 interactions
    assert training_share_by_rank(popularity, [1, 2, 3]) == pytest.approx([0.6, 0.9, 1.0])
    # Slots a, b, c, q: q is not in the training catalog, so the curve ends at 3/4.
    lists = rank_lists({"u1": ["a", "b"], "u2": ["c", "q"]}, 2)
    assert lists.cumulative_share_by_rank(popularity, [1, 2, 3]) == pytest.approx([0.25, 0.5, 0.75])
    assert curve_ranks(1) == [1]
    ranks = curve_ranks(5000)
    assert ranks[0] == 1 and ranks[-1] == 5000 and ranks == sorted(set(ranks))


def test_metrics_of_100000_users_take_well_under_a_second() -> None:
    rng = np.random.default_rng(0)
    items = [f"i{i}" for i in range(50_000)]
    # Ten distinct items per user (steps of 4,999 never meet within ten), five held out at random.
    ranked = (rng.integers(0, 50_000, (100_000, 1)) + np.arange(10) * 4_999) % 50_000
    recommendations = {f"u{u}": [items[i] for i in row] for u, row in enumerate(ranked.tolist())}
    relevant = rng.integers(0, 50_000, (100_000, 5)).tolist()
    held_out = {f"u{u}": {items[i] for i in row} for u, row in enumerate(relevant)}
    started = time.process_time()
    scores = score_users(recommendations, held_out, 10)
    scores.lists.coverage(len(items))
    scores.lists.long_tail_share(frozenset(items[:1000]))
    # About 0.5 s of CPU measured on a loaded 2-core machine; the bound only catches a slower algorithm.
    assert time.process_time() - started < 2.0
