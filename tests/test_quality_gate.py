"""The offline evaluation as the pipeline runs it, and the quality gate publishing enforces with it.

Real steps on generated data: canonicalize, aggregates, artifacts, `evaluate_day`, `publish_as_of`; then
`recsys evaluate` and `recsys status` as an operator runs them.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

import pytest

from recsys_cli import cli
from recsys_core.kinds import KINDS
from recsys_core.manifest import read_current
from recsys_core.settings import AlsConfig, BlendWeights, ModelLifts, Settings, load_settings
from recsys_dagster.evaluation.offline import evaluate_day, read_evaluation
from recsys_dagster.ingest.canonicalize import canonicalize_partition
from recsys_dagster.ingest.gates import run_gates
from recsys_dagster.ingest.generate import generate_events
from recsys_dagster.publishing.release import publish_as_of, write_build_record
from recsys_dagster.transform.aggregates import DAILY_MODELS, build_daily_aggregates, daily_aggregate_params
from recsys_dagster.transform.artifacts import build_window_artifacts

LAST = dt.date(2025, 6, 6)
DAYS = [LAST - dt.timedelta(days=n) for n in range(5, -1, -1)]


def settings_for(home: Path) -> Settings:
    return load_settings({"RECSYS_HOME": str(home), "RECSYS_START_DATE": DAYS[0].isoformat()})


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """RECSYS_HOME with six days of generated events canonicalized and aggregated."""
    home = tmp_path_factory.mktemp("quality") / "home"
    settings = settings_for(home)
    generate_events(
        settings.raw_root,
        end_date=LAST,
        days=len(DAYS),
        events_per_day=20_000,
        n_users=800,
        n_items=300,
        seed=7,
    )
    for day in DAYS:
        canonicalize_partition(settings.raw_root, settings.lake_root, day, settings.pipeline.ingest)
        run_gates(settings.lake_root, day, settings.pipeline.ingest, settings.pipeline.checks)
    for model in DAILY_MODELS:
        build_daily_aggregates(
            model, settings.lake_root, DAYS, daily_aggregate_params(model, settings.pipeline)
        )
    return home


def with_models(settings: Settings, als: AlsConfig, blend: BlendWeights) -> Settings:
    artifacts = dataclasses.replace(settings.pipeline.artifacts, als=als)
    return dataclasses.replace(
        settings, pipeline=dataclasses.replace(settings.pipeline, artifacts=artifacts, blend=blend)
    )


def build_evaluate_publish(settings: Settings, day: dt.date) -> list:
    for kind in KINDS:
        builds = build_window_artifacts(
            kind, settings.lake_root, settings.artifact_root, day, settings.pipeline
        )
        write_build_record(settings.lake_root, kind, day, builds)
    evaluate_day(settings, day)
    return publish_as_of(settings, day)


def test_a_crippled_model_is_refused_and_a_healthy_one_published(lake: Path) -> None:
    settings = settings_for(lake)
    crippled = with_models(
        settings, AlsConfig(factors=1, iterations=1, regularization=1000.0), BlendWeights(1.0, 0.0, 0.0)
    )
    (outcome,) = build_evaluate_publish(crippled, LAST)
    assert outcome.outcome.action == "refused"
    reasons = " ".join(outcome.outcome.problems)
    # A one-factor model ranks almost like the popular list, but covers less of the catalog than it.
    assert "quality gate: als coverage@10 (all users)" in reasons and "below popularity's" in reasons
    assert "quality gate: blend coverage@10" in reasons and "guardrails.min_coverage_vs_popularity" in reasons
    assert read_current(settings.artifact_root, "demo", "home") is None
    record = read_evaluation(settings.lake_root, LAST, "demo", "home")
    assert record is not None and record["passed"] is False and record["violations"]

    (outcome,) = build_evaluate_publish(settings, LAST)
    assert outcome.outcome.action == "publish", outcome.outcome.message
    record = read_evaluation(settings.lake_root, LAST, "demo", "home")
    assert record["passed"] is True and record["result"]["users"]["all"] > 50
    metrics = record["result"]["metrics"]
    assert set(metrics) == {"popularity", "cooc", "als", "blend"}
    assert all(metrics[m]["all"]["ndcg"] > 0 for m in metrics)
    report = settings.lake_root / "evaluation" / f"dt={LAST}" / "demo" / "home" / "report" / "report.md"
    assert report.is_file() and "ndcg" in report.read_text().lower()
    manifest = read_current(settings.artifact_root, "demo", "home")
    assert manifest["checks"]["evaluation"]["passed"] is True
    assert set(manifest["checks"]["evaluation"]["ndcg@10"]) == {"popularity", "cooc", "als", "blend"}


def test_too_little_history_reports_but_does_not_block(lake: Path) -> None:
    settings = settings_for(lake)
    # Floors no model can reach: every evaluation violates them.
    impossible = dataclasses.replace(
        settings.pipeline.guardrails, min_lift_over_popularity=ModelLifts(als=10.0, blend=10.0)
    )
    crippled = dataclasses.replace(
        settings, pipeline=dataclasses.replace(settings.pipeline, guardrails=impossible)
    )
    early = DAYS[2]  # two days of training data before it, fewer than guardrails.min_training_days
    (outcome,) = build_evaluate_publish(crippled, early)
    # Not refused (whether it becomes current depends on what is published already: forward-only).
    assert outcome.outcome.action in ("publish", "history_only"), outcome.outcome.message
    record = read_evaluation(settings.lake_root, early, "demo", "home")
    assert record["passed"] is True and "not enforced" in record["note"]
    first = DAYS[0]  # nothing before it at all
    build_evaluate_publish(crippled, first)
    assert "nothing to evaluate yet" in read_evaluation(settings.lake_root, first, "demo", "home")["note"]


def test_too_few_evaluated_users_report_but_do_not_block(lake: Path) -> None:
    settings = settings_for(lake)
    impossible = dataclasses.replace(
        settings.pipeline.guardrails, min_lift_over_popularity=ModelLifts(als=10.0, blend=10.0)
    )
    for min_users, blocked in ((10**6, False), (0, True)):
        guardrails = dataclasses.replace(impossible, min_users=min_users)
        crippled = dataclasses.replace(
            settings, pipeline=dataclasses.replace(settings.pipeline, guardrails=guardrails)
        )
        (outcome,) = build_evaluate_publish(crippled, LAST)
        record = read_evaluation(settings.lake_root, LAST, "demo", "home")
        users = record["result"]["users"]["all"]
        if blocked:
            assert outcome.outcome.action == "refused" and record["passed"] is False
        else:
            assert outcome.outcome.action != "refused", outcome.outcome.message
            assert record["passed"] is True
            assert (
                f"only {users} user(s) evaluated (guardrails.min_users = {min_users}): not enforced"
                in (record["note"])
            )


def test_recsys_evaluate_and_status_show_the_verdict(
    lake: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    settings = settings_for(lake)
    monkeypatch.setenv("RECSYS_HOME", str(lake))
    monkeypatch.setenv("RECSYS_START_DATE", DAYS[0].isoformat())
    build_evaluate_publish(settings, LAST)
    assert cli.main(["evaluate", "--start", LAST.isoformat(), "--quiet"]) == cli.EXIT_OK
    out = capsys.readouterr().out
    line = next(
        line for line in out.splitlines() if line.startswith(LAST.isoformat()) and "demo/home" in line
    )
    assert "demo/home" in line and "blend" in line and line.rstrip().endswith("passed")
    assert cli.main(["status", "--end", LAST.isoformat(), "--days", "1"]) == cli.EXIT_OK
    assert "evaluation    passed; ndcg@10 popularity" in capsys.readouterr().out
