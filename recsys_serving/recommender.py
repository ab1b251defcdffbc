"""What a recommendation request gets: seeds, the user's model factors, exclusions and fallbacks around
the calibrated blend (`blend`).

`recommend` chooses the seeds (the context items when any is known, else the user's most recent items),
the user's ALS factors (the model's own for a user it knows, else folded in from the seed items), what to
leave out (the seeds, plus every item of the user's window history with `exclude_seen`), runs the blend and
says in warnings where it fell back. It is pure: no HTTP, no metrics, no exposure logging (the route does
those with its result), so the offline evaluation calls exactly this, and diversity plugs in
here.

A user the ALS model knows, asking without context items and with `exclude_seen`, gets the same blend
precomputed (the `user_topn` artifact, built by calling `blend_inputs` and `blend.blend_users`) when the
target has it for the weights in force and `k` is within its depth: a lookup instead of the blend. The
lookup gives what `blend` gives for the same `k` (the best `k` candidates as a `Blended`), so whatever
comes after the blend applies to both alike.

Merchandising rules (`rules_at`: the request's time) are applied to the blend's candidate list in one
place, `_apply_rules`, after the blend and before the cut to k. The offline evaluation passes no time and
so measures the models alone: rules are a merchandiser's override of what the models rank, published
after the evaluation that gated the models, and a metric that moved with every campaign would no longer
compare models from one day to the next.

With the tenant's item catalog (`LoadedTarget.catalog`, from the `content` artifact):
- items the catalog marks unavailable, and items outside the request's `categories` or inside its
  `exclude_categories`, are left out of the candidates before the rules and out of what the rules place
  after them (a pinned unavailable item is not shown). The blend is asked for more candidates until `k`
  pass the filter or the catalog runs out (`_candidates`); a precomputed list too short for that gives way
  to the live blend;
- when most seeds have no co-occurrence neighbours (new items, or items too rarely seen together), their
  content neighbours vote as co-occurrence neighbours do (recency-weighted cosines, scaled to [0, 1] by the
  best and weighted like co-occurrence), merged into the blend's list as the `content` source;
- `diversity` > 0 or `max_per_category` re-ranks the candidates (`DIVERSITY_DEPTH` times k of them) by
  maximal marginal relevance over content similarity (`recsys_serving.diversity`), after the rules, with
  the positions rules fixed kept. 0 (the default) leaves the ranking untouched and costs nothing.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NotRequired, TypedDict

import numpy as np

from recsys_core.kinds import BLEND_SOURCES
from recsys_core.rules import apply_rules
from recsys_core.settings import BlendWeights
from recsys_serving import ranking
from recsys_serving.blend import SOURCE_POPULARITY, Blended, BlendRequest, blend, main_sources
from recsys_serving.catalog import SOURCE_CONTENT, ServedCatalog
from recsys_serving.diversity import mmr_order
from recsys_serving.rules import Selection
from recsys_serving.store import LoadedTarget, UserTopN

DEFAULT_WEIGHTS = BlendWeights()

# Warning codes, stable parts of the API (docs/reference/http-api.md lists them).
UNKNOWN_USER = "unknown_user_popularity_fallback"
ANONYMOUS = "anonymous_popularity_fallback"
CONTEXT_ITEMS_UNKNOWN = "context_items_unknown"
NO_COOC_CANDIDATES = "no_cooc_candidates_popularity_fallback"
FEWER_ITEMS = "fewer_items_than_requested"
WARNING_CODES = (UNKNOWN_USER, ANONYMOUS, CONTEXT_ITEMS_UNKNOWN, NO_COOC_CANDIDATES, FEWER_ITEMS)
# The `source` of an item a rule placed that the blend did not score (a pin or a replace list's item).
SOURCE_RULE = "rule"
# With diversity re-ranking, the candidates re-ranked: this many times k.
DIVERSITY_DEPTH = 3
# The content source joins the blend when at least this share of the seeds have no co-occurrence neighbours.
COLD_SEED_SHARE = 0.5


class RecommendationWarning(TypedDict):
    """A degraded answer, as it appears in a response's `warnings`."""

    code: str
    message: str
    items: NotRequired[list[str]]  # context_items_unknown only: the ignored ids


