"""The Dagster definitions as the UI and the daemon load them: asset graph, schedule, alert sensors."""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import subprocess
import time
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.definitions.freshness import FreshnessState, FreshnessStateChange

from recsys_dagster.automation.alerts import FileSink, sink_from_spec
from recsys_dagster.definitions import build_definitions
from recsys_dagster.defs.automation.sensors import freshness_alerts, freshness_transitions, run_failure_alerts
from recsys_dagster.defs.shared import RecsysResource
from recsys_dagster.runner import HOST_TAG, PID_TAG, PROCESS_STARTED_TAG, fail_orphaned_runs


@pytest.fixture
def defs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dg.Definitions:
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RECSYS_START_DATE", "2025-01-01")
    monkeypatch.setenv("RECSYS_ALERT_SINK", "file")
    monkeypatch.delenv("RECSYS_CONFIG", raising=False)
    return build_definitions()


def alerts_written(tmp_path: Path) -> list[dict]:
    path = tmp_path / "home" / "alerts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def ingest_only(defs: dg.Definitions) -> tuple[dg.JobDefinition, dg.RepositoryDefinition]:
    """A job of the ingestion step alone, and the repository with it (as the sensors see the job)."""
    with_job = dg.Definitions.merge(
        defs,
        dg.Definitions(
            jobs=[dg.define_asset_job("ingest_only", selection="key:canonical_events or key:quarantine")]
        ),
    )
    return with_job.resolve_job_def("ingest_only"), with_job.get_repository_def()


def test_asset_graph_reads_as_the_pipeline_story(defs: dg.Definitions) -> None:
    graph = defs.resolve_asset_graph()
    groups = {node.key.to_user_string(): node.group_name for node in graph.asset_nodes}
    assert groups == {
        "canonical_events": "ingest",
        "quarantine": "ingest",
        "item_daily": "aggregates",
        "pair_daily": "aggregates",
        "user_item_daily": "aggregates",
        "popularity": "artifacts",
        "cooc": "artifacts",
        "user_history": "artifacts",
        "als": "artifacts",
        "user_topn": "artifacts",
        "evaluation": "evaluation",
        "published_manifest": "publishing",
        "decisions": "audit",
        "catalog": "catalog",
        "content": "artifacts",
        "tuning": "tuning",
    }
    for node in graph.asset_nodes:
        assert node.description, node.key
        assert node.owners == ["team:data-platform"], node.key
        assert node.kinds, node.key
        # On-demand assets are not expected daily.
        assert (node.freshness_policy_or_from_metadata is None) == (node.group_name == "tuning"), node.key
        assert node.backfill_policy == dg.BackfillPolicy.single_run(), node.key
    upstream = {
        key.to_user_string(): sorted(p.to_user_string() for p in graph.get(key).parent_keys)
        for key in graph.get_all_asset_keys()
    }
    assert upstream["item_daily"] == ["canonical_events"]
    assert upstream["cooc"] == ["pair_daily"]
    assert upstream["als"] == ["user_item_daily"]
    assert upstream["user_topn"] == ["als", "cooc", "popularity", "user_history"]
    assert upstream["evaluation"] == ["als", "catalog", "cooc", "popularity", "user_history"]
    assert upstream["published_manifest"] == [
        "als",
        "content",
        "cooc",
        "evaluation",
        "popularity",
        "user_history",
        "user_topn",
    ]
    assert upstream["catalog"] == ["canonical_events"]
    assert upstream["content"] == ["catalog", "popularity"]
    checks = {key.name for key in graph.asset_check_keys}
    assert checks == {
        "schema",
        "non_null_keys",
        "unique_event_id",
        "ts_in_range",
        "quarantine_rate",
        "duplicate_rate",
        "volume",
        "resource_limits",
        "decisions_reconciled",
        "decisions_quarantine_rate",
        "catalog_reconciled",
        "catalog_unique_items",
        "catalog_missing_items",
    }


def test_daily_schedule_requests_yesterday(defs: dg.Definitions) -> None:
    schedule = defs.resolve_schedule_def("daily_pipeline_schedule")
    assert schedule.cron_schedule == "0 2 * * *"
    assert schedule.default_status == dg.DefaultScheduleStatus.RUNNING
    with dg.instance_for_test() as instance:
        context = dg.build_schedule_context(
            instance=instance, scheduled_execution_time=dt.datetime(2025, 3, 10, 2, 0, tzinfo=dt.UTC)
        )
        request = schedule.evaluate_tick(context).run_requests[0]
    assert request.partition_key == "2025-03-09"
    job = defs.resolve_job_def("daily_pipeline")
    assert {key.to_user_string() for key in job.asset_layer.selected_asset_keys} >= {
        "canonical_events",
        "published_manifest",
    }


def test_freshness_transitions_alert_on_stale_and_recovery() -> None:
    alerts = freshness_transitions({"a": "PASS", "b": "FAIL"}, {"a": "FAIL", "b": "PASS", "c": "WARN"})
    assert [(a.kind, a.subject) for a in alerts] == [("stale", "a"), ("recovered", "b"), ("stale", "c")]
    assert freshness_transitions({"a": "FAIL"}, {"a": "FAIL"}) == []


