"""The calibrated blend: one score per item from ALS, co-occurrence and popularity, on one scale.

Each source's scores are brought to [0, 1] by dividing by its best score (negative ALS scores count as 0),
then weighted and summed over every item of the target's vocabulary:

    score(i) = w_als * als(i) / max als + w_cooc * cooc(i) / max cooc + w_pop * pop(i) / max pop

- ALS: the dot product of the user's factors (known to the model, or folded in from the seed items) with
  the item's factors; an item the model never saw scores 0.
- co-occurrence: the recency-weighted summed votes of the seed items (`ranking.cooc_top`), its maximum
  taken over the items that may be returned.
- popularity: the published popularity score (0 outside the published top N), a prior for every item.
The top `k` of the sum is exact and items scoring 0 are never returned. Equal sums are ordered by the
published popularity ranking (an item of the popular list before any other, whatever the blend's
popularity weight), then by item id (vocabulary index). Each returned item carries the weighted
contribution of every source.

Only the items that can reach the top `k` are scored: the popularity and co-occurrence candidates, and the
items whose ALS score can reach the `k`-th best candidate's. The length of an item's factors bounds its ALS
score (score <= |item factors| * |user factors|), so the items are scored in order of that length, longest
first, until the bound rules out the rest; on the benchmark's model (20k items, 64 factors) a request
scores about a tenth of the catalog. The result is the exhaustive sum's, bit for bit (the tests compare
them).

`blend_users` computes the same for many users at once, for the precomputed `user_topn` artifact: the ALS
scores of a block of users in one matrix product, then per user only the items that can reach the top `k`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from recsys_core.kinds import BLEND_SOURCES
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
        return main_sources(self.contributions)


def main_sources(contributions: list[dict[str, float]]) -> list[str]:
    """The main source of each of `contributions`: the one that contributed most (ties: als, cooc,
    popularity)."""
    return [_main_source(c) for c in contributions]


def _main_source(contribution: dict[str, float]) -> str:
    # Compared by hand (a max() with a key costs about three times as much, on every item served).
    best, most = SOURCE_ALS, contribution.get(SOURCE_ALS, 0.0)
    value = contribution.get(SOURCE_COOC, 0.0)
    if value > most:
        best, most = SOURCE_COOC, value
    if contribution.get(SOURCE_POPULARITY, 0.0) > most:
        best = SOURCE_POPULARITY
    return best


def blend(
    target: LoadedTarget,
    *,
    user_vector: np.ndarray | None,
    seeds: list[int],
    excluded: set[int],
    k: int,
    weights: BlendWeights,
    exhaustive: bool = False,
) -> Blended:
    """The top `k` items by blended score, none of them in `excluded`.

    The result is the documented sum over every item, bit for bit (`exhaustive=True` computes it that
    way; the tests compare the two), but only the items that can reach the top `k` are scored: the
    popularity and co-occurrence candidates, and the items whose ALS score can reach the `k`-th best
    candidate's (`_AlsScores`: a bound from the length of their factors rules out the others).
    """
    if exhaustive:
        return _blend_exhaustive(
            target, user_vector=user_vector, seeds=seeds, excluded=excluded, k=k, weights=weights
        )
    n_items = target.n_items
    cooc: np.ndarray | None = None
    cooc_items: list[int] = []
    if seeds and weights.cooc > 0:
        cooc_items, votes = ranking.cooc_top(target, seeds, n_items, excluded)
        if cooc_items and votes[0] > 0:
            cooc = np.zeros(n_items)
            cooc[cooc_items] = np.asarray(votes) / votes[0]
        else:
            cooc_items = []
    prior = target.popularity_prior if weights.popularity > 0 else None
    excluded_items = list(excluded)
    # Candidates scored by co-occurrence or popularity (any other item scores by ALS alone), as a mask
    # over the vocabulary: flatnonzero gives them sorted, each once.
    member = np.zeros(n_items, dtype=bool)
    if cooc is not None:
        member[cooc_items] = True
    if prior is not None:
        member[target.popular_items] = True
    member[excluded_items] = False
    candidates = np.flatnonzero(member)

    als: _AlsScores | None = None
    if user_vector is not None and target.als is not None and weights.als > 0:
        als = _AlsScores(target, user_vector, candidates)
        if als.top > 0:
            total = _totals(candidates, als, cooc, prior, weights)[0]
            positive = total[total > 0]
            if len(positive) >= k:
                kth = np.partition(positive, len(positive) - k)[len(positive) - k]
                reach = als.reaching(kth / weights.als)
            else:
                reach = als.best_others(candidates, excluded_items, k)
            member[reach] = True
            member[excluded_items] = False
            candidates = np.flatnonzero(member)
        else:
            als = None
    total, values = _totals(candidates, als, cooc, prior, weights)
    return _best(target, candidates, total, values, k, weights)


def _best(
    target: LoadedTarget,
    candidates: np.ndarray,
    total: np.ndarray,
    values: dict[str, np.ndarray],
    k: int,
    weights: BlendWeights,
) -> Blended:
    """The `k` best of the scored `candidates` (their totals and each source's scaled scores)."""
    order = _best_order(target, candidates, total, k)
    best_totals = total[order].tolist()
    parts = {source: part[order].tolist() for source, part in values.items()}
    weight = {SOURCE_ALS: weights.als, SOURCE_COOC: weights.cooc, SOURCE_POPULARITY: weights.popularity}
    contributions = [
        {source: weight[source] * part[n] for source, part in parts.items() if part[n] > 0}
        for n in range(len(best_totals))
    ]
    return Blended(candidates[order].tolist(), best_totals, contributions, set(values))


def _best_order(target: LoadedTarget, candidates: np.ndarray, total: np.ndarray, k: int) -> np.ndarray:
    """Positions of the `k` best candidates: best first, ties by popularity rank, then item id (vocabulary
    index); items scoring 0 are never returned."""
    positions = _top_indexes(total, _popularity_ranks(target)[candidates], k, labels=candidates)
    best: np.ndarray = positions[total[positions] > 0]
    return best


@dataclass(frozen=True, slots=True)
class BlendRequest:
    """One user's blend inputs, as `blend` takes them (see recommender.blend_inputs)."""

    user_vector: np.ndarray | None
    seeds: list[int]
    excluded: set[int]


@dataclass(frozen=True, slots=True)
class BlendedArrays:
    """A `Blended` as arrays: items best first and each source's weighted contribution (a column per
    source of BLEND_SOURCES, 0 where it did not score the item); the blended score is their sum in that order."""

    items: np.ndarray
    contributions: np.ndarray
    sources_used: frozenset[str]


def blend_users(
    target: LoadedTarget, requests: list[BlendRequest], *, k: int, weights: BlendWeights
) -> list[BlendedArrays]:
    """`blend` of many users at once, their ALS scores computed by blocks of users in matrix products.

    Each result is the documented sum, as `blend` returns it (up to the last bits of the ALS scores: a
    matrix product may round its dot products differently from one user's matrix-vector product).
    Each user's top `k` is taken from the items that can reach it: the co-occurrence and popularity
    candidates and the items whose ALS score reaches the user's `k + len(excluded)`-th best (any other
    item scores by ALS alone, below `k` eligible items). That threshold is bounded from below by the
    same rank among the scores of the `_PROBE_ITEMS` items with the longest factors (a partition of a
    few thousand scores rather than of the catalog), which keeps every item that can reach it and few
    others.
    """
    weight = {SOURCE_ALS: weights.als, SOURCE_COOC: weights.cooc, SOURCE_POPULARITY: weights.popularity}
    n_items = target.n_items
    prior = target.popularity_prior if weights.popularity > 0 else None
    base = np.zeros(n_items, dtype=bool)
    if prior is not None:
        base[target.popular_items] = True
    model = target.als if weights.als > 0 else None
    factors = np.ascontiguousarray(model.item_factors.T) if model is not None else np.empty((0, n_items))
    probe = _probe_items(model.item_factors) if model is not None else np.empty(0, dtype=np.int64)
    cooc = np.zeros(n_items)  # one user's co-occurrence source at a time, reset after use
    results = []
    for block in range(0, len(requests), _BLOCK_USERS):
        chunk = requests[block : block + _BLOCK_USERS]
        scored = [r.user_vector is not None and model is not None for r in chunk]
        scores = np.zeros((len(chunk), n_items))
        if any(scored):
            vectors = np.stack([r.user_vector for r, s in zip(chunk, scored, strict=True) if s])  # type: ignore[misc]
            scores[scored] = vectors @ factors
        # max(0, best score): the scale of the ALS source, as `_AlsScores.top` and the exhaustive sum.
        tops = np.maximum(scores.max(axis=1), 0.0)
        probes = scores[:, probe]
        for n, request in enumerate(chunk):
            member = base.copy()
            cooc_items: list[int] = []
            if request.seeds and weights.cooc > 0:
                cooc_items, votes = ranking.cooc_top(target, request.seeds, n_items, request.excluded)
                if cooc_items and votes[0] > 0:
                    cooc[cooc_items] = np.asarray(votes) / votes[0]
                    member[cooc_items] = True
                else:
                    cooc_items = []
            top = tops[n] if scored[n] else 0.0
            if top > 0:
                reach = min(k + len(request.excluded), n_items)
                row = probes[n] if reach <= len(probe) else scores[n]
                member |= scores[n] >= np.partition(row, len(row) - reach)[len(row) - reach]
            member[list(request.excluded)] = False
            candidates = np.flatnonzero(member)
            values: dict[str, np.ndarray] = {}
            if top > 0:
                values[SOURCE_ALS] = np.maximum(scores[n, candidates], 0.0) / top
            if cooc_items:
                values[SOURCE_COOC] = cooc[candidates]
                cooc[cooc_items] = 0.0
            if prior is not None:
                values[SOURCE_POPULARITY] = prior[candidates]
            order = _best_order(target, candidates, _sum(values, weights, len(candidates)), k)
            contributions = np.zeros((len(order), len(BLEND_SOURCES)))
            for column, source in enumerate(BLEND_SOURCES):
                if source in values:
                    contributions[:, column] = weight[source] * values[source][order]
            results.append(BlendedArrays(candidates[order], contributions, frozenset(values)))
    return results


# Users scored by one matrix product (64 x 20k float64 scores: 10 MB, which stays in the cache between
# the passes over it), and the items whose scores bound a user's ALS threshold.
_BLOCK_USERS = 64
_PROBE_ITEMS = 2048


def _probe_items(item_factors: np.ndarray) -> np.ndarray:
    """The `_PROBE_ITEMS` items with the longest factors, by index."""
    lengths = np.einsum("ij,ij->i", item_factors, item_factors)
    return np.sort(np.argsort(-lengths, kind="stable")[:_PROBE_ITEMS])


def _sum(values: dict[str, np.ndarray], weights: BlendWeights, n: int) -> np.ndarray:
    """The blended score: each source's scaled scores times its weight, summed in the order of `values`."""
    weight = {SOURCE_ALS: weights.als, SOURCE_COOC: weights.cooc, SOURCE_POPULARITY: weights.popularity}
    total = np.zeros(n)
    for source, part in values.items():
        total += weight[source] * part
    return total


def _totals(
    items: np.ndarray,
    als: _AlsScores | None,
    cooc: np.ndarray | None,
    prior: np.ndarray | None,
    weights: BlendWeights,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The blended scores of `items` and each source's scaled scores, summed as the exhaustive blend does."""
    values: dict[str, np.ndarray] = {}
    if als is not None:
        values[SOURCE_ALS] = np.maximum(als.scores[items], 0.0) / als.top
    if cooc is not None:
        values[SOURCE_COOC] = cooc[items]
    if prior is not None:
        values[SOURCE_POPULARITY] = prior[items]
    return _sum(values, weights, len(items)), values


# Rows of one matrix-vector product. Block offsets and sizes are multiples of 64, so each row's dot product
# is computed by the same BLAS kernel path as in the product over every item (the same bits); products of
# up to a few thousand rows run on the calling thread (a larger one is split over threads, which on a
# server whose cores are busy with requests costs more than it saves).
_STEP_ROWS = 512
_MAX_BLOCK_ROWS = 4096
# A bound (factor length x user vector length) is widened by this much, far more than the rounding of
# the dot products and of the bound itself.
_BOUND_MARGIN = 1e-9


class _AlsScores:
    """The ALS scores of one user vector, computed only where they can matter.

    The items' factors are kept in `_AlsOrder` order: the popular items first, then the others by the
    length of their factors, longest first. Every score is computed for the popular items and the given
    candidates, then block by block down that order until the factor length bounds every remaining item's
    score (score <= |factors| * |user vector|) below the best one: `top`, the largest score (or 0), is
    then exact. `reaching` continues until the bound is below a threshold. `scores` holds a score for every
    item computed (and garbage elsewhere: read only those).
    """

    __slots__ = ("_by_row", "_computed", "_norm", "_order", "_vector", "scores", "top")

    def __init__(self, target: LoadedTarget, vector: np.ndarray, candidates: np.ndarray) -> None:
        model = target.als
        assert model is not None
        order = _AlsOrder.of(target)
        self._order = order
        self._vector = vector
        self._norm = float(np.sqrt(vector @ vector)) * (1.0 + _BOUND_MARGIN)
        self._computed = 0
        self._by_row = np.empty(len(order.factors))
        self.scores = np.empty(target.n_items)
        self._extend(order.first_rows)
        top = float(self._by_row[: self._computed].max(initial=0.0))
        while self._computed < len(order.items) and order.bound[self._computed] * self._norm > top:
            self._extend(self._computed + _STEP_ROWS)
            top = max(top, float(self._by_row[: self._computed].max(initial=0.0)))
        self.top = np.float64(top)
        # Candidates in rows not computed yet (co-occurrence neighbours off the popular list), gathered.
        missing = candidates[order.row_of[candidates] >= self._computed]
        if len(missing):
            # Padded to a multiple of _ROWS rows, as every block is (zero rows score 0).
            padded = np.zeros((-(-len(missing) // _ROWS) * _ROWS, order.factors.shape[1]))
            padded[: len(missing)] = model.item_factors[missing]
            self.scores[missing] = (padded @ vector)[: len(missing)]

    def _extend(self, end: int) -> None:
        """Compute the rows up to `end` (rounded up to a multiple of _ROWS; the factors are padded)."""
        order = self._order
        start = self._computed
        end = min(-(-end // _ROWS) * _ROWS, len(order.factors))
        if start >= len(order.items) or end <= start:
            return
        for block in range(start, end, _MAX_BLOCK_ROWS):
            stop = min(block + _MAX_BLOCK_ROWS, end)
            self._by_row[block:stop] = order.factors[block:stop] @ self._vector
        self._computed = min(end, len(order.items))
        self.scores[order.items[start : self._computed]] = self._by_row[start : self._computed]

    def reaching(self, fraction: float) -> np.ndarray:
        """The items whose ALS score may reach `fraction` of `top` (computing as many rows as that takes)."""
        order = self._order
        threshold = fraction * float(self.top)
        while self._computed < len(order.items) and order.bound[self._computed] * self._norm >= threshold:
            self._extend(self._computed + _STEP_ROWS)
        rows = np.flatnonzero(self._by_row[: self._computed] >= threshold * (1.0 - _BOUND_MARGIN))
        return order.items[rows]

    def best_others(self, candidates: np.ndarray, excluded: list[int], k: int) -> np.ndarray:
        """The items outside `candidates` and `excluded` with the `k` best ALS scores (ties included)."""
        self._extend(len(self._order.factors))
        others = np.ones(len(self.scores), dtype=bool)
        others[candidates] = False
        others[excluded] = False
        rest = self.scores[others]
        if len(rest) > k:
            others &= self.scores >= np.partition(rest, len(rest) - k)[len(rest) - k]
        return np.flatnonzero(others)


@dataclass(frozen=True, slots=True, eq=False)
class _AlsOrder:
    """A target's ALS item factors in scoring order (see `_AlsScores`), built once per loaded target.

    The order decides only how many scores are computed, never which items are returned: a candidate
    outside the rows computed is scored on its own.
    """

    source: weakref.ref[np.ndarray]  # the model's item factors this order was built from
    popular: weakref.ref[np.ndarray]  # and the target's popular items
    items: np.ndarray  # the vocabulary index of each row
    row_of: np.ndarray  # the row of each vocabulary index
    factors: np.ndarray  # float64 item factors in row order, zero rows padding to a multiple of _ROWS
    bound: np.ndarray  # bound[r]: the largest factor length of rows r.. (0 past the end)
    first_rows: int  # the popular items' rows

    @classmethod
    def of(cls, target: LoadedTarget) -> _AlsOrder:
        model = target.als
        assert model is not None
        key = id(model.item_factors)
        cached = _ORDERS.get(key)
        if (
            cached is not None
            and cached.source() is model.item_factors
            and cached.popular() is target.popular_items
        ):
            return cached
        lengths = np.sqrt(np.einsum("ij,ij->i", model.item_factors, model.item_factors))
        popular = np.unique(target.popular_items).astype(np.int64)
        rest = np.ones(target.n_items, dtype=bool)
        rest[popular] = False
        others = np.flatnonzero(rest)
        items = np.concatenate([popular, others[np.argsort(-lengths[others], kind="stable")]])
        row_of = np.empty(target.n_items, dtype=np.int64)
        row_of[items] = np.arange(len(items))
        factors = np.zeros((-(-len(items) // _ROWS) * _ROWS, model.item_factors.shape[1]))
        factors[: len(items)] = model.item_factors[items]
        bound = np.zeros(len(items) + 1)
        bound[:-1] = np.maximum.accumulate(lengths[items][::-1])[::-1]
        order = cls(
            # The entry goes when the model does (a swap replaces the target and its model).
            source=weakref.ref(model.item_factors, _forget(_ORDERS, key)),
            popular=weakref.ref(target.popular_items),
            items=items,
            row_of=row_of,
            factors=factors,
            bound=bound,
            first_rows=len(popular),
        )
        _ORDERS[key] = order
        return order


# The scoring order of every loaded ALS model, by the identity of its item factors (each entry holds a
# copy of them, and is dropped when the model's own array is freed).
_ORDERS: dict[int, _AlsOrder] = {}
# Block sizes are multiples of this many rows.
_ROWS = 64


def _forget(cache: dict[int, Any], key: int) -> Callable[[weakref.ref[np.ndarray]], None]:
    def forget(_: weakref.ref[np.ndarray]) -> None:
        cache.pop(key, None)

    return forget


# The tie order of every loaded target: its popularity ranks, by the identity of its popular items (each
# entry is dropped when that array is freed).
_RANKS: dict[int, tuple[weakref.ref[np.ndarray], np.ndarray]] = {}


def _popularity_ranks(target: LoadedTarget) -> np.ndarray:
    """Each vocabulary item's position in the published popularity ranking (items outside it: after all),
    the order of equal blended scores. Built once per loaded target."""
    popular = target.popular_items
    key = id(popular)
    cached = _RANKS.get(key)
    if cached is not None and cached[0]() is popular:
        return cached[1]
    ranks = np.full(target.n_items, len(popular), dtype=np.int64)
    ranks[popular] = np.arange(len(popular))
    _RANKS[key] = (weakref.ref(popular, _forget(_RANKS, key)), ranks)
    return ranks


def _blend_exhaustive(
    target: LoadedTarget,
    *,
    user_vector: np.ndarray | None,
    seeds: list[int],
    excluded: set[int],
    k: int,
    weights: BlendWeights,
) -> Blended:
    """The blend as documented: every item of the vocabulary summed, then the top `k`."""
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
    best = [int(i) for i in _top_indexes(total, _popularity_ranks(target), k) if total[i] > 0]
    return Blended(
        best,
        [float(total[i]) for i in best],
        [{s: weight[s] * float(v[i]) for s, v in parts.items() if v[i] > 0} for i in best],
        set(parts),
    )


def _top_indexes(
    scores: np.ndarray, ties: np.ndarray, n: int, labels: np.ndarray | None = None
) -> np.ndarray:
    """Indexes of the `n` highest scores, best first (ties by `ties` ascending, then by `labels`, ascending
    and distinct; default: the index)."""
    n = min(n, len(scores))
    if n == 0:
        return np.empty(0, dtype=np.int64)
    if n < len(scores):
        # Every item at least as good as the n-th best, ties at the boundary included, so that the cut
        # below breaks them by the tie order rather than by where the partition happened to put them.
        part = np.flatnonzero(scores >= np.partition(scores, len(scores) - n)[len(scores) - n])
    else:
        part = np.arange(len(scores))
    last = part if labels is None else labels[part]
    return part[np.lexsort((last, ties[part], -scores[part]))][:n]
