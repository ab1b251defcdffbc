"""Alert sinks: where freshness and run-failure alerts go (log, a JSONL file, or a webhook).

Chosen with RECSYS_ALERT_SINK: `log` (default), `file` (= $RECSYS_HOME/alerts.jsonl), `file:PATH`, or an
`http(s)://` URL that receives each alert as a JSON POST. No Dagster import: the sensors call this.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

logger = logging.getLogger("recsys.alerts")


@dataclass(frozen=True)
class Alert:
    kind: str  # "stale", "recovered" or "run_failure"
    subject: str  # the asset key or the job name
    message: str
    details: dict[str, Any] = field(default_factory=dict)
    at: str = field(default_factory=lambda: dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))


class AlertSink(Protocol):
    def send(self, alert: Alert) -> None: ...


class LogSink:
    def send(self, alert: Alert) -> None:
        level = logging.INFO if alert.kind == "recovered" else logging.ERROR
        logger.log(level, "[%s] %s: %s", alert.kind, alert.subject, alert.message)


class FileSink:
    """Appends one JSON object per alert; safe for concurrent writers (one write per line, O_APPEND)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def send(self, alert: Alert) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(asdict(alert), sort_keys=True) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)


class WebhookSink:
    def __init__(self, url: str, timeout: float = 5.0) -> None:
        self.url = url
        self.timeout = timeout

    def send(self, alert: Alert) -> None:
        body = json.dumps(asdict(alert)).encode()
        request = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                response.read()
        except (urllib.error.URLError, TimeoutError) as exc:
            # An unreachable webhook must not hide the alert: fall back to the log.
            logger.error("alert webhook %s failed (%s); alert was: %s", self.url, exc, alert.message)
            raise


def sink_from_spec(spec: str, home: Path) -> AlertSink:
    """Parse RECSYS_ALERT_SINK; a bad value is an error rather than silently dropped alerts."""
    if spec in ("", "log"):
        return LogSink()
    if spec == "file":
        return FileSink(home / "alerts.jsonl")
    if spec.startswith("file:"):
        return FileSink(Path(spec.removeprefix("file:")).expanduser().absolute())
    if spec.startswith(("http://", "https://")):
        return WebhookSink(spec)
    raise ValueError(f"RECSYS_ALERT_SINK: expected log, file, file:PATH or an http(s) URL, got {spec!r}")
