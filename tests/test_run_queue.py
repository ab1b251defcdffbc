"""The run queue: two runs that hold the same day never execute at once, runs on different days do, up to
RECSYS_MAX_CONCURRENT_RUNS; for runs queued for the Dagster daemon and for `recsys run` alike.

The daemon and the CLI run as separate processes against a real instance: PostgreSQL for the daemon (as
deployed), SQLite under RECSYS_HOME for `recsys run` on its own. A run is kept in progress by holding the
lock its day's canonicalization takes, as a slow day would.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import dagster as dg
import pytest
import yaml
from dagster._core.remote_representation.code_location import CodeLocation
from postgres_server import PASSWORD, PostgresServer
from sqlite_runs import run_ids

from recsys_cli import cli
from recsys_core.day_locks import holding_days
from recsys_core.settings import load_settings
from recsys_core.storage import locked
from recsys_dagster.run_queue import day_tags, run_days
from recsys_dagster.runner import POSTGRES_PASSWORD_VAR, code_location, create_run, prepare_instance

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
END = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)
DAY1, DAY2, DAY3 = (END - dt.timedelta(days=n) for n in (2, 1, 0))
# Every wait of these tests ends: a process that never gets there fails the test instead of hanging it.
TIMEOUT = 90


def test_a_run_holds_one_tag_per_day_of_its_partition_or_range() -> None:
    assert run_days({"dagster/partition": "2025-03-01"}) == (dt.date(2025, 3, 1),) * 2
    ranged = {
        "dagster/asset_partition_range_start": "2025-02-27",
        "dagster/asset_partition_range_end": "2025-03-01",
    }
    assert run_days(ranged) == (dt.date(2025, 2, 27), dt.date(2025, 3, 1))
    assert list(day_tags(*run_days(ranged) or ())) == [
        "recsys/day-slot-2025-02-27",
        "recsys/day-slot-2025-02-28",
        "recsys/day-slot-2025-03-01",
    ]
    assert run_days({}) is None, "an unpartitioned run holds no day"
    assert run_days({"dagster/partition": "tenant-a"}) is None


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    for name in list(os.environ):
        if name.startswith(("RECSYS_", "DAGSTER_")) and name != "RECSYS_SHARED_DATA":
            monkeypatch.delenv(name)
    monkeypatch.setenv("RECSYS_HOME", str(home))
    monkeypatch.setenv("RECSYS_START_DATE", (DAY1 - dt.timedelta(days=3)).isoformat())
    monkeypatch.setenv("DAGSTER_HOME", str(home / "dagster"))
    arguments = f"generate --end {END} --days 3 --events-per-day 500 --users 50 --items 40"
    assert cli.main(arguments.split()) == 0
    return home


def test_the_daemon_never_runs_two_runs_of_one_day_together_and_at_most_the_limit(
    home: Path, postgres_server: PostgresServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("RECSYS_POSTGRES_URL", postgres_server.create_database("run_queue"))
    monkeypatch.setenv("RECSYS_MAX_CONCURRENT_RUNS", "2")
    monkeypatch.setenv(POSTGRES_PASSWORD_VAR, PASSWORD)  # prepare_instance sets it; restored after the test
    with prepare_instance(load_settings()) as instance:
        queue = instance.get_concurrency_config().run_queue_config
        assert queue is not None and queue.max_concurrent_runs == 2  # RECSYS_MAX_CONCURRENT_RUNS
        _shorten_dequeue_interval(home / "dagster" / "dagster.yaml")
        first, ranged, other, second = _queue_runs(instance, home, tmp_path)
        [cli_run] = [
            run.run_id for run in instance.get_runs(dg.RunsFilter(tags={"recsys/launched_by": "cli"}))
        ]
        executing = {
            run_id: _executing(instance, run_id) for run_id in (first, ranged, other, second, cli_run)
        }
    # Runs sharing a day, one after the other; runs on different days side by side.
    for one, another in ((first, ranged), (first, cli_run), (ranged, cli_run), (ranged, second)):
        assert not _overlap(executing[one], executing[another]), (one, another, executing)
    assert _overlap(executing[first], executing[other])
    queued = [executing[run_id] for run_id in (first, ranged, other, second)]
    assert max(sum(start <= moment < end for start, end in queued) for moment, _ in queued) <= 2


def _queue_runs(instance: dg.DagsterInstance, home: Path, tmp_path: Path) -> tuple[str, str, str, str]:
    """Four runs through the daemon's queue and one `recsys run`, checked while they wait and run; the ids
    of the four, once all five have succeeded."""
    daemon_log, cli_log = tmp_path / "daemon.log", tmp_path / "cli.log"
    with ExitStack() as stack:
        location = stack.enter_context(code_location(instance))
        held = {day: stack.enter_context(_canonicalization_held(home, day)) for day in (DAY1, DAY3)}
        stack.enter_context(
            _process([BIN / "dagster-daemon", "run", "-w", REPO / "workspace.yaml"], daemon_log)
        )
        # Submitted as the UI, schedules and backfills submit them: a day, a range (a single-run backfill).
        # `first` and `other` are kept in progress by their held days; `ranged` shares DAY1 with `first`;
        # the day of `second` is free.
        first = _submit(instance, location, DAY1, DAY1)
        ranged = _submit(instance, location, DAY1, DAY2)
        other = _submit(instance, location, DAY3, DAY3)
        second = _submit(instance, location, DAY2, DAY2)

        # The daemon's first pass launches `first` and `other`: `ranged` is held back by its day, so
        # `other` takes the second place, and then the limit of 2 holds back `second`.
        _wait_for(lambda: _statuses(instance, first, other) == {"STARTED"}, "first and other to start")
        passes = daemon_log.read_text().count("Maximum is 2, won't launch more")
        _wait_for(
            lambda: daemon_log.read_text().count("Maximum is 2, won't launch more") > passes,
            "another pass of the daemon over the queue",
        )
        assert _statuses(instance, ranged, second) == {"QUEUED"}

        # `recsys run` on DAY1 waits for the run from the queue that holds it.
        command = [BIN / "recsys", "run", "--start", DAY1, "--select", "key:canonical_events", "--quiet"]
        cli_run = stack.enter_context(_process(command, cli_log))
        waiting = f"waiting for run {first} ({DAY1}) to end: it holds {DAY1}"
        _wait_for(lambda: waiting in cli_log.read_text(), f"recsys run to say {waiting!r}")

        held.pop(DAY3).close()  # `other` ends; the daemon launches `second` in its place
        _wait_for(lambda: _statuses(instance, other, second) == {"SUCCESS"}, "other and second to succeed")
        assert _statuses(instance, ranged) == {"QUEUED"} and _statuses(instance, first) == {"STARTED"}
        held.pop(DAY1).close()  # `first` ends; `ranged` and the CLI's run take DAY1 in turn
        _wait_for(lambda: cli_run.poll() is not None, "recsys run to end")
        assert cli_run.returncode == 0, cli_log.read_text()
        _wait_for(lambda: _statuses(instance, first, ranged) == {"SUCCESS"}, "first and ranged to succeed")

        # The queue sees only runs in progress: a `recsys run` that has taken DAY2 but not yet recorded
        # its run (here: the test holding the day) is not among them. The launched run waits all the same.
        with holding_days(load_settings(), DAY2, DAY2):
            guarded = _submit(instance, location, DAY2, DAY2)
            waiting = f"waiting for another run that holds {DAY2} to end"
            _wait_for(
                lambda: waiting in _log_messages(instance, guarded), f"the launched run to log {waiting!r}"
            )
            assert _statuses(instance, guarded) == {"STARTED"}
            assert not instance.all_logs(guarded, of_type=dg.DagsterEventType.STEP_START)
        _wait_for(lambda: _statuses(instance, guarded) == {"SUCCESS"}, "the launched run to succeed")
    return first, ranged, other, second


def test_recsys_run_waits_while_another_recsys_run_holds_one_of_its_days(home: Path, tmp_path: Path) -> None:
    """SQLite instance: the days are record locks in a file under RECSYS_HOME."""
    select = ["--select", "key:canonical_events", "--quiet"]
    logs = [tmp_path / f"{name}.log" for name in ("range", "middle", "other")]
    with ExitStack() as stack:
        held = stack.enter_context(_canonicalization_held(home, DAY2))
        ranged = stack.enter_context(
            _process([BIN / "recsys", "run", "--start", DAY1, "--end", DAY2, *select], logs[0])
        )
        _wait_for(lambda: run_ids(home / "dagster", "STARTED"), "the range's run to start")
        [ranged_id] = run_ids(home / "dagster", "STARTED")
        # The range is stuck on DAY2; a run of DAY1 waits all the same, one of DAY3 does not.
        middle = stack.enter_context(_process([BIN / "recsys", "run", "--start", DAY1, *select], logs[1]))
        other = stack.enter_context(_process([BIN / "recsys", "run", "--start", DAY3, *select], logs[2]))
        waiting = f"waiting for run {ranged_id} ({DAY1}..{DAY2}) to end: it holds {DAY1}"
        _wait_for(lambda: waiting in logs[1].read_text(), f"recsys run to say {waiting!r}")
        _wait_for(lambda: other.poll() is not None, "the run of another day to end")
        assert other.returncode == 0 and "waiting" not in logs[2].read_text(), logs[2].read_text()
        assert middle.poll() is None and ranged.poll() is None
        held.close()
        for process, log in ((ranged, logs[0]), (middle, logs[1])):
            _wait_for(lambda process=process: process.poll() is not None, f"recsys run to end ({log.name})")
            assert process.returncode == 0, log.read_text()
    with dg.DagsterInstance.from_config(str(home / "dagster")) as instance:
        runs = instance.get_runs()
        assert {run.status for run in runs} == {dg.DagsterRunStatus.SUCCESS} and len(runs) == 3
        [middle_id] = [
            run.run_id for run in runs if run.run_id != ranged_id and run_days(run.tags) == (DAY1, DAY1)
        ]
        assert not _overlap(_executing(instance, ranged_id), _executing(instance, middle_id))


def _submit(instance: dg.DagsterInstance, location: CodeLocation, first: dt.date, last: dt.date) -> str:
    """A run of canonical_events over first..last, submitted to the instance's run coordinator; its id."""
    run = create_run(instance, location, {}, first, last, "key:canonical_events", {})
    assert not set(day_tags(first, last)) & set(run.tags)
    submitted = instance.submit_run(run.run_id, workspace=None)  # type: ignore[arg-type]
    assert set(day_tags(first, last)) <= set(submitted.tags)
    return run.run_id


