"""Merchandising rules as the server applies them: a published rules document, indexed once when its
manifest is loaded, so that a request pays for the rules that concern it, not for every rule published.

`recsys_core.rules` defines the document and `apply_rules`, the precedence (block > pin > replace >
boost/bury). This module only decides, fast, which rules one request hands to it:

- rules without an audience ("global") are split by action. Blocks, pins and replace lists change only at
  the bounds of their validity windows, so those in force are computed once per interval between two
  bounds and cached (a request checks that its time is still inside the cached interval: two comparisons);
- global boosts and buries are indexed by item: a request looks up its candidates, never scans the rules;
- rules with an audience are indexed by user id, by segment and by context item; the few a request finds
  there are checked in full (window and every audience field).

Rules that target items by catalog attributes (`match`) are resolved to the served catalog's items when
the document is indexed (`resolve_matches`); without a catalog they target nothing.

A `Selection` (the rules of one request) gives the items to exclude before the blend (everything blocked),
how deep the blend's candidate list must go, and the rules to apply to that list.
"""

from __future__ import annotations

import bisect
import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from recsys_core.rules import (
    SEGMENT_ACTIVE,
    SEGMENT_COLD_START,
    Request,
    Rule,
    RulesDocument,
    audience_matches,
    matches,
)
from recsys_serving.catalog import ServedCatalog

# With a boost or bury in force, the blend is asked for this many times k candidates, so that a boosted
# item from just below the top k can move into it and a buried one can leave it. Deeper costs every such
# request more: the blend's ALS scoring prunes against the depth-th best candidate.
SCORING_DEPTH = 2
_SCORING = ("boost", "bury")
_PLACING = ("pin", "replace")


@dataclass(frozen=True, slots=True)
class _InForce:
    """The global blocks, pins and replace lists in force during [start, end)."""

    start: dt.datetime | None
    end: dt.datetime | None
    blocked: frozenset[int]  # vocabulary indexes of the blocked items
    placing: tuple[Rule, ...]  # pins and replace lists, in document order


class ServedRules:
    """One published rules document of a tenant and surface, indexed for serving (immutable once built,
    but for the cache of the global rules in force, which is replaced whole)."""

    def __init__(
        self,
        version: str,
        document: RulesDocument,
        item_index: Mapping[str, int],
        cold_start_max_interactions: int,
        catalog: ServedCatalog | None = None,
    ) -> None:
        self.version = version
        document = resolve_matches(document, catalog, item_index)
        self.document = document
        self.cold_start_max_interactions = cold_start_max_interactions
        self._item_index = item_index
        self._position = {rule.id: n for n, rule in enumerate(document.rules)}
        self._global_blocks: list[Rule] = []
        self._global_placing: list[Rule] = []
        # Global blocks by item: a pin or replace list naming a blocked item must see the block.
        self._blocks_by_item: dict[str, list[Rule]] = {}
        self._scoring_by_item: dict[str, list[Rule]] = {}
        self._by_user: dict[str, list[Rule]] = {}
        self._by_segment: dict[str, list[Rule]] = {}
        self._by_context: dict[str, list[Rule]] = {}
        for rule in document.rules:
            audience = rule.audience
            if audience is not None and audience.users is not None:
                for user in audience.users:
                    self._by_user.setdefault(user, []).append(rule)
            elif audience is not None and audience.segment is not None:
                self._by_segment.setdefault(audience.segment, []).append(rule)
            elif audience is not None and audience.context_items is not None:
                for item in audience.context_items:
                    self._by_context.setdefault(item, []).append(rule)
            elif rule.action in _SCORING:
                for item in rule.items:
                    self._scoring_by_item.setdefault(item, []).append(rule)
            elif rule.action == "block":
                self._global_blocks.append(rule)
                for item in rule.items:
                    self._blocks_by_item.setdefault(item, []).append(rule)
            else:
                self._global_placing.append(rule)
        self._bounds = sorted(
            {
                moment
                for rule in (*self._global_blocks, *self._global_placing)
                for moment in (rule.valid_from, rule.valid_until)
                if moment is not None
            }
        )
        self._in_force: _InForce | None = None
        # Whether any audience names a segment (then every request's segment is worked out).
        self._segments = any(rule.audience is not None and rule.audience.segment for rule in document.rules)

    def __len__(self) -> int:
        return len(self.document.rules)

    def select(
        self,
        when: dt.datetime,
        user_id: str | None,
        history_items: int,
        context_items: Sequence[str] | None,
    ) -> Selection:
        """The rules of one request at `when` (UTC) for a user with `history_items` items in the served
        history (0 for an unknown or absent user) and the request's context items."""
        in_force = self._in_force
        if in_force is None or not _inside(when, in_force.start, in_force.end):
            in_force = self._in_force = self._global_in_force(when)
        found: list[Rule] = []
        if user_id is not None and self._by_user:
            found += self._by_user.get(user_id, ())
        segment = None
        if self._segments:
            segment = (
                SEGMENT_COLD_START if history_items <= self.cold_start_max_interactions else SEGMENT_ACTIVE
            )
            found += self._by_segment.get(segment, ())
        if context_items and self._by_context:
            for item in context_items:
                found += self._by_context.get(item, ())
        targeted: list[Rule] = []
        if found:
            request = Request(when, user_id, segment, frozenset(context_items or ()))
            seen: set[str] = set()
            for rule in found:
                if rule.id not in seen and rule.active_at(when) and audience_matches(rule, request):
                    seen.add(rule.id)
                    targeted.append(rule)
        return Selection(self, when, in_force, targeted)

    def _global_in_force(self, when: dt.datetime) -> _InForce:
        bounds = self._bounds
        at = bisect.bisect_right(bounds, when)
        blocks = [rule for rule in self._global_blocks if rule.active_at(when)]
        return _InForce(
            start=bounds[at - 1] if at > 0 else None,
            end=bounds[at] if at < len(bounds) else None,
            blocked=frozenset(self.indexes(item for rule in blocks for item in rule.items)),
            placing=tuple(rule for rule in self._global_placing if rule.active_at(when)),
        )

    def indexes(self, items: Iterable[str]) -> list[int]:
        """The vocabulary indexes of the served items among `items` (others can never be candidates)."""
        index = self._item_index
        return [index[item] for item in items if item in index]

    def ordered(self, rules: Iterable[Rule]) -> list[Rule]:
        """`rules` once each, in document order (the order `apply_rules` resolves conflicts by)."""
        unique = {rule.id: rule for rule in rules}
        return sorted(unique.values(), key=lambda rule: self._position[rule.id])


