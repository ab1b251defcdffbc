"""What a recommendation request gets: seeds, exclusions and fallbacks around the ranking blend.

`recommend` chooses the seeds (the context items when any is known, else the user's most recent items),
what to leave out (the seeds, plus the user's whole history with `exclude_seen`), runs
`ranking.recommend` (co-occurrence, then popularity to fill) and says in warnings where it fell back.
It is pure: no HTTP, no metrics, no exposure logging (the route does those with its result), so further
candidate sources, business rules and diversity plug in here and are testable without a server.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NotRequired, TypedDict

from recsys_serving import ranking
from recsys_serving.store import LoadedTarget

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
    """Ranked items, best first: parallel lists of ids, scores and sources (`ranking.SOURCE_*`)."""

    item_ids: list[str]
    scores: list[float]
    sources: list[str]
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
) -> Recommendation:
    """The top `k` items for a user and/or context items from `target`, with warnings where it degraded.

    Seeds: the known `context_items` (in the order given, duplicates once; unknown ones are reported and
    ignored), else the user's `ranking.MAX_HISTORY_SEEDS` most recent items, else none (popular items).
    Seeds are never returned; with `exclude_seen`, neither is anything in the user's history.
    `context_items` are expected validated (at most `ranking.MAX_CONTEXT_ITEMS` trimmed ids, as the API
    accepts them).
    """
    warnings: list[RecommendationWarning] = []
    history = target.history(user_id) if user_id else None
    seeds: list[int] | None = None
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
        if known:
            seeds = list(known)
    if seeds is None and history:
        seeds = history[: ranking.MAX_HISTORY_SEEDS]
    if seeds is None:
        if user_id and history is None:
            warnings.append({"code": UNKNOWN_USER, "message": "unknown user: popular items"})
        else:
            warnings.append({"code": ANONYMOUS, "message": "no known user or context item: popular items"})
        seeds = []
    exclude = seeds + history if exclude_seen and history else seeds
    ranked = ranking.recommend(target, seeds, k, exclude)
    if seeds and ranked.n_cooc == 0:
        warnings.append(
            {
                "code": NO_COOC_CANDIDATES,
                "message": "the seed items have no co-occurrence neighbours left: popular items",
            }
        )
    if len(ranked) < k:
        warnings.append({"code": FEWER_ITEMS, "message": f"only {len(ranked)} items left to recommend"})
    ids = target.item_ids
    return Recommendation([ids[i] for i in ranked.items], ranked.scores, ranked.sources(), warnings)
