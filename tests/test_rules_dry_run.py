"""The rules dry run: a hand-computed replay, where the sample comes from, and `recsys rules publish
--dry-run` through the real command line (nothing published).

The published target is small enough to rank by hand: popularity only (i01 best ... i12 worst, so the
blend's candidates are the popular items in that order, minus what a user has seen) and the user history
of two users.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import polars as pl
import pytest

from recsys_cli import cli
from recsys_core.decisions import landing_dir, trace_line
from recsys_core.manifest import read_current, read_registry, target_dir
from recsys_core.rules import parse_rules, rules_in_force
from recsys_core.settings import BlendWeights, load_settings
from recsys_dagster.ingest.decisions import land_decisions
from recsys_dagster.publishing.protocol import publish
from recsys_dagster.publishing.rules import publish_rules
from recsys_dagster.transform.artifact_dir import write_artifact_dir
from recsys_serving.rules_dry_run import (
    LOOKBACK_DAYS,
    ReplayRequest,
    dry_run,
    rules_dry_run,
    sample_requests,
)
from recsys_serving.store import load_target

TENANT, SURFACE = "shop", "home"
DAY = dt.date(2026, 6, 20)
AT = dt.datetime(2026, 7, 1, tzinfo=dt.UTC)
ITEMS = [f"i{n:02d}" for n in range(1, 13)]
HISTORY = {"u2": ["i06", "i07", "i08", "i10"], "u3": ["i01", "i02", "i05"]}
CURRENT_RULES = "rules: [{id: b-old, action: block, items: [i02], reason: out of stock}]\n"
NEW_RULES = """rules:
  - {id: pin-9, action: pin, items: [i09], position: 2, audience: {users: [u9]}}
  - {id: block-1, action: block, items: [i01], audience: {segment: active}}
  - {id: push-5, action: boost, items: [i05], factor: 10, from: "2026-06-01T00:00:00Z", until: "2026-09-01T00:00:00Z"}
  - {id: vip, action: replace, items: [i11, i12], audience: {users: [u9]}}