def test_freshness_sensor_sends_alerts_to_the_sink(defs: dg.Definitions, tmp_path: Path) -> None:
    with dg.instance_for_test() as instance:

        def tick() -> str:
            context = dg.build_sensor_context(
                instance=instance, definitions=defs, cursor=cursor[0], resources={"recsys": RecsysResource()}
            )
            result = freshness_alerts.evaluate_tick(context)
            cursor[0] = result.cursor
            return result.skip_message

        cursor: list[str | None] = [None]

        def report(state: FreshnessState, previous: FreshnessState) -> None:
            instance.report_runless_asset_event(
                FreshnessStateChange(
                    key=dg.AssetKey("published_manifest"),
                    new_state=state,
                    previous_state=previous,
                    state_change_timestamp=time.time(),
                )
            )

        assert "0 alert(s)" in tick()
        report(FreshnessState.FAIL, FreshnessState.PASS)
        assert "stale now: published_manifest" in tick()
        assert "0 alert(s)" in tick()  # still stale: no repeated alert
        report(FreshnessState.PASS, FreshnessState.FAIL)
        tick()
    assert [(a["kind"], a["subject"]) for a in alerts_written(tmp_path)] == [
        ("stale", "published_manifest"),
        ("recovered", "published_manifest"),
    ]


def test_run_failure_sensor_names_the_failed_step(defs: dg.Definitions, tmp_path: Path) -> None:
    raw = tmp_path / "home" / "raw" / "dt=2025-03-01"
    raw.mkdir(parents=True)
    (raw / "bad.jsonl.gz").write_bytes(b"not gzip at all")
    job, repository = ingest_only(defs)
    resources = {"recsys": RecsysResource()}
    with dg.instance_for_test() as instance:
        # As the daemon evaluates it: the first tick only sets the cursor, the next one sees the failure.
        first = dg.build_sensor_context(instance, resources=resources, repository_def=repository)
        run_failure_alerts.evaluate_tick(first)
        result = job.execute_in_process(instance=instance, partition_key="2025-03-01", raise_on_error=False)
        assert not result.success
        tick = run_failure_alerts.evaluate_tick(
            dg.build_sensor_context(
                instance, cursor=first.cursor, resources=resources, repository_def=repository
            )
        )
    # One reaction, for the failed run, and without an error: the sensor itself ran cleanly.
    reactions = tick.dagster_run_reactions or []
    assert [(r.dagster_run.run_id, r.error) for r in reactions if r.dagster_run] == [(result.run_id, None)]
    written = alerts_written(tmp_path)
    assert "canonical_events" in written[-1]["message"] and "bad.jsonl.gz" in written[-1]["message"]
    assert written[-1]["kind"] == "run_failure" and written[-1]["details"]["partition"] == "2025-03-01"


def test_run_failure_sensor_says_why_a_killed_run_failed(defs: dg.Definitions, tmp_path: Path) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    job, repository = ingest_only(defs)
    resources = {"recsys": RecsysResource()}
    with dg.instance_for_test() as instance:
        first = dg.build_sensor_context(instance, resources=resources, repository_def=repository)
        run_failure_alerts.evaluate_tick(first)
        # A run of `recsys run` whose process is gone, and one of a process still running (this one).
        tags = {HOST_TAG: socket.gethostname(), "dagster/partition": "2025-03-01"}
        killed = instance.create_run_for_job(job, tags=tags | {PID_TAG: str(gone.pid)})
        running = instance.create_run_for_job(job, tags=tags | {PID_TAG: str(os.getpid())})
        assert fail_orphaned_runs(instance) == [killed.run_id]
        assert instance.get_run_by_id(running.run_id).status == dg.DagsterRunStatus.NOT_STARTED
        run_failure_alerts.evaluate_tick(
            dg.build_sensor_context(
                instance, cursor=first.cursor, resources=resources, repository_def=repository
            )
        )
    [alert] = alerts_written(tmp_path)
    assert alert["kind"] == "run_failure" and alert["details"]["run_id"] == killed.run_id
    assert f"pid {gone.pid} on {socket.gethostname()}" in alert["message"]
    assert "killed or crashed" in alert["message"]


def test_only_runs_whose_process_is_gone_are_marked_failed(defs: dg.Definitions) -> None:
    job, _ = ingest_only(defs)
    with subprocess.Popen(["sleep", "60"]) as child, dg.instance_for_test() as instance:
        # Linux's start time of the process, in clock ticks after boot (the 22nd field of its stat line).
        started = int(Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[19])

        def run_of(pid: int, start: int) -> str:
            tags = {HOST_TAG: socket.gethostname(), PID_TAG: str(pid), PROCESS_STARTED_TAG: str(start)}
            return instance.create_run_for_job(job, tags=tags).run_id

        alive = run_of(child.pid, started)
        reused = run_of(child.pid, started - 1)  # an earlier process that had the same pid
        other_host = instance.create_run_for_job(job, tags={HOST_TAG: "elsewhere", PID_TAG: "1"}).run_id
        assert fail_orphaned_runs(instance) == [reused]
        child.kill()
        while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            time.sleep(0.01)  # killed, not yet waited for: a zombie
        assert fail_orphaned_runs(instance) == [alive]
        assert instance.get_run_by_id(other_host).status == dg.DagsterRunStatus.NOT_STARTED


def test_alert_sink_spec(tmp_path: Path) -> None:
    assert isinstance(sink_from_spec("file", tmp_path), FileSink)
    assert sink_from_spec(f"file:{tmp_path}/x.jsonl", tmp_path).path == tmp_path / "x.jsonl"
    with pytest.raises(ValueError, match="RECSYS_ALERT_SINK"):
        sink_from_spec("smtp://nope", tmp_path)