# Not frozen: a frozen dataclass's __init__ costs about 0.35 us more, on every request.
@dataclass(slots=True)
class Recommendation:
    """Ranked items, best first: parallel lists of ids, scores (None: placed by a rule without a score),
    main sources, per-source contributions and the ids of the rules that touched each item; and the
    blend's candidates the rules were applied to (what a decision trace records)."""

    item_ids: list[str]
    scores: list[float | None]
    sources: list[str]
    contributions: list[dict[str, float]]
    warnings: list[RecommendationWarning]
    # Per item; None when no rule touched any item.
    rule_ids: list[list[str]] | None = None
    # The `rules` artifact version applied (None: no rules published, or none asked for).
    rules_version: str | None = None
    candidate_ids: list[str] = field(default_factory=list)
    candidate_scores: list[float] = field(default_factory=list)
    candidate_contributions: list[dict[str, float]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.item_ids)


def recommend(
    target: LoadedTarget,
    *,
    user_id: str | None = None,
    context_items: Sequence[str] | None = None,
    k: int,
    exclude_seen: bool,
    weights: BlendWeights = DEFAULT_WEIGHTS,
    rules_at: dt.datetime | None = None,
    categories: Sequence[str] | None = None,
    exclude_categories: Sequence[str] | None = None,
    diversity: float = 0.0,
    max_per_category: int | None = None,
) -> Recommendation:
    """The top `k` items for a user and/or context items from `target`, with warnings where it degraded.

    Seeds: the known `context_items` (in the order given, duplicates once; unknown ones are reported and
    ignored), else the user's `ranking.MAX_HISTORY_SEEDS` most recent items, else none. ALS factors: the
    model's for a user it knows, else folded in from the seeds (the user's items with their weights, or the
    context items with weight 1). Seeds are never returned; with `exclude_seen`, neither is anything in
    the user's window history. `context_items` are expected validated (at most `ranking.MAX_CONTEXT_ITEMS`
    trimmed ids, as the API accepts them). With `rules_at` (UTC), the target's rules in force then are
    applied; without it, none are. Catalog filters (`categories`, `exclude_categories`), availability,
    the content source and diversity (`diversity` in [0, 1], `max_per_category`) are as the module says.
    """
    catalog = target.catalog
    allowed = _allowed(catalog, target.n_items, categories, exclude_categories)
    diversify = diversity > 0 or max_per_category is not None
    inputs: BlendInputs | None = None
    topn = target.user_topn if user_id and not context_items and exclude_seen else None
    if topn is not None and catalog is not None and user_id is not None:
        recent = target.history(user_id)
        if recent and _mostly_cold(target, recent[: ranking.MAX_HISTORY_SEEDS]):
            topn = None  # the precomputed lists have no content source

    def best(n: int) -> Blended:
        """The blend's best `n`: precomputed when the target has them for this request, else live."""
        nonlocal inputs
        if topn is not None and user_id is not None:
            precomputed = _precomputed(topn, user_id, n, weights)
            if precomputed is not None:
                return precomputed
        if inputs is None:
            inputs = blend_inputs(
                target, user_id=user_id, context_items=context_items, exclude_seen=exclude_seen
            )
        request = inputs.request
        blended = blend(
            target,
            user_vector=request.user_vector,
            seeds=request.seeds,
            excluded=request.excluded,
            k=n,
            weights=weights,
        )
        if catalog is not None and request.seeds and _mostly_cold(target, request.seeds):
            blended = _with_content(catalog, blended, request.seeds, request.excluded, n, weights.cooc)
        return blended

    selection: Selection | None = None
    if rules_at is not None and target.rules is not None:
        history = target.history_with_weights(user_id) if user_id else None
        selection = target.rules.select(rules_at, user_id, len(history[0]) if history else 0, context_items)
    reranked = diversify or allowed is not None
    if selection is not None or reranked:
        blended = _candidates(best, k, DIVERSITY_DEPTH * k if diversify else k, selection, allowed)
    else:
        blended = best(k)
    warnings: list[RecommendationWarning] = []
    if inputs is not None:
        warnings = inputs.warnings
        _warn_fallback(blended, inputs, warnings)
    ids = target.item_ids
    candidate_ids = [ids[i] for i in blended.items]
    result = Recommendation(
        candidate_ids[:k],
        list(blended.scores[:k]),
        [],
        blended.contributions[:k],
        warnings,
        candidate_ids=candidate_ids,
        candidate_scores=blended.scores,
        candidate_contributions=blended.contributions,
    )
    # Filtered or diversified, the rules order the whole candidate list (and up to k items they place,
    # which the filter may drop again): what follows then cuts it to k.
    depth = len(candidate_ids) + k if reranked else k
    placed = _apply_rules(result, selection, depth) if selection is not None else None
    if placed is None:
        if reranked:
            result.item_ids, result.scores = candidate_ids[:depth], list(blended.scores[:depth])
            result.contributions = blended.contributions[:depth]
        result.sources = main_sources(result.contributions)
    if SOURCE_CONTENT in blended.sources_used:
        _content_sources(result)
    if reranked:
        if placed is not None and allowed is not None:
            outside = not categories  # an item outside the vocabulary has no category
            kept = [
                n for n, item in enumerate(result.item_ids) if _is_allowed(target, allowed, item, outside)
            ]
            _keep(result, kept)
        if diversify:
            fixed = {n: n for n, item in enumerate(result.item_ids) if placed and item in placed}
            _keep(result, _diversified(target, result, diversity, max_per_category, k, fixed))
        _keep(result, list(range(min(k, len(result)))))
    if len(result) < k:
        warnings.append({"code": FEWER_ITEMS, "message": f"only {len(result)} items left to recommend"})
    return result


