"""The artifact kinds: one declaration per kind, read by the pipeline, publishing and the API server.

A kind says what it is built from (a daily aggregate over a trailing window), how (a SQL model of
`dbt_like_sql/`), what it holds (its Parquet file, with columns in the order docs/reference/artifacts.md
lists them), which configuration shapes it, how its rows are checked before publishing, and whether a
manifest must have it. Adding a kind is one `ArtifactKind` here plus its builder: a SQL model whose rows
are the artifact's table, or a SQL model that prepares the input of a trainer (`recsys_dagster.transform`,
looked up by the kind's name) that writes the artifact's files. Kinds built from the item catalog rather
than from events are `CatalogArtifactKind`s (`CATALOG_KINDS`), always optional.

A derived kind (`derived_from`) is computed from other kinds' artifacts of the same as-of day rather than
from an aggregate (`user_topn`: the served blend precomputed per user); it has no aggregate or SQL model.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from recsys_core.settings import PipelineConfig


@dataclass(frozen=True)
class ArtifactKind:
    name: str
    description: str
    # The daily aggregate whose partitions of the trailing window the artifact is computed from (None for
    # a derived kind).
    aggregate: str | None
    # The artifact's data file and its columns (names, types, order).
    table: str
    schema: pa.Schema
    # The columns the API server reads from `table`.
    served_columns: tuple[str, ...]
    # Required kinds must be in every manifest and have at least one row; the others are optional, so a
    # manifest published before an optional kind existed still serves.
    required: bool
    # The dbt_like_sql model that computes the kind (or, for a trained kind, its input) over the window
    # (None for a derived kind).
    sql_model: str | None
    # What shapes the content, recorded in meta.json (and so part of the version).
    params: Callable[[PipelineConfig], dict[str, Any]]
    # The SQL model's parameters besides `paths` (None for a derived kind).
    sql_params: Callable[[PipelineConfig, dt.date], dict[str, Any]] | None
    # A dbt_like_sql/checks query over `table` that returns the rows breaking the kind's contract.
    row_check: str | None = None
    # True when a trainer turns the SQL model's rows into the files (`table` and `files`).
    trained: bool = False
    # The files a trainer (or a derived kind's builder) writes besides `table` (e.g. factor arrays).
    files: tuple[str, ...] = ()
    # The kinds whose artifacts of the same as-of day a derived kind is computed from.
    derived_from: tuple[str, ...] = ()

    def window_model(self) -> tuple[str, str, Callable[[PipelineConfig, dt.date], dict[str, Any]]]:
        """(aggregate, SQL model, SQL parameters) of a kind computed over a window of aggregates;
        ValueError for a derived kind."""
        if self.aggregate is None or self.sql_model is None or self.sql_params is None:
            raise ValueError(
                f"{self.name} is derived from {', '.join(self.derived_from)}, not computed over a window"
            )
        return self.aggregate, self.sql_model, self.sql_params

    def window_days(self, config: PipelineConfig) -> int:
        """The length of the kind's trailing window (`artifacts.<kind>.window_days`; a derived kind's is
        the widest of its inputs')."""
        if self.derived_from:
            return max(ARTIFACT_KINDS[name].window_days(config) for name in self.derived_from)
        days: int = getattr(config.artifacts, self.name).window_days
        return days


POPULARITY = ArtifactKind(
    name="popularity",
    description="Top-N items per tenant/surface by event-type-weighted counts over the trailing window.",
    aggregate="item_daily",
    table="items.parquet",
    schema=pa.schema(
        [("rank", pa.int32()), ("item_id", pa.string()), ("score", pa.float64()), ("events", pa.int64())]
    ),
    served_columns=("rank", "item_id", "score"),
    required=True,
    sql_model="popularity",
    params=lambda config: {
        "window_days": config.artifacts.popularity.window_days,
        "top_n": config.artifacts.popularity.top_n,
        "half_life_days": config.artifacts.popularity.half_life_days,
        "event_weights": config.interest_weights(),
        "event_value_scales": config.value_scales(),
    },
    sql_params=lambda config, as_of: {
        "weights": config.interest_weight_rows(),
        "as_of": as_of.isoformat(),
        "half_life_days": float(config.artifacts.popularity.half_life_days),
        "top_n": config.artifacts.popularity.top_n,
    },
    row_check="checks/popularity_invalid_rows",
)

