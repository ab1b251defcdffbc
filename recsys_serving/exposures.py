"""Exposure log: what the API served, appended as raw contract-v1 events the pipeline ingests.

Each recommendation response becomes one `exposure` event per returned item (fields `v, ts, tenant,
surface, session_id, user_id, item_id, event_type, rank, request_id, event_id`; `rank` 0 = first shown) in
the raw landing folder of the event's UTC day, `<raw root>/dt=YYYY-MM-DD/`. The `event_id` is made by the
server (a random token of the writer, the response's sequence number, the rank), never from what the
client sent: repeated identical requests are distinct exposures, not duplicates for the pipeline's gates.

Each day's log is capped at `max_bytes_per_day`: the exposure files in the day's folder, whoever wrote
them. Writers append under a lock on the raw root directory after reading the folder's size, so the
workers of a server, and servers sharing the raw root on one machine, stay within the cap together; events
beyond it are counted as dropped, not written.

The request path only appends a tuple to an in-memory queue (bounded: when full, responses are counted as
dropped instead of slowing requests down). A background thread drains the queue, renders JSON lines and
appends them to a hidden in-progress file `.exposures-<host>-<pid>-<seq>.jsonl.inprogress`, which the
pipeline ignores (it reads only visible `*.jsonl` files). A file is published under its visible name
`exposures-<host>-<pid>-<seq>.jsonl` (fsync, then a no-overwrite link + unlink) when it reaches its size or
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
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson

from recsys_core.storage import fsync_dir

log = logging.getLogger(__name__)

IN_PROGRESS_SUFFIX = ".jsonl.inprogress"
# Published exposure files are named `exposures-<host>-<pid>-<seq>.jsonl`; the pipeline's gates tell the
# server's log from producer data by this prefix.
FILE_PREFIX = "exposures-"
# Orphaned in-progress files are looked for in the folders of this many recent days.
ORPHAN_SCAN_DAYS = 8
_UNSAFE_HOST = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True, slots=True)
class _Served:
    ts: float
    tenant: str
    surface: str
    session_id: str
    user_id: str | None
    request_id: str
    item_ids: tuple[str, ...]


class _OpenFile:
    def __init__(self, hidden: Path, final_dir: Path, seq: int, opened_at: float) -> None:
        self.hidden = hidden
        self.final_dir = final_dir
        self.seq = seq
        self.opened_at = opened_at
        self.handle = open(hidden, "ab")  # noqa: SIM115 - kept open across batches, closed on publish
        self.size = 0


class ExposureWriter:
    """Buffered, background, rotation-safe writer of exposure events into the raw landing layout."""

    def __init__(
        self,
        raw_root: Path,
        *,
        host: str | None = None,
        pid: int | None = None,
        max_bytes: int = 64 * 1024 * 1024,
        max_age_seconds: float = 300.0,
        flush_seconds: float = 0.5,
        max_pending: int = 100_000,
        max_bytes_per_day: int = 1 << 30,
    ) -> None:
        self.raw_root = Path(raw_root)
        self.host = _UNSAFE_HOST.sub("_", host or socket.gethostname()).strip("._-")[:64] or "host"
        self.pid = os.getpid() if pid is None else pid
        self.max_bytes = max_bytes
        self.max_age_seconds = max_age_seconds
        self.flush_seconds = flush_seconds
        self.max_pending = max_pending
        self.max_bytes_per_day = max_bytes_per_day
        # Event ids: this token, then a sequence number per written response, then the rank.
        self._id_token = secrets.token_hex(8)
        self._responses = 0
        self._capped_day: str | None = None
        self._queue: collections.deque[_Served] = collections.deque()
        self._files: dict[str, _OpenFile] = {}
        self._seq = 0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._io_lock = threading.Lock()
        # Counters for /metrics (responses and events).
        self.events_written = 0
        self.responses_dropped = 0
        self.events_over_cap = 0
        self.write_errors = 0
        self.files_published = 0

    # ------------------------------------------------------------------------------ request path

    def record(
        self,
        *,
        tenant: str,
        surface: str,
        session_id: str,
        user_id: str | None,
        request_id: str,
        item_ids: tuple[str, ...] | list[str],
        ts: float | None = None,
    ) -> bool:
        """Queue one served response (O(1), never blocks); False if the queue is full and it was dropped."""
        if len(self._queue) >= self.max_pending:
            self.responses_dropped += 1
            return False
        self._queue.append(
            _Served(
                time.time() if ts is None else ts,
                tenant,
                surface,
                session_id,
                user_id or None,
                request_id,
                tuple(item_ids),
            )
        )
        return True

    @property
    def pending(self) -> int:
        return len(self._queue)

    # ----------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="recsys-exposure-writer", daemon=True)
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
            log.exception("exposure log: publishing orphaned in-progress files failed")
        while not self._stop.is_set():
            self._wake.wait(self.flush_seconds)
            self._wake.clear()
            try:
                self.flush()
            except Exception:  # keep the thread alive; the failure is counted and logged
                self.write_errors += 1
                log.exception("exposure log: write failed")

    # ------------------------------------------------------------------------------- writing

    def _write_pending(self) -> None:
        if not self._queue:
            return
        self.raw_root.mkdir(parents=True, exist_ok=True)
        # Every writer on this raw root (the other workers, other servers on this machine) reads the
        # day's size on disk and appends under this lock, so that together they stay within the cap.
        with _locked_dir(self.raw_root):
            self._append_pending()

    def _append_pending(self) -> None:
        batches: dict[str, list[bytes]] = {}
        batch_bytes: dict[str, int] = {}
        day_bytes: dict[str, int] = {}
        queue = self._queue
        while queue:
            served = queue.popleft()
            if not served.item_ids:
                continue
            self._responses += 1
            moment = dt.datetime.fromtimestamp(served.ts, dt.UTC)
            day = moment.date().isoformat()
            if day not in day_bytes:
                day_bytes[day] = _exposure_bytes(self.raw_root / f"dt={day}")
            budget = self.max_bytes_per_day - day_bytes[day] - batch_bytes.get(day, 0)
            lines = self._render(served, moment) if budget > 0 else []
            size = sum(len(line) for line in lines)
            if not lines or size > budget:  # a response is logged whole or not at all
                self._over_cap(day, len(served.item_ids))
                continue
            batch_bytes[day] = batch_bytes.get(day, 0) + size
            batches.setdefault(day, []).extend(lines)
        if not batches:
            return
        for day in sorted(batches):
            data = b"".join(batches[day])
            handle = self._files.get(day) or self._open(day)
            try:
                handle.handle.write(data)
                handle.handle.flush()
            except OSError as exc:
                self.write_errors += 1
                log.error("exposure log: cannot write %s (%d events lost): %s", handle.hidden, len(data), exc)
                # Cut back to the last complete line so the file never holds a torn event.
                with contextlib.suppress(OSError):
                    handle.handle.truncate(handle.size)
                continue
            handle.size += len(data)
            self.events_written += len(batches[day])
        # A newer day has started: files of earlier days are complete (late events included).
        newest = max(batches)
        for day in [d for d in self._files if d < newest]:
            self._publish(day)

    def _render(self, served: _Served, moment: dt.datetime) -> list[bytes]:
        """The JSON lines of one served response, one per item."""
        ts = moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
        lines = []
        for rank, item_id in enumerate(served.item_ids):
            event = {
                "v": 1,
                "ts": ts,
                "tenant": served.tenant,
                "surface": served.surface,
                "session_id": served.session_id,
            }
            if served.user_id is not None:
                event["user_id"] = served.user_id
            event["item_id"] = item_id
            event["event_type"] = "exposure"
            event["rank"] = rank
            event["request_id"] = served.request_id
            event["event_id"] = f"x{self._id_token}-{self._responses}-{rank}"
            lines.append(orjson.dumps(event, option=orjson.OPT_APPEND_NEWLINE))
        return lines

    def _over_cap(self, day: str, events: int) -> None:
        if day != self._capped_day:
            self._capped_day = day
            log.warning(
                "exposure log: %s reached its cap of %d bytes (RECSYS_EXPOSURE_MAX_BYTES_PER_DAY); the day's "
                "further exposures are counted in recsys_exposure_events_over_cap_total, not written",
                day,
                self.max_bytes_per_day,
            )
        self.events_over_cap += events

    def _open(self, day: str) -> _OpenFile:
        folder = self.raw_root / f"dt={day}"
        folder.mkdir(parents=True, exist_ok=True)
        self._seq += 1
        hidden = folder / f".{FILE_PREFIX}{self.host}-{self.pid}-{self._seq}{IN_PROGRESS_SUFFIX}"
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
            final = folder / f"{FILE_PREFIX}{self.host}-{self.pid}-{seq}.jsonl"
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
        prefix = f".{FILE_PREFIX}{self.host}-"
        for offset in range(ORPHAN_SCAN_DAYS):
            folder = self.raw_root / f"dt={(today - dt.timedelta(days=offset)).isoformat()}"
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
                claimed = folder / f".{FILE_PREFIX}{self.host}-{self.pid}-{self._seq}.recovering"
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
                log.warning("exposure log: published orphaned file %s as %s", path.name, final.name)


def _exposure_bytes(folder: Path) -> int:
    """Size of the exposure files (published, in progress or being recovered) in a day's folder."""
    total = 0
    if folder.is_dir():
        for path in folder.glob(f"*{FILE_PREFIX}*"):
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
