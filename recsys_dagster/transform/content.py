"""The `content` artifact: item-to-item similarity from what the catalog says about items, for items that
events say too little about (new ones above all).

Each available item of a tenant's catalog as of day D becomes a TF-IDF vector (scikit-learn's
`TfidfVectorizer`, L2-normalised) over its features: each category, each tag and each word of its title
(lower-cased, 2+ characters, English stop words left out), each feature prefixed with its field so that a
category and a title word never match. Its neighbours are the other available items with the highest cosine
(a dot product of the normalised vectors), at least one feature in common, top K. Scores are rounded to 12
decimals so that mathematically equal ones tie and the tie goes to the smaller item id: the same catalog
gives the same rows, and so the same version. Unavailable items are neither given nor chosen as neighbours.

One artifact per (tenant, surface) the window artifacts were built for, for tenants that have a catalog: a
catalog serves every surface of its tenant. Its meta.json records the catalog partition (day and file
SHA-256) it was built from; publishing confirms that partition is still that content and passed its
blocking checks (`catalog_input_problems`). Nothing here imports Dagster.

Besides the neighbour rows, the artifact carries what the server needs of the catalog: `items.parquet`, every
item of the tenant's catalog (available or not) with its availability, categories, tags and attributes, and
the items' TF-IDF vectors as CSR arrays aligned with its rows (`vector_indptr.npy`, `vector_features.npy`,
`vector_values.npy`; an unavailable item's row is empty), from which the server computes the content
similarity of any two items (diversity re-ranking).
"""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from scipy import sparse
from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS, TfidfVectorizer

from recsys_core.catalog import catalog_problem, partition_dir, read_catalog, read_catalog_record
from recsys_core.kinds import CONTENT, CONTENT_ITEMS_FILE, CONTENT_VECTOR_FILES
from recsys_core.lake import read_builds
from recsys_core.manifest import target_dir
from recsys_core.settings import PipelineConfig
from recsys_dagster.transform.artifact_dir import write_artifact_dir
from recsys_dagster.transform.artifacts import FORMAT, TOP_ROWS, ArtifactBuild

_WORD = re.compile(r"\w\w+")
# Cells of the dense block of similarities computed at once (rows x items): about 32 MB of float64.
BLOCK_CELLS = 4_000_000
SCORE_DECIMALS = 12


def item_features(title: str, categories: list[str], tags: list[str]) -> list[str]:
    """The features of one item: `category:<c>`, `tag:<t>`, `title:<word>`, lower-cased."""
    words = [word for word in _WORD.findall(title.lower()) if word not in ENGLISH_STOP_WORDS]
    return [
        *(f"category:{category.lower()}" for category in categories),
        *(f"tag:{tag.lower()}" for tag in tags),
        *(f"title:{word}" for word in words),
    ]


def content_vectors(items: pl.DataFrame) -> sparse.csr_matrix | None:
    """The L2-normalised TF-IDF vectors of `items` (`title`, `categories`, `tags`), one row per item in the
    given order; None when no item has a feature."""
    documents = [
        item_features(title, categories, tags)
        for title, categories, tags in items.select("title", "categories", "tags").iter_rows()
    ]
    if not any(documents):
        return None
    vectors = TfidfVectorizer(analyzer=lambda features: features, dtype=np.float64).fit_transform(documents)
    return sparse.csr_matrix(vectors)


def content_neighbors(items: pl.DataFrame, top_k: int) -> pl.DataFrame:
    """Each item's top-`top_k` neighbours by content (see the module docstring).

    `items` has `item_id`, `title`, `categories` and `tags` (the available items of one tenant); the result
    has CONTENT's columns, sorted by item_id, then rank.
    """
    items = items.sort("item_id")
    return _neighbors(items["item_id"].to_list(), content_vectors(items), top_k)


