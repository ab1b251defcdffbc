"""The dry run of a rules document: what publishing it would change, replayed on recent requests.

A sample of requests (`sample_requests`: the newest landed decision traces of the tenant and surface,
else users of the served user history) is replayed through the served recommender once each, asking for
more candidates than the request's k, and the rules in force and the new rules are both applied to those
same candidates (`recsys_core.rules.apply_rules`), each set to the candidates the server would give it
(`candidates_for`). The two final lists are diffed (`rules_dry_run`):
requests affected, items added and removed, and which rule each change comes from. Nothing is published
or written; `recsys rules publish --dry-run` and `PUT /v1/admin/rules?dry_run=true` print this report.

Attribution of a change, the same for every request (docs/how-to/rules.md explains it to merchandisers):
only rules that differ between the two applicable sets (new, removed, edited, or starting or ending
their window) are credited. An added item goes to the differing new rules that placed it (a pin, a
replace list, a boost), else to the removed blocks that had kept it out, else to `filled` (it moved up
into the list because another item left). A removed item goes to the differing new blocks that name it,
else to the differing current rules that had placed it, else to `displaced` (pushed down by the items
placed above it).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recsys_core import decisions
from recsys_core.rules import (
    DRY_RUN_MAX_SAMPLE,
    DRY_RUN_SAMPLE,
    SEGMENT_ACTIVE,
    SEGMENT_COLD_START,
    Placed,
    Request,
    Rule,
    RulesDocument,
    apply_rules,
    rules_in_force,
)
from recsys_core.rules import applicable as applicable_rules
from recsys_core.settings import BlendWeights, Settings
from recsys_serving.params import DEFAULT_K, MAX_K
from recsys_serving.recommender import recommend
from recsys_serving.rules import resolve_matches
from recsys_serving.store import LoadedTarget

# Decision traces older than this are not "recent": the sample falls back to users with history.
LOOKBACK_DAYS = 7
SOURCE_DECISIONS = "decisions"
SOURCE_USER_HISTORY = "user_history"
# Affected requests listed in full in a report.
MAX_EXAMPLES = 10
# With a boost or bury applying, the rules see this many times k candidates (as the server ranks them).
SCORING_DEPTH = 3


@dataclass(frozen=True, slots=True)
class ReplayRequest:
    """One request to replay: who asked and with which parameters."""

    request_id: str | None
    user_id: str | None
    context_items: tuple[str, ...] = ()
    k: int = DEFAULT_K
    exclude_seen: bool = True


@dataclass(slots=True)
class RuleEffect:
    """What one rule id did over the sample: requests it applies to under the rules in force and under the
    new rules, and the items added to and removed from final lists that are credited to it."""

    rule_id: str
    action: str
    change: str  # added, removed, changed or unchanged: the rule in the new document against the current
    requests_current: int = 0
    requests_new: int = 0
    items_added: int = 0
    items_removed: int = 0


@dataclass(slots=True)
class DryRunReport:
    """The dry run's answer (`as_dict` is its JSON form)."""

    tenant: str
    surface: str
    manifest_version: str
    current_rules_version: str | None
    at: dt.datetime
    source: str
    requests: int = 0
    affected: int = 0
    reordered: int = 0  # affected requests whose items stayed the same, in another order
    items_added: int = 0
    items_removed: int = 0
    filled: int = 0  # added items credited to no rule: they moved up because another item left
    displaced: int = 0  # removed items credited to no rule: pushed down by the items placed above them
    rules: list[RuleEffect] = field(default_factory=list)
    examples: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "tenant": self.tenant,
            "surface": self.surface,
            "manifest_version": self.manifest_version,
            "current_rules_version": self.current_rules_version,
            "at": self.at.astimezone(dt.UTC).isoformat().replace("+00:00", "Z"),
            "source": self.source,
            "requests": self.requests,
            "affected": self.affected,
            "reordered": self.reordered,
            "items_added": self.items_added,
            "items_removed": self.items_removed,
            "filled": self.filled,
            "displaced": self.displaced,
            "rules": [
                {
                    "rule_id": effect.rule_id,
                    "action": effect.action,
                    "change": effect.change,
                    "requests_current": effect.requests_current,
                    "requests_new": effect.requests_new,
                    "items_added": effect.items_added,
                    "items_removed": effect.items_removed,
                }
                for effect in self.rules
            ],
            "examples": self.examples,
        }