def _shorten_dequeue_interval(config: Path) -> None:
    """The daemon looks at the queue every second instead of every 5 s: only to keep the test short."""
    text = yaml.safe_load(config.read_text())
    text["run_coordinator"]["config"]["dequeue_interval_seconds"] = 1
    config.write_text(yaml.safe_dump(text, sort_keys=False))


@contextmanager
def _canonicalization_held(home: Path, day: dt.date) -> Iterator[ExitStack]:
    """The lock `day`'s canonicalization takes, held until the block ends or the stack is closed."""
    staging = home / "lake" / ".staging"
    staging.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        stack.enter_context(locked(staging / f"{day}.lock"))
        yield stack


@contextmanager
def _process(command: list[object], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A process in a session of its own, its output in `log`; it and its children are ended at exit."""
    with log.open("wb") as output:
        process = subprocess.Popen(
            [str(part) for part in command], stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=15)


def _wait_for(condition: Callable[[], object], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {TIMEOUT} s waiting for {what}")
        time.sleep(0.2)


def _statuses(instance: dg.DagsterInstance, *ids: str) -> set[str]:
    return {instance.get_run_by_id(run_id).status.value for run_id in ids}  # type: ignore[union-attr]


def _executing(instance: dg.DagsterInstance, run_id: str) -> tuple[float, float]:
    """From a run's first step starting to its last step ending: when it worked on its days."""
    kinds = {
        dg.DagsterEventType.STEP_START,
        dg.DagsterEventType.STEP_SUCCESS,
        dg.DagsterEventType.STEP_FAILURE,
    }
    events = instance.all_logs(run_id, of_type=kinds)
    starts = [
        event.timestamp for event in events if event.dagster_event_type == dg.DagsterEventType.STEP_START
    ]
    assert starts, f"run {run_id} executed no step"
    return min(starts), max(event.timestamp for event in events)


def _log_messages(instance: dg.DagsterInstance, run_id: str) -> str:
    return "\n".join(record.user_message for record in instance.all_logs(run_id))


def _overlap(one: tuple[float, float], another: tuple[float, float]) -> bool:
    return one[0] < another[1] and another[0] < one[1]
