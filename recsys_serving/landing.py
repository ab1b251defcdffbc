"""Append-only JSON-lines logs the server writes into a landing folder for the pipeline to land: the
exposure log (`exposures`) and the decision traces (`traces`) share this writer.

Each record is written to the folder of its UTC day, `<root>/dt=YYYY-MM-DD/`. Each day's log is capped at
`max_bytes_per_day`: the files of this log (by their name prefix) in the day's folder, whoever wrote them.
Writers append under a lock on the root directory after reading the folder's size, so the workers of a
server, and servers sharing the root on one machine, stay within the cap together; lines beyond it are
counted, not written.

The request path only appends a record to an in-memory queue (bounded: when full, records are counted as
dropped instead of slowing requests down). A background thread drains the queue, renders JSON lines and
appends them to a hidden in-progress file `.<prefix><host>-<pid>-<seq>.jsonl.inprogress`, which the
pipeline ignores (it reads only visible `*.jsonl` files). A file is published under its visible name
`<prefix><host>-<pid>-<seq>.jsonl` (fsync, then a no-overwrite link + unlink) when it reaches its size or
age limit, when a newer day starts, and on shutdown, so the pipeline never reads a half-written file.

A process that died without publishing leaves its hidden file behind; a later writer on the same host
publishes such orphans (cut back to their last complete line) once their process is gone.
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import errno
import fcntl
import logging
import os
import re
import socket
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Generic, Protocol, TypeVar

from recsys_core.storage import fsync_dir

log = logging.getLogger(__name__)

IN_PROGRESS_SUFFIX = ".jsonl.inprogress"
# Orphaned in-progress files are looked for in the folders of this many recent days.
ORPHAN_SCAN_DAYS = 8
_UNSAFE_HOST = re.compile(r"[^A-Za-z0-9._-]+")


class Record(Protocol):
    """What a log queues per response: at least its time (Unix seconds), which chooses its day."""

    @property
    def ts(self) -> float: ...


RecordT = TypeVar("RecordT", bound=Record)


class _OpenFile:
    def __init__(self, hidden: Path, final_dir: Path, seq: int, opened_at: float) -> None:
        self.hidden = hidden
        self.final_dir = final_dir
        self.seq = seq
        self.opened_at = opened_at
        self.handle = open(hidden, "ab")  # noqa: SIM115 - kept open across batches, closed on publish
        self.size = 0


class LandingWriter(ABC, Generic[RecordT]):
    """Buffered, background, rotation-safe writer of one log's JSON lines into a landing layout.

    A log is a subclass: its file name prefix, its name and settings in messages, how one record renders
    (`_render`) and how many lines it counts for when it does not fit under the cap (`_lines_of`).
    """

    FILE_PREFIX = ""
    LOG_NAME = ""
    RECORDS = ""  # what its lines are, in messages
    CAP_VARIABLE = ""
    OVER_CAP_METRIC = ""

    def __init__(
        self,
        root: Path,
        *,
        host: str | None = None,
        pid: int | None = None,
        max_bytes: int = 64 * 1024 * 1024,
        max_age_seconds: float = 300.0,
        flush_seconds: float = 0.5,
        max_pending: int = 100_000,
        max_bytes_per_day: int = 1 << 30,
    ) -> None:
        self.root = Path(root)
        self.host = _UNSAFE_HOST.sub("_", host or socket.gethostname()).strip("._-")[:64] or "host"
        self.pid = os.getpid() if pid is None else pid
        self.max_bytes = max_bytes
        self.max_age_seconds = max_age_seconds
        self.flush_seconds = flush_seconds
        self.max_pending = max_pending
        self.max_bytes_per_day = max_bytes_per_day
        # Records rendered so far (numbers the exposure events' ids).
        self._records = 0
        self._capped_day: str | None = None
        self._queue: collections.deque[RecordT] = collections.deque()
        self._files: dict[str, _OpenFile] = {}
        self._seq = 0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._io_lock = threading.Lock()
        # Counters for /metrics (responses and lines).
        self.events_written = 0
        self.responses_dropped = 0
        self.events_over_cap = 0
        self.write_errors = 0
        self.files_published = 0

    # ------------------------------------------------------------------------------ request path

    def _enqueue(self, record: RecordT) -> bool:
        """Queue one record (O(1), never blocks); False if the queue is full and it was dropped."""
        if len(self._queue) >= self.max_pending:
            self.responses_dropped += 1
            return False
        self._queue.append(record)
        return True

    @property
    def pending(self) -> int:
        return len(self._queue)

    # ----------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, name=f"recsys-{self.FILE_PREFIX.rstrip('-')}-writer", daemon=True
        )
        self._thread.start()

    def close(self, timeout: float = 30.0) -> None:
        """Write everything queued, publish every open file and stop the thread."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self.flush(publish_all=True)

    def flush(self, *, publish_all: bool = False) -> None:
        """Write what is queued now; publish files that are due (or all of them)."""
        with self._io_lock:
            self._write_pending()
            now = time.time()
            for day, handle in list(self._files.items()):
                if publish_all or self._due(handle, now):
                    self._publish(day)

    def _run(self) -> None:
        try:
            with self._io_lock:
                self._publish_orphans()
        except Exception:
            log.exception("%s: publishing orphaned in-progress files failed", self.LOG_NAME)
        while not self._stop.is_set():
            self._wake.wait(self.flush_seconds)
            self._wake.clear()
            try:
                self.flush()
            except Exception:  # keep the thread alive; the failure is counted and logged
                self.write_errors += 1
                log.exception("%s: write failed", self.LOG_NAME)

    # ------------------------------------------------------------------------------- writing

    def _write_pending(self) -> None:
        if not self._queue:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        # Every writer of this log on this root (the other workers, other servers on this machine) reads the
        # day's size on disk and appends under this lock, so that together they stay within the cap.
        with _locked_dir(self.root):
            self._append_pending()

    def _append_pending(self) -> None:
        batches: dict[str, list[bytes]] = {}
        records_of_day: dict[str, list[RecordT]] = {}
        written: list[RecordT] = []
        refused: list[RecordT] = []
        batch_bytes: dict[str, int] = {}
        day_bytes: dict[str, int] = {}
        queue = self._queue
        while queue:
            record = queue.popleft()
            count = self._lines_of(record)
            if not count:
                continue
            self._records += 1
            moment = dt.datetime.fromtimestamp(record.ts, dt.UTC)
            day = moment.date().isoformat()
            if day not in day_bytes:
                day_bytes[day] = _log_bytes(self.root / f"dt={day}", self.FILE_PREFIX)
            budget = self.max_bytes_per_day - day_bytes[day] - batch_bytes.get(day, 0)
            lines = self._render(record, moment) if budget > 0 else []
            size = sum(len(line) for line in lines)
            if not lines or size > budget:  # a record is logged whole or not at all
                self._over_cap(day, count)
                refused.append(record)
                continue
            batch_bytes[day] = batch_bytes.get(day, 0) + size
            batches.setdefault(day, []).extend(lines)
            records_of_day.setdefault(day, []).append(record)
        if not batches:
            self._settle(written, refused)
            return
        for day in sorted(batches):
            data = b"".join(batches[day])
            handle = self._files.get(day) or self._open(day)
            try:
                handle.handle.write(data)
                handle.handle.flush()
            except OSError as exc:
                self.write_errors += 1
                log.error(
                    "%s: cannot write %s (%d bytes lost): %s", self.LOG_NAME, handle.hidden, len(data), exc
                )
                # Cut back to the last complete line so the file never holds a torn event.
                with contextlib.suppress(OSError):
                    handle.handle.truncate(handle.size)
                refused.extend(records_of_day[day])
                continue
            handle.size += len(data)
            self.events_written += len(batches[day])
            written.extend(records_of_day[day])
        # A newer day has started: files of earlier days are complete (late events included).
        newest = max(batches)
        for day in [d for d in self._files if d < newest]:
            self._publish(day)
        self._settle(written, refused)

    def _settle(self, written: list[RecordT], refused: list[RecordT]) -> None:
        """Called after each write with the records written (handed to the OS, not yet fsync'd) and those
        refused (over the cap, or a failed write); a log whose clients wait for their records hooks in here."""

    @abstractmethod
    def _lines_of(self, record: RecordT) -> int:
        """The lines `record` renders to (0: nothing to write), counted when it does not fit the cap."""

    @abstractmethod
    def _render(self, record: RecordT, moment: dt.datetime) -> list[bytes]:
        """The JSON lines of one record; `moment` is its time."""

    def _over_cap(self, day: str, events: int) -> None:
        if day != self._capped_day:
            self._capped_day = day
            log.warning(
                "%s: %s reached its cap of %d bytes (%s); the day's further %s are counted in %s, not written",
                self.LOG_NAME,
                day,
                self.max_bytes_per_day,
                self.CAP_VARIABLE,
                self.RECORDS,
                self.OVER_CAP_METRIC,
            )
        self.events_over_cap += events

    def _open(self, day: str) -> _OpenFile:
        folder = self.root / f"dt={day}"
        folder.mkdir(parents=True, exist_ok=True)
        self._seq += 1
        hidden = folder / f".{self.FILE_PREFIX}{self.host}-{self.pid}-{self._seq}{IN_PROGRESS_SUFFIX}"
        handle = self._files[day] = _OpenFile(hidden, folder, self._seq, time.time())
        return handle

    def _due(self, handle: _OpenFile, now: float) -> bool:
        return handle.size >= self.max_bytes or now - handle.opened_at >= self.max_age_seconds

    def _publish(self, day: str) -> None:
        handle = self._files.pop(day)
        try:
            handle.handle.flush()
            os.fsync(handle.handle.fileno())
        finally:
            handle.handle.close()
        if handle.size == 0:
            handle.hidden.unlink(missing_ok=True)
            return
        self._publish_path(handle.hidden, handle.final_dir, handle.seq)

    def _publish_path(self, hidden: Path, folder: Path, seq: int) -> Path:
        """Give a complete hidden file its visible name, never replacing an existing file."""
        while True:
            final = folder / f"{self.FILE_PREFIX}{self.host}-{self.pid}-{seq}.jsonl"
            try:
                os.link(hidden, final)
            except FileExistsError:
                # Same host and pid as an earlier process (a restarted container is pid 1 again).
                self._seq = max(self._seq, seq) + 1
                seq = self._seq
                continue
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
                    raise
                if final.exists():
                    self._seq = max(self._seq, seq) + 1
                    seq = self._seq
                    continue
                os.rename(hidden, final)  # no hard links here: rename after the existence check
                break
            hidden.unlink()
            break
        fsync_dir(folder)
        self.files_published += 1
        return final

    def _publish_orphans(self) -> None:
        """Publish in-progress files this host's dead writers left (complete lines only)."""
        today = dt.datetime.now(dt.UTC).date()
        prefix = f".{self.FILE_PREFIX}{self.host}-"
        for offset in range(ORPHAN_SCAN_DAYS):
            folder = self.root / f"dt={(today - dt.timedelta(days=offset)).isoformat()}"
            if not folder.is_dir():
                continue
            for path in sorted(folder.glob(f"{prefix}*{IN_PROGRESS_SUFFIX}")):
                match = re.fullmatch(
                    re.escape(prefix) + r"(\d+)-(\d+)" + re.escape(IN_PROGRESS_SUFFIX), path.name
                )
                if match is None:
                    continue
                pid = int(match.group(1))
                if pid != self.pid and _alive(pid):
                    continue
                if pid == self.pid and any(h.hidden == path for h in self._files.values()):
                    continue
                # Claim it first, so two writers starting together cannot publish it twice.
                self._seq += 1
                claimed = folder / f".{self.FILE_PREFIX}{self.host}-{self.pid}-{self._seq}.recovering"
                try:
                    os.rename(path, claimed)
                except FileNotFoundError:
                    continue
                data = claimed.read_bytes()
                complete = data[: data.rfind(b"\n") + 1]
                if not complete:
                    claimed.unlink()
                    continue
                if len(complete) != len(data):
                    with open(claimed, "r+b") as handle:
                        handle.truncate(len(complete))
                        os.fsync(handle.fileno())
                final = self._publish_path(claimed, folder, self._seq)
                log.warning("%s: published orphaned file %s as %s", self.LOG_NAME, path.name, final.name)


def _log_bytes(folder: Path, prefix: str) -> int:
    """Size of one log's files (published, in progress or being recovered) in a day's folder."""
    total = 0
    if folder.is_dir():
        for path in folder.glob(f"*{prefix}*"):
            with contextlib.suppress(FileNotFoundError):  # published or recovered meanwhile
                total += path.stat().st_size
    return total


@contextlib.contextmanager
def _locked_dir(folder: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on the directory `folder` itself: no lock file is left in the landing
    zone. Released when the block ends, or when the process dies."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
