"""Merchandising rules: the document schema, its validation, and how rules change a ranked list.

A rules document belongs to one tenant and surface. Each rule has an `action`:
- `block`: the items are never returned;
- `pin`: the item is put at `position` (1 = first);
- `replace`: the response is the rule's `items` in their order (a manual override list), filled from the
  ranked candidates when it is shorter than the request's k;
- `boost` / `bury`: the item's score is multiplied by `factor` (> 1 for boost, between 0 and 1 for bury),
  which moves it among the candidates the recommender found (a boost does not add an item that is not a
  candidate; a pin does).

A rule names its items by id (`items`) or, for block, boost and bury, by what the tenant's item catalog
says about them (`match`: any of `categories`, any of `tags`, every `attributes` key equal to its value; the
fields given must all hold). The server resolves a `match` to the catalog's items when it loads the rules
with the catalog (`matches`), so a catalog update re-targets the rule at the next manifest.

A rule applies to a request when its validity window contains the request's time (`from` inclusive, `until`
exclusive, UTC) and its `audience` matches (every field given must match: the user is listed, the user is in
the segment, the request's context items include one of the listed items; no audience = everyone).

Precedence, fixed: block beats pin beats replace beats boost/bury. Between rules of one kind, the one
earlier in the document wins: the first `replace` that applies is the list; an item pinned twice goes where
its first pin puts it; a pin whose position an earlier pin took goes to the next free position. Boost and
bury factors on one item multiply.

Nothing here imports Dagster or the server: the CLI validates documents with it, publishing writes its
normalised form, and the server applies it.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from recsys_core.manifest import Manifest, resolve_uri, verify_artifact

ACTIONS = ("block", "pin", "replace", "boost", "bury")
# The artifact kind that holds a published rules document, and its file (docs/reference/artifacts.md).
RULES_KIND = "rules"
RULES_FILE = "rules.json"
# Segments a rule's audience may name; the server puts each request in one of them (docs/reference/rules.md).
SEGMENT_COLD_START = "cold_start"
SEGMENT_ACTIVE = "active"
SEGMENTS = (SEGMENT_COLD_START, SEGMENT_ACTIVE)
# Bounds that keep a document something a merchandiser wrote, not a dump: a request applies every rule.
MAX_RULES = 10_000
MAX_ITEMS_PER_RULE = 1_000
MAX_POSITION = 1_000
# The requests a dry run replays (recsys_serving.rules_dry_run): by default, and at most.
DRY_RUN_SAMPLE = 200
DRY_RUN_MAX_SAMPLE = 10_000

RuleId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")]
ItemId = Annotated[str, Field(min_length=1, max_length=512)]


class RulesError(ValueError):
    """A rules document that cannot be used; the message names the rule and the field."""


class Audience(BaseModel):
    """Who a rule applies to; every field given must match."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    users: tuple[ItemId, ...] | None = Field(default=None, min_length=1, max_length=100_000)
    segment: Literal["cold_start", "active"] | None = None
    context_items: tuple[ItemId, ...] | None = Field(
        default=None, min_length=1, max_length=MAX_ITEMS_PER_RULE
    )


Label = Annotated[str, Field(min_length=1, max_length=256)]
AttributeValue = str | int | float | bool
# The actions that may target items by catalog attributes: a pin places one item and a replace list orders
# its items, both of which need ids.
MATCH_ACTIONS = ("block", "boost", "bury")
_MISSING = object()


