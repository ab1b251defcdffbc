"""Offline evaluation: metrics, holdouts, evaluate_models, guardrails (and their config section), report.

Every metric is checked against small examples worked out by hand in the comments; D(i) = 1 / log2(i + 1)
is the discount of position i (D(1) = 1, D(2) = 0.6309, D(3) = 0.5). The last test runs a popularity and
a random ranker on a temporal split of the real MovieLens sample.
"""

from __future__ import annotations

import datetime as dt
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
from shared_data import shared_data_dir

from recsys_core.settings import (
    RANKING_METRICS,
    ConfigError,
    GuardrailsConfig,
    ModelLifts,
    PipelineConfig,
    load_pipeline_config,
)
from recsys_dagster.evaluation.evaluate import METRICS, EvaluationResult, LongTailCurve, evaluate_models
from recsys_dagster.evaluation.guardrails import Violation, check_guardrails
from recsys_dagster.evaluation.holdout import (
    Holdout,
    item_popularity,
    random_holdout,
    temporal_holdout,
)
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
from recsys_dagster.evaluation.report import REPORT_FILE, write_report


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


# --------------------------------------------------------------------------------------------- holdout
T, S = "shop", "web"
DAY1, DAY2, DAY3 = dt.date(2025, 3, 1), dt.date(2025, 3, 2), dt.date(2025, 3, 3)


def interactions(rows: list[tuple[dt.date, str, str, float]]) -> pl.DataFrame:
    """user_item_daily rows (day, user, item, weight) of one tenant and surface."""
    return pl.DataFrame(
        {
            "day": [r[0] for r in rows],
            "tenant": T,
            "surface": S,
            "user_id": [r[1] for r in rows],
            "item_id": [r[2] for r in rows],
            "weight": [r[3] for r in rows],
            "events": 1,
            "last_ts": [dt.datetime.combine(r[0], dt.time(12), dt.UTC) for r in rows],
        },
        schema_overrides={"events": pl.Int64},
    )


# Day 3 is held out (holdout_days = 1):
#   u1: trained on a, b (day 1), c (day 2); on day 3 d (new: held out) and a (seen: dropped). 3 items: cold start
#   u2: trained on a, b, c, d; on day 3 e (in the catalog through u3): held out. 4 items: active
#   u3: trained on e, nothing on day 3: not evaluated
#   u4: only on day 3: no training, not evaluated
#   u5: trained on a; on day 3 only zzz, which no training row has: not evaluated
#   u6: a weight-0 row on day 2 (no interest), then c: no training, not evaluated
WINDOW = interactions(
    [
        (DAY1, "u1", "a", 1.0),
        (DAY1, "u1", "b", 3.0),
        (DAY2, "u1", "c", 1.0),
        (DAY3, "u1", "d", 1.0),
        (DAY3, "u1", "a", 5.0),
        *[(DAY1, "u2", item, 1.0) for item in "abcd"],
        (DAY3, "u2", "e", 1.0),
        (DAY2, "u3", "e", 1.0),
        (DAY3, "u4", "a", 1.0),
        (DAY1, "u5", "a", 1.0),
        (DAY3, "u5", "zzz", 1.0),
        (DAY2, "u6", "b", 0.0),
        (DAY3, "u6", "c", 1.0),
    ]
)


def test_temporal_holdout_by_hand() -> None:
    holdout = temporal_holdout(WINDOW)
    assert holdout.held_out == {"u1": {"d"}, "u2": {"e"}}
    assert list(holdout.held_out) == ["u1", "u2"]
    assert holdout.segments == {"all": {"u1", "u2"}, "cold_start": {"u1"}, "active": {"u2"}}
    # Training: every interest row before day 3 (u6's weight-0 row is no interaction).
    expected = WINDOW.filter((pl.col("day") < DAY3) & (pl.col("weight") > 0))
    assert holdout.training.equals(expected)
    assert item_popularity(holdout.training) == {"a": 3, "b": 2, "c": 2, "d": 1, "e": 1}