def dry_run(
    settings: Settings,
    target: LoadedTarget,
    new: RulesDocument,
    *,
    sample: int = DRY_RUN_SAMPLE,
    at: dt.datetime | None = None,
) -> DryRunReport:
    """The dry run of `new` against the rules of `target`'s manifest, on a sample of `sample` recent
    requests (`sample_requests`), ranked with the target's blend as the server does; rule windows are
    evaluated at `at` (default: now). `RulesError` when the rules in force are damaged."""
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    source, requests = sample_requests(settings.lake_root, target, size=sample, now=now)
    return rules_dry_run(
        target,
        rules_in_force(settings.artifact_root, target.manifest),
        new,
        requests,
        source=source,
        at=at or now,
        weights=target.blend or settings.pipeline.blend,
        cold_start_max_interactions=settings.pipeline.guardrails.cold_start_max_interactions,
    )


def sample_requests(
    lake_root: Path, target: LoadedTarget, *, size: int = DRY_RUN_SAMPLE, now: dt.datetime
) -> tuple[str, list[ReplayRequest]]:
    """(source, requests): the newest `size` recommendation requests landed in the decision log in the
    LOOKBACK_DAYS before `now`, else `size` users of the target's user history (the same users every
    time: those with the smallest hash of their id), each with the API's default parameters."""
    if not 1 <= size <= DRY_RUN_MAX_SAMPLE:
        raise ValueError(f"the sample size must be from 1 to {DRY_RUN_MAX_SAMPLE}, got {size}")
    traces = decisions.recent_requests(
        lake_root, target.tenant, target.surface, since=now - dt.timedelta(days=LOOKBACK_DAYS), limit=size
    )
    if traces:
        return SOURCE_DECISIONS, [_replayed(trace) for trace in traces]
    users = sorted(target.user_index, key=lambda user: hashlib.sha256(user.encode()).digest())[:size]
    return SOURCE_USER_HISTORY, [ReplayRequest(None, user) for user in users]


def _replayed(trace: dict[str, Any]) -> ReplayRequest:
    """A landed request's parameters; a value the API would not have accepted takes the API's default."""
    params = trace["params"] if isinstance(trace["params"], dict) else {}
    k = params.get("k")
    exclude_seen = params.get("exclude_seen")
    context = params.get("context_items")
    return ReplayRequest(
        trace["request_id"],
        trace["user_id"],
        tuple(item for item in context if isinstance(item, str)) if isinstance(context, list) else (),
        k if isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= MAX_K else DEFAULT_K,
        exclude_seen if isinstance(exclude_seen, bool) else True,
    )


def segment_of(target: LoadedTarget, user_id: str | None, cold_start_max_interactions: int) -> str:
    """The audience segment of a request's user: cold_start with at most that many items in the served
    history (unknown users and requests without a user included), else active."""
    history = target.history(user_id) if user_id else None
    if history is None or len(history) <= cold_start_max_interactions:
        return SEGMENT_COLD_START
    return SEGMENT_ACTIVE


def candidates_for(
    rules: Sequence[Rule], candidates: Sequence[tuple[str, float]], k: int
) -> list[tuple[str, float]]:
    """The candidates the rules of one request are applied to, as the server ranks: the blend's best
    items that the rules do not block, k of them, or SCORING_DEPTH times k when a boost or bury applies
    (so that a boosted item from just below the top k can move into it and a buried one can leave it)."""
    blocked = {item for rule in rules if rule.action == "block" for item in rule.items}
    scoring = any(rule.action in ("boost", "bury") for rule in rules)
    depth = k * (SCORING_DEPTH if scoring else 1)
    return [candidate for candidate in candidates if candidate[0] not in blocked][:depth]