COOC = ArtifactKind(
    name="cooc",
    description="Each item's top-K neighbours by normalised session co-occurrence over the trailing window.",
    aggregate="pair_daily",
    table="neighbors.parquet",
    schema=pa.schema(
        [
            ("item_id", pa.string()),
            ("rank", pa.int32()),
            ("neighbor_id", pa.string()),
            ("score", pa.float64()),
            ("count", pa.int64()),
        ]
    ),
    served_columns=("item_id", "rank", "neighbor_id", "score"),
    required=False,
    sql_model="cooc",
    # Parameters applied upstream by pair_daily (max_session_items, the event types that count) are
    # recorded too, as the configuration the aggregates are expected to have been built with.
    params=lambda config: {
        "window_days": config.artifacts.cooc.window_days,
        "metric": config.artifacts.cooc.metric,
        "top_k": config.artifacts.cooc.top_k,
        "min_support": config.artifacts.cooc.min_support,
        "max_session_items": config.artifacts.cooc.max_session_items,
        "max_items": config.artifacts.cooc.max_items,
        "event_types": list(config.interest_weights()),
    },
    sql_params=lambda config, as_of: {
        "metric": config.artifacts.cooc.metric,
        "min_support": config.artifacts.cooc.min_support,
        "top_k": config.artifacts.cooc.top_k,
        "max_items": config.artifacts.cooc.max_items,
    },
    row_check="checks/cooc_invalid_rows",
)

USER_HISTORY = ArtifactKind(
    name="user_history",
    description="Each user's most recent distinct items in the trailing window (exclude-seen, context).",
    aggregate="user_item_daily",
    table="history.parquet",
    schema=pa.schema(
        [
            ("user_id", pa.string()),
            ("rank", pa.int32()),
            ("item_id", pa.string()),
            ("last_ts", pa.timestamp("us", tz="UTC")),
            ("weight", pa.float64()),
        ]
    ),
    served_columns=("user_id", "rank", "item_id", "weight"),
    required=False,
    sql_model="user_history",
    params=lambda config: {
        "window_days": config.artifacts.user_history.window_days,
        "max_items": config.artifacts.user_history.max_items,
        "event_weights": config.interest_weights(),
        "event_value_scales": config.value_scales(),
    },
    sql_params=lambda config, as_of: {"max_items": config.artifacts.user_history.max_items},
)

ALS = ArtifactKind(
    name="als",
    description=(
        "Implicit-feedback ALS (the implicit library) on the window's user-item interactions: user and item "
        "factors with their id maps."
    ),
    aggregate="user_item_daily",
    # Row i of item_factors.npy is the factor of items.parquet's row i; likewise for users.
    table="items.parquet",
    schema=pa.schema([("item_id", pa.string())]),
    served_columns=("item_id",),
    required=False,
    sql_model="als_interactions",
    params=lambda config: {
        "window_days": config.artifacts.als.window_days,
        "factors": config.artifacts.als.factors,
        "regularization": config.artifacts.als.regularization,
        "alpha": config.artifacts.als.alpha,
        "iterations": config.artifacts.als.iterations,
        "random_state": config.artifacts.als.random_state,
        "half_life_days": config.artifacts.als.half_life_days,
        "confidence": config.artifacts.als.confidence,
        "event_weights": config.interest_weights(),
        "event_value_scales": config.value_scales(),
    },
    sql_params=lambda config, as_of: {
        "as_of": as_of.isoformat(),
        "half_life_days": float(config.artifacts.als.half_life_days),
    },
    trained=True,
    files=("users.parquet", "user_factors.npy", "item_factors.npy"),
)