def test_temporal_holdout_of_two_days() -> None:
    # Training = day 1 only: u1 {a, b}, u2 {a, b, c, d}, u5 {a}. Held out, days 2-3: u1 c and d (a is
    # seen); u2's e and u5's zzz are not in the day-1 catalog; u3, u4, u6 have no training.
    holdout = temporal_holdout(WINDOW, holdout_days=2)
    assert holdout.held_out == {"u1": {"c", "d"}}
    assert holdout.segments["cold_start"] == {"u1"}


def test_cold_start_threshold_and_as_of() -> None:
    assert temporal_holdout(WINDOW, cold_start_max_interactions=4).segments["cold_start"] == {"u1", "u2"}
    assert temporal_holdout(WINDOW, cold_start_max_interactions=0).segments["cold_start"] == frozenset()
    # As of day 4, day 4 (no rows) is held out: nobody to evaluate, all three days train.
    later = temporal_holdout(WINDOW, as_of=DAY3 + dt.timedelta(days=1))
    assert later.held_out == {} and later.segments["all"] == frozenset()
    assert later.training.height == WINDOW.filter(pl.col("weight") > 0).height
    with pytest.raises(ValueError, match="after the as-of day"):
        temporal_holdout(WINDOW, as_of=DAY2)


def test_holdout_refuses_mixed_scopes_missing_columns_and_bad_parameters() -> None:
    other = WINDOW.head(1).with_columns(pl.lit("app").alias("surface"))
    with pytest.raises(ValueError, match="several tenants and surfaces"):
        temporal_holdout(pl.concat([WINDOW, other]))
    with pytest.raises(ValueError, match="weight"):
        temporal_holdout(WINDOW.drop("weight"))
    with pytest.raises(ValueError, match="holdout_days"):
        temporal_holdout(WINDOW, holdout_days=0)
    with pytest.raises(ValueError, match="no interactions"):
        temporal_holdout(WINDOW.clear())
    with pytest.raises(ValueError, match="test_fraction"):
        random_holdout(WINDOW, test_fraction=1.0)


def test_random_holdout_per_user_is_deterministic_and_excludes_training_items() -> None:
    # u1..u8: 8 distinct items each (i0..i7 over two days, i0 twice), so 2 held out each (floor of 25%).
    rows = [
        (DAY1 if n % 2 else DAY2, f"u{user}", f"i{(n + user) % 8}", 1.0)
        for user in range(8)
        for n in range(8)
    ]
    rows += [(DAY3, f"u{user}", f"i{user % 8}", 2.0) for user in range(8)]
    frame = interactions(rows)
    holdout = random_holdout(frame, 0.25, seed=7)
    assert set(holdout.held_out) == {f"u{user}" for user in range(8)}
    assert all(len(items) == 2 for items in holdout.held_out.values())
    training = holdout.training
    for user, items in holdout.held_out.items():
        # Every row of a held-out pair left training, on every day.
        assert training.filter((pl.col("user_id") == user) & pl.col("item_id").is_in(list(items))).height == 0
        assert training.filter(pl.col("user_id") == user)["item_id"].n_unique() == 6
    assert (
        training.height
        + sum(
            frame.filter((pl.col("user_id") == user) & pl.col("item_id").is_in(list(items))).height
            for user, items in holdout.held_out.items()
        )
        == frame.height
    )
    # The same pairs in another order, same seed: same split; another seed: another split.
    assert random_holdout(frame.reverse(), 0.25, seed=7).held_out == holdout.held_out
    assert random_holdout(frame, 0.25, seed=8).held_out != holdout.held_out
    # Users with fewer than 4 items keep them all (floor(3 * 0.25) = 0): only u1 and u2 have 4 or more.
    assert set(random_holdout(WINDOW, 0.25).held_out) <= {"u1", "u2"}


# -------------------------------------------------------------------------------------------- evaluate
def small_holdout() -> Holdout:
    held_out = {"u1": frozenset({"b"}), "u2": frozenset({"a", "c"})}
    return Holdout(
        training=WINDOW,
        held_out=held_out,
        segments={"all": frozenset(held_out), "cold_start": frozenset(), "active": frozenset(held_out)},
    )