class Selection:
    """The rules that concern one request."""

    __slots__ = ("_in_force", "_served", "_targeted", "_when", "blocked", "depth_factor")

    def __init__(
        self, served: ServedRules, when: dt.datetime, in_force: _InForce, targeted: list[Rule]
    ) -> None:
        self._served = served
        self._when = when
        self._in_force = in_force
        self._targeted = targeted
        targeted_blocks = [rule for rule in targeted if rule.action == "block"]
        # Vocabulary indexes of every item blocked for this request.
        self.blocked: frozenset[int] | set[int] = (
            in_force.blocked.union(served.indexes(i for rule in targeted_blocks for i in rule.items))
            if targeted_blocks
            else in_force.blocked
        )
        scoring = served._scoring_by_item or any(rule.action in _SCORING for rule in targeted)
        self.depth_factor = SCORING_DEPTH if scoring else 1

    @property
    def version(self) -> str:
        return self._served.version

    def rules_for(self, candidates: Sequence[str]) -> list[Rule]:
        """The rules to apply to a candidate list (item ids, best first), in document order: the pins and
        replace lists in force, this request's targeted rules, the global boosts and buries of the
        candidates, and the global blocks of the items the pins and replace lists name."""
        served, when = self._served, self._when
        rules: list[Rule] = [*self._in_force.placing, *self._targeted]
        scoring = served._scoring_by_item
        if scoring:
            for item in candidates:
                for rule in scoring.get(item, ()):
                    if rule.active_at(when):
                        rules.append(rule)
        blocks = served._blocks_by_item
        if blocks:
            for rule in (*self._in_force.placing, *self._targeted):
                if rule.action in _PLACING:
                    for item in rule.items:
                        rules += (block for block in blocks.get(item, ()) if block.active_at(when))
        if not rules:
            return rules
        return served.ordered(rules)


def resolve_matches(
    document: RulesDocument, catalog: ServedCatalog | None, item_index: Mapping[str, int]
) -> RulesDocument:
    """`document` with each rule that targets catalog attributes (`match`) targeting the served items that
    match them, in item id order (none without a catalog)."""
    if not any(rule.match is not None for rule in document.rules):
        return document
    ids = list(item_index)  # in vocabulary order
    resolved = []
    for rule in document.rules:
        if rule.match is not None:
            items: tuple[str, ...] = ()
            if catalog is not None:
                items = tuple(
                    ids[n]
                    for n in range(len(ids))
                    if matches(rule.match, catalog.categories[n], catalog.tags[n], catalog.attributes[n])
                )
            rule = rule.model_copy(update={"items": items})
        resolved.append(rule)
    return document.model_copy(update={"rules": tuple(resolved)})


def _inside(when: dt.datetime, start: dt.datetime | None, end: dt.datetime | None) -> bool:
    return (start is None or start <= when) and (end is None or when < end)
