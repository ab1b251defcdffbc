"""Publishing rules through the command line: a rules artifact in a new manifest, carried by later daily
publishes, rolled back and collected like the other artifacts. Runs on the serving tests' published home."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from test_serving import DAY, SURFACE, TENANT, build_published_home, publish_day, settings_for

from recsys_cli import cli
from recsys_core.manifest import read_current, read_registry, resolve_uri
from recsys_core.rules import RULES_KIND, read_published_rules

RULES = """rules:
  - {id: recall-7, action: block, items: [i7], reason: product recall}
  - {id: summer-pin, action: pin, items: [i42], position: 1, from: "2026-06-01T00:00:00Z"}
"""


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    import shutil

    copy = tmp_path / "home"
    shutil.copytree(build_published_home(tmp_path.parent / "rules-base"), copy, symlinks=True)
    monkeypatch.setenv("RECSYS_HOME", str(copy))
    monkeypatch.setenv("RECSYS_START_DATE", (DAY - dt.timedelta(days=2)).isoformat())
    monkeypatch.setenv("RECSYS_ACTOR", "merch@example.com")
    return copy


def rules_file(tmp_path: Path, text: str = RULES, name: str = "rules.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def publish(path: Path, reason: str = "summer campaign") -> int:
    target = ["--tenant", TENANT, "--surface", SURFACE]
    return cli.main(["rules", "publish", *target, str(path), "--reason", reason])


def rules_in_force(home: Path) -> str | None:
    current = read_current(home / "artifacts", TENANT, SURFACE)
    assert current is not None
    uri = current["current"].get(RULES_KIND)
    return (
        uri
        and read_published_rules(resolve_uri(home / "artifacts", TENANT, SURFACE, uri))
        .normalised_json()
        .decode()
    )


def test_validate_reports_a_valid_file_and_names_the_broken_rule(tmp_path: Path, capsys) -> None:
    assert cli.main(["rules", "validate", str(rules_file(tmp_path))]) == cli.EXIT_OK
    assert "valid (1 block, 1 pin)" in capsys.readouterr().out
    broken = rules_file(tmp_path, "rules: [{id: p, action: pin, items: [x]}]", "broken.yaml")
    assert cli.main(["rules", "validate", str(broken)]) == cli.EXIT_FAILED
    assert "rule 'p' (rules[0]): `position` is required for pin" in capsys.readouterr().err
    assert cli.main(["rules", "validate", str(tmp_path / "absent.yaml")]) == cli.EXIT_FAILED
    assert "cannot read" in capsys.readouterr().err


def test_publish_makes_a_new_manifest_with_the_rules_and_records_who_and_why(
    home: Path, tmp_path: Path
) -> None:
    before = read_current(home / "artifacts", TENANT, SURFACE)
    assert before is not None and RULES_KIND not in before["current"]
    assert publish(rules_file(tmp_path)) == cli.EXIT_OK
    after = read_current(home / "artifacts", TENANT, SURFACE)
    assert after is not None and after["manifest_version"] != before["manifest_version"]
    # The models, the day and the blend are the ones in force; only the rules are new.
    assert {k: v for k, v in after["current"].items() if k != RULES_KIND} == before["current"]
    assert (after["as_of"], after.get("blend")) == (before["as_of"], before.get("blend"))
    assert json.loads(rules_in_force(home) or "")["rules"][0]["id"] == "recall-7"
    last = read_registry(home / "artifacts", TENANT, SURFACE)[-1]
    assert (last["action"], last["actor"], last["reason"]) == (
        "publish",
        "merch@example.com",
        "summer campaign",
    )
    # The same rules again change nothing; the same rules written as JSON neither.
    assert publish(rules_file(tmp_path)) == cli.EXIT_OK
    import yaml

    as_json = rules_file(tmp_path, json.dumps(yaml.safe_load(RULES)), "rules.json")
    assert publish(as_json) == cli.EXIT_OK
    actions = [r["action"] for r in read_registry(home / "artifacts", TENANT, SURFACE)]
    assert actions[-3:] == ["publish", "noop", "noop"]


def test_show_prints_the_rules_in_force(home: Path, tmp_path: Path, capsys) -> None:
    target = ["--tenant", TENANT, "--surface", SURFACE]
    assert cli.main(["rules", "show", *target]) == cli.EXIT_OK
    assert "no rules in force" in capsys.readouterr().out
    publish(rules_file(tmp_path))
    capsys.readouterr()
    assert cli.main(["rules", "show", *target]) == cli.EXIT_OK
    assert capsys.readouterr().out == rules_in_force(home)


def test_a_broken_file_publishes_nothing(home: Path, tmp_path: Path, capsys) -> None:
    before = read_current(home / "artifacts", TENANT, SURFACE)
    broken = "rules: [{id: p, action: pin, items: [x], position: 1}, {id: b, action: block, items: [x]}]"
    assert publish(rules_file(tmp_path, broken)) == cli.EXIT_FAILED
    assert "rule 'p' pins 'x' and rule 'b' blocks it" in capsys.readouterr().err
    assert read_current(home / "artifacts", TENANT, SURFACE) == before
    assert not (home / "artifacts" / TENANT / SURFACE / RULES_KIND).exists()


def test_publishing_rules_needs_a_published_manifest(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path / "empty"))
    assert publish(rules_file(tmp_path)) == cli.EXIT_FAILED
    assert "nothing is published yet; run the pipeline first" in capsys.readouterr().err


def test_the_next_daily_publish_keeps_the_rules_and_rollback_restores_the_old_ones(
    home: Path, tmp_path: Path
) -> None:
    publish(rules_file(tmp_path))
    first_rules = rules_in_force(home)
    second = RULES.replace("i7", "i8")
    assert publish(rules_file(tmp_path, second, "second.yaml"), "recall widened") == cli.EXIT_OK
    assert rules_in_force(home) != first_rules
    # The pipeline publishes the next day: its models are new, the rules in force stay.
    next_day = DAY + dt.timedelta(days=1)
    outcomes = publish_day(
        settings_for(home, RECSYS_START_DATE=(DAY - dt.timedelta(days=2)).isoformat()), next_day
    )
    assert [o.outcome.action for o in outcomes] == ["publish"]
    current = read_current(home / "artifacts", TENANT, SURFACE)
    assert current is not None and current["as_of"] == next_day.isoformat()
    assert "i8" in (rules_in_force(home) or "")
    # Rolling back two manifests (the next day, then the widened rules) serves the first rules again.
    target = ["--tenant", TENANT, "--surface", SURFACE]
    assert cli.main(["rollback", *target, "--steps", "2", "--reason", "wrong recall"]) == cli.EXIT_OK
    assert rules_in_force(home) == first_rules
    # gc keeps what the kept manifests reference, the rules included, and collects the widened rules.
    rules_dir = home / "artifacts" / TENANT / SURFACE / RULES_KIND
    assert len(list(rules_dir.iterdir())) == 2
    assert cli.main(["gc", "--keep", "1", "--apply", "--min-age-hours", "0"]) == cli.EXIT_OK
    assert rules_in_force(home) == first_rules
    assert len(list(rules_dir.iterdir())) == 1


def test_a_daily_publish_landing_while_rules_are_published_is_built_on(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rules command reads the manifest it adds the rules to under the target's lock: a daily publish
    that lands after the command started (here: right after it wrote the rules artifact) is kept, and the
    rules join the new day's models rather than being refused as older (history_only)."""
    from recsys_dagster.publishing import rules as rules_publishing

    next_day = DAY + dt.timedelta(days=1)
    settings = settings_for(home, RECSYS_START_DATE=(DAY - dt.timedelta(days=2)).isoformat())
    write = rules_publishing.write_rules_artifact

    def write_then_let_the_pipeline_publish(*args, **kwargs) -> Path:
        folder = write(*args, **kwargs)
        assert [o.outcome.action for o in publish_day(settings, next_day)] == ["publish"]
        return folder

    monkeypatch.setattr(rules_publishing, "write_rules_artifact", write_then_let_the_pipeline_publish)
    assert publish(rules_file(tmp_path)) == cli.EXIT_OK
    current = read_current(home / "artifacts", TENANT, SURFACE)
    assert current is not None and current["as_of"] == next_day.isoformat()
    assert "recall-7" in (rules_in_force(home) or "")
    actions = [(r["action"], r["as_of"]) for r in read_registry(home / "artifacts", TENANT, SURFACE)]
    assert actions[-2:] == [("publish", next_day.isoformat()), ("publish", next_day.isoformat())]


def test_rules_published_while_a_daily_run_builds_stay_in_its_manifest(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daily publish carries the rules in force as they are under the target's lock: rules published
    while the run was checking its artifacts are in the run's manifest, not dropped by it."""
    from recsys_dagster.publishing import release

    next_day = DAY + dt.timedelta(days=1)
    settings = settings_for(home, RECSYS_START_DATE=(DAY - dt.timedelta(days=2)).isoformat())
    check = release.lineage_problems

    def publish_rules_then_check(*args, **kwargs):
        assert publish(rules_file(tmp_path)) == cli.EXIT_OK
        return check(*args, **kwargs)

    monkeypatch.setattr(release, "lineage_problems", publish_rules_then_check)
    assert [o.outcome.action for o in publish_day(settings, next_day)] == ["publish"]
    current = read_current(home / "artifacts", TENANT, SURFACE)
    assert current is not None and current["as_of"] == next_day.isoformat()
    assert RULES_KIND in current["current"] and "recall-7" in (rules_in_force(home) or "")
