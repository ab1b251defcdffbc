"""Daily aggregates (pair_daily, user_item_daily) and window artifacts (popularity, cooc, user_history).

The SQL models are checked against small hand-made canonical partitions whose answers are worked out in
the comments, and on the real MovieLens and OTTO samples against an independent computation in plain
Python (Counter / itertools, no SQL) from the source files themselves.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from decimal import Decimal
from itertools import combinations
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from shared_data import shared_data_dir

from recsys_core.kinds import ARTIFACT_KINDS, WINDOW_KINDS
from recsys_core.lake import AGGREGATE_FILE, SUMMARY_FILE, content_hash, partition_dir
from recsys_core.manifest import artifact_version, read_meta, verify_artifact
from recsys_core.settings import (
    AlsConfig,
    ArtifactsConfig,
    CoocConfig,
    IngestConfig,
    PipelineConfig,
    PopularityConfig,
    UserHistoryConfig,
)
from recsys_dagster.ingest.canonicalize import canonicalize_partition
from recsys_dagster.ingest.contract import CANONICAL_SCHEMA
from recsys_dagster.ingest.importers import import_file
from recsys_dagster.transform.aggregates import (
    DAILY_MODELS,
    DAYS_PER_QUERY,
    build_daily_aggregate,
    build_daily_aggregates,
    daily_aggregate_params,
)
from recsys_dagster.transform.artifacts import (
    build_window_artifacts,
    compute_window,
    polars_schema,
    window_days,
)
from recsys_dagster.transform.sql import run_sql

D1, D2, D3 = dt.date(2024, 5, 1), dt.date(2024, 5, 2), dt.date(2024, 5, 3)
WEIGHTS = [
    {"event_type": "click", "weight": 1.0},
    {"event_type": "add_to_cart", "weight": 0.5},
    {"event_type": "purchase", "weight": 5.0},
]
INTEREST = ["add_to_cart", "click", "purchase"]
# The default value scales: a rating's stars out of 5.
SCALES = PipelineConfig().value_scale_rows()


def _ts(day: dt.date, seconds: float) -> dt.datetime:
    return dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC) + dt.timedelta(seconds=seconds)


def write_canonical(lake: Path, day: dt.date, events: list[tuple]) -> None:
    """One canonical_events partition from (session, item, second of the day[, type[, user[, tenant[, value]]]]).

    Defaults: type click, user "u-<session>" (None = anonymous), tenant "t", no value; the surface is "home".
    """
    rows = []
    for n, (session, item, second, *rest) in enumerate(events):
        event_type = rest[0] if len(rest) > 0 else "click"
        user = rest[1] if len(rest) > 1 else f"u-{session}"
        tenant = rest[2] if len(rest) > 2 else "t"
        value = rest[3] if len(rest) > 3 else None
        rows.append(
            {
                "event_id": f"{day}-{n}",
                "ts": _ts(day, second),
                "tenant": tenant,
                "surface": "home",
                "session_id": session,
                "user_id": user,
                "item_id": item,
                "event_type": event_type,
                "value": value,
                "rank": None,
                "request_id": None,
                "source_file": "test.jsonl",
                "source_line": n + 1,
            }
        )
    folder = partition_dir(lake, "canonical_events", day)
    folder.mkdir(parents=True, exist_ok=True)
    pl.DataFrame(rows, schema=CANONICAL_SCHEMA).write_parquet(folder / "part-00000.parquet")
    # The lineage hash is the one recorded at write time, as canonicalize_partition does.
    (folder / SUMMARY_FILE).write_text(json.dumps({"content_hash": content_hash(folder)}))


def aggregate_paths(lake: Path, model: str, days: list[dt.date]) -> list[str]:
    return [str(partition_dir(lake, model, d) / "part-00000.parquet") for d in days]


def build_aggregates(lake: Path, days: list[dt.date], config: PipelineConfig) -> None:
    for model in DAILY_MODELS:
        build_daily_aggregates(model, lake, days, daily_aggregate_params(model, config))


def pairs_of(frame: pl.DataFrame) -> dict[tuple, int]:
    return {(r["tenant"], r["item_a"], r["item_b"]): r["sessions"] for r in frame.iter_rows(named=True)}


def neighbors_of(frame: pl.DataFrame) -> dict[str, list[tuple[str, float, int]]]:
    out: dict[str, list] = defaultdict(list)
    for row in frame.sort("item_id", "rank").iter_rows(named=True):
        out[row["item_id"]].append((row["neighbor_id"], row["score"], row["count"]))
    return dict(out)


def config_with(**kinds: Any) -> PipelineConfig:
    return replace(PipelineConfig(), artifacts=replace(ArtifactsConfig(), **kinds))


def replace_kind(config: PipelineConfig, kind: str, **changes: Any) -> PipelineConfig:
    section = replace(getattr(config.artifacts, kind), **changes)
    return replace(config, artifacts=replace(config.artifacts, **{kind: section}))


# ----------------------------------------------------------------------------------------- pair_daily


def test_pair_daily_caps_sessions_and_counts_pairs_diagonal_and_totals(tmp_path: Path) -> None:
    write_canonical(
        tmp_path,
        D1,
        [
            # s1 in first-occurrence order: d@1, then a and b tie @2 (a first by id), d again (not new),
            # c@4 is the 4th distinct item: beyond a cap of 3. The exposure of z@0 is no interest.
            ("s1", "z", 0, "exposure"),
            ("s1", "d", 1),
            ("s1", "b", 2, "add_to_cart"),
            ("s1", "a", 2),
            ("s1", "d", 3),
            ("s1", "c", 4),
            # s2 has exactly 3 distinct items: kept whole at a cap of 3.
            ("s2", "e", 1),
            ("s2", "a", 2),
            ("s2", "c", 3, "purchase"),
            ("s2", "a", 4),
            # s3 only saw an exposure: not a session with interest at all.
            ("s3", "a", 1, "exposure"),
            # s4 holds one item: no pair, but it counts on the diagonal and in the total.
            ("s4", "c", 5, "purchase"),
            # Same session id in another tenant: a different session.
            ("s1", "a", 1, "click", "u", "t2"),
            ("s1", "b", 2, "click", "u", "t2"),
        ],
    )
    params = {"event_types": INTEREST, "max_session_items": 3}
    assert build_daily_aggregate("pair_daily", tmp_path, D1, params)["rows"] == 16
    frame = pl.read_parquet(partition_dir(tmp_path, "pair_daily", D1) / AGGREGATE_FILE)
    assert frame.columns == ["day", "tenant", "surface", "item_a", "item_b", "sessions"]
    assert frame["day"].unique().to_list() == [D1] and frame["surface"].unique().to_list() == ["home"]
    assert pairs_of(frame) == {
        ("t", None, None): 3,  # s1, s2, s4
        ("t", "a", "a"): 2,
        ("t", "a", "b"): 1,
        ("t", "a", "c"): 1,
        ("t", "a", "d"): 1,
        ("t", "a", "e"): 1,
        ("t", "b", "b"): 1,
        ("t", "b", "d"): 1,
        ("t", "c", "c"): 2,  # s2 and s4, not s1 (capped away)
        ("t", "c", "e"): 1,
        ("t", "d", "d"): 1,
        ("t", "e", "e"): 1,
        ("t2", None, None): 1,
        ("t2", "a", "a"): 1,
        ("t2", "a", "b"): 1,
        ("t2", "b", "b"): 1,
    }
    # Sorted by tenant, surface, item_a, item_b with the total row first.
    assert list(pairs_of(frame)) == sorted(pairs_of(frame), key=lambda k: (k[0], k[1] or "", k[2] or ""))

    # One more item of room lets c into s1: c now pairs with a, b and d.
    build_daily_aggregate("pair_daily", tmp_path, D1, params | {"max_session_items": 4})
    wider = pairs_of(pl.read_parquet(partition_dir(tmp_path, "pair_daily", D1) / AGGREGATE_FILE))
    assert wider[("t", "c", "c")] == 3 and wider[("t", "a", "c")] == 2
    assert wider[("t", "b", "c")] == 1 and wider[("t", "c", "d")] == 1

    # The same data with exposures counted as interest: z joins s1 first (ts 0) and s3 becomes a session.
    build_daily_aggregate("pair_daily", tmp_path, D1, params | {"event_types": [*INTEREST, "exposure"]})
    with_exposures = pairs_of(pl.read_parquet(partition_dir(tmp_path, "pair_daily", D1) / AGGREGATE_FILE))
    assert with_exposures[("t", None, None)] == 4
    assert with_exposures[("t", "d", "z")] == 1 and ("t", "a", "b") not in with_exposures  # b capped out


def test_pair_daily_without_interest_types_is_empty(tmp_path: Path) -> None:
    write_canonical(tmp_path, D1, [("s1", "a", 1), ("s1", "b", 2)])
    built = build_daily_aggregate("pair_daily", tmp_path, D1, {"event_types": [], "max_session_items": 5})
    assert built["rows"] == 0
    assert pl.read_parquet_schema(built["path"])["item_a"] == pl.String()


# ------------------------------------------------------------------------------ batches of days


def test_a_batch_of_days_writes_the_same_bytes_as_one_day_at_a_time(tmp_path: Path) -> None:
    # More days than one query takes; the same session and user ids on every day (a session counts per
    # day); one day without interest events at all (its partitions are still written, empty).
    days = [D1 + dt.timedelta(days=n) for n in range(DAYS_PER_QUERY + 2)]
    for n, day in enumerate(days):
        # Ratings of a varying number of stars (their weights are scaled sums) and a priced purchase.
        events = [
            ("s1", "a", 1),
            ("s1", f"i{n}", 2, "purchase", "u-s1", "t", 19.99),
            ("s2", "a", 3),
            ("s2", "b", n + 4),
            *(("s3", "r", 5 + k, "rating", "u-s3", "t", 0.5 + 0.7 * ((n + k) % 7)) for k in range(3)),
        ]
        write_canonical(tmp_path / "batch", day, events if n != 3 else [("s1", "a", 1, "exposure")])
        write_canonical(tmp_path / "single", day, events if n != 3 else [("s1", "a", 1, "exposure")])
    config = PipelineConfig()
    for model in DAILY_MODELS:
        params = daily_aggregate_params(model, config)
        built = build_daily_aggregates(model, tmp_path / "batch", reversed(days), params)
        assert [b["day"] for b in built] == days
        for day, batch in zip(days, built, strict=True):
            single = build_daily_aggregate(model, tmp_path / "single", day, params)
            assert batch["rows"] == single["rows"]
            assert Path(batch["path"]).read_bytes() == Path(single["path"]).read_bytes(), (model, day)
            assert pl.read_parquet(batch["path"])["day"].unique().to_list() in ([day], [])
    pairs = pl.read_parquet(aggregate_paths(tmp_path / "batch", "pair_daily", days))
    # a and b share s2 on every day but the empty one; each day counts its own session.
    assert pairs.filter(item_a="a", item_b="b")["sessions"].to_list() == [1] * (len(days) - 1)
    assert pairs.filter(pl.col("day") == days[3]).height == 0


def test_a_batch_caps_each_session_of_each_day_and_tenant_on_its_own(tmp_path: Path) -> None:
    # Only sessions over the cap are ranked: the same session id is over a cap of 2 on D1 in tenants t and
    # t2 (with its items in opposite orders) and within it on D2.
    events = {
        D1: [
            *[("s1", item, second) for item, second in (("a", 1), ("b", 2), ("c", 3))],
            *[("s1", item, second, "click", "u", "t2") for item, second in (("c", 1), ("b", 2), ("a", 3))],
        ],
        D2: [("s1", "c", 1), ("s1", "a", 2)],
    }
    for lake in ("batch", "single"):
        for day, rows in events.items():
            write_canonical(tmp_path / lake, day, rows)
    params = {"event_types": INTEREST, "max_session_items": 2}
    built = build_daily_aggregates("pair_daily", tmp_path / "batch", [D1, D2], params)
    for day, batch in zip([D1, D2], built, strict=True):
        single = build_daily_aggregate("pair_daily", tmp_path / "single", day, params)
        assert Path(batch["path"]).read_bytes() == Path(single["path"]).read_bytes(), day
    assert pairs_of(pl.read_parquet(built[0]["path"])) == {
        ("t", None, None): 1,
        ("t", "a", "a"): 1,
        ("t", "a", "b"): 1,
        ("t", "b", "b"): 1,
        ("t2", None, None): 1,
        ("t2", "b", "b"): 1,
        ("t2", "b", "c"): 1,
        ("t2", "c", "c"): 1,
    }
    assert pairs_of(pl.read_parquet(built[1]["path"])) == {
        ("t", None, None): 1,
        ("t", "a", "a"): 1,
        ("t", "a", "c"): 1,
        ("t", "c", "c"): 1,
    }


def test_a_batch_with_a_missing_day_writes_nothing(tmp_path: Path) -> None:
    write_canonical(tmp_path, D1, [("s1", "a", 1), ("s1", "b", 2)])
    with pytest.raises(FileNotFoundError, match=f"canonical_events partition {D2} has not been materialized"):
        build_daily_aggregates("item_daily", tmp_path, [D1, D2], {"value_scales": SCALES})
    assert not partition_dir(tmp_path, "item_daily", D1).exists()


# ------------------------------------------------------------------------------------ user_item_daily


def test_user_item_daily_weights_known_users_and_interest_only(tmp_path: Path) -> None:
    write_canonical(
        tmp_path,
        D1,
        [
            ("s1", "a", 1, "click", "u1"),
            ("s1", "a", 5, "click", "u1"),
            ("s1", "a", 3, "purchase", "u1"),
            ("s1", "a", 9, "exposure", "u1"),  # later, but weight 0: does not move last_ts
            ("s1", "b", 2, "add_to_cart", "u1"),
            ("s1", "z", 4, "exposure", "u1"),  # only exposures: no row
            ("s2", "a", 6, "click", None),  # anonymous: no row
            ("s3", "a", 7, "rating", "u2"),  # a type without weight: no row
            ("s4", "a", 8, "click", "u2"),
        ],
    )
    built = build_daily_aggregate(
        "user_item_daily", tmp_path, D1, {"weights": WEIGHTS, "value_scales": SCALES}
    )
    frame = pl.read_parquet(built["path"])
    assert frame.columns == ["day", "tenant", "surface", "user_id", "item_id", "weight", "events", "last_ts"]
    assert frame.select("user_id", "item_id", "weight", "events", "last_ts").rows() == [
        ("u1", "a", 7.0, 3, _ts(D1, 5)),
        ("u1", "b", 0.5, 1, _ts(D1, 2)),
        ("u2", "a", 1.0, 1, _ts(D1, 8)),
    ]


# ----------------------------------------------------------------------------------------- popularity


@pytest.fixture
def popularity_lake(tmp_path: Path) -> Path:
    write_canonical(
        tmp_path, D1, [("s1", "c", n) for n in range(4)] + [("s9", "z", n, "exposure") for n in range(99)]
    )
    write_canonical(tmp_path, D2, [("s2", "a", 1)])
    write_canonical(
        tmp_path,
        D3,
        [("s3", "a", 1), ("s3", "a", 2), ("s4", "b", 1, "purchase"), ("s5", "x", 1), ("s6", "w", 1)],
    )
    for day in (D1, D2, D3):
        build_daily_aggregate("item_daily", tmp_path, day, {"value_scales": SCALES})
    return tmp_path


def _popularity(lake: Path, half_life: float, top_n: int = 10) -> list[tuple]:
    params = {"weights": WEIGHTS, "as_of": D3.isoformat(), "half_life_days": half_life, "top_n": top_n}
    frame = run_sql("popularity", {"paths": aggregate_paths(lake, "item_daily", [D1, D2, D3])} | params)
    assert frame.columns == ["tenant", "surface", "rank", "item_id", "score", "events"]
    return frame.select("rank", "item_id", "score", "events").rows()


def test_popularity_weights_ties_and_top_n(popularity_lake: Path) -> None:
    # b = 1 purchase * 5; c = 4 clicks; a = 3 clicks; w and x 1 click each (tie: by id); z only exposures.
    assert _popularity(popularity_lake, 0.0) == [
        (1, "b", 5.0, 1),
        (2, "c", 4.0, 4),
        (3, "a", 3.0, 3),
        (4, "w", 1.0, 1),
        (5, "x", 1.0, 1),
    ]
    assert [r[1] for r in _popularity(popularity_lake, 0.0, top_n=4)] == ["b", "c", "a", "w"]


def test_equal_popularity_scores_rank_by_reach_then_events_then_recency(tmp_path: Path) -> None:
    # Every item scores 2.0: two clicks (weight 1) or four adds to cart (weight 0.5).
    write_canonical(
        tmp_path, D1, [("s1", "p", 1, "click", "u1"), ("s2", "p", 2, "click", "u2"), ("s3", "s", 1)]
    )
    write_canonical(
        tmp_path,
        D3,
        [
            ("s1", "q", 1, "click", "u1"),
            ("s2", "q", 2, "click", "u2"),
            ("s3", "s", 1),
            *(("s4", "r", n, "add_to_cart") for n in range(4)),
            ("s5", "t", 1),
            ("s5", "t", 1, "click", "u-s5", "t", 7.0),  # a click's value does not count
            ("s5", "u", 1),
            ("s5", "u", 1, "click", "u-s5", "t", 7.0),
        ],
    )
    for day in (D1, D3):
        build_daily_aggregate("item_daily", tmp_path, day, {"value_scales": SCALES})
    params = {"weights": WEIGHTS, "as_of": D3.isoformat(), "half_life_days": 0.0, "top_n": 10}
    frame = run_sql("popularity", {"paths": aggregate_paths(tmp_path, "item_daily", [D1, D3])} | params)
    # q, s and p: 2 user-days and 2 events each; q's latest event is the latest, p's the earliest (D1).
    # r: 1 user-day, but 4 events. t and u: 1 user-day, 2 events, the same latest time: by id.
    assert frame.select("item_id", "score", "events").rows() == [
        ("q", 2.0, 2),
        ("s", 2.0, 2),
        ("p", 2.0, 2),
        ("r", 2.0, 4),
        ("t", 2.0, 2),
        ("u", 2.0, 2),
    ]


def test_popularity_time_decay(popularity_lake: Path) -> None:
    # Half-life 1 day as of D3: D2 counts 1/2, D1 1/4. a = 2 + 0.5, c = 4 * 0.25; events stay undecayed.
    assert _popularity(popularity_lake, 1.0) == [
        (1, "b", 5.0, 1),
        (2, "a", 2.5, 3),
        (3, "c", 1.0, 4),  # three-way tie at 1.0: by item_id
        (4, "w", 1.0, 1),
        (5, "x", 1.0, 1),
    ]
    two_days = dict((r[1], r[2]) for r in _popularity(popularity_lake, 2.0))
    assert two_days["c"] == pytest.approx(4 * 0.5) and two_days["a"] == pytest.approx(2 + 0.5**0.5)


# ------------------------------------------------------------------------------------------------ cooc


@pytest.fixture
def cooc_lake(tmp_path: Path) -> Path:
    # Day 1: {a,b} {a,b,c} {a}; day 2: {a,b} (s1 again: a new session-day) {b,c} {d}.
    # N = 6; n_a = 4, n_b = 4, n_c = 2, n_d = 1; c_ab = 3, c_ac = 1, c_bc = 2.
    write_canonical(
        tmp_path,
        D1,
        [("s1", "a", 1), ("s1", "b", 2), ("s2", "a", 1), ("s2", "b", 2), ("s2", "c", 3), ("s3", "a", 1)],
    )
    write_canonical(
        tmp_path, D2, [("s1", "a", 1), ("s1", "b", 2), ("s4", "b", 1), ("s4", "c", 2), ("s5", "d", 1)]
    )
    for day in (D1, D2):
        build_daily_aggregate("pair_daily", tmp_path, day, {"event_types": INTEREST, "max_session_items": 50})
    return tmp_path


def _cooc(lake: Path, days: list[dt.date], metric: str = "cosine", **overrides: int) -> pl.DataFrame:
    params = {"metric": metric, "min_support": 1, "top_k": 10, "max_items": 1000} | overrides
    frame = run_sql("cooc", {"paths": aggregate_paths(lake, "pair_daily", days)} | params)
    assert frame.columns == ["tenant", "surface", "item_id", "rank", "neighbor_id", "score", "count"]
    assert frame["rank"].dtype == pl.Int32()
    return frame


@pytest.mark.parametrize(
    ("metric", "ab", "ac", "bc"),
    [
        ("cosine", 3 / math.sqrt(16), 1 / math.sqrt(8), 2 / math.sqrt(8)),
        ("count", 3.0, 1.0, 2.0),
        ("jaccard", 3 / (4 + 4 - 3), 1 / (4 + 2 - 1), 2 / (4 + 2 - 2)),
        ("lift", 3 * 6 / 16, 1 * 6 / 8, 2 * 6 / 8),
    ],
)
def test_cooc_metrics(cooc_lake: Path, metric: str, ab: float, ac: float, bc: float) -> None:
    got = neighbors_of(_cooc(cooc_lake, [D1, D2], metric))
    expected = {
        "a": [("b", ab, 3), ("c", ac, 1)],
        "b": [("a", ab, 3), ("c", bc, 2)],
        "c": [("b", bc, 2), ("a", ac, 1)],
    }
    for neighbors in expected.values():
        neighbors.sort(key=lambda n: (-n[1], -n[2], n[0]))
    assert set(got) == set(expected)  # d has no neighbour at all
    for item in expected:
        assert [(n, c) for n, _, c in got[item]] == [(n, c) for n, _, c in expected[item]]
        assert [s for _, s, _ in got[item]] == pytest.approx([s for _, s, _ in expected[item]])
    if metric == "lift":  # the one metric here where b prefers c (smaller, more specific) to a
        assert got["b"][0][0] == "c"


def test_cooc_min_support_top_k_and_one_day(cooc_lake: Path) -> None:
    supported = neighbors_of(_cooc(cooc_lake, [D1, D2], min_support=2))
    assert {item: [n for n, _, _ in ns] for item, ns in supported.items()} == {
        "a": ["b"],
        "b": ["a", "c"],
        "c": ["b"],
    }
    top1 = neighbors_of(_cooc(cooc_lake, [D1, D2], top_k=1))
    assert {item: [n for n, _, _ in ns] for item, ns in top1.items()} == {"a": ["b"], "b": ["a"], "c": ["b"]}
    # Day 1 alone: N = 3, n_a = 3, n_b = 2, n_c = 1, c_ab = 2.
    day1 = neighbors_of(_cooc(cooc_lake, [D1]))
    assert day1["a"][0] == ("b", pytest.approx(2 / math.sqrt(6)), 2)
    with pytest.raises(Exception, match="unknown metric"):
        _cooc(cooc_lake, [D1], "pearson")


def test_cooc_ranking_ties_by_count_then_neighbor(tmp_path: Path) -> None:
    # n_x = 4, n_m = 1, n_z = 4, n_n = 1: every neighbour of x scores exactly 0.5 by cosine
    # (1/sqrt(4), 2/sqrt(16), 1/sqrt(4)); z wins on count, then m before n by id.
    sessions = {
        "S1": ["x", "m"],
        "S2": ["x", "z"],
        "S3": ["x", "z"],
        "S4": ["x", "n"],
        "S5": ["z"],
        "S6": ["z"],
    }
    write_canonical(
        tmp_path, D1, [(s, item, i) for s, items in sessions.items() for i, item in enumerate(items)]
    )
    build_daily_aggregate("pair_daily", tmp_path, D1, {"event_types": INTEREST, "max_session_items": 50})
    got = neighbors_of(_cooc(tmp_path, [D1]))
    assert got["x"] == [("z", 0.5, 2), ("m", 0.5, 1), ("n", 0.5, 1)]
    ranks = _cooc(tmp_path, [D1]).filter(pl.col("item_id") == "x")["rank"].to_list()
    assert ranks == [1, 2, 3]


def test_cooc_max_items_keeps_the_most_popular(tmp_path: Path) -> None:
    # Sessions per item: y 3, z 3, a 2, m 2. Keeping 3 keeps y, z and then a (tie with m, by id);
    # an alphabetical cut would have kept a, m, y.
    sessions = {"S1": ["y", "z", "a"], "S2": ["y", "z"], "S3": ["y", "z", "m"], "S4": ["m", "a"]}
    write_canonical(
        tmp_path, D1, [(s, item, i) for s, items in sessions.items() for i, item in enumerate(items)]
    )
    build_daily_aggregate("pair_daily", tmp_path, D1, {"event_types": INTEREST, "max_session_items": 50})
    got = neighbors_of(_cooc(tmp_path, [D1], max_items=3))
    assert set(got) == {"a", "y", "z"}
    assert {n for ns in got.values() for n, _, _ in ns} == {"a", "y", "z"}
    assert got["y"][0] == ("z", pytest.approx(3 / 3), 3)
    everything = neighbors_of(_cooc(tmp_path, [D1], max_items=100))
    assert set(everything) == {"a", "m", "y", "z"}


# ---------------------------------------------------------------------------------------- user_history


def test_user_history_most_recent_distinct_items(tmp_path: Path) -> None:
    write_canonical(
        tmp_path,
        D1,
        [
            ("s1", "a", 36000, "click", "u1"),
            ("s1", "b", 39600, "purchase", "u1"),
            ("s2", "q", 1, "click", "u2"),
        ],
    )
    write_canonical(
        tmp_path,
        D2,
        [
            ("s3", "c", 32400, "click", "u1"),
            ("s3", "a", 32400, "click", "u1"),  # same time as c: a first by id
            ("s3", "d", 43200, "exposure", "u1"),  # latest, but only an exposure
            ("s4", "q", 2, "click", None),
        ],
    )
    for day in (D1, D2):
        build_daily_aggregate("user_item_daily", tmp_path, day, {"weights": WEIGHTS, "value_scales": SCALES})
    paths = aggregate_paths(tmp_path, "user_item_daily", [D1, D2])
    frame = run_sql("user_history", {"paths": paths, "max_items": 2})
    assert frame.columns == ["tenant", "surface", "user_id", "rank", "item_id", "last_ts", "weight"]
    assert frame.select("user_id", "rank", "item_id", "last_ts", "weight").rows() == [
        ("u1", 1, "a", _ts(D2, 32400), 2.0),  # one click each day
        ("u1", 2, "c", _ts(D2, 32400), 1.0),
        ("u2", 1, "q", _ts(D1, 1), 1.0),
    ]
    assert run_sql("user_history", {"paths": paths, "max_items": 3})["item_id"].to_list() == [
        "a",
        "c",
        "b",
        "q",
    ]


# ------------------------------------------------------------------------------------ value scales


def test_a_half_star_rating_weighs_a_tenth_of_a_five_star_one(tmp_path: Path) -> None:
    # MovieLens-shaped: one user rates movie 10 half a star, movie 20 five stars, movie 30 3.5 stars.
    ratings = tmp_path / "ratings.csv"
    ratings.write_text(
        "userId,movieId,rating,timestamp\n1,10,0.5,1714550400\n1,20,5.0,1714550460\n2,30,3.5,1714550520\n"
    )
    import_file(ratings, tmp_path / "raw", fmt="movielens", tenant="ml", surface="movies")
    canonicalize_partition(tmp_path / "raw", tmp_path / "lake", D1, IngestConfig())
    config = config_with(popularity=PopularityConfig(window_days=1))
    build_aggregates(tmp_path / "lake", [D1], config)

    interactions = pl.read_parquet(partition_dir(tmp_path / "lake", "user_item_daily", D1) / AGGREGATE_FILE)
    weight = dict(interactions.select("item_id", "weight").rows())
    assert weight == {"10": 0.1, "20": 1.0, "30": 0.7}
    assert weight["10"] * 10 == weight["20"]
    (popularity,) = build_window_artifacts(
        "popularity", tmp_path / "lake", tmp_path / "artifacts", D1, config
    )
    items = pl.read_parquet(popularity.path / "items.parquet")
    assert items.select("item_id", "score", "events").rows() == [
        ("20", 1.0, 1),
        ("30", 0.7, 1),
        ("10", 0.1, 1),
    ]
    assert read_meta(popularity.path)["params"]["event_value_scales"] == {"rating": 5.0}


def test_only_types_with_a_value_scale_weigh_by_their_value(tmp_path: Path) -> None:
    write_canonical(
        tmp_path,
        D1,
        [
            ("s1", "a", 1, "purchase", "u1", "t", 250.0),  # a price: purchases have no scale
            ("s1", "b", 2, "rating", "u1", "t", 9.0),  # above the scale: counts fully
            ("s1", "c", 3, "rating", "u1", "t", -2.0),  # below 0: counts nothing
            ("s1", "d", 4, "rating", "u1", "t", None),  # no value: counts fully
            ("s1", "d", 5, "rating", "u1", "t", 2.5),
        ],
    )
    weights = [*WEIGHTS, {"event_type": "rating", "weight": 2.0}]
    user_item = build_daily_aggregate(
        "user_item_daily", tmp_path, D1, {"weights": weights, "value_scales": SCALES}
    )
    assert pl.read_parquet(user_item["path"]).select("item_id", "weight", "events").rows() == [
        ("a", 5.0, 1),
        ("b", 2.0, 1),
        ("c", 0.0, 1),
        ("d", 3.0, 2),
    ]
    item_daily = build_daily_aggregate("item_daily", tmp_path, D1, {"value_scales": SCALES})
    assert pl.read_parquet(item_daily["path"]).select("item_id", "events", "scaled_events").rows() == [
        ("a", 1, 1.0),
        ("b", 1, 1.0),
        ("c", 1, 0.0),
        ("d", 2, 1.5),
    ]
    # Without scales every event counts fully, whatever its value.
    item_daily = build_daily_aggregate("item_daily", tmp_path, D1, {"value_scales": []})
    assert pl.read_parquet(item_daily["path"])["scaled_events"].to_list() == [1.0, 1.0, 1.0, 2.0]


def test_popularity_reads_item_daily_partitions_built_before_value_scales(popularity_lake: Path) -> None:
    # D1's partition as an earlier version wrote it: no scaled_events, so its events count fully.
    old = partition_dir(popularity_lake, "item_daily", D1) / AGGREGATE_FILE
    pl.read_parquet(old).drop("scaled_events").write_parquet(old)
    assert _popularity(popularity_lake, 0.0)[1] == (2, "c", 4.0, 4)


# --------------------------------------------------------------------------------- window artifacts


def test_window_days() -> None:
    assert window_days(D3, 3) == [D1, D2, D3]
    assert window_days(D3, 1) == [D3]
    with pytest.raises(ValueError):
        window_days(D3, 0)


def _two_tenant_lake(lake: Path, config: PipelineConfig) -> None:
    write_canonical(
        lake,
        D1,
        [
            ("s1", "a", 1, "click", "u1"),
            ("s1", "b", 2, "click", "u1"),
            ("s9", "k", 1, "click", "v", "t2"),
            ("s8", "k", 1, "exposure", None, "t3"),  # t3: one anonymous exposure, nothing else
        ],
    )
    write_canonical(lake, D2, [("s2", "a", 1, "click", "u1"), ("s2", "b", 2, "purchase", "u1")])
    write_canonical(
        lake,
        D3,
        [("s3", "a", 1, "click", "u2"), ("s3", "b", 2, "click", "u2"), ("s3", "c", 3, "click", "u2")],
    )
    # D2's aggregates are never built: the window has a hole.
    build_aggregates(lake, [D1, D3], config)


def test_build_window_artifacts_layout_meta_and_determinism(tmp_path: Path) -> None:
    lake, artifacts = tmp_path / "lake", tmp_path / "artifacts"
    config = config_with(
        popularity=PopularityConfig(window_days=3, top_n=10),
        cooc=CoocConfig(window_days=3, top_k=5, min_support=1),
        user_history=UserHistoryConfig(window_days=3, max_items=5),
        als=AlsConfig(window_days=3, factors=4, iterations=2),
    )
    _two_tenant_lake(lake, config)
    for kind in WINDOW_KINDS:
        builds = build_window_artifacts(kind, lake, artifacts, D3, config, run_id="run-1")
        assert [(b.tenant, b.surface, b.kind) for b in builds] == [
            ("t", "home", kind),
            ("t2", "home", kind),
            ("t3", "home", kind),
        ]
        assert builds[2].rows == 0  # every kind, explicitly empty: the publisher decides what may be empty
        for build in builds:
            assert build.path == artifacts / build.tenant / "home" / kind / build.version
            assert verify_artifact(build.path, required_nonempty=False) == []
            meta = read_meta(build.path)
            assert meta["version"] == build.version == artifact_version(meta)
            assert (meta["format"], meta["kind"], meta["tenant"], meta["surface"]) == (
                1,
                kind,
                build.tenant,
                "home",
            )
            assert meta["as_of"] == "2024-05-03" and meta["run_id"] == "run-1"
            assert meta["window"] == {"days": 3, "start": "2024-05-01", "end": "2024-05-03"}
            assert meta["inputs"][ARTIFACT_KINDS[kind].aggregate] == ["2024-05-01", "2024-05-03"]
            assert meta["inputs"]["missing_days"] == ["2024-05-02"] and build.missing_days == ("2024-05-02",)
            assert meta["inputs"]["canonical_events"] == {
                d.isoformat(): content_hash(partition_dir(lake, "canonical_events", d)) for d in (D1, D3)
            }
            name = ARTIFACT_KINDS[kind].table
            assert sorted(meta["files"]) == sorted([name, *ARTIFACT_KINDS[kind].files])
            data = pl.read_parquet(build.path / name)
            assert data.schema == pl.Schema(polars_schema(ARTIFACT_KINDS[kind]))
            assert meta["rows"][name] == data.height and build.rows == data.height
            assert [tuple(r.values()) for r in build.top] == [
                tuple(v.isoformat() if isinstance(v, dt.datetime) else v for v in row)
                for row in data.head(10).rows()
            ]
        # Same inputs and parameters, another run: same versions, same directories.
        again = build_window_artifacts(kind, lake, artifacts, D3, config, run_id="run-2")
        assert [(b.version, b.path) for b in again] == [(b.version, b.path) for b in builds]

    popularity = build_window_artifacts("popularity", lake, artifacts, D3, config)
    t = pl.read_parquet(popularity[0].path / "items.parquet")
    # t/home: D1 (a 1, b 1) and D3 (a 1, b 1, c 1); D2 (b's purchase) is not built, so not counted. a and b
    # tie on score, user-days and events: b, clicked last, comes first.
    assert t.rows() == [(1, "b", 2.0, 2), (2, "a", 2.0, 2), (3, "c", 1.0, 1)]
    cooc = build_window_artifacts("cooc", lake, artifacts, D3, config)
    # t2 has a single one-item session: an explicit empty artifact, which publishing would refuse.
    assert cooc[1].rows == 0
    assert verify_artifact(cooc[1].path, required_nonempty=True) == [
        f"cooc/{cooc[1].version}: required artifact is empty (0 rows)"
    ]
    history = pl.read_parquet(
        build_window_artifacts("user_history", lake, artifacts, D3, config)[0].path / "history.parquet"
    )
    assert history.select("user_id", "rank", "item_id").rows() == [
        ("u1", 1, "b"),
        ("u1", 2, "a"),
        ("u2", 1, "c"),
        ("u2", 2, "b"),
        ("u2", 3, "a"),
    ]

    # A parameter change is a new version; the old directory stays.
    changed = build_window_artifacts("cooc", lake, artifacts, D3, replace_kind(config, "cooc", metric="lift"))
    assert changed[0].version != cooc[0].version and cooc[0].path.is_dir()
    # Once D2 is built the inputs change, and so does the version.
    build_aggregates(lake, [D2], config)
    filled = build_window_artifacts("popularity", lake, artifacts, D3, config)
    assert filled[0].missing_days == () and filled[0].version != popularity[0].version
    filled_top = pl.read_parquet(filled[0].path / "items.parquet")
    assert filled_top.rows()[0] == (1, "b", 7.0, 3)


def test_build_window_artifacts_without_any_aggregate(tmp_path: Path) -> None:
    config = config_with(popularity=PopularityConfig(window_days=2))
    outside = dt.date(2024, 4, 1)  # built, but not in the window
    write_canonical(tmp_path, outside, [("s", "a", 1)])
    build_daily_aggregate("item_daily", tmp_path, outside, {"value_scales": SCALES})
    with pytest.raises(
        FileNotFoundError, match=r"no item_daily partition in the window 2024-05-02\.\.2024-05-03"
    ):
        build_window_artifacts("popularity", tmp_path, tmp_path / "artifacts", D3, config)
    with pytest.raises(ValueError, match="unknown artifact kind"):
        build_window_artifacts("no_such_kind", tmp_path, tmp_path / "artifacts", D3, config)


# --------------------------------------------------------------------------------------------- checks


def _check_rows(name: str, frame: pl.DataFrame, folder: Path, **params: Any) -> list[tuple]:
    """Run a check query of dbt_like_sql/checks/ over `frame` written as an artifact file."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-input.parquet"
    frame.write_parquet(path)
    return run_sql(f"checks/{name}", {"paths": [str(path)]} | params).rows()


