"""The calibrated blend: one score per item from ALS, co-occurrence and popularity, on one scale.

Each source's scores are brought to [0, 1] by dividing by its best score (negative ALS scores count as 0),
then weighted and summed over every item of the target's vocabulary:

    score(i) = w_als * als(i) / max als + w_cooc * cooc(i) / max cooc + w_pop * pop(i) / max pop

- ALS: the dot product of the user's factors (known to the model, or folded in from the seed items) with
  the item's factors; an item the model never saw scores 0.
- co-occurrence: the recency-weighted summed votes of the seed items (`ranking.cooc_top`), its maximum
  taken over the items that may be returned.
- popularity: the published popularity score (0 outside the published top N), a prior for every item.
The top `k` of the sum is exact (every item is scored: a few vector operations over the vocabulary), items
scoring 0 are never returned, and ties are broken by item id (vocabulary index). Each returned item
carries the weighted contribution of every source.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from recsys_core.settings import BlendWeights
from recsys_serving import ranking
from recsys_serving.store import LoadedTarget

SOURCE_ALS = "als"
SOURCE_COOC = ranking.SOURCE_COOC
SOURCE_POPULARITY = ranking.SOURCE_POPULARITY


@dataclass(slots=True)
class Blended:
    """Items (vocabulary indexes) best first, their blended scores and per-source contributions."""

    items: list[int]
    scores: list[float]
    contributions: list[dict[str, float]]
    # The sources that scored this request (had a usable signal and a weight > 0).
    sources_used: set[str] = field(default_factory=set)

    def sources(self) -> list[str]:
        """The main source of each item: the one that contributed most (ties: als, cooc, popularity)."""
        order = (SOURCE_ALS, SOURCE_COOC, SOURCE_POPULARITY)

        def main_source(contribution: dict[str, float]) -> str:
            return max(order, key=lambda s: (contribution.get(s, 0.0), -order.index(s)))

        return [main_source(c) for c in self.contributions]


def blend(
    target: LoadedTarget,
    *,
    user_vector: np.ndarray | None,
    seeds: list[int],
    excluded: set[int],
    k: int,
    weights: BlendWeights,
) -> Blended:
    """The top `k` items by blended score, none of them in `excluded`."""
    parts: dict[str, np.ndarray] = {}
    if user_vector is not None and target.als is not None and weights.als > 0:
        als = np.maximum(target.als.scores(user_vector), 0.0)
        top = als.max(initial=0.0)
        if top > 0:
            parts[SOURCE_ALS] = als / top
    if seeds and weights.cooc > 0:
        items, votes = ranking.cooc_top(target, seeds, target.n_items, excluded)
        if items and votes[0] > 0:
            cooc = np.zeros(target.n_items)
            cooc[items] = np.asarray(votes) / votes[0]
            parts[SOURCE_COOC] = cooc
    if weights.popularity > 0:
        parts[SOURCE_POPULARITY] = target.popularity_prior
    weight = {SOURCE_ALS: weights.als, SOURCE_COOC: weights.cooc, SOURCE_POPULARITY: weights.popularity}
    total = np.zeros(target.n_items)
    for source, scores in parts.items():
        total += weight[source] * scores
    if excluded:
        total[list(excluded)] = 0.0
    best = [int(i) for i in _top_indexes(total, k) if total[i] > 0]
    return Blended(
        best,
        [float(total[i]) for i in best],
        [{s: weight[s] * float(v[i]) for s, v in parts.items() if v[i] > 0} for i in best],
        set(parts),
    )


def _top_indexes(scores: np.ndarray, n: int) -> np.ndarray:
    """Indexes of the `n` highest scores, best first (ties by index)."""
    n = min(n, len(scores))
    if n == 0:
        return np.empty(0, dtype=np.int64)
    if n < len(scores):
        # Every item at least as good as the n-th best, ties at the boundary included, so that the cut
        # below breaks them by index rather than by where the partition happened to put them.
        part = np.flatnonzero(scores >= np.partition(scores, len(scores) - n)[len(scores) - n])
    else:
        part = np.arange(len(scores))
    return part[np.lexsort((part, -scores[part]))][:n]
