"""`recsys serve`: run the API with uvicorn (the app is built by `create_app` in every worker process).

uvicorn itself never closes a connection that sends nothing, or sends its request headers slowly: enough
such connections take every file descriptor of the process, and with them new connections and hot reload.
The guarded protocols here close a connection whose request headers are not complete within a time
limit, and any connection beyond the limit on open connections as soon as it is accepted. A reverse proxy
in front of the server remains the place for per-client limits
(docs/reference/http-api.md#connection-limits).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import resource
import shutil
import signal
import tempfile
from collections.abc import Iterator
from typing import Any, cast

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from recsys_core.settings import Settings, load_settings

APP_FACTORY = "recsys_serving.app:create_app"
# Request headers larger than this are refused (400) and the connection closed: headers are buffered
# until complete, so without a limit a client could fill the memory within the header timeout.
MAX_HEADER_BYTES = 64 * 1024
# File descriptors kept for the server's own files (artifacts being loaded, the exposure log, logs)
# when the connection limit is fitted under the process's open-file limit.
RESERVED_FDS = 256
# The variable that puts prometheus_client in multiprocess mode, read when a process first imports it (so
# this module does not import it): the directory where the workers of one server share their metrics.
MULTIPROCESS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"

log = logging.getLogger(__name__)


class _HeaderDeadline(asyncio.Protocol):
    """A deadline for request headers and a cap on connections, over either of uvicorn's HTTP/1.1
    protocols (listed first among the bases, so that its methods wrap theirs).

    The deadline runs from the moment a connection is accepted and from the first byte of every further
    request on it; between requests uvicorn's keep-alive timeout applies. A request's headers are complete
    when the protocol starts its request-response cycle. Connections beyond `limit_concurrency` are closed
    at once (uvicorn itself would keep them open and answer their requests 503).
    """

    # Set by uvicorn's protocols.
    config: Any
    connections: Any
    cycle: Any
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport

    def __init__(self, *args: Any, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self.header_deadline: asyncio.TimerHandle | None = None
        self.header_bytes = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        limit = self.config.limit_concurrency
        if limit is not None and len(self.connections) > limit:
            transport.close()
            return
        self._arm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.header_deadline is None and (self.cycle is None or self.cycle.response_complete):
            self._arm_header_deadline()  # the first bytes of a further request
        cycle = self.cycle
        super().data_received(data)
        if self.cycle is not cycle:
            self._cancel_header_deadline()
        elif self.header_deadline is not None:
            self.header_bytes += len(data)
            if self.header_bytes > MAX_HEADER_BYTES and not self.transport.is_closing():
                self._cancel_header_deadline()
                cast(Any, self).send_400_response("Request headers too large.")

    def _arm_header_deadline(self) -> None:
        self.header_bytes = 0
        self.header_deadline = self.loop.call_later(self.header_timeout, self._headers_too_late)

    def _cancel_header_deadline(self) -> None:
        if self.header_deadline is not None:
            self.header_deadline.cancel()
            self.header_deadline = None

    def _headers_too_late(self) -> None:
        self.header_deadline = None
        if not self.transport.is_closing():
            self.transport.close()


class GuardedH11Protocol(_HeaderDeadline, H11Protocol):
    """uvicorn's h11 protocol with the header deadline and the connection cap."""


try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # the API-only install has no httptools: h11, as uvicorn's own default would be
    GUARDED_PROTOCOL: type[_HeaderDeadline] = GuardedH11Protocol
else:

    class GuardedHttpToolsProtocol(_HeaderDeadline, HttpToolsProtocol):
        """uvicorn's httptools protocol (its faster default) with the header deadline and connection cap."""

    GUARDED_PROTOCOL = GuardedHttpToolsProtocol


def connection_limit(configured: int) -> int:
    """`configured`, lowered to leave RESERVED_FDS of the process's open-file limit for its own files."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or configured <= soft - RESERVED_FDS:
        return configured
    fitted = max(1, soft - RESERVED_FDS)
    log.warning(
        "RECSYS_SERVE_MAX_CONNECTIONS=%d does not fit the open-file limit of %d (ulimit -n) with %d kept for "
        "the server's own files: serving at most %d connections",
        configured,
        soft,
        RESERVED_FDS,
        fitted,
    )
    return fitted


def serve(
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: int | None = None,
    *,
    settings: Settings | None = None,
    log_level: str = "info",
    access_log: bool = False,
) -> None:
    """Serve the API until stopped (SIGINT or SIGTERM); settings come from the environment
    (`load_settings`) unless given.

    `workers` (default: `settings.serve_workers`) processes share the listening socket; each loads the
    artifacts, polls the manifests and writes its own exposure files. Their metrics meet in a private
    temporary directory (`metrics.shared_metrics_dir`), removed when the server stops. On SIGTERM or
    SIGINT the server stops accepting connections, lets in-flight requests finish for up to
    `settings.serve_shutdown_grace_seconds`, then publishes the exposure log, and returns.
    The access log is off by default: it costs a large share of throughput, and /metrics plus the
    X-Request-Id of every response cover it.
    """
    settings = settings or load_settings()
    workers = settings.serve_workers if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be 0-65535, got {port}")
    protocol = functools.partial(GUARDED_PROTOCOL, header_timeout=settings.serve_header_timeout_seconds)
    with _worker_metrics_dir(workers), _sigterm_stops_gracefully():
        uvicorn.run(
            APP_FACTORY,
            factory=True,
            host=host,
            port=port,
            workers=workers,
            log_level=log_level,
            access_log=access_log,
            # uvicorn calls the protocol factory like a protocol class (and pickles it for each worker).
            http=cast(type[asyncio.Protocol], protocol),
            limit_concurrency=connection_limit(settings.serve_max_connections),
            timeout_keep_alive=settings.serve_keep_alive_seconds,
            timeout_graceful_shutdown=settings.serve_shutdown_grace_seconds,
        )


@contextlib.contextmanager
def _worker_metrics_dir(workers: int) -> Iterator[None]:
    """With several workers, a fresh directory for their shared metrics, named by the variable that
    prometheus_client reads when a worker process first imports it; removed afterwards. A process serving
    alone keeps its metrics in memory, whatever the environment says."""
    previous = os.environ.pop(MULTIPROCESS_DIR_VARIABLE, None)
    directory = tempfile.mkdtemp(prefix="recsys-serve-metrics-") if workers > 1 else None
    if directory is not None:
        os.environ[MULTIPROCESS_DIR_VARIABLE] = directory
    try:
        yield
    finally:
        if directory is not None:
            del os.environ[MULTIPROCESS_DIR_VARIABLE]
            shutil.rmtree(directory, ignore_errors=True)
        if previous is not None:
            os.environ[MULTIPROCESS_DIR_VARIABLE] = previous


@contextlib.contextmanager
def _sigterm_stops_gracefully() -> Iterator[None]:
    """SIGTERM as Ctrl-C: a graceful stop and a normal return.

    A single uvicorn server handles SIGTERM gracefully, then raises it again once it has stopped, which
    with the default disposition would kill the process (exit status 143, not 0). As KeyboardInterrupt it
    is swallowed by `uvicorn.run`, as Ctrl-C is. (The supervisor of several workers handles SIGTERM
    itself, stopping each worker with SIGTERM, and returns.)
    """
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