def similar(target: LoadedTarget, item: int, k: int) -> tuple[list[int], list[float], list[str]]:
    """An item's `k` most similar available items and their sources: its co-occurrence neighbours in
    published rank order, then, for an item with fewer than `k` (a new one has none), its content
    neighbours (cosine order) that are not among them."""
    catalog = target.catalog
    neighbors, scores = ranking.similar(target, item, k if catalog is None else target.n_items)
    if catalog is None:
        return neighbors, scores, [ranking.SOURCE_COOC] * len(neighbors)
    available = catalog.available
    kept = [n for n, neighbor in enumerate(neighbors) if available[neighbor]][:k]
    items, values = [neighbors[n] for n in kept], [scores[n] for n in kept]
    sources = [ranking.SOURCE_COOC] * len(items)
    if len(items) < k:
        chosen = set(items)
        for neighbor, score in zip(*catalog.neighbors(item), strict=True):
            if neighbor not in chosen and available[neighbor] and len(items) < k:
                items.append(neighbor)
                values.append(score)
                sources.append(SOURCE_CONTENT)
    return items, values, sources


def _allowed(
    catalog: ServedCatalog | None,
    n_items: int,
    categories: Sequence[str] | None,
    exclude_categories: Sequence[str] | None,
) -> np.ndarray | None:
    """The items a request may return, as a mask over the vocabulary; None: every item."""
    if catalog is not None:
        return catalog.allowed(categories, exclude_categories)
    # Without a catalog no item has a category: a category filter leaves nothing, an exclusion nothing out.
    return np.zeros(n_items, dtype=bool) if categories else None


def _is_allowed(target: LoadedTarget, allowed: np.ndarray, item_id: str, outside: bool) -> bool:
    """Whether an item a rule placed may be shown (`outside`: whether one outside the served vocabulary,
    which has no category and is not known to be unavailable, may)."""
    index = target.item_index.get(item_id)
    return bool(allowed[index]) if index is not None else outside


def _mostly_cold(target: LoadedTarget, seeds: Sequence[int]) -> bool:
    """Whether at least COLD_SEED_SHARE of `seeds` have no co-occurrence neighbours."""
    ptr = target.cooc_ptr
    cold = sum(1 for seed in seeds if ptr[seed] == ptr[seed + 1])
    return cold >= COLD_SEED_SHARE * len(seeds)


def _with_content(
    catalog: ServedCatalog, blended: Blended, seeds: list[int], excluded: set[int], n: int, weight: float
) -> Blended:
    """`blended` with the content votes of `seeds` added (see the module docstring), best `n` first; ties
    keep the blend's order, then go to the smaller item id."""
    votes: dict[int, float] = {}
    for seed_weight, seed in zip(ranking.recency_weights(len(seeds)), seeds, strict=True):
        items, scores = catalog.neighbors(seed)
        for item, score in zip(items, scores, strict=True):
            if item not in excluded:
                votes[item] = votes.get(item, 0.0) + score * seed_weight
    top = max(votes.values(), default=0.0)
    if top <= 0 or weight <= 0:
        return blended
    merged: dict[int, tuple[float, dict[str, float]]] = {
        item: (score, contribution)
        for item, score, contribution in zip(
            blended.items, blended.scores, blended.contributions, strict=True
        )
    }
    for item, vote in votes.items():
        part = weight * vote / top
        score, contribution = merged.get(item, (0.0, {}))
        merged[item] = (score + part, {**contribution, SOURCE_CONTENT: part})
    position = {item: n for n, item in enumerate(blended.items)}
    ranked = sorted(merged, key=lambda item: (-merged[item][0], position.get(item, len(position)), item))[:n]
    return Blended(
        ranked,
        [merged[item][0] for item in ranked],
        [merged[item][1] for item in ranked],
        blended.sources_used | {SOURCE_CONTENT},
    )


