"""Ranking: pure functions over a `LoadedTarget`, no I/O and no shared state.

Items are integer indexes into the target's vocabulary, which is sorted by item id, so "score desc, then
item id asc" is "score desc, then index asc".

Blend (`recommend`): each seed item s (the user's most recent items, or the request's context items, in
the order given) votes for its co-occurrence neighbours c with `score(s, c) * RECENCY_DECAY ** position`;
votes are summed per candidate, in seed order. Seeds are never recommended, nor (with exclude_seen)
anything in the user's history. Candidates are ranked by summed score desc, item id asc; popularity fills
the remaining slots in its published order, skipping anything excluded or already chosen.

Two implementations compute the same blend, bit for bit: a typical request has a handful of seeds and a
few dozen votes, where a plain-Python dict beats a dozen numpy calls of fixed overhead each; from
`VECTOR_THRESHOLD` votes on, numpy takes over (one integer sort groups the votes). Tests hold them equal.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from recsys_serving.store import LoadedTarget

# The user's most recent items used as seeds; context items given in a request are all used (the API
# caps them at MAX_CONTEXT_ITEMS).
MAX_HISTORY_SEEDS = 20
MAX_CONTEXT_ITEMS = 50
# Weight of the seed at position p (0 = most recent): RECENCY_DECAY ** p.
RECENCY_DECAY = 0.85
# Python's pow, not numpy's (which differs in the last bit for a few exponents), so the weights are
# exactly RECENCY_DECAY ** p as documented, in both implementations.
_WEIGHTS = [RECENCY_DECAY**p for p in range(max(MAX_HISTORY_SEEDS, MAX_CONTEXT_ITEMS))]
_WEIGHTS_ARRAY = np.array(_WEIGHTS)
# Votes (seeds x their neighbours) from which the numpy implementation is used: the measured crossover
# on the 2-core machine was about 100 votes (about 24 us either way).
VECTOR_THRESHOLD = 100

SOURCE_COOC = "cooc"
SOURCE_POPULARITY = "popularity"

_POSITION_BITS = 32
_POSITION_MASK = (1 << _POSITION_BITS) - 1
_ARANGE = np.arange(1 << 16, dtype=np.int64)


@dataclass(frozen=True, slots=True)
class Ranking:
    """A ranked list: `items` (vocabulary indexes) best first with their `scores`.

    The first `n_cooc` entries come from co-occurrence, the rest from popularity.
    """

    items: list[int]
    scores: list[float]
    n_cooc: int

    def __len__(self) -> int:
        return len(self.items)

    def sources(self) -> list[str]:
        return [SOURCE_COOC] * self.n_cooc + [SOURCE_POPULARITY] * (len(self.items) - self.n_cooc)


def recency_weights(n: int) -> list[float]:
    """Weights of `n` seeds, most recent (or first given) first."""
    return _WEIGHTS[:n] if n <= len(_WEIGHTS) else [RECENCY_DECAY**p for p in range(n)]


def recommend(
    target: LoadedTarget,
    seeds: Sequence[int],
    k: int,
    exclude: Iterable[int] = (),
    *,
    vectorized: bool | None = None,
) -> Ranking:
    """Top `k`: co-occurrence from `seeds` (most recent first), then popularity to fill.

    `exclude` lists items never to return (the caller passes the seeds, plus the user's history when
    excluding seen items). `vectorized` forces one implementation (tests); by default the number of
    votes decides.
    """
    excluded = set(exclude)
    items, scores = cooc_top(target, seeds, k, excluded, vectorized=vectorized)
    n_cooc = len(items)
    if n_cooc < k:
        excluded.update(items)
        fill, fill_scores = popular(target, k - n_cooc, excluded)
        items += fill
        scores += fill_scores
    return Ranking(items, scores, n_cooc)


def cooc_top(
    target: LoadedTarget,
    seeds: Sequence[int],
    k: int,
    excluded: set[int],
    *,
    vectorized: bool | None = None,
) -> tuple[list[int], list[float]]:
    """The `k` best co-occurrence candidates of `seeds` (recency-weighted summed votes), none in `excluded`."""
    ptr = target.cooc_ptr
    spans = [(ptr[seed], ptr[seed + 1]) for seed in seeds]
    votes = sum(end - start for start, end in spans)
    if vectorized if vectorized is not None else votes >= VECTOR_THRESHOLD:
        return _cooc_top_numpy(target, spans, votes, k, excluded)
    return _cooc_top_python(target, spans, k, excluded)


def _cooc_top_python(
    target: LoadedTarget, spans: list[tuple[int, int]], k: int, excluded: set[int]
) -> tuple[list[int], list[float]]:
    neighbors, scores = target.cooc_neighbor_list, target.cooc_score_list
    if not spans:
        return [], []
    # The first seed weighs exactly 1.0 (score * 1.0 == score), so its row fills the dict in C.
    start, end = spans[0]
    votes: dict[int, float] = dict(zip(neighbors[start:end], scores[start:end], strict=True))
    get = votes.get
    for weight, (start, end) in zip(recency_weights(len(spans))[1:], spans[1:], strict=True):
        for item, score in zip(neighbors[start:end], scores[start:end], strict=True):
            votes[item] = get(item, 0.0) + score * weight
    ranked = sorted([(-total, item) for item, total in votes.items() if item not in excluded])[:k]
    return [item for _, item in ranked], [-negated for negated, _ in ranked]


def _cooc_top_numpy(
    target: LoadedTarget, spans: list[tuple[int, int]], total: int, k: int, excluded: set[int]
) -> tuple[list[int], list[float]]:
    if total == 0:
        return [], []
    # Every numpy call costs about a microsecond whatever its size, so the few seed rows are gathered
    # with slices (one per seed) rather than computed index arrays.
    keys = np.concatenate([target.cooc_keys[start:end] for start, end in spans])
    votes = np.concatenate([target.cooc_scores[start:end] for start, end in spans])
    if len(spans) > 1:
        votes *= np.repeat(_weights_array(len(spans)), [end - start for start, end in spans])
    # Group equal candidates with one integer sort of (candidate << 32 | vote position) keys: each group
    # keeps its votes in seed order, and bincount adds them in that order, as the Python version does.
    keys |= _ARANGE[:total] if total <= len(_ARANGE) else np.arange(total)
    keys.sort()
    candidates = keys >> _POSITION_BITS
    first = np.empty(total, dtype=bool)
    first[0] = True
    np.not_equal(candidates[1:], candidates[:-1], out=first[1:])
    negated = -np.bincount(np.cumsum(first) - 1, weights=votes[keys & _POSITION_MASK])
    candidates = candidates[first]
    # At most len(excluded) of the best k + len(excluded) candidates are excluded: rank only those
    # (ties at the boundary included) and leave the exclusion to a set lookup on the few survivors.
    wanted = k + len(excluded)
    if len(candidates) > 4 * wanted:
        keep = negated <= np.partition(negated, wanted - 1)[wanted - 1]
        candidates, negated = candidates[keep], negated[keep]
    order = np.argsort(negated, kind="stable")[:wanted]  # candidates ascend: ties stay in index order
    best = [
        (item, -score)
        for item, score in zip(candidates[order].tolist(), negated[order].tolist(), strict=True)
        if item not in excluded
    ][:k]
    return [item for item, _ in best], [score for _, score in best]


def _weights_array(n: int) -> np.ndarray:
    return _WEIGHTS_ARRAY[:n] if n <= len(_WEIGHTS_ARRAY) else np.array(recency_weights(n))


def popular(
    target: LoadedTarget, k: int, skip: set[int] | frozenset[int] = frozenset()
) -> tuple[list[int], list[float]]:
    """The `k` most popular items in published order, leaving out `skip`."""
    if not skip:
        return target.popular_list[:k], target.popular_score_list[:k]
    items: list[int] = []
    scores: list[float] = []
    for item, score in zip(target.popular_list, target.popular_score_list, strict=True):
        if item not in skip:
            items.append(item)
            scores.append(score)
            if len(items) == k:
                break
    return items, scores


def similar(target: LoadedTarget, item: int, k: int) -> tuple[list[int], list[float]]:
    """An item's `k` best co-occurrence neighbours in published rank order."""
    neighbors, scores = target.neighbors(item)
    return neighbors[:k].tolist(), scores[:k].tolist()