def test_cooc_check_returns_each_violating_row(tmp_path: Path) -> None:
    rows = [
        ("a", 1, "b", 0.9, 3),
        ("a", 2, "c", 0.8, 3),
        ("a", 4, "d", 0.7, 2),  # gap: 4 after 2
        ("b", 1, "a", 0.5, 2),
        ("b", 1, "c", 0.5, 2),  # duplicate rank 1
        ("c", 1, "a", 0.1, 2),
        ("c", 2, "d", 0.2, 2),  # rank 2 scores higher than rank 1
        ("d", 1, "d", 0.3, 2),  # itself
        ("e", 1, "a", 0.3, 0),
        ("f", 1, "a", 0.3, 1),  # below a support of 2
        ("g", 1, "a", 0.3, 2),
        ("g", 2, "a", 0.3, 2),  # the same neighbour twice
        ("h", 1, "a", 0.0, 2),
        ("i", 1, "a", 0.5, 3),  # a valid list: equal scores broken by count, then id
        ("i", 2, "b", 0.5, 2),
        ("i", 3, "c", 0.5, 2),
        ("j", 1, "b", 0.5, 2),
        ("j", 2, "a", 0.5, 2),  # tie not broken by neighbor_id
    ]
    frame = pl.DataFrame(rows, schema=polars_schema(ARTIFACT_KINDS["cooc"]), orient="row")
    found = [
        (p[0], p[1], p[2], p[3]) for p in _check_rows("cooc_invalid_rows", frame, tmp_path, min_support=2)
    ]
    assert found == [
        ("bad_score", "h", 1, "a"),
        ("below_min_support", "f", 1, "a"),
        ("duplicate_neighbor", "g", 1, "a"),
        ("duplicate_neighbor", "g", 2, "a"),
        ("non_positive_count", "e", 1, "a"),
        ("rank_not_sequential", "a", 4, "d"),
        ("rank_not_sequential", "b", 1, "c"),
        ("rank_order", "c", 2, "d"),
        ("rank_order", "j", 2, "a"),
        ("self_neighbor", "d", 1, "d"),
    ]