def test_evaluate_models_scores_every_model_and_segment() -> None:
    popularity = {"a": 3, "b": 2, "c": 1}
    ranked = {"u1": ["a", "b", "c"], "u2": ["a", "b", "c"]}
    models = {"fixed": lambda user, k: ranked[user], "nothing": lambda user, k: []}
    result = evaluate_models(models, small_holdout(), 2, 3, popularity)
    assert result.users == {"all": 2, "cold_start": 0, "active": 2}
    assert result.models == ("fixed", "nothing")
    # No cold-start user: no metrics for that segment.
    assert set(result.metrics["fixed"]) == {"all", "active"}
    fixed = result.metrics["fixed"]["all"]
    assert list(fixed) == list(METRICS)
    # k = 2: u1 a b (hit at 2), u2 a b (hit at 1, |T| = 2).
    assert fixed["precision"] == pytest.approx((1 / 2 + 1 / 2) / 2)
    assert fixed["ndcg"] == pytest.approx((D2 / D1 + D1 / (D1 + D2)) / 2)
    assert fixed["coverage"] == pytest.approx(2 / 3)
    # Head at 80% of 6 interactions: a (3), b (5), c (6) -> {a, b}; no slot in the tail.
    assert result.head_size == 2 and fixed["long_tail_share"] == 0.0
    assert result.metrics["nothing"]["all"] == dict.fromkeys(METRICS, 0.0)
    assert result.long_tail.ranks == (1, 2, 3)
    assert result.long_tail.training == pytest.approx((0.5, 5 / 6, 1.0))
    assert result.long_tail.models["fixed"] == pytest.approx((0.5, 1.0, 1.0))
    assert result.value("fixed", "cold_start", "ndcg") is None

    rows = result.to_rows()
    assert len(rows) == 2 * 2 * len(METRICS)
    assert rows[0] == {"model": "fixed", "segment": "all", "metric": "precision", "value": 0.5, "users": 2}
    again = evaluate_models(models, small_holdout(), 2, 3, popularity)
    assert again.to_json() == result.to_json()
    assert EvaluationResult.from_json(result.to_json()) == result


# ------------------------------------------------------------------------------------------ guardrails
def result_of(ndcg: dict[str, dict[str, float]], coverage: dict[str, float], k: int = 10) -> EvaluationResult:
    """A result with the given nDCG per model and segment and coverage per model (all users)."""
    metrics = {
        model: {
            segment: dict.fromkeys(METRICS, 0.0)
            | {"ndcg": value, "coverage": coverage[model] if segment == "all" else 0.0}
            for segment, value in segments.items()
        }
        for model, segments in ndcg.items()
    }
    return EvaluationResult(
        k=k,
        catalog_size=1000,
        head_share=0.8,
        head_size=100,
        users={"all": 500, "cold_start": 100, "active": 400},
        metrics=metrics,
        long_tail=LongTailCurve((1,), (0.0,), {model: (0.0,) for model in ndcg}),
    )


HEALTHY = result_of(
    {
        "popularity": {"all": 0.050, "cold_start": 0.040},
        "blend": {"all": 0.055, "cold_start": 0.038},
        "als": {"all": 0.080, "cold_start": 0.020},
    },
    {"popularity": 0.01, "blend": 0.10, "als": 0.08},
)


def test_healthy_result_passes_the_default_guardrails() -> None:
    assert check_guardrails(HEALTHY, None, GuardrailsConfig()) == []
    assert check_guardrails(HEALTHY, HEALTHY, GuardrailsConfig()) == []


