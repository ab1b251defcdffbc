"""Rules documents: parsing, validation and how each action and the precedence change a ranked list."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from recsys_core.rules import (
    Request,
    RulesDocument,
    RulesError,
    applicable,
    apply_rules,
    parse_rules,
)

NOW = dt.datetime(2026, 7, 1, 12, tzinfo=dt.UTC)
CANDIDATES = [("i1", 0.9), ("i2", 0.8), ("i3", 0.7), ("i4", 0.6), ("i5", 0.5), ("i6", 0.4), ("i7", 0.3)]

# The example of the rules reference, as a merchandiser writes it.
EXAMPLE = """
rules:
  - {id: summer-pin, action: pin, items: [i42], position: 1, reason: summer campaign,
     from: "2026-06-01T00:00:00Z", until: "2026-09-01T00:00:00Z"}
  - {id: recall-7, action: block, items: [i7], reason: product recall}
  - {id: push-shoes, action: boost, items: [i10, i11], factor: 2.0}
  - {id: vip-list, action: replace, items: [i1, i2, i3], audience: {users: [u9]}}
"""


def ranked(
    rules_text: str, request: Request, k: int = 5, candidates=CANDIDATES
) -> list[tuple[str, list[str]]]:
    document = parse_rules(rules_text, "rules.yaml")
    placed = apply_rules(applicable(document, request), candidates, k)
    return [(p.item_id, p.rule_ids) for p in placed]


ANYONE = Request(NOW)


def items(rules_text: str, request: Request = ANYONE, k: int = 5, candidates=CANDIDATES) -> list[str]:
    return [item for item, _ in ranked(rules_text, request, k, candidates)]


def test_the_documented_example_parses_and_applies() -> None:
    candidates = [("i1", 0.9), ("i7", 0.85), ("i11", 0.5), ("i2", 0.8), ("i10", 0.1)]
    got = ranked(EXAMPLE, Request(NOW, user_id="u1"), k=4, candidates=candidates)
    # i42 pinned first (not a candidate), i7 blocked, i11 boosted 0.5 -> 1.0 above i1.
    assert got == [("i42", ["summer-pin"]), ("i11", ["push-shoes"]), ("i1", []), ("i2", [])]
    vip = ranked(EXAMPLE, Request(NOW, user_id="u9"), k=5, candidates=candidates)
    assert [item for item, _ in vip] == ["i42", "i1", "i2", "i3", "i11"]
    assert vip[1] == ("i1", ["vip-list"])


def test_block_removes_items_and_the_list_fills_from_the_next_candidates() -> None:
    assert items("rules: [{id: b, action: block, items: [i1, i3]}]", k=3) == ["i2", "i4", "i5"]


def test_pin_puts_the_item_at_its_position_whether_or_not_it_was_a_candidate() -> None:
    assert items("rules: [{id: p, action: pin, items: [i5], position: 2}]") == ["i1", "i5", "i2", "i3", "i4"]
    assert items("rules: [{id: p, action: pin, items: [new], position: 1}]") == [
        "new",
        "i1",
        "i2",
        "i3",
        "i4",
    ]


def test_a_pin_beyond_k_is_not_shown_and_a_pin_beyond_the_candidates_follows_them() -> None:
    assert items("rules: [{id: p, action: pin, items: [new], position: 6}]") == ["i1", "i2", "i3", "i4", "i5"]
    short = [("i1", 0.9), ("i2", 0.8)]
    assert items("rules: [{id: p, action: pin, items: [new], position: 4}]", candidates=short) == [
        "i1",
        "i2",
        "new",
    ]


def test_two_pins_on_one_position_the_earlier_rule_gets_it() -> None:
    text = """rules:
      - {id: first, action: pin, items: [x], position: 2}
      - {id: second, action: pin, items: [y], position: 2}
      - {id: again, action: pin, items: [x], position: 4}"""
    assert items(text) == ["i1", "x", "y", "i2", "i3"]


def test_boost_and_bury_move_candidates_and_their_factors_multiply() -> None:
    text = """rules:
      - {id: up, action: boost, items: [i5], factor: 1.5}
      - {id: up-again, action: boost, items: [i5], factor: 1.5}
      - {id: down, action: bury, items: [i1], factor: 0.5}"""
    got = ranked(text, Request(NOW))
    # i5: 0.5 * 2.25 = 1.125 first; i1: 0.9 * 0.5 = 0.45 after i4 (0.6) and before i6 (0.4).
    assert got == [("i5", ["up", "up-again"]), ("i2", []), ("i3", []), ("i4", []), ("i1", ["down"])]


def test_a_boost_does_not_add_an_item_that_is_not_a_candidate() -> None:
    assert "new" not in items("rules: [{id: b, action: boost, items: [new], factor: 10}]")


def test_replace_gives_its_list_then_fills_from_the_candidates() -> None:
    text = "rules: [{id: r, action: replace, items: [x, i3, y]}]"
    assert items(text) == ["x", "i3", "y", "i1", "i2"]


def test_precedence_block_beats_pin_beats_replace_beats_boost() -> None:
    text = """rules:
      - {id: boost-x, action: boost, items: [x, i6], factor: 100}
      - {id: list, action: replace, items: [x, z]}
      - {id: pin-i7, action: pin, items: [i7], position: 1}
      - {id: block-z, action: block, items: [z], audience: {users: [u1]}}
      - {id: pin-z, action: pin, items: [z], position: 2, audience: {users: [u2]}}"""
    got = ranked(text, Request(NOW, user_id="u1"))
    # z blocked (its pin is for another user); the list beats the boost's order; the pin beats the list.
    assert got == [("i7", ["pin-i7"]), ("x", ["list"]), ("i6", ["boost-x"]), ("i1", []), ("i2", [])]
    assert [item for item, _ in ranked(text, Request(NOW, user_id="u2"))][:3] == ["i7", "z", "x"]


def test_the_first_replace_in_the_document_wins() -> None:
    text = """rules:
      - {id: a, action: replace, items: [a1]}
      - {id: b, action: replace, items: [b1]}"""
    assert items(text, k=2) == ["a1", "i1"]


@pytest.mark.parametrize(
    ("when", "active"),
    [
        (dt.datetime(2026, 5, 31, 23, 59, 59, 999999, tzinfo=dt.UTC), False),
        (dt.datetime(2026, 6, 1, tzinfo=dt.UTC), True),
        (dt.datetime(2026, 8, 31, 23, 59, 59, 999999, tzinfo=dt.UTC), True),
        (dt.datetime(2026, 9, 1, tzinfo=dt.UTC), False),
    ],
)
def test_validity_window_includes_from_and_excludes_until(when: dt.datetime, active: bool) -> None:
    assert (items(EXAMPLE, Request(when))[0] == "i42") is active


def test_a_window_in_another_time_zone_is_compared_in_utc() -> None:
    text = 'rules: [{id: p, action: pin, items: [x], position: 1, from: "2026-07-01T14:00:00+02:00"}]'
    assert items(text, Request(dt.datetime(2026, 7, 1, 12, tzinfo=dt.UTC)))[0] == "x"
    assert items(text, Request(dt.datetime(2026, 7, 1, 11, 59, tzinfo=dt.UTC)))[0] == "i1"


def test_audiences_by_user_segment_and_context_items() -> None:
    text = """rules:
      - {id: cold, action: pin, items: [starter], position: 1, audience: {segment: cold_start}}
      - {id: ctx, action: block, items: [i1], audience: {context_items: [c1, c2]}}
      - {id: both, action: block, items: [i2], audience: {users: [u1], segment: active}}"""
    assert items(text, Request(NOW, segment="cold_start"))[:2] == ["starter", "i1"]
    assert items(text, Request(NOW, segment="active", context_items=frozenset({"c2"})))[:1] == ["i2"]
    assert items(text, Request(NOW, user_id="u1", segment="active"))[:2] == ["i1", "i3"]
    assert items(text, Request(NOW, user_id="u1", segment="cold_start"))[:3] == ["starter", "i1", "i2"]


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ("[{id: p, action: pin, items: [x]}]", "rule 'p' (rules[0]): `position` is required for pin"),
        ("[{id: p, action: pin, items: [x, y], position: 1}]", "exactly one item"),
        ("[{id: b, action: boost, items: [x], factor: 0.5}]", "factor above 1"),
        ("[{id: b, action: bury, items: [x], factor: 2}]", "between 0 and 1"),
        ("[{id: b, action: boost, items: [x]}]", "`factor` is required"),
        ("[{id: b, action: block, items: [x], factor: 2}]", "only for them"),
        (
            "[{id: b, action: block, items: []}]",
            "give the items by id (`items`) or by catalog attributes (`match`)",
        ),
        (
            "[{id: p, action: pin, position: 1, match: {categories: [a]}}]",
            "`match` targets items of block, boost, bury rules only",
        ),
        ("[{id: m, action: block, match: {}}]", "give at least one of"),
        ("[{id: b, action: hide, items: [x]}]", "rule 'b' (rules[0]) action"),
        ("[{id: b, action: block, items: [x], color: red}]", "color: Extra inputs are not permitted"),
        ("[{id: 'bad id', action: block, items: [x]}]", "rule 'bad id' (rules[0]) id"),
        ("[{id: b, action: block, items: [x, x]}]", "listed twice"),
        ("[{id: b, action: block, items: [x], from: '2026-06-01T00:00:00'}]", "needs a time zone"),
        (
            "[{id: b, action: block, items: [x], from: '2026-06-02T00:00:00Z', until: '2026-06-01T00:00:00Z'}]",
            "`from` must be before `until`",
        ),
        ("[{id: a, action: block, items: [x]}, {id: a, action: block, items: [y]}]", "'a' is used twice"),
        (
            "[{id: p, action: pin, items: [x], position: 1}, {id: b, action: block, items: [x]}]",
            "rule 'p' pins 'x' and rule 'b' blocks it",
        ),
    ],
)
def test_invalid_documents_are_refused_naming_the_rule(rules: str, message: str) -> None:
    with pytest.raises(RulesError) as error:
        parse_rules(f"rules: {rules}", "rules.yaml")
    assert message in str(error.value)
    assert str(error.value).startswith("rules.yaml: ")


def test_a_pin_and_a_block_of_one_item_for_different_audiences_or_times_are_allowed() -> None:
    parse_rules(
        """rules:
          - {id: p, action: pin, items: [x], position: 1, audience: {users: [u1]}}
          - {id: b, action: block, items: [x], audience: {users: [u2]}}
          - {id: p2, action: pin, items: [y], position: 1, until: "2026-06-01T00:00:00Z"}
          - {id: b2, action: block, items: [y], from: "2026-06-01T00:00:00Z"}""",
        "rules.yaml",
    )


def test_the_normalised_form_is_the_same_for_yaml_and_json_of_the_same_rules() -> None:
    from_yaml = parse_rules(EXAMPLE, "a.yaml").normalised_json()
    as_json = json.dumps(yaml.safe_load(EXAMPLE))
    assert parse_rules(as_json, "a.json").normalised_json() == from_yaml
    assert parse_rules(from_yaml, "normalised").normalised_json() == from_yaml


@pytest.mark.parametrize("text", ["", "[]", "rules: 3", "- a", "{rules: [1]}", ": :", "rules: [{}]"])
def test_documents_of_the_wrong_shape_are_refused(text: str) -> None:
    with pytest.raises(RulesError):
        parse_rules(text, "rules.yaml")


_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=10,
)
_rule = st.fixed_dictionaries(
    {},
    optional={
        "id": st.text(max_size=6) | st.integers(),
        "action": st.sampled_from(["block", "pin", "replace", "boost", "bury", "x"]),
        "items": st.lists(st.text(max_size=4), max_size=3) | _values,
        "position": st.integers(-2, 5) | _values,
        "factor": st.floats() | _values,
        "audience": st.fixed_dictionaries({}, optional={"users": _values, "segment": _values}) | _values,
        "from": st.datetimes().map(str) | _values,
        "until": st.datetimes().map(str) | _values,
    },
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_rule, max_size=4), st.integers(0, 8))
def test_fuzzed_documents_are_refused_cleanly_or_applied(rules: list, k: int) -> None:
    try:
        document = parse_rules(json.dumps({"rules": rules}, default=str), "fuzz.json")
    except RulesError:
        return
    placed = apply_rules(applicable(document, Request(NOW, user_id="u1")), CANDIDATES, k)
    assert len(placed) <= k
    assert len({p.item_id for p in placed}) == len(placed)


def test_the_published_json_schema_is_the_codes() -> None:
    published = Path(__file__).parents[1] / "docs" / "reference" / "rules.schema.json"
    assert published.read_text() == RulesDocument.json_schema_text(), (
        "regenerate it: python -c 'from recsys_core.rules import RulesDocument as D; "
        'print(D.json_schema_text(), end="")\' > docs/reference/rules.schema.json'
    )
