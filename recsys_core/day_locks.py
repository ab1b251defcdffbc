"""Days of the pipeline held by one run at a time, across the processes (and hosts) that share an instance.

A run holds the days it materializes until it ends; a run that wants one of them meanwhile waits. Where
the hold lives follows the Dagster instance:

- with RECSYS_POSTGRES_URL, a session-level PostgreSQL advisory lock per day in that database: every host
  of a deployment sees it, and the server drops it when the holder's connection closes, also when the
  holding process is killed;
- without it, a POSIX record lock on one byte per day of RECSYS_HOME/locks/days.lock: the kernel drops it
  when the holding process ends, however it ends.

Holds belong to a process. Days a process already holds are not taken again (`recsys run` holds its days
before it starts the run that then executes in the same process), and the threads of one process never
wait for each other. A request takes all its days at once or none: a run waiting for one day never keeps
another run from a day it merely wants later.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import ClassVar, Protocol

import psycopg2

from recsys_core.settings import Settings

# How often a waiting request tries again.
POLL_SECONDS = 0.5
# The first key of every advisory lock recsys takes (the second is the day's ordinal): keeps them apart
# from other users of the same database. "rcsy" as a 32-bit number.
ADVISORY_NAMESPACE = 0x72637379
LOCK_FILE = Path("locks") / "days.lock"


class _Hold(Protocol):
    """Days taken in one store by one request, given back by `release`."""

    def release(self) -> None: ...


class _Store(Protocol):
    name: str

    def try_take(self, ordinals: Sequence[int]) -> _Hold | list[int]:
        """All of `ordinals` (days as `date.toordinal()`), or the ones another process holds."""
        ...


# Days held by this process: (store name, day ordinal) -> number of open requests holding it.
_held: Counter[tuple[str, int]] = Counter()
_held_guard = threading.Lock()


@contextlib.contextmanager
def holding_days(
    settings: Settings,
    first: dt.date,
    last: dt.date,
    on_wait: Callable[[list[dt.date]], None] | None = None,
) -> Iterator[None]:
    """Hold the days `first`..`last` for the block, waiting while another process holds any of them.

    `on_wait` is called once, with the days held elsewhere, if the request has to wait.
    """
    if last < first:
        raise ValueError(f"the last day {last} is before the first {first}")
    store = _store(settings)
    wanted = range(first.toordinal(), last.toordinal() + 1)
    with _held_guard:
        missing = [day for day in wanted if not _held[(store.name, day)]]
    hold = _take(store, missing, on_wait) if missing else None
    with _held_guard:
        _held.update((store.name, day) for day in wanted)
    try:
        yield
    finally:
        with _held_guard:
            _held.subtract((store.name, day) for day in wanted)
            for day in wanted:
                if _held[(store.name, day)] <= 0:
                    del _held[(store.name, day)]
        if hold is not None:
            hold.release()


def _take(store: _Store, ordinals: list[int], on_wait: Callable[[list[dt.date]], None] | None) -> _Hold:
    announced = False
    while True:
        taken = store.try_take(ordinals)
        if not isinstance(taken, list):
            return taken
        if on_wait is not None and not announced:
            on_wait([dt.date.fromordinal(day) for day in taken])
            announced = True
        time.sleep(POLL_SECONDS)


def _store(settings: Settings) -> _Store:
    if settings.postgres_url is not None:
        return _AdvisoryLocks(settings.postgres_url)
    return _FileLocks(settings.home / LOCK_FILE)


class _AdvisoryLocks:
    """Session-level advisory locks in the PostgreSQL database of the instance, one per day."""

    def __init__(self, url: str) -> None:
        self._url = url
        parts = psycopg2.extensions.parse_dsn(url)
        self.name = f"postgresql://{parts.get('host')}:{parts.get('port', 5432)}/{parts.get('dbname')}"

    def try_take(self, ordinals: Sequence[int]) -> _Hold | list[int]:
        # Keep-alives: a long run's connection sits idle for hours, and a dead one must be noticed.
        connection = psycopg2.connect(self._url, connect_timeout=30, keepalives=1, keepalives_idle=60)
        connection.autocommit = True
        try:
            with connection.cursor() as cursor:
                cursor.execute(
                    "SELECT day, pg_try_advisory_lock(%s, day) FROM unnest(%s::int[]) AS day",
                    (ADVISORY_NAMESPACE, list(ordinals)),
                )
                busy = [day for day, taken in cursor.fetchall() if not taken]
        except BaseException:
            connection.close()
            raise
        if busy:
            connection.close()  # gives back the days it did take
            return busy
        return _Connection(connection)


class _Connection:
    def __init__(self, connection: psycopg2.extensions.connection) -> None:
        self._connection = connection

    def release(self) -> None:
        # Closing the session ends every advisory lock it holds.
        self._connection.close()


class _FileLocks:
    """POSIX record locks on one byte per day (at the day's ordinal) of one lock file.

    Record locks belong to the process and the file, not to a descriptor: closing any descriptor of the
    file would drop all of the process's locks on it. The process therefore keeps one descriptor per file,
    shared by its holds, and closes it when the last hold is released.
    """

    _descriptors: ClassVar[dict[Path, tuple[int, int]]] = {}  # path -> (descriptor, holds using it)
    _guard = threading.Lock()

    def __init__(self, path: Path) -> None:
        self._path = path
        self.name = str(path)

    def try_take(self, ordinals: Sequence[int]) -> _Hold | list[int]:
        descriptor = self._open()
        taken: list[tuple[int, int]] = []
        refused: list[int] = []
        for start, length in _stretches(ordinals):
            try:
                fcntl.lockf(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB, length, start)
                taken.append((start, length))
            except OSError:  # EAGAIN or EACCES: another process holds a day of the stretch
                refused.extend(range(start, start + length))
        hold = _RecordLocks(self, descriptor, taken)
        if refused:
            # The days to name (if their holder has let go meanwhile, the whole stretch), asked before the
            # descriptor may close.
            busy = [day for day in refused if not self._free(descriptor, day)] or refused
            hold.release()
            return busy
        return hold

    @staticmethod
    def _free(descriptor: int, day: int) -> bool:
        try:
            fcntl.lockf(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, day)
        except OSError:
            return False
        fcntl.lockf(descriptor, fcntl.LOCK_UN, 1, day)
        return True

    def _open(self) -> int:
        with self._guard:
            descriptor, users = self._descriptors.get(self._path, (-1, 0))
            if users == 0:
                self._path.parent.mkdir(parents=True, exist_ok=True)
                descriptor = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            self._descriptors[self._path] = (descriptor, users + 1)
            return descriptor

    def close(self) -> None:
        with self._guard:
            descriptor, users = self._descriptors[self._path]
            if users == 1:
                del self._descriptors[self._path]
                os.close(descriptor)
            else:
                self._descriptors[self._path] = (descriptor, users - 1)


class _RecordLocks:
    def __init__(self, store: _FileLocks, descriptor: int, stretches: list[tuple[int, int]]) -> None:
        self._store, self._descriptor, self._stretches = store, descriptor, stretches

    def release(self) -> None:
        for start, length in self._stretches:
            fcntl.lockf(self._descriptor, fcntl.LOCK_UN, length, start)
        self._store.close()


def _stretches(ordinals: Sequence[int]) -> list[tuple[int, int]]:
    """Consecutive days as (first, count): a range of days is one record lock, whatever its length."""
    stretches: list[tuple[int, int]] = []
    for day in sorted(ordinals):
        if stretches and stretches[-1][0] + stretches[-1][1] == day:
            stretches[-1] = (stretches[-1][0], stretches[-1][1] + 1)
        else:
            stretches.append((day, 1))
    return stretches
