"""Diversity re-ranking of a ranked list: maximal marginal relevance (MMR) and a per-category cap.

MMR picks the list position by position: at each free position, the remaining candidate with the highest

    (1 - diversity) * relevance(i) - diversity * max over the items already picked of similarity(i, j)

where relevance is the candidate's score divided by the best score of the list and similarity the cosine of
the two items' content vectors (`ServedCatalog.similarities`; 0 for an item without one). `diversity` 0
keeps the ranking as it is, 1 picks by dissimilarity alone. With `max_per_category`, a candidate with a
category that already has that many items in the list is passed over (items without a category never
are). Positions that merchandising rules fixed (pins, replace lists) keep their items. Ties go to the
candidate ranked first. Pure: no I/O, no state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

MIN_DIVERSITY, MAX_DIVERSITY = 0.0, 1.0


def mmr_order(
    scores: Sequence[float | None],
    similarity: np.ndarray,
    categories: Sequence[Sequence[str]],
    *,
    diversity: float,
    max_per_category: int | None,
    k: int,
    fixed: Mapping[int, int] | None = None,
) -> list[int]:
    """The positions (into the candidate list) of the re-ranked top `k`, best first.

    `scores` are the candidates' scores, best first (None: placed by a rule without a score, counted as the
    best score), `similarity` their pairwise content similarities, `categories` each one's categories;
    `fixed` maps an output position to the candidate that must be there.
    """
    if not MIN_DIVERSITY <= diversity <= MAX_DIVERSITY:
        raise ValueError(f"diversity must be in [0, 1], got {diversity}")
    fixed = dict(fixed or {})
    n = len(scores)
    known = [score for score in scores if score is not None]
    top = max(known, default=0.0)
    relevance = np.array([1.0 if s is None or top <= 0 else s / top for s in scores], dtype=np.float64)
    taken = np.zeros(n, dtype=bool)
    taken[list(fixed.values())] = True
    closest = np.zeros(n)  # each candidate's largest similarity to the items picked so far
    counts: dict[str, int] = {}
    order: list[int] = []
    while len(order) < k:
        pick = fixed.pop(len(order), None)
        if pick is None:
            value = (1.0 - diversity) * relevance - diversity * closest
            value[taken] = -np.inf
            if max_per_category is not None:
                for position in np.flatnonzero(~taken).tolist():
                    if any(counts.get(c, 0) >= max_per_category for c in categories[position]):
                        value[position] = -np.inf
            best = int(np.argmax(value))  # the first of equal values: the candidate ranked first
            if value[best] == -np.inf:
                if not fixed:
                    break
                # Nothing free may go here: the next fixed item moves up, as a rule's pin does when
                # the candidates run out.
                pick = fixed.pop(min(fixed))
            else:
                pick = best
        order.append(pick)
        taken[pick] = True
        np.maximum(closest, similarity[pick], out=closest)
        for category in categories[pick]:
            counts[category] = counts.get(category, 0) + 1
    return order


def intra_list_diversity(similarity: np.ndarray) -> float:
    """1 - the mean similarity of the distinct pairs of a list (0 for fewer than two items)."""
    n = len(similarity)
    if n < 2:
        return 0.0
    upper = similarity[np.triu_indices(n, 1)]
    return float(1.0 - upper.mean())
