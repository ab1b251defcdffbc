"""The command line and the Makefile as an operator meets them: help texts, busy ports, closed pipes, the
first partition day of `make run` and `make ui`, and the Dagster instance they create."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlite_runs import run_ids

from recsys_cli import cli, ports
from recsys_core.settings import load_settings
from recsys_core.storage import locked

REPO = Path(__file__).resolve().parent.parent
RECSYS = Path(sys.executable).parent / "recsys"
needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port that a listening socket holds on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("RECSYS_HOME", str(home))
    for var in ("DAGSTER_HOME", "RECSYS_START_DATE", "RECSYS_CONFIG", "RECSYS_ARTIFACT_ROOT"):
        monkeypatch.delenv(var, raising=False)
    return home


def make(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("RECSYS_", "MAKE", "DAGSTER_"))}
    return subprocess.run(
        ["make", "--no-print-directory", *args],
        cwd=REPO,
        env=environ | (env or {}),
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("serve", ["(default 127.0.0.1)", "(default 8000)", "(default 1)", "0.0.0.0"]),
        ("ui", ["(default 127.0.0.1)", "(default 3000)", "Dagster UI"]),
    ],
)
def test_serve_and_ui_help_describe_every_option_and_its_default(
    command: str, expected: list[str], capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.build_parser().parse_args([command, "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for fragment in expected:
        assert fragment in text
    options = [o for o in ("--host", "--port", "--workers") if f"[{o} " in text]
    assert options == (["--host", "--port", "--workers"] if command == "serve" else ["--host", "--port"])


def test_port_problem_tells_a_busy_port_from_a_free_one(busy_port: int) -> None:
    assert ports.port_problem("127.0.0.1", busy_port) == f"port {busy_port} on 127.0.0.1 is already in use"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        free = sock.getsockname()[1]
    assert ports.port_problem("127.0.0.1", free) is None
    assert ports.port_problem("127.0.0.1", 70000) == "port 70000 is not a port number (1-65535)"


@pytest.mark.parametrize("command", ["serve", "ui"])
def test_serve_and_ui_refuse_a_busy_port_before_starting_anything(
    command: str, busy_port: int, home: Path, capsys: pytest.CaptureFixture
) -> None:
    assert cli.main([command, "--port", str(busy_port)]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err == (
        f"recsys {command}: port {busy_port} on 127.0.0.1 is already in use; "
        "stop what uses it, or choose another with --port\n"
    )
    assert not home.exists(), "nothing may be created before the port is known to be free"


def test_ports_module_names_the_make_variable(busy_port: int) -> None:
    def check(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "recsys_cli.ports", "--command", "make run", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=60)

    busy = check(f"PORT={busy_port}")
    assert busy.returncode == 2 and busy.stdout == ""
    assert busy.stderr == (
        f"make run: port {busy_port} on 127.0.0.1 is already in use (PORT={busy_port}); stop what uses it, "
        f"or choose another port: make run PORT={busy_port + 1}\n"
    )
    invalid = check("PORT=eighty")
    assert invalid.returncode == 2
    assert invalid.stderr == "make run: PORT must be a port number (1-65535), got 'eighty'\n"


@needs_make
def test_make_run_and_make_ui_fail_fast_on_a_busy_port(busy_port: int, tmp_path: Path) -> None:
    if make("-q", "install").returncode != 0:
        pytest.skip("the environment is not installed by make (make install)")
    home = tmp_path / "home"
    for target, variable in (("run", "PORT"), ("ui", "UI_PORT")):
        result = make(target, f"{variable}={busy_port}", f"RECSYS_HOME={home}")
        assert result.returncode != 0
        assert f"make {target}: port {busy_port} on 127.0.0.1 is already in use ({variable}={busy_port})" in (
            result.stderr
        )
        assert "recsys" not in result.stdout, "nothing may run before the port check"
        assert not home.exists(), f"make {target} generated or created something before failing"


def _days_ago(days: int) -> str:
    return (dt.datetime.now(dt.UTC).date() - dt.timedelta(days=days)).isoformat()


@needs_make
def test_make_run_and_make_ui_start_the_partitions_where_the_sample_starts(tmp_path: Path) -> None:
    """The Dagster UI shows no day before the sample as missing: make run gives Dagster the first day it
    generates as RECSYS_START_DATE and records it, make ui reads it back, and the caller can override it."""
    home = tmp_path / "home"

    def commands(*args: str, env: dict[str, str] | None = None) -> list[str]:
        result = make("-n", *args, f"RECSYS_HOME={home}", env=env)  # -n: print the commands, run nothing
        assert result.returncode == 0, result.stderr
        return result.stdout.splitlines()

    first, last = _days_ago(5), _days_ago(1)
    run = commands("run", "RUN_DAYS=5", "PORT=8123", "UI_PORT=3123")
    assert f'echo {first} > "{home}/start_date"' in run
    assert f"RECSYS_START_DATE={first} .venv/bin/recsys run --start {first} --end {last}" in run
    check = next(n for n, line in enumerate(run) if "recsys_cli.ports" in line and "PORT=8123" in line)
    assert check < next(n for n, line in enumerate(run) if "recsys generate --days 5" in line)
    assert ".venv/bin/recsys serve --host 127.0.0.1 --port 8123" in run
    assert any("make ui UI_PORT=3123  (http://127.0.0.1:3123)" in line for line in run)
    assert ".venv/bin/recsys ui --port 3000" in commands("ui"), "nothing recorded: Dagster's default"

    home.mkdir()
    (home / "start_date").write_text(_days_ago(30) + "\n")  # an earlier make run's first day
    run = commands("run", "RUN_DAYS=5")
    assert f"RECSYS_START_DATE={_days_ago(30)} .venv/bin/recsys run --start {first} --end {last}" in run
    assert f"RECSYS_START_DATE={_days_ago(30)} .venv/bin/recsys ui --port 3124" in commands(
        "ui", "UI_PORT=3124"
    )
    override = commands("ui", env={"RECSYS_START_DATE": "2026-01-05"})
    assert "RECSYS_START_DATE=2026-01-05 .venv/bin/recsys ui --port 3000" in override


def test_output_into_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    """`recsys status | head -3`: no BrokenPipeError traceback once the reader has gone."""
    env = {**os.environ, "RECSYS_HOME": str(tmp_path / "home")}
    with subprocess.Popen(
        [str(RECSYS), "status", "--days", "5000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    ) as process:
        assert process.stdout is not None and process.stderr is not None
        head = [process.stdout.readline() for _ in range(3)]
        process.stdout.close()  # the reader goes away; 5,000 lines do not fit in the pipe's buffer
        err = process.stderr.read().decode()
        status = process.wait(timeout=60)
    assert head[0].startswith(b"RECSYS_HOME ")
    assert err == "" and status == cli.EXIT_FAILED


def test_the_dagster_instance_has_no_telemetry_retries_or_newsletter_dialog_and_monitors_and_queues_runs(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from recsys_dagster.run_queue import DayQueuedRunCoordinator
    from recsys_dagster.runner import (
        EARLIER_INSTANCE_CONFIGS,
        INSTANCE_CONFIG,
        instance_config,
        prepare_instance,
    )

    # prepare_instance points DAGSTER_HOME at the instance; monkeypatch restores it after the test.
    monkeypatch.setenv("DAGSTER_HOME", str(home / "dagster"))
    settings = load_settings()
    config = settings.dagster_home / "dagster.yaml"
    generated = instance_config(None, 4)
    # None yet, or one an earlier version generated (before the run queue, or with another limit).
    for earlier in ("", *EARLIER_INSTANCE_CONFIGS, INSTANCE_CONFIG, instance_config(None, 9)):
        if earlier:
            config.write_text(earlier)
        with prepare_instance(settings) as instance:
            assert not instance.nux_enabled  # the UI's newsletter sign-up dialog
            assert not instance.telemetry_enabled
            assert not instance.run_retries_enabled
            # The daemon fails runs that never start or never end (it runs with `recsys ui`).
            assert instance.run_monitoring_enabled
            assert instance.run_monitoring_start_timeout_seconds == 180
            assert instance.run_monitoring_max_runtime_seconds == 86400
            # Runs from the UI wait in the daemon's queue: at most RECSYS_MAX_CONCURRENT_RUNS at once.
            assert isinstance(instance.run_coordinator, DayQueuedRunCoordinator)
            assert instance.get_concurrency_config().run_queue_config.max_concurrent_runs == 4
        assert config.read_text() == generated
    edited = generated.replace("86400", "3600")
    config.write_text(edited)
    prepare_instance(settings).dispose()
    assert config.read_text() == edited, "a configuration edited by hand is left alone"


def _generate_one_day(day: str) -> None:
    """A small day of events. The tests that run the pipeline in this process give it the same
    RECSYS_START_DATE (three days ago): a process loads the definitions, and their partitions, once."""
    assert (
        cli.main(["generate", "--end", day, "--days", "1", "--events-per-day", "2000", "--users", "200"]) == 0
    )


def test_a_killed_recsys_run_is_marked_failed_by_the_next_one(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import dagster as dg

    day = _days_ago(1)
    monkeypatch.setenv("RECSYS_START_DATE", _days_ago(3))  # the same in every test: see _generate_one_day
    monkeypatch.setenv("DAGSTER_HOME", str(home / "dagster"))
    _generate_one_day(day)
    # Holding the day's canonicalization lock keeps the run in progress until it is killed, however fast.
    staging = home / "lake" / ".staging"
    staging.mkdir(parents=True, exist_ok=True)
    with locked(staging / f"{day}.lock"):
        process = subprocess.Popen(
            [str(RECSYS), "run", "--start", day, "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        try:
            # Its run record, read without opening the instance: the child has created the instance's
            # tables by then, and opening it here before would race that.
            deadline = time.monotonic() + 120
            started: list[str] = []
            while not started and process.poll() is None and time.monotonic() < deadline:
                started = run_ids(home / "dagster", "STARTED")
                time.sleep(0.1)
        finally:
            # Mid-run: no chance to record the run's end. Killed whatever happened above, so that leaving
            # the lock's block never waits for a child stuck behind it.
            process.kill()
            _, err = process.communicate(timeout=30)
    assert started, f"the run never started: {err.decode()}"
    [killed_id] = started
    assert run_ids(home / "dagster", "STARTED") == [killed_id], "the killed run shows as started"
    with dg.DagsterInstance.from_config(str(home / "dagster")) as instance:
        capsys.readouterr()
        assert cli.main(["run", "--start", day, "--select", "key:canonical_events", "--quiet"]) == 0
        out = capsys.readouterr().out
        assert (
            f"run {killed_id}: marked FAILED: the recsys run that executed it on this host was killed" in out
        )
        assert instance.get_run_by_id(killed_id).status == dg.DagsterRunStatus.FAILURE
        [failure] = instance.all_logs(killed_id, of_type=dg.DagsterEventType.RUN_FAILURE)
        assert f"(recsys run, pid {process.pid} on {socket.gethostname()})" in failure.message
        assert "it was killed or crashed" in failure.message
        # The next run is not touched: its process was alive while it ran, and it ended.
        statuses = {run.run_id: run.status for run in instance.get_runs()}
        assert sorted(status.value for status in statuses.values()) == ["FAILURE", "SUCCESS"]


def test_a_damaged_partition_record_is_named_and_the_other_days_still_shown(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from recsys_core.lake import partition_dir

    first, second, third = _days_ago(3), _days_ago(2), _days_ago(1)
    monkeypatch.setenv("RECSYS_START_DATE", first)
    monkeypatch.setenv("DAGSTER_HOME", str(home / "dagster"))
    for day in (first, second, third):
        _generate_one_day(day)
    select = ["--select", "key:canonical_events", "--quiet"]
    assert cli.main(["run", "--start", first, "--end", third, *select]) == 0
    folders = [
        partition_dir(home / "lake", "canonical_events", dt.date.fromisoformat(d)) for d in (first, second)
    ]
    summary, checks = folders[0] / "_summary.json", folders[1] / "_checks.json"
    summary.write_text(summary.read_text()[:40])  # cut short, as by a full disk
    checks.write_text("[]")  # JSON, but not a checks record
    capsys.readouterr()

    assert cli.main(["status", "--start", first, "--end", third]) == cli.EXIT_FAILED
    out, err = capsys.readouterr()
    rows = {line.split()[0]: line for line in out.splitlines() if line[:4].isdigit()}
    assert rows[first].endswith("UNREADABLE record (see the error)")
    assert rows[second].split()[1] == "2,000" and rows[second].endswith("UNREADABLE record (see the error)")
    assert rows[third].endswith("passed")
    assert f"error: {summary} cannot be read: " in err
    assert f"error: {checks} cannot be read: not a JSON object" in err
    remedy = f"recsys run --start {first} --end {second} --select key:canonical_events"
    assert remedy in err

    assert cli.main(["status", "--start", first, "--end", third, "--json"]) == cli.EXIT_FAILED
    partitions = json.loads(capsys.readouterr().out)["partitions"]
    assert [len(p.get("errors", [])) for p in partitions] == [1, 1, 0]
    assert partitions[1]["lines"] == 2000 and "checks" not in partitions[1]

    assert cli.main(["run", *remedy.split()[2:], "--quiet"]) == 0  # the remedy it prints
    assert cli.main(["status", "--start", first, "--end", third]) == cli.EXIT_OK


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ("ingest:\n  max_lateness_days: 1000000\n", "ingest.max_lateness_days"),
        ("checks:\n  max_events: 10\n  max_events: 20\n", "checks.max_events"),
    ],
)
def test_a_bad_configuration_stops_every_command_naming_the_key(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, config: str, key: str
) -> None:
    home.mkdir()
    (home / "recsys.yaml").write_text(config)
    monkeypatch.setenv("RECSYS_CONFIG", str(home / "recsys.yaml"))
    assert cli.main(["run", "--start", _days_ago(1)]) == cli.EXIT_USAGE
    assert cli.main(["status"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err.splitlines()
    assert [line.split(": ")[0] for line in err] == ["recsys run", "recsys status"]
    assert all(key in line for line in err)
    assert not (home / "dagster").exists(), "nothing ran"


def test_importing_only_undatable_lines_says_so_without_a_range(
    home: Path, capsys: pytest.CaptureFixture
) -> None:
    source = home.parent / "undatable.jsonl"
    source.write_text(
        '{"v":1,"ts":"yesterday","tenant":"t","surface":"s","session_id":"a","item_id":"i","event_type":"click"}\n'
    )
    assert cli.main(["import", str(source)]) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert "None" not in out
    assert f"{source}: jsonl, 0 events into 0 day(s), 1 undatable line(s) kept for quarantine" in out