def _neighbors(ids: list[str], vectors: sparse.csr_matrix | None, top_k: int) -> pl.DataFrame:
    """The top-`top_k` rows of the items `ids` (sorted) whose vectors are `vectors`."""
    empty = pl.DataFrame(CONTENT.schema.empty_table())
    if len(ids) < 2 or vectors is None:
        return empty
    transposed = vectors.T.tocsc()
    rows_per_block = max(1, BLOCK_CELLS // len(ids))
    sources: list[int] = []
    neighbors: list[np.ndarray] = []
    scores: list[np.ndarray] = []
    for start in range(0, len(ids), rows_per_block):
        block = (vectors[start : start + rows_per_block] @ transposed).toarray()
        block = np.round(block, SCORE_DECIMALS)
        for offset, row in enumerate(block):
            row[start + offset] = 0.0  # an item is not its own neighbour
            chosen = _top(row, top_k)
            sources.extend([start + offset] * len(chosen))
            neighbors.append(chosen)
            scores.append(row[chosen])
    if not sources:
        return empty
    neighbor_index = np.concatenate(neighbors)
    id_array = np.array(ids, dtype=object)
    frame = pl.DataFrame(
        {
            "item_id": id_array[np.array(sources, dtype=np.int64)].tolist(),
            "neighbor_id": id_array[neighbor_index].tolist(),
            "score": np.concatenate(scores),
        },
        schema={"item_id": pl.String, "neighbor_id": pl.String, "score": pl.Float64},
    )
    ranked = frame.with_columns(rank=(pl.int_range(pl.len()).over("item_id") + 1).cast(pl.Int32))
    return ranked.select(empty.columns)


def content_files(catalog: pl.DataFrame, top_k: int) -> dict[str, pl.DataFrame | np.ndarray]:
    """The files of one tenant's content artifact from its catalog state (every item, available or not):
    the neighbour rows of the available items, the item table and the vectors aligned with it."""
    catalog = catalog.sort("item_id")
    available = catalog.filter(pl.col("available"))
    vectors = content_vectors(available)
    n_features = 0 if vectors is None else vectors.shape[1]
    # The available items' rows, placed among every item's (the others stay empty).
    rows = sparse.csr_matrix((catalog.height, n_features), dtype=np.float64)
    if vectors is not None:
        positions = np.flatnonzero(catalog["available"].to_numpy())
        placement = sparse.csr_matrix(
            (np.ones(len(positions)), (positions, np.arange(len(positions)))),
            shape=(catalog.height, len(positions)),
        )
        rows = sparse.csr_matrix(placement @ vectors)
    rows.sort_indices()
    table = catalog.select("item_id", "available", "categories", "tags", "attributes").cast(
        {"categories": pl.List(pl.String), "tags": pl.List(pl.String)}
    )
    return {
        CONTENT.table: _neighbors(available["item_id"].to_list(), vectors, top_k),
        CONTENT_ITEMS_FILE: table,
        CONTENT_VECTOR_FILES[0]: rows.indptr.astype(np.int64),
        CONTENT_VECTOR_FILES[1]: rows.indices.astype(np.int32),
        CONTENT_VECTOR_FILES[2]: rows.data.astype(np.float64),
    }


def _top(row: np.ndarray, top_k: int) -> np.ndarray:
    """Indices of the `top_k` largest positive values of `row`, largest first, ties by smaller index (items
    are sorted by id, so by smaller id)."""
    positive = np.flatnonzero(row > 0)
    if len(positive) > top_k:
        # Everything at or above the k-th largest value, ties at the boundary included, then ordered.
        threshold = np.partition(row[positive], len(positive) - top_k)[len(positive) - top_k]
        positive = positive[row[positive] >= threshold]
    order = np.lexsort((positive, -row[positive]))
    return positive[order][:top_k]


def build_content_artifacts(
    lake_root: Path,
    artifact_root: Path,
    as_of: dt.date,
    config: PipelineConfig,
    targets: list[tuple[str, str]],
    *,
    run_id: str | None = None,
) -> list[ArtifactBuild]:
    """The content artifact as of `as_of` for each of `targets` (tenant, surface) whose tenant has a
    catalog. Raises ValueError when the catalog state as of `as_of` is missing, modified or failed its
    blocking checks."""
    problem = catalog_problem(lake_root, as_of)
    if problem:
        raise ValueError(problem)
    record = read_catalog_record(lake_root, as_of)
    assert record is not None  # catalog_problem found it
    state = pl.from_arrow(read_catalog(lake_root, as_of))
    assert isinstance(state, pl.DataFrame)
    top_k = config.catalog.content_top_k
    inputs = {"catalog": {"day": as_of.isoformat(), "sha256": record["sha256"]}}
    built_at = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    per_tenant: dict[str, dict[str, pl.DataFrame | np.ndarray]] = {}
    builds: list[ArtifactBuild] = []
    for tenant, surface in sorted(targets):
        if tenant not in record["tenants"]:
            continue
        if tenant not in per_tenant:
            per_tenant[tenant] = content_files(state.filter(pl.col("tenant") == tenant), top_k)
        files = per_tenant[tenant]
        table = files[CONTENT.table]
        assert isinstance(table, pl.DataFrame)
        meta: dict[str, Any] = {
            "format": FORMAT,
            "kind": CONTENT.name,
            "tenant": tenant,
            "surface": surface,
            "as_of": as_of.isoformat(),
            "params": CONTENT.params(config),
            "inputs": inputs,
            "built_at": built_at,
            "run_id": run_id,
        }
        version, path = write_artifact_dir(
            target_dir(artifact_root, tenant, surface), CONTENT.name, meta, files
        )
        builds.append(
            ArtifactBuild(
                tenant=tenant,
                surface=surface,
                kind=CONTENT.name,
                version=version,
                path=Path(path),
                rows=table.height,
                window_start=as_of,
                window_end=as_of,
                top=tuple(table.head(TOP_ROWS).iter_rows(named=True)),
            )
        )
    return builds


def built_content(lake_root: Path, as_of: dt.date) -> dict[tuple[str, str], Path]:
    """The content artifacts built as of `as_of`, by (tenant, surface). FileNotFoundError when a catalog
    with items exists as of that day but no content was built: publishing would silently drop it."""
    record = read_builds(lake_root, CONTENT.name, as_of)
    if record is None:
        catalog = read_catalog_record(lake_root, as_of)
        if catalog is not None and catalog["items"]:
            raise FileNotFoundError(
                f"the catalog as of {as_of} has items but no content artifact was built as of that day; "
                "materialize content before publishing"
            )
        return {}
    return {(entry["tenant"], entry["surface"]): Path(entry["path"]) for entry in record["artifacts"]}


def catalog_input_problems(lake_root: Path, kind: str, meta: dict[str, Any]) -> list[str]:
    """Why an artifact built from the catalog may not be published: the catalog partition it records is
    gone, was modified or re-materialized since, or failed its blocking checks."""
    recorded = (meta.get("inputs") or {}).get("catalog")
    if recorded is None:
        return []
    day = dt.date.fromisoformat(recorded["day"])
    problem = catalog_problem(lake_root, day)
    if problem:
        return [f"artifact {kind} was built from {problem}"]
    current = read_catalog_record(lake_root, day)
    if current is None or current["sha256"] != recorded["sha256"]:
        return [
            f"artifact {kind} was built from catalog {day} content {recorded['sha256'][:12]}, which was "
            f"re-materialized since ({partition_dir(lake_root, day)}); re-run content for {day}"
        ]
    return []
