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
) -> Recommendation:
    """The top `k` items for a user and/or context items from `target`, with warnings where it degraded.

    Seeds: the known `context_items` (in the order given, duplicates once; unknown ones are reported and
    ignored), else the user's `ranking.MAX_HISTORY_SEEDS` most recent items, else none. ALS factors: the
    model's for a user it knows, else folded in from the seeds (the user's items with their weights, or the
    context items with weight 1). Seeds are never returned; with `exclude_seen`, neither is anything in
    the user's window history. `context_items` are expected validated (at most `ranking.MAX_CONTEXT_ITEMS`
    trimmed ids, as the API accepts them). With `rules_at` (UTC), the target's rules in force then are
    applied; without it, none are.
    """
    inputs: BlendInputs | None = None
    topn = target.user_topn if user_id and not context_items and exclude_seen else None

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
        return blend(
            target,
            user_vector=request.user_vector,
            seeds=request.seeds,
            excluded=request.excluded,
            k=n,
            weights=weights,
        )

    selection: Selection | None = None
    if rules_at is not None and target.rules is not None:
        history = target.history_with_weights(user_id) if user_id else None
        selection = target.rules.select(rules_at, user_id, len(history[0]) if history else 0, context_items)
        blended = _candidates(best, k, selection)
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
    if selection is None or not _apply_rules(result, selection, k):
        result.sources = main_sources(result.contributions)
    if len(result) < k:
        warnings.append({"code": FEWER_ITEMS, "message": f"only {len(result)} items left to recommend"})
    return result


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


def _candidates(best: Callable[[int], Blended], k: int, selection: Selection) -> Blended:
    """The blend's best items that the selected rules do not block: `k` times the selection's depth factor
    of them (at least `k` when the catalog has them).

    Blocked items are removed from the blend's list rather than handed to it as excluded items: the
    remaining items keep exactly the scores they have without the rules (exclusion would rescale the
    co-occurrence scores), and a request does not pay for a long exclusion list when, as nearly always,
    none of the blocked items is among its best candidates. Any blocked items are looked for among a few
    more than `k` (a deeper list, or a quarter more, at least 5: blocking 2% of a catalog leaves a blocked
    item among the best 30 of nearly half the requests, rarely more than 5); when fewer than `k` are left,
    the blend is asked again for as many as the share of blocked items among those suggests (at least
    twice as many), until `k` are left or the catalog runs out.
    """
    blocked = selection.blocked
    depth = k * selection.depth_factor
    wanted = max(depth, k + min(len(blocked), max(5, k // 4)))
    while True:
        blended = best(wanted)
        if not blocked:
            return blended
        kept = [n for n, item in enumerate(blended.items) if item not in blocked]
        if len(kept) >= k or len(blended.items) < wanted:
            kept = kept[:depth]
            return Blended(
                [blended.items[n] for n in kept],
                [blended.scores[n] for n in kept],
                [blended.contributions[n] for n in kept],
                blended.sources_used,
            )
        share_kept = max(len(kept), 1) / len(blended.items)
        wanted = max(2 * wanted, int(1.5 * k / share_kept) + k)


def _apply_rules(result: Recommendation, selection: Selection, k: int) -> bool:
    """Replace `result`'s items (and sources) by the first `k` after the selected rules change its
    candidate list; False when no selected rule concerns the list, which is then left as it is.

    The blocked items are out of the candidate list already (`_candidates`); the list is deeper than k
    when a boost or bury may apply (`Selection.depth_factor`). A rescored item's contributions are scaled
    with its score, so that its score stays the sum of its sources.
    """
    result.rules_version = selection.version
    candidates = result.candidate_ids
    rules = selection.rules_for(candidates)
    if not rules:
        return False
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
    return True
