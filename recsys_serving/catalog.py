"""The item catalog as the server uses it: availability, categories, tags and attributes of every item, the
content neighbours of each item and its TF-IDF vector, from a target's `content` artifact.

Everything is indexed by the target's vocabulary once at load. A request asks for the items it may return
(`allowed`: the available ones, narrowed by category filters) as one boolean mask over the vocabulary, and
for the content similarity of a handful of candidates (`similarities`: the dot products of their
L2-normalised vectors, so cosine, the measure the content neighbours were ranked by). An item the catalog
does not list is available and has no category, tag or vector. A target without a catalog has none of
this, and its requests pay nothing for it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recsys_core.kinds import CONTENT, CONTENT_ITEMS_FILE, CONTENT_VECTOR_FILES
from recsys_core.manifest import Manifest, read_meta, resolve_uri, verify_artifact

SOURCE_CONTENT = "content"


class CatalogLoadError(RuntimeError):
    """A `content` artifact that cannot be served; the message says which file and why."""


@dataclass(frozen=True, slots=True)
class ContentTables:
    """The files of a verified `content` artifact, as read."""

    version: str
    neighbors: pa.Table  # item_id, rank, neighbor_id, score
    items: pa.Table  # CONTENT_ITEMS_SCHEMA
    vector_indptr: np.ndarray
    vector_features: np.ndarray
    vector_values: np.ndarray

    def item_ids(self) -> list[pa.ChunkedArray]:
        """Every item id the artifact names (the target's vocabulary includes them)."""
        return [self.items["item_id"], self.neighbors["item_id"], self.neighbors["neighbor_id"]]


def read_content(artifact_root: Path, tenant: str, surface: str, manifest: Manifest) -> ContentTables | None:
    """The files of the `content` artifact `manifest` names, verified; `CatalogLoadError` if unusable, None
    for a content artifact built before it carried the item table (neighbours only), which is then not
    served: the manifest serves as one without a catalog rather than not at all."""
    uri = manifest["current"][CONTENT.name]
    folder = resolve_uri(artifact_root, tenant, surface, uri)
    problems = verify_artifact(folder, required_nonempty=False)
    if problems:
        raise CatalogLoadError(f"content artifact {uri} is not valid: {'; '.join(problems)}")
    version = str(manifest["artifacts"][CONTENT.name]["version"])
    meta = read_meta(folder)
    if meta.get("version") != version:
        raise CatalogLoadError(f"content artifact {uri}: meta.json version does not match the manifest's")
    if not set(CONTENT.files) <= set(meta.get("files", {})):
        return None
    try:
        neighbors = pq.read_table(folder / CONTENT.table, columns=list(CONTENT.served_columns))
        items = pq.read_table(folder / CONTENT_ITEMS_FILE)
        indptr, features, values = (
            np.load(folder / name, allow_pickle=False) for name in CONTENT_VECTOR_FILES
        )
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise CatalogLoadError(f"content artifact {uri}: unreadable ({exc})") from exc
    if (
        indptr.shape != (items.num_rows + 1,)
        or features.shape != values.shape
        or (len(indptr) and (indptr[0] != 0 or indptr[-1] != len(features) or np.any(np.diff(indptr) < 0)))
        or not np.isfinite(values).all()
    ):
        raise CatalogLoadError(f"content artifact {uri}: vector arrays do not match the item table")
    return ContentTables(version, neighbors, items, indptr, features, values)


class ServedCatalog:
    """One target's catalog, indexed by the target's vocabulary (immutable once built)."""

    def __init__(self, tables: ContentTables, item_index: Mapping[str, int], n_items: int) -> None:
        self.version = tables.version
        # Items outside the vocabulary are left out (a server's vocabulary has every item of the artifact;
        # an evaluation's, trained on fewer days, may not).
        items = tables.items
        inside = pc.is_in(items["item_id"], value_set=pa.array(list(item_index), pa.string()))
        items = items.filter(inside)
        rows = np.array([item_index[item] for item in items["item_id"].to_pylist()], dtype=np.int64)
        indptr = tables.vector_indptr
        kept = np.flatnonzero(inside.to_numpy(zero_copy_only=False))
        # Items the catalog does not list are available.
        self.available = np.ones(n_items, dtype=bool)
        self.available[rows] = np.asarray(items["available"].to_pylist(), dtype=bool)
        # Every item allowed: a request without filters then skips the mask entirely.
        self.all_available = bool(self.available.all())
        self.unavailable = frozenset(np.flatnonzero(~self.available).tolist())
        self.categories: list[tuple[str, ...]] = [()] * n_items
        self.tags: list[tuple[str, ...]] = [()] * n_items
        self.attributes: list[Mapping[str, Any]] = [{}] * n_items
        by_category: dict[str, list[int]] = {}
        for row, categories, tags, attributes in zip(
            rows.tolist(),
            items["categories"].to_pylist(),
            items["tags"].to_pylist(),
            items["attributes"].to_pylist(),
            strict=True,
        ):
            self.categories[row] = tuple(categories or ())
            self.tags[row] = tuple(tags or ())
            self.attributes[row] = json.loads(attributes) if attributes else {}
            for category in self.categories[row]:
                by_category.setdefault(category, []).append(row)
        self._by_category = {name: np.array(members, dtype=np.int64) for name, members in by_category.items()}
        # Vectors re-indexed to the vocabulary: vocabulary item i owns entries vector_ptr[i]:vector_ptr[i + 1].
        lengths = np.zeros(n_items, dtype=np.int64)
        lengths[rows] = np.diff(indptr)[kept]
        self.vector_ptr = np.zeros(n_items + 1, dtype=np.int64)
        np.cumsum(lengths, out=self.vector_ptr[1:])
        # The table's rows (of the vocabulary) in vocabulary order.
        order = kept[np.argsort(rows, kind="stable")]
        self.vector_features = np.concatenate(
            [tables.vector_features[indptr[r] : indptr[r + 1]] for r in order]
            or [np.empty(0, dtype=np.int32)]
        )
        self.vector_values = np.concatenate(
            [tables.vector_values[indptr[r] : indptr[r + 1]] for r in order]
            or [np.empty(0, dtype=np.float64)]
        )
        # Content neighbours as CSR over the vocabulary, in published rank order.
        neighbors = tables.neighbors
        vocabulary = pa.array(list(item_index), pa.string())
        neighbors = neighbors.filter(
            pc.and_(
                pc.is_in(neighbors["item_id"], value_set=vocabulary),
                pc.is_in(neighbors["neighbor_id"], value_set=vocabulary),
            )
        )
        src = np.array([item_index[i] for i in neighbors["item_id"].to_pylist()], dtype=np.int64)
        dst = np.array([item_index[i] for i in neighbors["neighbor_id"].to_pylist()], dtype=np.int64)
        ranks = np.asarray(neighbors["rank"].to_pylist(), dtype=np.int64)
        scores = np.asarray(neighbors["score"].to_pylist(), dtype=np.float64)
        order = np.lexsort((ranks, src))
        self.content_neighbors = dst[order].tolist()
        self.content_scores = scores[order].tolist()
        self.content_ptr = np.zeros(n_items + 1, dtype=np.int64)
        np.cumsum(np.bincount(src, minlength=n_items), out=self.content_ptr[1:])

    def allowed(
        self, categories: Sequence[str] | None = None, exclude_categories: Sequence[str] | None = None
    ) -> np.ndarray | None:
        """The items a request may return, as a mask over the vocabulary: available, in one of
        `categories` (when given) and in none of `exclude_categories`; None when that is every item."""
        if not categories and not exclude_categories:
            return None if self.all_available else self.available
        return allowed_mask(self.available, self._by_category, categories, exclude_categories)

    def neighbors(self, item: int) -> tuple[list[int], list[float]]:
        """The item's content neighbours (vocabulary indexes) and cosines, most similar first."""
        start, end = int(self.content_ptr[item]), int(self.content_ptr[item + 1])
        return self.content_neighbors[start:end], self.content_scores[start:end]

    def similarities(self, items: Sequence[int]) -> np.ndarray:
        """The cosine of every pair of `items` (a square matrix; 0 for an item without a vector)."""
        ptr = self.vector_ptr
        spans = [(int(ptr[i]), int(ptr[i + 1])) for i in items]
        features = [self.vector_features[start:end] for start, end in spans]
        used, columns = np.unique(
            np.concatenate(features or [np.empty(0, dtype=np.int32)]), return_inverse=True
        )
        dense = np.zeros((len(items), len(used)))
        offset = 0
        for row, (start, end) in enumerate(spans):
            dense[row, columns[offset : offset + end - start]] = self.vector_values[start:end]
            offset += end - start
        similarity: np.ndarray = dense @ dense.T
        return similarity


def allowed_mask(
    available: np.ndarray,
    by_category: Mapping[str, np.ndarray],
    categories: Sequence[str] | None,
    exclude_categories: Sequence[str] | None,
) -> np.ndarray:
    """`available`, narrowed to the members of any of `categories` (when given) and to the non-members of
    every one of `exclude_categories`."""
    mask = available.copy()
    if categories:
        member = np.zeros(len(available), dtype=bool)
        for category in categories:
            if category in by_category:
                member[by_category[category]] = True
        mask &= member
    for category in exclude_categories or ():
        if category in by_category:
            mask[by_category[category]] = False
    return mask