def rules_dry_run(
    target: LoadedTarget,
    current: tuple[str, RulesDocument] | None,
    new: RulesDocument,
    requests: Sequence[ReplayRequest],
    *,
    source: str,
    at: dt.datetime,
    weights: BlendWeights,
    cold_start_max_interactions: int,
) -> DryRunReport:
    """What replacing the rules in force (`current`: their version and document, None without rules) by
    `new` changes in the final lists of `requests`, with rule windows evaluated at `at`."""
    # Rules that target catalog attributes, resolved to the served catalog's items as the server does.
    current_doc = resolve_matches(
        current[1] if current else RulesDocument(), target.catalog, target.item_index
    )
    new = resolve_matches(new, target.catalog, target.item_index)
    report = DryRunReport(
        target.tenant,
        target.surface,
        target.manifest_version,
        current[0] if current else None,
        at,
        source,
        requests=len(requests),
    )
    effects = _effects(current_doc, new)
    for replay in requests:
        request = Request(
            at,
            replay.user_id,
            segment_of(target, replay.user_id, cold_start_max_interactions),
            frozenset(replay.context_items),
        )
        before_rules = applicable_rules(current_doc, request)
        after_rules = applicable_rules(new, request)
        for rule in before_rules:
            effects[rule.id].requests_current += 1
        for rule in after_rules:
            effects[rule.id].requests_new += 1
        # One blend per request, deep enough for both rule sets: what each blocks is left out after.
        blocked = {
            item for rule in (*before_rules, *after_rules) if rule.action == "block" for item in rule.items
        }
        blended = recommend(
            target,
            user_id=replay.user_id,
            context_items=list(replay.context_items) or None,
            k=SCORING_DEPTH * replay.k + len(blocked),
            exclude_seen=replay.exclude_seen,
            weights=weights,
        )
        candidates = list(zip(blended.candidate_ids, blended.candidate_scores, strict=True))
        before = apply_rules(before_rules, candidates_for(before_rules, candidates, replay.k), replay.k)
        after = apply_rules(after_rules, candidates_for(after_rules, candidates, replay.k), replay.k)
        if [p.item_id for p in before] == [p.item_id for p in after]:
            continue
        added, removed = _diff(before, after, before_rules, after_rules)
        report.affected += 1
        report.reordered += not added and not removed
        for credited in added.values():
            report.items_added += 1
            report.filled += not credited
            for rule_id in credited:
                effects[rule_id].items_added += 1
        for credited in removed.values():
            report.items_removed += 1
            report.displaced += not credited
            for rule_id in credited:
                effects[rule_id].items_removed += 1
        if len(report.examples) < MAX_EXAMPLES:
            report.examples.append(
                {
                    "request_id": replay.request_id,
                    "user_id": replay.user_id,
                    "current": [p.item_id for p in before],
                    "new": [p.item_id for p in after],
                    "added": list(added),
                    "removed": list(removed),
                }
            )
    report.rules = list(effects.values())
    return report


def _effects(current: RulesDocument, new: RulesDocument) -> dict[str, RuleEffect]:
    """An empty effect per rule id: the new document's rules in order, then the rules it drops."""
    before = {rule.id: rule for rule in current.rules}
    after = {rule.id: rule for rule in new.rules}
    effects = {}
    for rule in new.rules:
        old = before.get(rule.id)
        change = "added" if old is None else "unchanged" if old == rule else "changed"
        effects[rule.id] = RuleEffect(rule.id, rule.action, change)
    for rule in current.rules:
        if rule.id not in after:
            effects[rule.id] = RuleEffect(rule.id, rule.action, "removed")
    return effects


def _diff(
    before: list[Placed], after: list[Placed], before_rules: list[Rule], after_rules: list[Rule]
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """The items added and removed, each with the ids of the rules credited (module docstring)."""
    # By id, then content: a rule of the same id and content applies under both (rule ids are unique).
    before_by_id = {rule.id: rule for rule in before_rules}
    after_by_id = {rule.id: rule for rule in after_rules}
    gone = [rule for rule in before_rules if after_by_id.get(rule.id) != rule]
    came = [rule for rule in after_rules if before_by_id.get(rule.id) != rule]
    gone_ids = {rule.id for rule in gone}
    came_ids = {rule.id for rule in came}
    before_items = {p.item_id: p for p in before}
    after_items = {p.item_id: p for p in after}

    def blocking(rules: list[Rule], item: str) -> list[str]:
        return [rule.id for rule in rules if rule.action == "block" and item in rule.items]

    added = {
        p.item_id: [r for r in p.rule_ids if r in came_ids] or blocking(gone, p.item_id)
        for p in after
        if p.item_id not in before_items
    }
    removed = {
        p.item_id: blocking(came, p.item_id) or [r for r in p.rule_ids if r in gone_ids]
        for p in before
        if p.item_id not in after_items
    }
    return added, removed