def _content_sources(result: Recommendation) -> None:
    """Make `content` the main source of the items it contributed most to (`main_sources` knows the
    blend's three sources only)."""
    for n, contribution in enumerate(result.contributions):
        part = contribution.get(SOURCE_CONTENT)
        others = (value for source, value in contribution.items() if source != SOURCE_CONTENT)
        if part is not None and result.sources[n] != SOURCE_RULE and all(part > value for value in others):
            result.sources[n] = SOURCE_CONTENT


def _keep(result: Recommendation, positions: list[int]) -> None:
    """Keep the items of `result` at `positions`, in that order."""
    result.item_ids = [result.item_ids[n] for n in positions]
    result.scores = [result.scores[n] for n in positions]
    result.sources = [result.sources[n] for n in positions]
    result.contributions = [result.contributions[n] for n in positions]
    if result.rule_ids is not None:
        result.rule_ids = [result.rule_ids[n] for n in positions]


def _diversified(
    target: LoadedTarget,
    result: Recommendation,
    diversity: float,
    max_per_category: int | None,
    k: int,
    fixed: dict[int, int],
) -> list[int]:
    """The positions of `result`'s top `k` re-ranked for diversity (`recsys_serving.diversity`)."""
    catalog = target.catalog
    if catalog is None:
        return list(range(min(k, len(result))))
    index = target.item_index
    items = [index.get(item, -1) for item in result.item_ids]
    known = [item for item in items if item >= 0]
    similarity = np.zeros((len(items), len(items)))
    if known:
        rows = [n for n, item in enumerate(items) if item >= 0]
        similarity[np.ix_(rows, rows)] = catalog.similarities(known)
    categories = [catalog.categories[item] if item >= 0 else () for item in items]
    return mmr_order(
        result.scores,
        similarity,
        categories,
        diversity=diversity,
        max_per_category=max_per_category,
        k=k,
        fixed=fixed,
    )


def _precomputed(topn: UserTopN, user_id: str, k: int, weights: BlendWeights) -> Blended | None:
    """The user's top `k` of the precomputed blend; None when it cannot stand for the live one (a user
    not listed, more items than were kept, other weights)."""
    row = topn.user_index.get(user_id)
    if row is None or k > topn.depth or weights != topn.weights:
        return None
    start = int(topn.offsets[row])
    end = min(int(topn.offsets[row + 1]), start + k)
    totals = []
    contributions = []
    for values in topn.contributions[start:end].tolist():
        # The blend's own sum: 0.0 plus each source's contribution in BLEND_SOURCES order (an unused
        # source adds 0.0, which changes nothing), so the scores are those the batch blend ranked by.
        totals.append(values[0] + values[1] + values[2])
        contributions.append(
            {source: value for source, value in zip(BLEND_SOURCES, values, strict=True) if value > 0}
        )
    items: list[int] = topn.vocabulary[topn.items[start:end]].tolist()
    return Blended(items, totals, contributions, set(topn.sources[row]))


@dataclass(slots=True)
class BlendInputs:
    """What the blend of one request starts from, and the warnings choosing it raised."""

    request: BlendRequest
    user_id: str | None
    # The user's window history (items most recent first, weights); None for a user without one.
    history: tuple[list[int], list[float]] | None
    warnings: list[RecommendationWarning]


def blend_inputs(
    target: LoadedTarget,
    *,
    user_id: str | None,
    context_items: Sequence[str] | None,
    exclude_seen: bool,
) -> BlendInputs:
    """The seeds, ALS factors and exclusions of a request (see `recommend`)."""
    warnings: list[RecommendationWarning] = []
    history = target.history_with_weights(user_id) if user_id else None
    seeds: list[int] = []
    seed_weights: list[float] = []
    if context_items:
        index = target.item_index
        known: dict[int, None] = {}
        unknown = []
        for item in context_items:
            position = index.get(item)
            if position is None:
                unknown.append(item)
            else:
                known[position] = None
        if unknown:
            warnings.append(
                {
                    "code": CONTEXT_ITEMS_UNKNOWN,
                    "message": f"{len(unknown)} context item(s) are not in the served catalog and were "
                    "ignored",
                    "items": unknown,
                }
            )
        seeds, seed_weights = list(known), [1.0] * len(known)
    if not seeds and history:
        seeds = history[0][: ranking.MAX_HISTORY_SEEDS]
        seed_weights = history[1][: ranking.MAX_HISTORY_SEEDS]
    user_vector: np.ndarray | None = None
    if target.als is not None:
        user_vector = target.als.user_vector(user_id) if user_id else None
        if user_vector is None and seeds:
            user_vector = target.als.fold_in(seeds, seed_weights)
    excluded = set(seeds)
    if exclude_seen and history:
        excluded.update(history[0])
    return BlendInputs(BlendRequest(user_vector, seeds, excluded), user_id, history, warnings)