"""


def publish_target(artifact_root: Path) -> None:
    """Popularity (score 12 for i01 down to 1 for i12) and the history of u2 (active: 4 items) and u3
    (cold start: 3 items), then the rules in force: b-old blocks i02."""
    target = target_dir(artifact_root, TENANT, SURFACE)
    meta = {"tenant": TENANT, "surface": SURFACE, "as_of": DAY.isoformat(), "window": None, "params": {}}
    popularity = pl.DataFrame(
        {
            "rank": pl.Series(range(1, 13), dtype=pl.Int32),
            "item_id": ITEMS,
            "score": [float(13 - n) for n in range(1, 13)],
            "events": pl.Series([13 - n for n in range(1, 13)], dtype=pl.Int64),
        }
    )
    rows = [(user, rank, item) for user, items in HISTORY.items() for rank, item in enumerate(items, 1)]
    history = pl.DataFrame(
        {
            "user_id": [user for user, _, _ in rows],
            "rank": pl.Series([rank for _, rank, _ in rows], dtype=pl.Int32),
            "item_id": [item for _, _, item in rows],
            "last_ts": pl.Series([dt.datetime(2026, 6, 19, tzinfo=dt.UTC)] * len(rows)),
            "weight": [1.0] * len(rows),
        }
    ).with_columns(pl.col("last_ts").dt.cast_time_unit("us"))
    artifacts = {
        kind: write_artifact_dir(target, kind, meta, {table: frame})[1]
        for kind, table, frame in (
            ("popularity", "items.parquet", popularity),
            ("user_history", "history.parquet", history),
        )
    }
    assert publish(artifact_root, TENANT, SURFACE, DAY, artifacts).action == "publish"
    document = parse_rules(CURRENT_RULES, "current")
    outcome = publish_rules(artifact_root, TENANT, SURFACE, document, reason="recall", actor="merch")
    assert outcome.action == "publish"


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "recsys"
    publish_target(home / "artifacts")
    monkeypatch.setenv("RECSYS_HOME", str(home))
    return home


def loaded(home: Path):
    artifact_root = home / "artifacts"
    manifest = read_current(artifact_root, TENANT, SURFACE)
    assert manifest is not None
    return load_target(artifact_root, TENANT, SURFACE, manifest)


def test_the_report_matches_the_hand_computed_case(home: Path) -> None:
    target = loaded(home)
    current = rules_in_force(home / "artifacts", target.manifest)
    assert current is not None
    requests = [
        ReplayRequest("a", None, k=3),  # anonymous: cold start
        ReplayRequest("b", "u9", k=3),  # unknown user: cold start, the VIP
        ReplayRequest("c", "u2", k=2),  # active; has seen i06, i07, i08, i10
        ReplayRequest("d", "u3", k=2),  # cold start; has seen i01, i02, i05
    ]
    report = rules_dry_run(
        target,
        current,
        parse_rules(NEW_RULES, "new"),
        requests,
        source="test",
        at=AT,
        weights=BlendWeights(),
        cold_start_max_interactions=3,
    ).as_dict()
    # Candidates are the popular items in order minus what the user has seen and what the rules block: k
    # of them, 3k with a boost.
    # a: now i01 i03 i04 (i02 blocked); new: i01..i09, i05 boosted (8/12 x 10) first -> [i05 i01 i02].
    # b: now [i01 i03 i04]; new: the VIP list i11 i12 with i09 pinned second -> [i11 i09 i12].
    # c (has seen i06 i07 i08 i10): now i01 i03 (i02 blocked); new: i01 blocked (active), candidates
    #    i02 i03 i04 i05 i09 i11, i05 boosted -> [i05 i02].
    # d (has seen i01 i02 i05): i03 i04 both times; the boost applies, but i05 is not a candidate.
    assert report["examples"] == [
        {
            "request_id": "a",
            "user_id": None,
            "current": ["i01", "i03", "i04"],
            "new": ["i05", "i01", "i02"],
            "added": ["i05", "i02"],
            "removed": ["i03", "i04"],
        },
        {
            "request_id": "b",
            "user_id": "u9",
            "current": ["i01", "i03", "i04"],
            "new": ["i11", "i09", "i12"],
            "added": ["i11", "i09", "i12"],
            "removed": ["i01", "i03", "i04"],
        },
        {
            "request_id": "c",
            "user_id": "u2",
            "current": ["i01", "i03"],
            "new": ["i05", "i02"],
            "added": ["i05", "i02"],
            "removed": ["i01", "i03"],
        },
    ]
    counts = {
        key: report[key] for key in ("requests", "affected", "reordered", "items_added", "items_removed")
    }
    assert counts == {"requests": 4, "affected": 3, "reordered": 0, "items_added": 7, "items_removed": 7}
    # Nothing moved up without a rule; i03/i04 of a, all three of b and i03 of c were pushed down.
    assert (report["filled"], report["displaced"]) == (0, 6)
    assert report["rules"] == [
        # id, action, change, requests now, requests new, added, removed
        *(
            dict(zip(RULE_FIELDS, row, strict=True))
            for row in (
                ("pin-9", "pin", "added", 0, 1, 1, 0),  # i09 for b
                ("block-1", "block", "added", 0, 1, 0, 1),  # i01 of c
                ("push-5", "boost", "added", 0, 4, 2, 0),  # i05 for a and c; d applies but has seen i05
                ("vip", "replace", "added", 0, 1, 2, 0),  # i11 and i12 for b
                ("b-old", "block", "removed", 4, 0, 2, 0),  # i02 back for a and c
            )
        )
    ]
    assert (report["source"], report["at"], report["current_rules_version"]) == (
        "test",
        "2026-07-01T00:00:00Z",
        current[0],
    )


RULE_FIELDS = (
    "rule_id",
    "action",
    "change",
    "requests_current",
    "requests_new",
    "items_added",
    "items_removed",
)


LATE_BOOST = """rules:
  - {id: b-old, action: block, items: [i02], reason: out of stock}
  - {id: late, action: boost, items: [i03], factor: 5, from: "2026-08-01T00:00:00Z"}
