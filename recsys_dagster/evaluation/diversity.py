"""The accuracy / diversity trade-off of the served ranking: per diversity setting, the lists the server
would return (`recsys_serving.recommender.recommend` with `diversity` and `max_per_category`) scored for
accuracy against held-out items and for diversity against the catalog.

- intra-list diversity: per list, 1 - the mean content similarity (cosine of the items' TF-IDF vectors,
  the similarity the re-ranking uses) of its distinct pairs, averaged over the lists of two items or more;
- categories per list: the distinct catalog categories of a list, averaged over the lists;
- category coverage: the distinct categories of all lists over the categories of the catalog's available
  items.

`with_catalog` gives a target the catalog as the server would serve it (the content artifact's files built
from a catalog state by the pipeline's own `content_files`). Nothing here imports Dagster.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

from recsys_core.kinds import CONTENT, CONTENT_ITEMS_FILE, CONTENT_VECTOR_FILES
from recsys_core.settings import BlendWeights
from recsys_dagster.evaluation.holdout import Holdout
from recsys_dagster.evaluation.metrics import score_users
from recsys_dagster.transform.content import content_files
from recsys_serving import recommender
from recsys_serving.catalog import ContentTables, ServedCatalog
from recsys_serving.diversity import intra_list_diversity
from recsys_serving.store import LoadedTarget

# The settings the trade-off is reported for: (diversity, max_per_category).
DIVERSITY_SETTINGS: tuple[tuple[float, int | None], ...] = (
    (0.0, None),
    (0.1, None),
    (0.2, None),
    (0.3, None),
    (0.5, None),
    (0.7, None),
    (0.0, 3),
)


@dataclass(frozen=True)
class DiversityRow:
    """One setting's figures (accuracy metrics averaged over the held-out users)."""

    diversity: float
    max_per_category: int | None
    precision: float
    recall: float
    ndcg: float
    intra_list_diversity: float
    categories_per_list: float
    category_coverage: float


def with_catalog(target: LoadedTarget, catalog: pl.DataFrame, top_k: int) -> LoadedTarget:
    """`target` serving the catalog state `catalog` (one tenant's items: `item_id`, `title`, `categories`,
    `tags`, `available`, `attributes`) as its content artifact would."""
    files = content_files(catalog, top_k)
    frames = {name: data for name, data in files.items() if isinstance(data, pl.DataFrame)}
    arrays = [files[name] for name in CONTENT_VECTOR_FILES]
    assert all(isinstance(array, np.ndarray) for array in arrays)
    tables = ContentTables(
        "offline",
        frames[CONTENT.table].to_arrow(),
        frames[CONTENT_ITEMS_FILE].to_arrow(),
        *arrays,  # type: ignore[arg-type]
    )
    return dataclasses.replace(target, catalog=ServedCatalog(tables, target.item_index, target.n_items))


def diversity_tradeoff(
    target: LoadedTarget,
    holdout: Holdout,
    k: int,
    weights: BlendWeights,
    settings: Sequence[tuple[float, int | None]] = DIVERSITY_SETTINGS,
) -> list[DiversityRow]:
    """Each of `settings` scored on `holdout`'s users with the lists `recommend` gives them (seen items
    excluded, no rules: the models alone, as the offline evaluation measures them). ValueError without
    a catalog."""
    catalog = target.catalog
    if catalog is None:
        raise ValueError(f"{target.tenant}/{target.surface} has no catalog: no diversity to measure")
    index = target.item_index
    every_category = {c for n in range(target.n_items) if catalog.available[n] for c in catalog.categories[n]}
    users = sorted(holdout.held_out)
    rows = []
    for diversity, cap in settings:
        lists = {
            user: recommender.recommend(
                target,
                user_id=user,
                k=k,
                exclude_seen=True,
                weights=weights,
                diversity=diversity,
                max_per_category=cap,
            ).item_ids
            for user in users
        }
        scores = score_users(lists, holdout.held_out, k)
        ild: list[float] = []
        per_list: list[int] = []
        seen: set[str] = set()
        for items in lists.values():
            positions = [index[item] for item in items]
            if len(positions) >= 2:
                ild.append(intra_list_diversity(catalog.similarities(positions)))
            categories = {c for n in positions for c in catalog.categories[n]}
            per_list.append(len(categories))
            seen |= categories
        rows.append(
            DiversityRow(
                diversity=diversity,
                max_per_category=cap,
                precision=scores.mean("precision"),
                recall=scores.mean("recall"),
                ndcg=scores.mean("ndcg"),
                intra_list_diversity=sum(ild) / len(ild) if ild else 0.0,
                categories_per_list=sum(per_list) / len(per_list) if per_list else 0.0,
                category_coverage=len(seen) / len(every_category) if every_category else 0.0,
            )
        )
    return rows