def test_popularity_check_returns_each_violating_row(tmp_path: Path) -> None:
    rows = [
        (1, "a", 3.0, 3),
        (2, "b", 2.0, 2),
        (2, "c", 2.0, 2),  # rank 2 twice
        (4, "a", 1.0, 1),  # a listed twice
        (5, "e", -1.0, 1),
        (6, "f", 2.0, 1),  # scores higher than rank 5
        (7, "g", 1.0, 0),
    ]
    frame = pl.DataFrame(rows, schema=polars_schema(ARTIFACT_KINDS["popularity"]), orient="row")
    found = [(p[0], p[1], p[2]) for p in _check_rows("popularity_invalid_rows", frame, tmp_path)]
    assert found == [
        ("bad_score", 5, "e"),
        ("duplicate_item", 1, "a"),
        ("duplicate_item", 4, "a"),
        ("non_positive_events", 7, "g"),
        ("rank_not_sequential", 2, "c"),
        ("rank_order", 6, "f"),
    ]
    # Equal scores in any order (the file does not hold the reach that orders them).
    valid = pl.DataFrame(
        [(1, "b", 2.0, 2), (2, "c", 1.0, 1), (3, "a", 1.0, 1)],
        schema=polars_schema(ARTIFACT_KINDS["popularity"]),
        orient="row",
    )
    assert _check_rows("popularity_invalid_rows", valid, tmp_path) == []