# Source names, in the order the blend sums them (`user_topn` stores one contribution column per source).
BLEND_SOURCES = ("als", "cooc", "popularity")

USER_TOPN = ArtifactKind(
    name="user_topn",
    description=(
        "Each ALS-known user's top N candidates of the served blend (seen items excluded), precomputed from "
        "the day's als, cooc, popularity and user_history artifacts with the configured blend weights."
    ),
    aggregate=None,
    # Row u of users.parquet owns rows offsets[u]:offsets[u + 1] of items.npy and contributions.npy.
    table="users.parquet",
    schema=pa.schema([("user_id", pa.string()), ("sources", pa.string())]),
    served_columns=("user_id", "sources"),
    required=False,
    sql_model=None,
    params=lambda config: {
        "top_n": config.artifacts.user_topn.top_n,
        "blend": {source: getattr(config.blend, source) for source in BLEND_SOURCES},
    },
    sql_params=None,
    files=("item_ids.parquet", "offsets.npy", "items.npy", "contributions.npy"),
    derived_from=("popularity", "cooc", "user_history", "als"),
)

ARTIFACT_KINDS: Mapping[str, ArtifactKind] = {
    kind.name: kind for kind in (POPULARITY, COOC, USER_HISTORY, ALS, USER_TOPN)
}
# Every kind, inputs before the kinds derived from them.
KINDS: tuple[str, ...] = tuple(ARTIFACT_KINDS)
# The kinds computed from the daily aggregates of their window (what the evaluation and tuning retrain).
WINDOW_KINDS: tuple[str, ...] = tuple(kind.name for kind in ARTIFACT_KINDS.values() if not kind.derived_from)
REQUIRED_KINDS: tuple[str, ...] = tuple(kind.name for kind in ARTIFACT_KINDS.values() if kind.required)


@dataclass(frozen=True)
class CatalogArtifactKind:
    """A kind built from a tenant's item catalog as of the day (the `catalog` asset), not from a window of
    events. Always optional: a tenant without a catalog has none, and its manifests serve without it."""

    name: str
    description: str
    table: str
    schema: pa.Schema
    served_columns: tuple[str, ...]
    params: Callable[[PipelineConfig], dict[str, Any]]
    # The files written besides `table`.
    files: tuple[str, ...] = ()


# The content artifact's item table: every catalog item of the tenant (available or not) with what serving
# filters and diversifies by; row i's TF-IDF vector is CSR row i of the vector_*.npy arrays.
CONTENT_ITEMS_FILE = "items.parquet"
CONTENT_ITEMS_SCHEMA = pa.schema(
    [
        ("item_id", pa.string()),
        ("available", pa.bool_()),
        ("categories", pa.list_(pa.string())),
        ("tags", pa.list_(pa.string())),
        ("attributes", pa.string()),
    ]
)
CONTENT_VECTOR_FILES = ("vector_indptr.npy", "vector_features.npy", "vector_values.npy")

CONTENT = CatalogArtifactKind(
    name="content",
    description=(
        "Each available catalog item's top-K most similar available items by content: cosine of TF-IDF "
        "vectors over its categories, tags and title words."
    ),
    table="neighbors.parquet",
    # cooc's neighbour rows without the co-occurrence count: a server reads both the same way.
    schema=COOC.schema.remove(COOC.schema.get_field_index("count")),
    served_columns=COOC.served_columns,
    params=lambda config: {
        "top_k": config.catalog.content_top_k,
        "features": ["categories", "tags", "title"],
    },
    files=(CONTENT_ITEMS_FILE, *CONTENT_VECTOR_FILES),
)
CATALOG_KINDS: Mapping[str, CatalogArtifactKind] = {CONTENT.name: CONTENT}


def artifact_kind(name: str) -> ArtifactKind:
    """The declaration of kind `name`; ValueError naming the known kinds otherwise."""
    try:
        return ARTIFACT_KINDS[name]
    except KeyError:
        raise ValueError(f"unknown artifact kind {name!r}: choose one of {', '.join(KINDS)}") from None
