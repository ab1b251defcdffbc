"""What a recommendation request gets: seeds, the user's model factors, exclusions and fallbacks around
the calibrated blend (`blend`).

`recommend` chooses the seeds (the context items when any is known, else the user's most recent items),
the user's ALS factors (the model's own for a user it knows, else folded in from the seed items), what to
leave out (the seeds, plus every item of the user's window history with `exclude_seen`), runs the blend and
says in warnings where it fell back. It is pure: no HTTP, no metrics, no exposure logging (the route does
those with its result), so the offline evaluation calls exactly this, and business rules and diversity
plug in here.

A user the ALS model knows, asking without context items and with `exclude_seen`, gets the same blend
precomputed (the `user_topn` artifact, built by calling `blend_inputs` and `blend.blend_users`) when the
target has it for the weights in force and `k` is within its depth: a lookup instead of the blend. The
lookup gives what `blend` gives for the same `k` (the best `k` candidates as a `Blended`), so whatever
comes after the blend applies to both alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NotRequired, TypedDict

import numpy as np

from recsys_core.kinds import BLEND_SOURCES
from recsys_core.settings import BlendWeights
from recsys_serving import ranking
from recsys_serving.blend import SOURCE_POPULARITY, Blended, BlendRequest, blend
from recsys_serving.store import LoadedTarget, UserTopN

DEFAULT_WEIGHTS = BlendWeights()

# Warning codes, stable parts of the API (docs/reference/http-api.md lists them).
UNKNOWN_USER = "unknown_user_popularity_fallback"
ANONYMOUS = "anonymous_popularity_fallback"
CONTEXT_ITEMS_UNKNOWN = "context_items_unknown"
NO_COOC_CANDIDATES = "no_cooc_candidates_popularity_fallback"
FEWER_ITEMS = "fewer_items_than_requested"
WARNING_CODES = (UNKNOWN_USER, ANONYMOUS, CONTEXT_ITEMS_UNKNOWN, NO_COOC_CANDIDATES, FEWER_ITEMS)


class RecommendationWarning(TypedDict):
    """A degraded answer, as it appears in a response's `warnings`."""

    code: str
    message: str
    items: NotRequired[list[str]]  # context_items_unknown only: the ignored ids


# Not frozen: a frozen dataclass's __init__ costs about 0.35 us more, on every request.
@dataclass(slots=True)
class Recommendation:
    """Ranked items, best first: parallel lists of ids, scores, main sources and per-source contributions."""

    item_ids: list[str]
    scores: list[float]
    sources: list[str]
    contributions: list[dict[str, float]]
    warnings: list[RecommendationWarning]

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
) -> Recommendation:
    """The top `k` items for a user and/or context items from `target`, with warnings where it degraded.

    Seeds: the known `context_items` (in the order given, duplicates once; unknown ones are reported and
    ignored), else the user's `ranking.MAX_HISTORY_SEEDS` most recent items, else none. ALS factors: the
    model's for a user it knows, else folded in from the seeds (the user's items with their weights, or the
    context items with weight 1). Seeds are never returned; with `exclude_seen`, neither is anything in
    the user's window history. `context_items` are expected validated (at most `ranking.MAX_CONTEXT_ITEMS`
    trimmed ids, as the API accepts them).
    """
    warnings: list[RecommendationWarning] = []
    blended: Blended | None = None
    if user_id and not context_items and exclude_seen and target.user_topn is not None:
        blended = _precomputed(target.user_topn, user_id, k, weights)
    if blended is None:
        inputs = blend_inputs(target, user_id=user_id, context_items=context_items, exclude_seen=exclude_seen)
        warnings = inputs.warnings
        blended = blend(
            target,
            user_vector=inputs.request.user_vector,
            seeds=inputs.request.seeds,
            excluded=inputs.request.excluded,
            k=k,
            weights=weights,
        )
        _warn_fallback(blended, inputs, warnings)
    if len(blended.items) < k:
        warnings.append(
            {"code": FEWER_ITEMS, "message": f"only {len(blended.items)} items left to recommend"}
        )
    ids = target.item_ids
    return Recommendation(
        [ids[i] for i in blended.items], blended.scores, blended.sources(), blended.contributions, warnings
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