class Match(BaseModel):
    """The catalog items a rule targets: in any of `categories`, with any of `tags`, and with every one of
    `attributes` equal to the given value (each field given must hold)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    categories: tuple[Label, ...] | None = Field(default=None, min_length=1, max_length=MAX_ITEMS_PER_RULE)
    tags: tuple[Label, ...] | None = Field(default=None, min_length=1, max_length=MAX_ITEMS_PER_RULE)
    attributes: dict[Label, AttributeValue] | None = Field(default=None, min_length=1, max_length=100)

    @model_validator(mode="after")
    def _something(self) -> Match:
        if self.categories is None and self.tags is None and self.attributes is None:
            raise ValueError("give at least one of `categories`, `tags`, `attributes`")
        return self


def matches(
    match: Match, categories: Sequence[str], tags: Sequence[str], attributes: Mapping[str, Any]
) -> bool:
    """Whether an item with these catalog fields is one `match` targets."""
    if match.categories is not None and not set(match.categories).intersection(categories):
        return False
    if match.tags is not None and not set(match.tags).intersection(tags):
        return False
    if match.attributes is not None:
        # bool is an int in Python: True must not equal an attribute 1.
        for key, value in match.attributes.items():
            found = attributes.get(key, _MISSING)
            if found is _MISSING or isinstance(found, bool) != isinstance(value, bool) or found != value:
                return False
    return True


class Rule(BaseModel):
    """One rule of a rules document (docs/reference/rules.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    id: RuleId
    action: Literal["block", "pin", "replace", "boost", "bury"]
    items: tuple[ItemId, ...] = Field(default=(), max_length=MAX_ITEMS_PER_RULE)
    match: Match | None = None
    position: int | None = Field(default=None, ge=1, le=MAX_POSITION)
    factor: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    audience: Audience | None = None
    valid_from: dt.datetime | None = Field(default=None, alias="from")
    valid_until: dt.datetime | None = Field(default=None, alias="until")
    reason: str | None = Field(default=None, max_length=1_000)

    @field_validator("valid_from", "valid_until")
    @classmethod
    def _utc(cls, value: dt.datetime | None) -> dt.datetime | None:
        if value is not None and value.utcoffset() is None:
            raise ValueError("needs a time zone (for example 2026-06-01T00:00:00Z)")
        return None if value is None else value.astimezone(dt.UTC)

    @model_validator(mode="after")
    def _fields_of_the_action(self) -> Rule:
        if bool(self.items) == (self.match is not None):
            raise ValueError("give the items by id (`items`) or by catalog attributes (`match`), one of them")
        if self.match is not None and self.action not in MATCH_ACTIONS:
            raise ValueError(f"`match` targets items of {', '.join(MATCH_ACTIONS)} rules only; give `items`")
        if (self.action == "pin") != (self.position is not None):
            raise ValueError("`position` is required for pin and only for pin")
        if self.action == "pin" and len(self.items) != 1:
            raise ValueError("a pin puts one item at its position: give exactly one item")
        if (self.action in ("boost", "bury")) != (self.factor is not None):
            raise ValueError("`factor` is required for boost and bury and only for them")
        if self.action == "boost" and self.factor is not None and self.factor <= 1:
            raise ValueError(f"a boost multiplies scores by a factor above 1, got {self.factor}")
        if self.action == "bury" and self.factor is not None and self.factor >= 1:
            raise ValueError(f"a bury multiplies scores by a factor between 0 and 1, got {self.factor}")
        if self.valid_from and self.valid_until and self.valid_from >= self.valid_until:
            raise ValueError("`from` must be before `until`")
        if len(set(self.items)) != len(self.items):
            raise ValueError("an item is listed twice")
        return self

    def active_at(self, when: dt.datetime) -> bool:
        """Whether `when` is inside the validity window (`from` inclusive, `until` exclusive)."""
        return (self.valid_from is None or self.valid_from <= when) and (
            self.valid_until is None or when < self.valid_until
        )


class RulesDocument(BaseModel):
    """A tenant and surface's rules, in precedence order within each action."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rules: tuple[Rule, ...] = Field(default=(), max_length=MAX_RULES)

    @model_validator(mode="after")
    def _consistent(self) -> RulesDocument:
        seen: set[str] = set()
        for rule in self.rules:
            if rule.id in seen:
                raise ValueError(f"rule id {rule.id!r} is used twice")
            seen.add(rule.id)
        for pin in (r for r in self.rules if r.action == "pin"):
            for block in (r for r in self.rules if r.action == "block"):
                if pin.items[0] in block.items and _may_overlap(pin, block):
                    raise ValueError(
                        f"rule {pin.id!r} pins {pin.items[0]!r} and rule {block.id!r} blocks it for the same "
                        "audience and time: one of them never takes effect"
                    )
        return self

    @classmethod
    def json_schema_text(cls) -> str:
        """The document's JSON Schema, as published in docs/reference/rules.schema.json."""
        return json.dumps(cls.model_json_schema(by_alias=True), indent=2, sort_keys=True) + "\n"

    def normalised_json(self) -> bytes:
        """The canonical bytes of the document: the same rules give the same bytes (and artifact version)."""
        data = self.model_dump(mode="json", by_alias=True, exclude_none=True)
        return (json.dumps(data, sort_keys=True, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


_EARLIEST = dt.datetime.min.replace(tzinfo=dt.UTC)
_LATEST = dt.datetime.max.replace(tzinfo=dt.UTC)


def _may_overlap(a: Rule, b: Rule) -> bool:
    """Whether some request could be in both rules' audiences and windows (a conservative yes)."""
    start = max(a.valid_from or _EARLIEST, b.valid_from or _EARLIEST)
    end = min(a.valid_until or _LATEST, b.valid_until or _LATEST)
    if start >= end:
        return False
    aud_a, aud_b = a.audience or Audience(), b.audience or Audience()
    if aud_a.users and aud_b.users and not set(aud_a.users) & set(aud_b.users):
        return False
    return not (aud_a.segment and aud_b.segment and aud_a.segment != aud_b.segment)


def parse_rules(text: str | bytes, source: str) -> RulesDocument:
    """A rules document from YAML or JSON text (JSON is YAML); `source` names it in errors."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RulesError(f"{source}: not valid YAML or JSON: {exc}") from None
    except RecursionError:
        raise RulesError(f"{source}: not a rules document: nested too deeply") from None
    if not isinstance(raw, dict):
        raise RulesError(f"{source}: expected a mapping with a `rules` list, got {type(raw).__name__}")
    try:
        return RulesDocument.model_validate(raw)
    except ValidationError as exc:
        raise RulesError(f"{source}: {_describe(exc, raw)}") from None


def read_rules(path: Path) -> RulesDocument:
    """The rules document in `path` (YAML or JSON)."""
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise RulesError(f"{path}: cannot read: {exc.strerror}") from None
    return parse_rules(text, str(path))


def read_published_rules(artifact_dir: Path) -> RulesDocument:
    """The rules document of a published `rules` artifact directory (verified by the caller)."""
    return read_rules(artifact_dir / RULES_FILE)


def rules_in_force(artifact_root: Path, manifest: Manifest) -> tuple[str, RulesDocument] | None:
    """The version and document of the `rules` artifact `manifest` names (verified first: its files and
    version as published), or None when the manifest has no rules. `RulesError` if it is damaged."""
    uri = manifest["current"].get(RULES_KIND)
    if uri is None:
        return None
    folder = resolve_uri(artifact_root, manifest["tenant"], manifest["surface"], uri)
    problems = verify_artifact(folder, False)
    if problems:
        raise RulesError(f"{manifest['tenant']}/{manifest['surface']}: rules in force: {'; '.join(problems)}")
    return folder.name, read_published_rules(folder)


def _describe(exc: ValidationError, raw: dict[str, Any]) -> str:
    """Each problem as `rule <id> (rules[n]) field: message`, so a merchandiser finds the rule by its id."""
    problems = []
    listed = raw.get("rules")
    rules: list[Any] = listed if isinstance(listed, list) else []
    for error in exc.errors(include_url=False):
        loc = list(error["loc"])
        where = ".".join(str(part) for part in loc) or "document"
        if len(loc) >= 2 and loc[0] == "rules" and isinstance(loc[1], int) and loc[1] < len(rules):
            rule = rules[loc[1]]
            rule_id = rule.get("id") if isinstance(rule, dict) else None
            field_path = ".".join(str(part) for part in loc[2:] if not str(part).startswith("function-"))
            where = f"rule {rule_id!r} (rules[{loc[1]}])" + (f" {field_path}" if field_path else "")
        message = str(error["msg"]).removeprefix("Value error, ")
        problems.append(f"{where}: {message}")
    return "; ".join(problems)


@dataclass(frozen=True, slots=True)
class Request:
    """What a rule's audience and window are matched against."""

    when: dt.datetime
    user_id: str | None = None
    segment: str | None = None
    context_items: frozenset[str] = frozenset()


@dataclass(slots=True)
class Placed:
    """An item of the final list: its score after boosts (None when a rule put it there without a score)
    and the ids of the rules that touched it, in document order."""

    item_id: str
    score: float | None
    rule_ids: list[str] = field(default_factory=list)


def applicable(document: RulesDocument, request: Request) -> list[Rule]:
    """The rules that apply to `request`, in document order."""
    return [
        rule for rule in document.rules if rule.active_at(request.when) and audience_matches(rule, request)
    ]


def audience_matches(rule: Rule, request: Request) -> bool:
    """Whether `request` is in `rule`'s audience (its validity window aside)."""
    audience = rule.audience
    if audience is None:
        return True
    if audience.users is not None and request.user_id not in audience.users:
        return False
    if audience.segment is not None and request.segment != audience.segment:
        return False
    return audience.context_items is None or not request.context_items.isdisjoint(audience.context_items)


def apply_rules(rules: Sequence[Rule], candidates: Sequence[tuple[str, float]], k: int) -> list[Placed]:
    """The first `k` items after `rules` (those that apply, in document order) change `candidates` (item ids
    with scores, best first): blocks, then boosts and buries, then the first replace list, then pins."""
    blocked = {item for rule in rules if rule.action == "block" for item in rule.items}
    candidate_items = {item for item, _ in candidates}
    touched: dict[str, list[str]] = {}
    factors: dict[str, float] = {}
    for rule in rules:
        if rule.action in ("boost", "bury") and rule.factor is not None:
            for item in rule.items:
                if item in candidate_items and item not in blocked:
                    factors[item] = factors.get(item, 1.0) * rule.factor
                    touched.setdefault(item, []).append(rule.id)
    scored = [
        (item, score * factors.get(item, 1.0), position)
        for position, (item, score) in enumerate(candidates)
        if item not in blocked
    ]
    # A stable order: equal scores keep the recommender's order.
    scored.sort(key=lambda entry: (-entry[1], entry[2]))
    ranked: dict[str, float | None] = {item: score for item, score, _ in scored}

    replace = next((rule for rule in rules if rule.action == "replace"), None)
    if replace is not None:
        listed = {item: ranked.get(item) for item in replace.items if item not in blocked}
        for item in listed:
            touched.setdefault(item, []).append(replace.id)
        ranked = listed | {item: score for item, score in ranked.items() if item not in listed}

    slots: dict[int, str] = {}
    pinned: set[str] = set()
    for rule in sorted((r for r in rules if r.action == "pin"), key=lambda r: r.position or 0):
        item = rule.items[0]
        if item in blocked or item in pinned or rule.position is None:
            continue
        slot = rule.position - 1
        while slot in slots:
            slot += 1
        slots[slot] = item
        pinned.add(item)
        touched.setdefault(item, []).append(rule.id)
    rest = iter(item for item in ranked if item not in pinned)
    order: list[str] = []
    while len(order) < k:
        if len(order) in slots:
            order.append(slots[len(order)])
            continue
        following = next(rest, None)
        if following is None:
            # Candidates ran out: the pins due within k follow, in position order.
            order.extend(slots[s] for s in sorted(slots) if len(order) <= s < k)
            break
        order.append(following)
    rule_order = {rule.id: n for n, rule in enumerate(rules)}
    return [
        Placed(item, ranked.get(item), sorted(touched.get(item, []), key=rule_order.__getitem__))
        for item in order[:k]
    ]
