"""The SQLite instance storage `recsys` generates (recsys_dagster.sqlite_storage): events committed without a
disk flush each, all of them read back by another instance, the UI's watcher woken per event, and an instance
made with Dagster's default storage keeps its history when it switches."""

import sqlite3
import threading
from pathlib import Path

import dagster as dg
import pytest

from recsys_core.settings import load_settings
from recsys_dagster.runner import INSTANCE_CONFIG, prepare_instance, run_queue_config
from recsys_dagster.sqlite_storage import KEPT_OPEN_RUN_DATABASES, KeptOpenSqliteEventLogStorage

DAYS = dg.DailyPartitionsDefinition(start_date="2026-01-01", end_date="2026-01-04", end_offset=0)


@dg.asset(partitions_def=DAYS, check_specs=[dg.AssetCheckSpec("rows_positive", asset="daily_rows")])
def daily_rows(context: dg.AssetExecutionContext):
    rows = int(context.partition_key[-2:]) * 10
    yield dg.MaterializeResult(metadata={"dagster/row_count": rows})
    yield dg.AssetCheckResult(check_name="rows_positive", passed=rows > 0, metadata={"rows": rows})


def _backfill(instance: dg.DagsterInstance) -> str:
    """One run per day of DAYS; the last run's id."""
    for day in DAYS.get_partition_keys():
        result = dg.materialize([daily_rows], instance=instance, partition_key=day)
        assert result.success
    return result.run_id


def _row_counts(instance: dg.DagsterInstance) -> dict[str, int]:
    records = instance.fetch_materializations(dg.AssetKey("daily_rows"), limit=100).records
    return {
        record.partition_key: record.asset_materialization.metadata["dagster/row_count"].value
        for record in records
    }


@pytest.fixture
def dagster_home(home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    # prepare_instance points DAGSTER_HOME at the instance; monkeypatch restores it after the test.
    monkeypatch.setenv("DAGSTER_HOME", str(home / "dagster"))
    return home / "dagster"


def test_a_backfill_stores_every_partitions_events_without_checkpointing_and_another_instance_reads_them(
    dagster_home: Path,
) -> None:
    with prepare_instance(load_settings()) as instance:
        assert isinstance(instance.event_log_storage, KeptOpenSqliteEventLogStorage)
        run_id = _backfill(instance)
        run_db = dagster_home / "history" / "runs" / f"{run_id}.db"
        # The commits sit in the write-ahead log: the connection that wrote them is still open, so nothing
        # checkpointed (flushed) them into the database file yet.
        assert run_db.with_name(f"{run_id}.db-wal").stat().st_size > 0
        # Another process's reader (a fresh instance, as the UI's) sees every partition's own figures and check.
        with dg.DagsterInstance.from_config(str(dagster_home)) as reader:
            assert _row_counts(reader) == {"2026-01-01": 10, "2026-01-02": 20, "2026-01-03": 30}
            checks = reader.event_log_storage.get_asset_check_execution_history(
                dg.AssetCheckKey(dg.AssetKey("daily_rows"), "rows_positive"), limit=10
            )
            assert [check.status.value for check in checks].count("SUCCEEDED") == 3
            assert len(reader.all_logs(run_id)) == len(instance.all_logs(run_id))
    # Disposing the instance closed its connections: the last close checkpointed the log into the file.
    with sqlite3.connect(run_db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1] == 0, "nothing left in the log"


def test_storing_an_event_wakes_the_uis_watcher_of_the_run(dagster_home: Path) -> None:
    with prepare_instance(load_settings()) as instance:
        run_id = _backfill(instance)
        with dg.DagsterInstance.from_config(str(dagster_home)) as reader:
            seen = threading.Event()
            # The UI follows a run this way; its watcher reacts to changes of the run's database file.
            reader.watch_event_logs(run_id, None, lambda event, cursor: seen.set())
            instance.report_engine_event("one more event", instance.get_run_by_id(run_id))
            assert seen.wait(timeout=20), "the watcher saw the new event"


def test_only_the_most_recent_run_databases_stay_open(dagster_home: Path) -> None:
    with prepare_instance(load_settings()) as instance:
        storage = instance.event_log_storage
        assert isinstance(storage, KeptOpenSqliteEventLogStorage)
        for _ in range(KEPT_OPEN_RUN_DATABASES + 2):
            last = _backfill(instance)
        open_runs = [shard for shard in storage._engines if shard != "index"]
        assert len(open_runs) == KEPT_OPEN_RUN_DATABASES and open_runs[-1] == last
        assert len(instance.get_runs()) == len(DAYS.get_partition_keys()) * (KEPT_OPEN_RUN_DATABASES + 2)


def test_an_instance_made_with_dagsters_default_storage_keeps_its_history_when_it_switches(
    dagster_home: Path,
) -> None:
    dagster_home.mkdir(parents=True)
    config = dagster_home / "dagster.yaml"
    config.write_text(INSTANCE_CONFIG + run_queue_config(4))  # as generated before this storage
    with dg.DagsterInstance.from_config(str(dagster_home)) as before:
        assert type(before.event_log_storage).__name__ == "SqliteEventLogStorage"
        run_id = _backfill(before)
    with prepare_instance(load_settings()) as instance:
        assert isinstance(instance.event_log_storage, KeptOpenSqliteEventLogStorage)
        assert instance.get_run_by_id(run_id) is not None
        assert _row_counts(instance) == {"2026-01-01": 10, "2026-01-02": 20, "2026-01-03": 30}
