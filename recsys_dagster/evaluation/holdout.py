"""Held-out test sets from `user_item_daily` rows: what a model is trained on, what it must find.

Input: the `user_item_daily` partitions of one tenant and surface over a window, as one frame (columns
day, tenant, surface, user_id, item_id, weight, events, last_ts; dbt_like_sql/user_item_daily.sql). Only
rows with weight > 0 are interactions (the SQL writes no others; the filter keeps the rule explicit).

Two protocols give a training frame (rows of the input) and a test set of (user, item) pairs:

- `temporal_holdout`: training = the days up to `as_of - holdout_days`; test = the interactions of the
  last `holdout_days` days (`as_of` and the days before it), what a model built yesterday would have had
  to predict today;
- `random_holdout`: per user, a seeded random `test_fraction` (floor of it, so users with fewer than
  1 / test_fraction items keep all of theirs for training) of the user's distinct items is the test set,
  all their rows out of training; the rest of the rows are training. Deterministic for a given seed and
  set of pairs, whatever the row order.

Both then keep, as the held-out set of a user, only the test items that
- belong to a user who has training interactions (a model cannot personalise for a stranger),
- the user did not already interact with in training ("new items" protocol: serving excludes seen
  items, so a re-interaction could never be recommended),
- are in the training catalog (no model built from training can recommend an item it never saw).

Users left with no held-out item are not evaluated. The evaluated users are split into segments by their
number of distinct training items: `cold_start` (<= `cold_start_max_interactions`) and `active` (the
others); `all` is both.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast

import numpy as np
import polars as pl

SEGMENT_ALL = "all"
SEGMENT_COLD_START = "cold_start"
SEGMENT_ACTIVE = "active"
SEGMENTS = (SEGMENT_ALL, SEGMENT_COLD_START, SEGMENT_ACTIVE)
DEFAULT_COLD_START_MAX_INTERACTIONS = 3

_PAIR = ["user_id", "item_id"]
_REQUIRED_COLUMNS = ("day", "tenant", "surface", "user_id", "item_id", "weight")


@dataclass(frozen=True)
class Holdout:
    """A training frame, the items each evaluated user must find, and the users of each segment."""

    # The input rows the models may learn from (user_item_daily columns).
    training: pl.DataFrame
    # Per evaluated user (sorted), the held-out items; never empty.
    held_out: Mapping[str, frozenset[str]]
    # SEGMENTS -> the evaluated users in it.
    segments: Mapping[str, frozenset[str]]


def temporal_holdout(
    interactions: pl.DataFrame,
    holdout_days: int = 1,
    cold_start_max_interactions: int = DEFAULT_COLD_START_MAX_INTERACTIONS,
    as_of: dt.date | None = None,
) -> Holdout:
    """Train on the days before the last `holdout_days` days up to `as_of` (default: the latest day)."""
    if holdout_days < 1:
        raise ValueError(f"holdout_days must be >= 1, got {holdout_days}")
    rows = _interactions(interactions)
    if as_of is None:
        if rows.is_empty():
            raise ValueError("no interactions to hold out")
        as_of = cast(dt.date, rows["day"].max())
    elif not rows.filter(pl.col("day") > as_of).is_empty():
        raise ValueError(f"interactions after the as-of day {as_of}: the window ends at as_of")
    first_test_day = as_of - dt.timedelta(days=holdout_days - 1)
    training = rows.filter(pl.col("day") < first_test_day)
    test_pairs = rows.filter(pl.col("day") >= first_test_day).select(_PAIR)
    return _holdout(training, test_pairs, cold_start_max_interactions)


def random_holdout(
    interactions: pl.DataFrame,
    test_fraction: float = 0.25,
    seed: int = 0,
    cold_start_max_interactions: int = DEFAULT_COLD_START_MAX_INTERACTIONS,
) -> Holdout:
    """Hold out a seeded random `test_fraction` of each user's distinct items."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rows = _interactions(interactions)
    # Sorted first, so that the random draws land on the same pairs whatever the input order.
    pairs = rows.select(_PAIR).unique().sort(_PAIR)
    draws = pl.Series("draw", np.random.default_rng(seed).random(pairs.height))
    test_pairs = (
        pairs.with_columns(draws)
        .filter(
            pl.col("draw").rank("ordinal").over("user_id")
            <= (pl.len().over("user_id") * test_fraction).floor()
        )
        .select(_PAIR)
    )
    training = rows.join(test_pairs, on=_PAIR, how="anti", maintain_order="left")
    return _holdout(training, test_pairs, cold_start_max_interactions)


def item_popularity(training: pl.DataFrame) -> dict[str, int]:
    """Per training item, the number of distinct users who interacted with it (sorted by item id)."""
    counts = training.group_by("item_id").agg(pl.col("user_id").n_unique().alias("users")).sort("item_id")
    return dict(zip(counts["item_id"].to_list(), counts["users"].to_list(), strict=True))


def _interactions(frame: pl.DataFrame) -> pl.DataFrame:
    missing = [column for column in _REQUIRED_COLUMNS if column not in frame.columns]
    if missing:
        raise ValueError(f"user_item_daily rows need the columns {', '.join(missing)}")
    scopes = frame.select("tenant", "surface").unique().sort("tenant", "surface").rows()
    if len(scopes) > 1:
        # Users and items of different tenants or surfaces are different things: evaluate each alone.
        raise ValueError(f"rows of several tenants and surfaces {scopes}: evaluate one at a time")
    return frame.filter(pl.col("weight") > 0)


def _holdout(training: pl.DataFrame, test_pairs: pl.DataFrame, cold_start_max_interactions: int) -> Holdout:
    if cold_start_max_interactions < 0:
        raise ValueError(f"cold_start_max_interactions must be >= 0, got {cold_start_max_interactions}")
    training_pairs = training.select(_PAIR).unique()
    test = (
        test_pairs.unique()
        .join(training_pairs.select("user_id").unique(), on="user_id", how="semi")
        .join(training_pairs, on=_PAIR, how="anti")
        .join(training_pairs.select("item_id").unique(), on="item_id", how="semi")
    )
    grouped = test.group_by("user_id").agg(pl.col("item_id")).sort("user_id")
    held_out = {
        user: frozenset(items)
        for user, items in zip(grouped["user_id"].to_list(), grouped["item_id"].to_list(), strict=True)
    }
    training_items = training_pairs.group_by("user_id").len()
    cold_start = frozenset(
        training_items.filter(
            pl.col("user_id").is_in(list(held_out)) & (pl.col("len") <= cold_start_max_interactions)
        )["user_id"].to_list()
    )
    evaluated = frozenset(held_out)
    return Holdout(
        training=training,
        held_out=held_out,
        segments={
            SEGMENT_ALL: evaluated,
            SEGMENT_COLD_START: cold_start,
            SEGMENT_ACTIVE: evaluated - cold_start,
        },
    )
