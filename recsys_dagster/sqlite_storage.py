"""The SQLite instance storage of an embedded install, with an event log that does not flush the disk per event.

Dagster's SQLite event log opens a new connection for every event it stores and closes it afterwards. The
databases are in WAL mode, and closing the last connection to one checkpoints it: the write-ahead log is
copied into the database and both are flushed to disk (fdatasync). A backfill of a few hundred small days
records about 4,000 events, and those flushes were most of its time.

`KeptOpenSqliteEventLogStorage` keeps one connection per database open for the life of the process (the index
and the most recently used run databases) and commits with `synchronous=NORMAL`: a commit appends to the
write-ahead log without a flush, and the log is flushed when SQLite checkpoints it (every 1,000 pages, and
when the connection closes). What that trades: a crash of the machine (not of a process) can lose the last
events a run stored, never corrupt the databases; the lake's files, not the event log, hold the pipeline's
results. A deployment that needs every event on disk uses PostgreSQL (RECSYS_POSTGRES_URL).

The UI follows a run in progress by watching its database file for changes; as commits no longer reach
that file until a checkpoint, storing an event touches it (its modification time) so the UI still sees each
event as it is stored.

The files and their layout under DAGSTER_HOME are Dagster's own: an instance switches between this storage and
Dagster's default without losing its history.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

import sqlalchemy as db
from dagster._core.events.log import EventLogEntry
from dagster._core.storage.event_log.sqlite.sqlite_event_log import SqliteEventLogStorage
from dagster._core.storage.sqlite import SQLITE_BUSY_TIMEOUT_SECONDS
from dagster._core.storage.sqlite_storage import DagsterSqliteStorage, _event_logs_directory
from dagster._serdes import ConfigurableClassData
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import StaticPool

# Run databases whose connection stays open besides the index's: the runs this process is storing or
# reading (a process executes one run at a time; the UI reads a handful). Older ones are closed.
KEPT_OPEN_RUN_DATABASES = 8


def _commit_without_flush(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


class KeptOpenSqliteEventLogStorage(SqliteEventLogStorage):
    """Dagster's run-sharded SQLite event log, on connections kept open with `synchronous=NORMAL`."""

    def __init__(self, base_dir: str, inst_data: ConfigurableClassData | None = None):
        self._engines: OrderedDict[str, Engine] = OrderedDict()
        self._engines_pid = os.getpid()
        self._engines_lock = threading.Lock()
        super().__init__(base_dir, inst_data)

    @classmethod
    def from_config_value(
        cls, inst_data: ConfigurableClassData | None, config_value: Any
    ) -> KeptOpenSqliteEventLogStorage:
        return cls(inst_data=inst_data, **config_value)

    def _engine(self, shard: str) -> Engine:
        """The engine of one database, with its single connection: opened on first use, kept while used."""
        with self._engines_lock:
            if os.getpid() != self._engines_pid:
                # A forked child must not use (nor close) the parent's connections: it opens its own.
                for engine in self._engines.values():
                    engine.dispose(close=False)
                self._engines.clear()
                self._engines_pid = os.getpid()
            if shard in self._engines:
                engine = self._engines.pop(shard)
            else:
                engine = db.create_engine(
                    self.conn_string_for_shard(shard),
                    poolclass=StaticPool,
                    # `_connect` holds Dagster's storage lock while a connection is in use: one thread at a time.
                    connect_args={"timeout": SQLITE_BUSY_TIMEOUT_SECONDS, "check_same_thread": False},
                )
                db.event.listen(engine, "connect", _commit_without_flush)
            self._engines[shard] = engine
            run_engines = [name for name in self._engines if name != "index"]
            for name in run_engines[:-KEPT_OPEN_RUN_DATABASES]:
                self._engines.pop(name).dispose()
            return engine

    @contextlib.contextmanager
    def _connect(self, shard: str) -> Iterator[Connection]:
        # As Dagster's `_connect`, on the kept engine instead of a new one per call.
        with self._db_lock:
            engine = self._engine(shard)
            if shard not in self._initialized_dbs:
                self._initdb(engine)
                self._initialized_dbs.add(shard)
            with engine.connect() as conn, conn.begin():
                yield conn

    def store_event(self, event: EventLogEntry) -> None:
        super().store_event(event)
        self._wake_watchers(event.run_id)

    def store_event_batch(self, events: Sequence[EventLogEntry]) -> None:
        super().store_event_batch(events)
        for run_id in {event.run_id for event in events}:
            self._wake_watchers(run_id)

    def _wake_watchers(self, run_id: str) -> None:
        """Touch the run's database file: the UI's watcher of a run reacts to changes of that file."""
        with contextlib.suppress(FileNotFoundError):
            os.utime(self.path_for_shard(run_id))

    def _close_connections(self) -> None:
        with self._engines_lock:
            for engine in self._engines.values():
                engine.dispose()
            self._engines.clear()

    def wipe(self) -> None:
        self._close_connections()  # before the run databases are deleted
        super().wipe()

    def dispose(self) -> None:
        super().dispose()
        self._close_connections()


class KeptOpenSqliteStorage(DagsterSqliteStorage):
    """Dagster's SQLite storage (runs, schedules, event log under `base_dir`) with
    `KeptOpenSqliteEventLogStorage` as its event log."""

    def __init__(self, base_dir: str, inst_data: ConfigurableClassData | None = None):
        super().__init__(base_dir, inst_data)
        self._event_log_storage = KeptOpenSqliteEventLogStorage(_event_logs_directory(base_dir))

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData, config_value: Any) -> KeptOpenSqliteStorage:
        return cls.from_local(inst_data=inst_data, **config_value)
