"""The Dagster instance on PostgreSQL (RECSYS_POSTGRES_URL), against a real throwaway PostgreSQL server
(the `postgres_url` fixture of conftest.py)."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import psycopg2
import pytest
from postgres_server import PASSWORD

from recsys_core.settings import ConfigError, load_settings
from recsys_dagster.runner import (
    INSTANCE_CONFIG,
    POSTGRES_PASSWORD_VAR,
    instance_config,
    run_queue_config,
    write_instance_config,
)

END = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)
START = END - dt.timedelta(days=1)


def _recsys(env: dict[str, str], *args: str | dt.date) -> None:
    script = Path(sys.executable).with_name("recsys")
    done = subprocess.run([script, *map(str, args)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def test_recsys_run_records_runs_and_partitions_in_postgres(
    postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("RECSYS_", "DAGSTER_")) or name == "RECSYS_SHARED_DATA"
    }
    env |= {
        "RECSYS_HOME": str(home),
        "RECSYS_START_DATE": (START - dt.timedelta(days=5)).isoformat(),
        "RECSYS_POSTGRES_URL": postgres_url,
    }
    _recsys(
        env, "generate", "--end", END, "--days", 2, "--events-per-day", 2000, "--users", 200, "--items", 100
    )
    _recsys(env, "run", "--start", START, "--end", END, "--quiet")

    dagster_home = home / "dagster"
    config = (dagster_home / "dagster.yaml").read_text()
    assert "postgresql+psycopg2" in config and f"env: {POSTGRES_PASSWORD_VAR}" in config
    assert "s3cret" not in config, "the password stays out of dagster.yaml"
    assert not (dagster_home / "history").exists(), "no SQLite run storage next to it"

    # The instance a Dagster process builds from the generated dagster.yaml (as the UI and daemon do).
    monkeypatch.setenv("DAGSTER_HOME", str(dagster_home))
    monkeypatch.setenv(POSTGRES_PASSWORD_VAR, PASSWORD)
    with dg.DagsterInstance.get() as instance:
        runs = instance.get_runs()
        assert runs and {run.status for run in runs} == {dg.DagsterRunStatus.SUCCESS}
        days = {START.isoformat(), END.isoformat()}
        assert instance.get_materialized_partitions(dg.AssetKey("canonical_events")) == days
        assert instance.get_latest_materialization_event(dg.AssetKey("published_manifest")) is not None
    with psycopg2.connect(postgres_url) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT run_id, status FROM runs")
        assert dict(cursor.fetchall()) == {run.run_id: "SUCCESS" for run in runs}
        cursor.execute("SELECT count(*) FROM event_logs WHERE dagster_event_type = 'ASSET_MATERIALIZATION'")
        assert cursor.fetchone()[0] > 0


def test_the_generated_dagster_yaml_follows_recsys_postgres_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path))
    for var in (
        "DAGSTER_HOME",
        "RECSYS_CONFIG",
        "RECSYS_POSTGRES_URL",
        "RECSYS_MAX_CONCURRENT_RUNS",
        POSTGRES_PASSWORD_VAR,
    ):
        monkeypatch.delenv(var, raising=False)
    config = tmp_path / "dagster" / "dagster.yaml"
    url = "postgresql://recsys:pw@db.example:6543/recsys?sslmode=require"
    sqlite = instance_config(None, 4)
    on_postgres = instance_config(url, 4)
    on_another = instance_config("postgresql://other@db.example/other", 4)

    def prepared(url: str | None) -> str:
        if url is None:
            monkeypatch.delenv("RECSYS_POSTGRES_URL", raising=False)
        else:
            monkeypatch.setenv("RECSYS_POSTGRES_URL", url)
        # Only the file: an instance would connect to the server, which does not exist.
        return write_instance_config(load_settings()).read_text()

    assert prepared(url) == on_postgres
    assert "sslmode: require" in on_postgres and "port: 6543" in on_postgres
    assert prepared("postgresql://other@db.example/other") == on_another
    assert "password" not in on_another and "port: 5432" in on_another
    assert prepared(None) == sqlite, "unset again: back to SQLite"
    # As generated before the run queue.
    config.write_text(INSTANCE_CONFIG + on_postgres.removeprefix(INSTANCE_CONFIG + run_queue_config(4)))
    assert prepared(url) == on_postgres
    monkeypatch.setenv("RECSYS_MAX_CONCURRENT_RUNS", "7")
    assert prepared(url) == instance_config(url, 7), "the limit follows RECSYS_MAX_CONCURRENT_RUNS"
    edited = on_postgres.replace("max_runtime_seconds: 86400", "max_runtime_seconds: 3600")
    config.write_text(edited)
    assert prepared("postgresql://other@db.example/other") == edited, "edited by hand: left alone"


def test_a_malformed_recsys_postgres_url_is_refused_without_showing_the_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RECSYS_POSTGRES_URL", "mysql://recsys:hunter2@db.example:99999")
    with pytest.raises(ConfigError) as error:
        load_settings()
    message = str(error.value)
    assert message.startswith("RECSYS_POSTGRES_URL: ") and "hunter2" not in message
    assert "'mysql'" in message and "no database" in message and "port" in message