def test_a_blend_below_popularity_is_blocked_with_a_message_naming_everything() -> None:
    crippled = result_of(
        {"popularity": {"all": 0.050}, "blend": {"all": 0.031}}, {"popularity": 0.01, "blend": 0.10}
    )
    config = GuardrailsConfig(min_lift_over_popularity=ModelLifts(als=-0.5, blend=0.0))
    assert check_guardrails(crippled, None, config) == [
        Violation(
            rule="min_lift_over_popularity.blend",
            model="blend",
            segment="all",
            metric="ndcg",
            value=0.031,
            threshold=0.0,
            message="blend ndcg@10 (all users) 0.031 is 38% below popularity's 0.050; "
            "guardrails.min_lift_over_popularity.blend = 0.0",
        )
    ]
    # The default lets the blend be up to 25% below popularity: 0.031 is 38% below.
    assert [v.rule for v in check_guardrails(crippled, None, GuardrailsConfig())] == [
        "min_lift_over_popularity.blend"
    ]


def test_each_guardrail_names_its_metric_segment_value_and_key() -> None:
    crippled = result_of(
        {
            "popularity": {"all": 0.050, "cold_start": 0.040},
            # 0.036 is 28% below popularity (floor 0.75 * 0.050 = 0.0375) and 35% below the published
            # 0.055 (floor 0.8 * 0.055 = 0.044); cold start 0.020 is 50% below 0.040 (floor 0.6 * 0.040).
            "blend": {"all": 0.036, "cold_start": 0.020},
            # ALS: 0.020 is 60% below popularity (floor 0.5 * 0.050) and 75% below the published 0.080
            # (floor 0.064); its cold-start floor is 0 * 0.040; coverage 0.005 is half popularity's.
            "als": {"all": 0.020, "cold_start": 0.0},
        },
        {"popularity": 0.01, "blend": 0.10, "als": 0.005},
    )
    messages = [v.message for v in check_guardrails(crippled, HEALTHY, GuardrailsConfig())]
    assert messages == [
        "als ndcg@10 (all users) 0.020 is 60% below popularity's 0.050; "
        "guardrails.min_lift_over_popularity.als = -0.5",
        "als ndcg@10 (all users) 0.020 is 75% below the published version's 0.080; "
        "guardrails.max_relative_drop = 0.2",
        "als coverage@10 (all users) 0.005 is 50% below popularity's 0.010; "
        "guardrails.min_coverage_vs_popularity = 1.0",
        "blend ndcg@10 (all users) 0.036 is 28% below popularity's 0.050; "
        "guardrails.min_lift_over_popularity.blend = -0.25",
        "blend ndcg@10 (cold-start users) 0.020 is 50% below popularity's 0.040; "
        "guardrails.min_cold_start_lift_over_popularity.blend = -0.4",
        "blend ndcg@10 (all users) 0.036 is 35% below the published version's 0.055; "
        "guardrails.max_relative_drop = 0.2",
    ]


def test_a_positive_lift_is_required_when_configured() -> None:
    config = GuardrailsConfig(min_lift_over_popularity=ModelLifts(als=0.7, blend=0.0))
    (violation,) = check_guardrails(HEALTHY, None, config)
    assert violation.message == (
        "als ndcg@10 (all users) 0.080 is 60% above popularity's 0.050; "
        "guardrails.min_lift_over_popularity.als = 0.7"
    )


def test_guardrails_skip_what_cannot_be_compared() -> None:
    only_popularity = result_of({"popularity": {"all": 0.05}}, {"popularity": 0.01})
    assert check_guardrails(only_popularity, HEALTHY, GuardrailsConfig()) == []
    collapsed = result_of(
        {"popularity": {"all": 0.05}, "blend": {"all": 0.01}}, {"popularity": 0.01, "blend": 0.0}
    )
    assert check_guardrails(collapsed, None, GuardrailsConfig(enabled=False)) == []
    # A published result at another k is not compared with.
    dropped = result_of(
        {"popularity": {"all": 0.05}, "blend": {"all": 0.05}}, {"popularity": 0.01, "blend": 0.1}
    )
    published_at_20 = result_of(
        {"popularity": {"all": 0.5}, "blend": {"all": 0.5}}, {"popularity": 0.01, "blend": 0.1}, k=20
    )
    assert check_guardrails(dropped, published_at_20, GuardrailsConfig()) == []
    with pytest.raises(ValueError, match="no 'popularity' baseline"):
        check_guardrails(result_of({"blend": {"all": 0.05}}, {"blend": 0.1}), None, GuardrailsConfig())