# ------------------------------------------------------------------------------------------ real data
# MovieLens "latest small" (GroupLens, Harper & Konstan 2015; research use only) and the OTTO sample
# (CC BY 4.0, (c) OTTO GmbH & Co KG). Expectations are computed straight from the source files in plain
# Python, with the pipeline's session rule: one session per session id and UTC day (canonical partition).

# day, session, user, item, ts (ms), event type, value (a rating's stars)
Event = tuple[dt.date, str, str, str, int, str, float | None]


@pytest.fixture(scope="module")
def data_dir() -> Path:
    found = shared_data_dir()
    if found is None:
        pytest.skip("shared data sets (MovieLens, OTTO) not found: set RECSYS_SHARED_DATA")
    return found


@dataclass(frozen=True)
class RealLake:
    lake: Path
    artifacts: Path
    as_of: dt.date
    days: list[dt.date]
    events: list[Event]  # every event of the window, read from the source file


def _load(source: Path, root: Path, fmt: str, tenant: str, surface: str, days: int | None) -> RealLake:
    report = import_file(source, root / "raw", fmt=fmt, tenant=tenant, surface=surface)
    as_of = dt.date.fromisoformat(report.last_day)
    span = (as_of - dt.date.fromisoformat(report.first_day)).days + 1
    window = window_days(as_of, days or span)
    for day in window:
        canonicalize_partition(root / "raw", root / "lake", day, IngestConfig())
    return RealLake(
        root / "lake", root / "artifacts", as_of, window, _source_events(source, fmt, set(window))
    )