def _warn_fallback(blended: Blended, inputs: BlendInputs, warnings: list[RecommendationWarning]) -> None:
    """Say so when no personal source scored the request (popular items only)."""
    personal = blended.sources_used - {SOURCE_POPULARITY}
    if not personal:
        if inputs.request.seeds:
            warnings.append(
                {
                    "code": NO_COOC_CANDIDATES,
                    "message": "the seed items have no co-occurrence neighbours or model factors: popular items",
                }
            )
        elif inputs.user_id and inputs.history is None and inputs.request.user_vector is None:
            warnings.append({"code": UNKNOWN_USER, "message": "unknown user: popular items"})
        else:
            warnings.append({"code": ANONYMOUS, "message": "no known user or context item: popular items"})


def _candidates(
    best: Callable[[int], Blended],
    k: int,
    need: int,
    selection: Selection | None,
    allowed: np.ndarray | None,
) -> Blended:
    """The blend's best items that the selected rules do not block and the request may return (`allowed`;
    None: any): `need` of them, or `k` times the selection's depth factor when more (at least `k` when the
    catalog has them).

    Blocked items are removed from the blend's list rather than handed to it as excluded items: the
    remaining items keep exactly the scores they have without the rules (exclusion would rescale the
    co-occurrence scores), and a request does not pay for a long exclusion list when, as nearly always,
    none of the blocked items is among its best candidates. Any blocked items are looked for among a few
    more than `k` (a deeper list, or a quarter more, at least 5: blocking 2% of a catalog leaves a blocked
    item among the best 30 of nearly half the requests, rarely more than 5); when fewer than `k` are left,
    the blend is asked again for as many as the share of blocked items among those suggests (at least
    twice as many), until `k` are left or the catalog runs out. Items the request may not return are
    looked for the same way.
    """
    blocked = selection.blocked if selection is not None else frozenset()
    depth = max(need, k * selection.depth_factor) if selection is not None else need
    filtered = bool(blocked) or allowed is not None
    wanted = max(depth, k + min(len(blocked), max(5, k // 4))) if filtered else depth
    while True:
        blended = best(wanted)
        if not filtered:
            return blended
        kept = [
            n
            for n, item in enumerate(blended.items)
            if item not in blocked and (allowed is None or allowed[item])
        ]
        if len(kept) >= need or len(blended.items) < wanted:
            kept = kept[:depth]
            return Blended(
                [blended.items[n] for n in kept],
                [blended.scores[n] for n in kept],
                [blended.contributions[n] for n in kept],
                blended.sources_used,
            )
        share_kept = max(len(kept), 1) / len(blended.items)
        wanted = max(2 * wanted, int(1.5 * k / share_kept) + k)


def _apply_rules(result: Recommendation, selection: Selection, k: int) -> set[str] | None:
    """Replace `result`'s items (and sources) by the first `k` after the selected rules change its
    candidate list, and return the items pins and replace lists placed; None when no selected rule concerns
    the list, which is then left as it is.

    The blocked items are out of the candidate list already (`_candidates`); the list is deeper than k
    when a boost or bury may apply (`Selection.depth_factor`). A rescored item's contributions are scaled
    with its score, so that its score stays the sum of its sources.
    """
    result.rules_version = selection.version
    candidates = result.candidate_ids
    rules = selection.rules_for(candidates)
    if not rules:
        return None
    scores, contributions = result.candidate_scores, result.candidate_contributions
    placed = apply_rules(rules, list(zip(candidates, scores, strict=True)), k)
    position = {item: n for n, item in enumerate(candidates)}
    result.item_ids = [entry.item_id for entry in placed]
    result.scores = [entry.score for entry in placed]
    result.rule_ids = [entry.rule_ids for entry in placed]
    result.contributions = []
    for entry in placed:
        n = position.get(entry.item_id)
        if n is None:
            result.contributions.append({})
        elif entry.score is None or entry.score == scores[n] or scores[n] <= 0:
            result.contributions.append(contributions[n])
        else:
            factor = entry.score / scores[n]
            result.contributions.append({source: part * factor for source, part in contributions[n].items()})
    # Scaling keeps an item's main source; an item placed without a score has none of its own.
    result.sources = [
        source if entry.item_id in position else SOURCE_RULE
        for entry, source in zip(placed, main_sources(result.contributions), strict=True)
    ]
    positioned = {rule.id for rule in rules if rule.action in ("pin", "replace")}
    return {entry.item_id for entry in placed if positioned.intersection(entry.rule_ids)}