# ---------------------------------------------------------------------------------- guardrails config
def config_from(tmp_path: Path, text: str) -> PipelineConfig:
    path = tmp_path / "recsys.yaml"
    path.write_text(text, encoding="utf-8")
    return load_pipeline_config(path)


def test_guardrails_defaults() -> None:
    guardrails = PipelineConfig().guardrails
    assert guardrails == GuardrailsConfig()
    assert (guardrails.enabled, guardrails.k, guardrails.holdout_days) == (True, 10, 1)
    assert (guardrails.cold_start_max_interactions, guardrails.metric) == (3, "ndcg")
    assert guardrails.min_lift_over_popularity == ModelLifts(als=-0.5, blend=-0.25)
    assert guardrails.min_cold_start_lift_over_popularity == ModelLifts(als=-1.0, blend=-0.4)
    assert (guardrails.max_relative_drop, guardrails.min_coverage_vs_popularity) == (0.2, 1.0)


def test_guardrails_section_is_read(tmp_path: Path) -> None:
    config = config_from(
        tmp_path,
        """
guardrails:
  enabled: false
  k: 20
  holdout_days: 2
  cold_start_max_interactions: 5
  metric: recall
  min_lift_over_popularity:
    blend: 0
  min_cold_start_lift_over_popularity:
    als: -0.9
    blend: -0.3
  max_relative_drop: 0.3
  min_coverage_vs_popularity: 2
""",
    )
    assert config.guardrails == GuardrailsConfig(
        enabled=False,
        k=20,
        holdout_days=2,
        cold_start_max_interactions=5,
        metric="recall",
        min_lift_over_popularity=ModelLifts(als=-0.5, blend=0.0),
        min_cold_start_lift_over_popularity=ModelLifts(als=-0.9, blend=-0.3),
        max_relative_drop=0.3,
        min_coverage_vs_popularity=2.0,
    )
    assert config_from(tmp_path, "guardrails:\n").guardrails == GuardrailsConfig()


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("guardrails:\n  k: 0\n", "guardrails.k"),
        ("guardrails:\n  k: 1.5\n", "guardrails.k"),
        ("guardrails:\n  k: true\n", "guardrails.k"),
        ("guardrails:\n  holdout_days: 0\n", "guardrails.holdout_days"),
        ("guardrails:\n  cold_start_max_interactions: -1\n", "guardrails.cold_start_max_interactions"),
        ("guardrails:\n  enabled: 'yes'\n", "guardrails.enabled"),
        ("guardrails:\n  enabled: 1\n", "guardrails.enabled"),
        ("guardrails:\n  metric: auc\n", "guardrails.metric"),
        ("guardrails:\n  max_relative_drop: 1.5\n", "guardrails.max_relative_drop"),
        ("guardrails:\n  max_relative_drop: -0.1\n", "guardrails.max_relative_drop"),
        ("guardrails:\n  min_coverage_vs_popularity: -1\n", "guardrails.min_coverage_vs_popularity"),
        ("guardrails:\n  min_lift_over_popularity: 0.1\n", "guardrails.min_lift_over_popularity"),
        (
            "guardrails:\n  min_lift_over_popularity:\n    blend: -2\n",
            "guardrails.min_lift_over_popularity.blend",
        ),
        (
            "guardrails:\n  min_cold_start_lift_over_popularity:\n    als: high\n",
            "guardrails.min_cold_start_lift_over_popularity.als",
        ),
        ("guardrails: [k]\n", "guardrails"),
    ],
)
def test_bad_guardrail_values_are_refused_with_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"(?<![\w.]){key}(?![\w.])"):
        config_from(tmp_path, text)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("guardrails:\n  min_coverage: 0.1\n", "guardrails.min_coverage"),
        (
            "guardrails:\n  min_lift_over_popularity:\n    cooc: 0\n",
            "guardrails.min_lift_over_popularity.cooc",
        ),
    ],
)
def test_unknown_guardrail_keys_are_refused(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"unknown config key\(s\): {key}$"):
        config_from(tmp_path, text)