def _source_events(source: Path, fmt: str, window: set[dt.date]) -> list[Event]:
    """The events of the window's days, read from the source file."""
    epoch = dt.date(1970, 1, 1)

    def day_of(ms: int) -> dt.date:  # the UTC day
        return epoch + dt.timedelta(days=ms // 86_400_000)

    events: set[Event] = set()  # the pipeline drops exact duplicates
    if fmt == "movielens":
        with open(source, newline="") as handle:
            rows = csv.reader(handle)
            assert next(rows) == ["userId", "movieId", "rating", "timestamp"]
            for user, movie, rating, seconds in rows:
                ms = int(seconds) * 1000
                day = day_of(ms)
                if day in window:
                    events.add((day, f"{user}-{day:%Y%m%d}", user, movie, ms, "rating", float(rating)))
    else:
        types = {"clicks": "click", "carts": "add_to_cart", "orders": "purchase"}
        for line in source.read_text().splitlines():
            obj = json.loads(line)
            session = str(obj["session"])
            for e in obj["events"]:
                if day_of(e["ts"]) in window:
                    day = day_of(e["ts"])
                    events.add((day, session, session, str(e["aid"]), e["ts"], types[e["type"]], None))
    return sorted(events)


def _real_config(days: int, **cooc: Any) -> PipelineConfig:
    return config_with(
        popularity=PopularityConfig(window_days=days, top_n=100),
        cooc=CoocConfig(
            window_days=days, **({"top_k": 20, "min_support": 2, "max_session_items": 50} | cooc)
        ),
        user_history=UserHistoryConfig(window_days=days, max_items=20),
    )


@pytest.fixture(scope="module")
def movielens(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> RealLake:
    source = data_dir / "ml-latest-small" / "ratings.csv"
    # The last 60 days of ratings: 1,481 ratings in 85 user-day sessions, some of 150-220 ratings.
    return _load(source, tmp_path_factory.mktemp("movielens"), "movielens", "ml", "movies", 60)


@pytest.fixture(scope="module")
def otto(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> RealLake:
    source = data_dir / "otto-sample" / "train.jsonl"
    return _load(source, tmp_path_factory.mktemp("otto"), "otto", "shop", "pdp", None)


def value_share(value: float | None, scale: float | None) -> Decimal:
    """What one event counts for: clamp(value / scale, 0, 1) for a type with a scale and an event with a
    value, else 1 (exact: MovieLens stars over 5 are tenths)."""
    if scale is None or value is None:
        return Decimal(1)
    return min(max(Decimal(str(value)) / Decimal(str(scale)), Decimal(0)), Decimal(1))


def expected_popularity(
    events: list[Event], config: PipelineConfig, as_of: dt.date, half_life: float, top_n: int
) -> list[tuple[int, str, float, int]]:
    weights, scales = config.event_weights, config.event_value_scales
    per_day: dict[tuple[str, dt.date, str], Decimal] = defaultdict(Decimal)
    users: dict[tuple[str, dt.date, str], set[str]] = defaultdict(set)
    count: Counter[str] = Counter()
    last: dict[str, int] = {}
    for day, _session, user, item, ts, event_type, value in events:
        if weights.get(event_type, 0) > 0:
            per_day[(item, day, event_type)] += value_share(value, scales.get(event_type))
            users[(item, day, event_type)].add(user)
            count[item] += 1
            last[item] = max(last.get(item, ts), ts)
    user_days = Counter({item: 0 for item in count})
    for (item, _day, _type), seen in users.items():
        user_days[item] += len(seen)
    # Each day's term rounded to 9 decimals, then summed exactly.
    sums: dict[str, Decimal] = defaultdict(Decimal)
    for (item, day, event_type), shares in per_day.items():
        decay = 0.5 ** ((as_of - day).days / half_life) if half_life else 1.0
        sums[item] += Decimal(float(shares) * weights[event_type] * decay).quantize(Decimal("1e-9"))
    score = {item: float(total) for item, total in sums.items()}
    # Equal scores: more user-days (distinct users per day and event type), more events, latest event, id.
    ranked = sorted(
        score, key=lambda item: (-score[item], -user_days[item], -count[item], -last[item], item)
    )[:top_n]
    return [(rank, item, score[item], count[item]) for rank, item in enumerate(ranked, 1)]


def expected_cooc(
    events: list[Event],
    interest: set[str],
    cap: int,
    metric: str,
    min_support: int,
    top_k: int,
    max_items: int,
) -> tuple[dict[str, list[tuple[str, float, int]]], int]:
    """Neighbour lists, and how many sessions the cap cut."""
    first_seen: dict[tuple[dt.date, str], dict[str, int]] = defaultdict(dict)
    for day, session, _user, item, ts, event_type, _value in events:
        if event_type in interest:
            seen = first_seen[(day, session)]
            seen[item] = min(seen.get(item, ts), ts)
    sessions = 0
    cut = 0
    item_sessions: Counter[str] = Counter()
    pair_sessions: Counter[tuple[str, str]] = Counter()
    for seen in first_seen.values():
        items = sorted(seen, key=lambda item: (seen[item], item))
        cut += len(items) > cap
        items = items[:cap]
        sessions += 1
        item_sessions.update(items)
        pair_sessions.update(combinations(sorted(items), 2))
    kept = set(sorted(item_sessions, key=lambda item: (-item_sessions[item], item))[:max_items])
    neighbors: dict[str, list[tuple[str, float, int]]] = defaultdict(list)
    for (a, b), c in pair_sessions.items():
        if c < min_support or a not in kept or b not in kept:
            continue
        na, nb = item_sessions[a], item_sessions[b]
        score = {
            "cosine": c / math.sqrt(na * nb),
            "count": float(c),
            "jaccard": c / (na + nb - c),
            "lift": c * sessions / (na * nb),
        }[metric]
        neighbors[a].append((b, score, c))
        neighbors[b].append((a, score, c))
    for item in neighbors:
        neighbors[item] = sorted(neighbors[item], key=lambda n: (-n[1], -n[2], n[0]))[:top_k]
    return dict(neighbors), cut


def expected_history(
    events: list[Event], weights: dict[str, float], max_items: int
) -> list[tuple[str, int, str, int, float]]:
    last: dict[tuple[str, str], int] = {}
    weight: dict[tuple[str, str], float] = defaultdict(float)
    for _day, _session, user, item, ts, event_type, _value in events:
        if weights.get(event_type, 0) > 0:
            last[(user, item)] = max(last.get((user, item), ts), ts)
            weight[(user, item)] += weights[event_type]
    by_user: dict[str, list[str]] = defaultdict(list)
    for user, item in last:
        by_user[user].append(item)
    rows = []
    for user in sorted(by_user):
        items = sorted(by_user[user], key=lambda item: (-last[(user, item)], item))[:max_items]
        rows += [
            (user, rank, item, last[(user, item)], weight[(user, item)]) for rank, item in enumerate(items, 1)
        ]
    return rows


def _assert_same_neighbors(got: dict, expected: dict) -> None:
    assert set(got) == set(expected)
    for item, neighbors in expected.items():
        assert [(n, c) for n, _, c in got[item]] == [(n, c) for n, _, c in neighbors], item
        assert [s for _, s, _ in got[item]] == pytest.approx([s for _, s, _ in neighbors], rel=1e-12)


def _single_build(kind: str, real: RealLake, config: PipelineConfig) -> pl.DataFrame:
    (build,) = build_window_artifacts(kind, real.lake, real.artifacts, real.as_of, config)
    assert verify_artifact(build.path, required_nonempty=True) == []
    assert build.missing_days == ()
    # Rebuilding from the same aggregates (DuckDB runs multi-threaded) gives the same bytes, same version.
    (again,) = build_window_artifacts(kind, real.lake, real.artifacts, real.as_of, config, run_id="again")
    assert again.version == build.version
    return pl.read_parquet(build.path / ARTIFACT_KINDS[kind].table)


def test_movielens_popularity_and_cooc_match_plain_python(movielens: RealLake) -> None:
    config = _real_config(60)
    for day in movielens.days:
        for model in ("item_daily", "pair_daily"):
            build_daily_aggregate(model, movielens.lake, day, daily_aggregate_params(model, config))
    assert len(movielens.events) == 1481

    items = _single_build("popularity", movielens, config)
    expected = expected_popularity(movielens.events, config, movielens.as_of, 0, 100)
    assert items.rows() == expected
    assert _check_rows("popularity_invalid_rows", items, movielens.lake.parent / "checks") == []
    # With a 7-day half-life over every item (no top-N cut to straddle).
    decayed, _, _ = compute_window(
        "popularity",
        movielens.lake,
        movielens.as_of,
        replace_kind(config, "popularity", half_life_days=7.0, top_n=10**6),
    )
    expected = expected_popularity(movielens.events, config, movielens.as_of, 7.0, 10**6)
    assert decayed.select("rank", "item_id", "events").rows() == [(r, i, n) for r, i, _, n in expected]
    assert decayed["score"].to_list() == pytest.approx([s for _, _, s, _ in expected], rel=1e-12)

    neighbors = _single_build("cooc", movielens, config)
    expected_neighbors, cut = expected_cooc(movielens.events, {"rating"}, 50, "cosine", 2, 20, 10**9)
    assert cut == 7  # 7 of 85 user-days hold more than 50 ratings (up to 219): the cap matters here
    assert len(expected_neighbors) == 99  # items with a neighbour of support >= 2
    _assert_same_neighbors(neighbors_of(neighbors), expected_neighbors)
    assert _check_rows("cooc_invalid_rows", neighbors, movielens.lake.parent / "checks", min_support=2) == []

    # Only the 300 items in the most sessions, support 1.
    narrow = replace_kind(config, "cooc", max_items=300, min_support=1)
    frame, _, _ = compute_window("cooc", movielens.lake, movielens.as_of, narrow)
    _assert_same_neighbors(
        neighbors_of(frame), expected_cooc(movielens.events, {"rating"}, 50, "cosine", 1, 20, 300)[0]
    )


def test_movielens_popularity_favours_high_ratings(movielens: RealLake) -> None:
    stars: dict[str, list[float]] = defaultdict(list)
    for *_, item, _ts, _type, value in movielens.events:
        assert value is not None
        stars[item].append(value)

    def top(config: PipelineConfig) -> list[str]:
        for day in movielens.days:
            build_daily_aggregate(
                "item_daily", movielens.lake, day, daily_aggregate_params("item_daily", config)
            )
        frame, _, _ = compute_window("popularity", movielens.lake, movielens.as_of, config)
        return frame["item_id"].to_list()

    def mean_stars(items: set[str] | list[str]) -> list[float]:
        return [sum(stars[item]) / len(stars[item]) for item in items]

    config = _real_config(60)
    counted = top(replace(config, event_value_scales={}))[:20]  # every rating weighs 1: the most rated
    weighed = top(config)[:20]
    # Items rated as often as each other now rank by their stars.
    for count in {len(stars[item]) for item in weighed}:
        same = [item for item in weighed if len(stars[item]) == count]
        assert mean_stars(same) == sorted(mean_stars(same), reverse=True)
    # The items that enter the top 20 are better rated than those that leave it, and the top gets better.
    entered, left = set(weighed) - set(counted), set(counted) - set(weighed)
    assert entered and min(mean_stars(entered)) > max(mean_stars(left))
    assert sum(mean_stars(weighed)) > sum(mean_stars(counted))


@pytest.fixture(scope="module")
def otto_config(otto: RealLake) -> PipelineConfig:
    # A cap of 20 items cuts 5 of the 91 session-days (the longest has 74 distinct items).
    config = _real_config(len(otto.days), max_session_items=20)
    build_aggregates(otto.lake, otto.days, config)
    return config


@pytest.mark.parametrize(
    ("metric", "min_support"), [("cosine", 2), ("lift", 1), ("jaccard", 1), ("count", 3)]
)
def test_otto_cooc_matches_plain_python(
    otto: RealLake, otto_config: PipelineConfig, metric: str, min_support: int
) -> None:
    config = replace_kind(otto_config, "cooc", metric=metric, min_support=min_support)
    interest = {"click", "add_to_cart", "purchase"}
    expected, cut = expected_cooc(otto.events, interest, 20, metric, min_support, 20, 10**9)
    assert cut == 5 and expected
    neighbors = _single_build("cooc", otto, config)
    _assert_same_neighbors(neighbors_of(neighbors), expected)
    assert (
        _check_rows("cooc_invalid_rows", neighbors, otto.lake.parent / "checks", min_support=min_support)
        == []
    )


def test_otto_popularity_and_user_history_match_plain_python(
    otto: RealLake, otto_config: PipelineConfig
) -> None:
    config = otto_config
    assert (otto.days[0], otto.as_of, len(otto.events)) == (dt.date(2022, 7, 31), dt.date(2022, 8, 28), 862)
    weights = dict(config.event_weights)
    items = _single_build("popularity", otto, config)
    assert items.rows() == expected_popularity(otto.events, config, otto.as_of, 0, 100)
    history = _single_build("user_history", otto, config)
    got = [
        (user, rank, item, int(ts.timestamp() * 1000), weight)
        for user, rank, item, ts, weight in history.rows()
    ]
    assert got == expected_history(otto.events, weights, 20)
