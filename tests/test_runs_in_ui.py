"""Runs the CLI starts are runs of jobs the code location defines: the UI finds them and re-executes them.

The UI re-executes a run through its GraphQL API (`launchPipelineReexecution`), resolving the run's job by
its code location, repository and job names; the test sends that same mutation to the same code location
(loaded in this process, with a run launcher that executes in this process), after fixing what made the
CLI's run fail.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.workspace.context import WorkspaceProcessContext
from dagster._core.workspace.load_target import InProcessWorkspaceLoadTarget
from dagster_graphql.test.utils import execute_dagster_graphql

from recsys_cli import cli
from recsys_core.manifest import read_current
from recsys_core.settings import load_settings
from recsys_dagster.defs.automation.schedules import DAILY_JOB
from recsys_dagster.runner import LOCATION_NAME, code_location_origin

END = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)
START = END - dt.timedelta(days=2)
REEXECUTE = """
mutation ($reexecutionParams: ReexecutionParams) {
  launchPipelineReexecution(reexecutionParams: $reexecutionParams) {
    __typename
    ... on LaunchRunSuccess { run { runId status } }
    ... on PythonError { message stack }
  }
}
"""


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("RECSYS_HOME", str(home))
    monkeypatch.setenv("RECSYS_START_DATE", (START - dt.timedelta(days=10)).isoformat())
    for var in (
        "RECSYS_CONFIG",
        "DAGSTER_HOME",
        "RECSYS_LAKE_ROOT",
        "RECSYS_ARTIFACT_ROOT",
        "RECSYS_RAW_ROOT",
    ):
        monkeypatch.delenv(var, raising=False)
    # The UI's instance queues runs for its daemon, which launches each in a new process; this one hands
    # them straight to a launcher that executes them in the test's process.
    dagster_home = home / "dagster"
    dagster_home.mkdir(parents=True)
    (dagster_home / "dagster.yaml").write_text(
        "telemetry:\n  enabled: false\nrun_retries:\n  enabled: false\nrun_launcher:\n"
        "  module: dagster._core.launcher.sync_in_memory_run_launcher\n  class: SyncInMemoryRunLauncher\n"
        "run_coordinator:\n  module: dagster._core.run_coordinator\n  class: DefaultRunCoordinator\n"
    )
    return home


def recsys(*args: object) -> int:
    return cli.main([str(a) for a in args])


def test_a_failed_cli_run_is_found_and_re_executed_from_the_ui_once_fixed(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    assert (
        recsys(
            "generate", "--end", END, "--days", 3, "--events-per-day", 3000, "--users", 300, "--items", 200
        )
        == 0
    )
    config = home / "config.yaml"
    config.write_text("checks:\n  max_events: 100\n")
    monkeypatch.setenv("RECSYS_CONFIG", str(config))
    settings = load_settings()

    # A range: its first run (ingestion and aggregates of the earlier days) trips the gate; the daily job
    # as of the last day does not start.
    assert recsys("run", "--start", START, "--end", END) == 1
    assert "blocking check failed: canonical_events:resource_limits" in capsys.readouterr().out
    instance = dg.DagsterInstance.get()  # the one the CLI prepared under DAGSTER_HOME
    (failed,) = instance.get_runs()
    assert failed.job_name == "__ASSET_JOB" and failed.status == dg.DagsterRunStatus.FAILURE
    assert failed.tags["dagster/asset_partition_range_end"] == (END - dt.timedelta(days=1)).isoformat()
    monkeypatch.delenv("RECSYS_CONFIG")
    assert run_status(instance, reexecute_from_ui(instance, failed)) == dg.DagsterRunStatus.SUCCESS

    # The last day, alone: one run of the daily job, which the limit fails again.
    monkeypatch.setenv("RECSYS_CONFIG", str(config))
    assert recsys("run", "--start", END) == 1
    failed = instance.get_runs(limit=1)[0]
    # A run of the daily job of the code location the UI loads, not of a job only the CLI knows.
    assert failed.job_name == DAILY_JOB
    assert failed.remote_job_origin is not None
    assert failed.remote_job_origin.location_name == LOCATION_NAME
    assert failed.status == dg.DagsterRunStatus.FAILURE
    assert read_current(settings.artifact_root, "demo", "home") is None

    # The operator lifts the limit and re-executes the failed run from the UI.
    monkeypatch.delenv("RECSYS_CONFIG")
    rerun_id = reexecute_from_ui(instance, failed)
    assert run_status(instance, rerun_id) == dg.DagsterRunStatus.SUCCESS
    rerun = instance.get_run_by_id(rerun_id)
    assert rerun is not None and rerun.parent_run_id == failed.run_id
    assert rerun.tags["dagster/asset_partition_range_end"] == END.isoformat()
    manifest = read_current(settings.artifact_root, "demo", "home")
    assert manifest is not None and manifest["as_of"] == END.isoformat()


def reexecute_from_ui(instance: dg.DagsterInstance, failed: dg.DagsterRun) -> str:
    """Re-execute a run the way the UI's "Re-execute" button does; the new run's id."""
    target = InProcessWorkspaceLoadTarget([code_location_origin()])
    with WorkspaceProcessContext(instance, target) as workspace:
        result = execute_dagster_graphql(
            workspace.create_request_context(),
            REEXECUTE,
            {"reexecutionParams": {"parentRunId": failed.run_id, "strategy": "ALL_STEPS"}},
        )
    launched = result.data["launchPipelineReexecution"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    return launched["run"]["runId"]


def run_status(instance: dg.DagsterInstance, run_id: str) -> dg.DagsterRunStatus:
    run = instance.get_run_by_id(run_id)
    assert run is not None
    return run.status


def test_a_selected_cli_run_is_a_run_of_the_asset_job_with_that_selection(home: Path) -> None:
    assert (
        recsys("generate", "--end", END, "--days", 1, "--events-per-day", 2000, "--users", 100, "--items", 50)
        == 0
    )
    assert recsys("run", "--start", END, "--select", "key:canonical_events") == 0
    instance = dg.DagsterInstance.get()
    (run,) = instance.get_runs()
    assert run.job_name == "__ASSET_JOB"
    assert {key.to_user_string() for key in run.asset_selection or ()} == {"canonical_events", "quarantine"}
    # The gates ran with the asset, as a materialization from the UI runs them.
    checks = instance.all_logs(run.run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION)
    assert {e.dagster_event.event_specific_data.check_name for e in checks} >= {"schema", "volume"}