"""


def test_a_rule_outside_its_window_changes_nothing(home: Path) -> None:
    """A boost that starts after the time of the dry run applies to no request and changes no list."""
    target = loaded(home)
    report = rules_dry_run(
        target,
        rules_in_force(home / "artifacts", target.manifest),
        parse_rules(LATE_BOOST, "new"),
        [ReplayRequest("a", None, k=3)],
        source="test",
        at=AT,
        weights=BlendWeights(),
        cold_start_max_interactions=3,
    )
    assert (report.requests, report.affected, report.examples) == (1, 0, [])
    assert [(e.rule_id, e.change, e.requests_current, e.requests_new) for e in report.rules] == [
        ("b-old", "unchanged", 1, 1),
        ("late", "added", 0, 0),
    ]


def land_traces(home: Path, day: dt.date, traces: list[dict]) -> None:
    folder = landing_dir(home / "raw", day)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "decisions-test.jsonl").write_bytes(b"".join(trace_line(t) for t in traces))
    assert land_decisions(home / "raw", home / "lake", day, 1 << 20)["reconciled"] is True


def trace(request_id: str, ts: dt.datetime, user: str | None, params: dict) -> dict:
    return {
        "v": 1,
        "request_id": request_id,
        "ts": ts.isoformat().replace("+00:00", "Z"),
        "tenant": TENANT,
        "surface": SURFACE,
        "user_id": user,
        "params": params,
        "manifest_version": "a" * 64,
        "items": [],
    }


def test_the_sample_comes_from_the_decision_log_else_from_users_with_history(home: Path) -> None:
    target = loaded(home)
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    source, requests = sample_requests(home / "lake", target, size=5, now=now)
    # No landed trace: the users of the served history, the same ones in the same order every time.
    assert source == "user_history"
    assert sorted(r.user_id for r in requests) == ["u2", "u3"]
    assert requests == sample_requests(home / "lake", target, size=5, now=now)[1]
    assert len(sample_requests(home / "lake", target, size=1, now=now)[1]) == 1

    today, old = now.date(), now.date() - dt.timedelta(days=LOOKBACK_DAYS + 1)
    midnight = dt.datetime.combine(today, dt.time(), dt.UTC)
    land_traces(
        home,
        today,
        [
            trace("r1", midnight, "u2", {"k": 3, "exclude_seen": False}),
            trace("r2", midnight + dt.timedelta(seconds=1), "u9", {"k": 5, "context_items": ["i03"]}),
            trace("r3", midnight + dt.timedelta(seconds=2), None, {"k": 1000, "exclude_seen": "x"}),
            {**trace("r4", midnight, "u2", {}), "tenant": "other"},
        ],
    )
    land_traces(home, old, [trace("r0", dt.datetime.combine(old, dt.time(), dt.UTC), "u3", {})])
    source, requests = sample_requests(home / "lake", target, size=5, now=now)
    assert source == "decisions"
    # Newest first, with the request's parameters; one the API refuses takes its default; the other
    # tenant's request and the trace older than the look-back are not sampled.
    assert requests == [
        ReplayRequest("r3", None, (), 10, True),
        ReplayRequest("r2", "u9", ("i03",), 5, True),
        ReplayRequest("r1", "u2", (), 3, False),
    ]
    assert [r.request_id for r in sample_requests(home / "lake", target, size=2, now=now)[1]] == ["r3", "r2"]


def test_publish_dry_run_prints_the_report_and_publishes_nothing(home: Path, tmp_path: Path, capsys) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(NEW_RULES)
    registry = read_registry(home / "artifacts", TENANT, SURFACE)
    command = ["rules", "publish", "--tenant", TENANT, "--surface", SURFACE, str(rules), "--reason", "summer"]
    at = ["--at", "2026-07-01T02:00:00+02:00"]

    assert cli.main([*command, "--dry-run", *at, "--json"]) == cli.EXIT_OK
    report = json.loads(capsys.readouterr().out)
    settings = load_settings()
    expected = dry_run(settings, loaded(home), parse_rules(NEW_RULES, "new"), at=AT).as_dict()
    assert report == expected
    assert (report["source"], report["requests"], report["at"]) == ("user_history", 2, "2026-07-01T00:00:00Z")
    # u2 (active): i01 blocked, i05 boosted, i02 unblocked; u3 (cold start, has seen i01, i02, i05): no change.
    assert report["affected"] == 1 and report["examples"][0]["user_id"] == "u2"

    assert cli.main([*command, "--dry-run", *at, "--sample", "1"]) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert (
        f"{TENANT}/{SURFACE}: dry run of {rules} (nothing published) on 1 requests from users with history"
        in out
    )
    lines = out.splitlines()
    header = next(n for n, line in enumerate(lines) if line.startswith("rule "))
    assert lines[header].split() == [
        "rule",
        "action",
        "change",
        "requests",
        "now",
        "requests",
        "new",
        "added",
        "removed",
    ]
    assert [line.split()[:3] for line in lines[header + 2 : header + 7]] == [
        ["pin-9", "pin", "added"],
        ["block-1", "block", "added"],
        ["push-5", "boost", "added"],
        ["vip", "replace", "added"],
        ["b-old", "block", "removed"],
    ]
    # Nothing was published or recorded.
    assert read_registry(home / "artifacts", TENANT, SURFACE) == registry

    assert cli.main([*command, "--json"]) == cli.EXIT_USAGE
    assert "--json goes with --dry-run" in capsys.readouterr().err
    assert cli.main([*command, "--dry-run", "--sample", "0"]) == cli.EXIT_USAGE
    assert "--sample must be from 1 to 10000" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main([*command, "--dry-run", "--at", "2026-07-01"])
    assert "expected a time with a time zone" in capsys.readouterr().err


def test_the_runbooks_rules_files_validate_as_written(tmp_path: Path, capsys) -> None:
    runbook = (Path(__file__).parent.parent / "docs" / "how-to" / "rules.md").read_text()
    blocks = [block.split("```", 1)[0] for block in runbook.split("```yaml\n")[1:]]
    assert len(blocks) == 2 and "summer-pin" in blocks[0] and "winter-pin" in blocks[1]
    for n, block in enumerate(blocks):
        path = tmp_path / f"rules-{n}.yaml"
        path.write_text(block)
        assert cli.main(["rules", "validate", str(path)]) == cli.EXIT_OK
        assert "valid (1 block, 1 boost, 1 pin, 1 replace)" in capsys.readouterr().out