# ---------------------------------------------------------------------------------------------- report
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_report_files_links_and_identical_bytes(tmp_path: Path) -> None:
    context: dict[str, Any] = {"tenant": T, "surface": S, "as of": "2025-03-03", "note": "a | b"}
    out = tmp_path / "report"
    path = write_report(HEALTHY, out, "Evaluation shop/web", context)
    assert path == out / REPORT_FILE
    markdown = path.read_text(encoding="utf-8")
    assert markdown.startswith("# Evaluation shop/web\n")
    assert "| note | a \\| b |" in markdown
    assert "| blend | 0.0000 | 0.0000 | 0.0550 |" in markdown
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == sorted(
        [f"metric-{metric}.png" for metric in METRICS]
        + ["segment-all.png", "segment-cold_start.png", "segment-active.png", "long-tail.png"]
    )
    for name in pngs:
        assert (out / name).read_bytes().startswith(PNG_SIGNATURE)
        assert f"]({name})" in markdown
    first = {p.name: p.read_bytes() for p in out.iterdir()}

    # Written again over the first: the same bytes, and nothing left beside the report directory.
    write_report(HEALTHY, out, "Evaluation shop/web", context)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first
    assert [p.name for p in tmp_path.iterdir()] == ["report"]


# ------------------------------------------------------------------------------------------- real data
# MovieLens "latest small" (GroupLens; F. M. Harper and J. A. Konstan, 2015, "The MovieLens Datasets:
# History and Context", ACM TiiS 5(4); research use only).


@pytest.fixture(scope="module")
def movielens_interactions() -> pl.DataFrame:
    found = shared_data_dir()
    if found is None:
        pytest.skip("shared data sets (MovieLens) not found: set RECSYS_SHARED_DATA")
    ratings = pl.read_csv(
        found / "ml-latest-small" / "ratings.csv",
        schema_overrides={"userId": pl.String, "movieId": pl.String},
    )
    # The user_item_daily rows the pipeline makes of it: one rating = one event of weight 1 on its UTC day.
    rated_at = pl.from_epoch("timestamp", time_unit="s").dt.replace_time_zone("UTC")
    return ratings.select(
        day=rated_at.dt.date(),
        tenant=pl.lit("ml"),
        surface=pl.lit("movies"),
        user_id="userId",
        item_id="movieId",
        weight=pl.lit(1.0),
        events=pl.lit(1, pl.Int64),
        last_ts=rated_at,
    )


def test_popularity_beats_random_on_a_temporal_split_of_movielens(
    movielens_interactions: pl.DataFrame,
) -> None:
    # MovieLens users rarely come back: the last day has one rating user. The last year holds 25 users
    # who rated before it too.
    holdout = temporal_holdout(movielens_interactions, holdout_days=365)
    popularity = item_popularity(holdout.training)
    by_popularity = sorted(popularity, key=lambda item: (-popularity[item], item))
    catalog = sorted(popularity)
    seen = {
        user: set(items) for user, items in holdout.training.group_by("user_id").agg("item_id").iter_rows()
    }

    def most_popular(user: str, k: int) -> list[str]:
        return [item for item in by_popularity[: k + len(seen[user])] if item not in seen[user]][:k]

    def at_random(user: str, k: int) -> list[str]:
        rng = np.random.default_rng(int(user))
        return [catalog[i] for i in rng.choice(len(catalog), k, replace=False)]

    result = evaluate_models(
        {"popularity": most_popular, "random": at_random}, holdout, 10, len(popularity), popularity
    )
    assert result.users["all"] == 25
    popular_precision = result.value("popularity", "all", "precision")
    random_precision = result.value("random", "all", "precision")
    assert popular_precision is not None and random_precision is not None
    # Measured: 0.116 against 0.012.
    assert popular_precision > random_precision
