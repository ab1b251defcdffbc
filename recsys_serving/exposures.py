"""Exposure log: what the API served, appended as raw contract-v1 events the pipeline ingests.

Each recommendation response becomes one `exposure` event per returned item (fields `v, ts, tenant,
surface, session_id, user_id, item_id, event_type, rank, request_id, event_id`; `rank` 0 = first shown) in
the raw landing folder of the event's UTC day, `<raw root>/dt=YYYY-MM-DD/`, in files named
`exposures-<host>-<pid>-<seq>.jsonl`. The `event_id` is made by the server (a random token of the writer,
the response's sequence number, the rank), never from what the client sent: repeated identical requests
are distinct exposures, not duplicates for the pipeline's gates.

The writing (off the request path, the daily cap `max_bytes_per_day`, rotation, orphans) is
`landing.LandingWriter`'s.
"""

from __future__ import annotations

import datetime as dt
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from recsys_serving.landing import IN_PROGRESS_SUFFIX, LandingWriter

__all__ = ["FILE_PREFIX", "IN_PROGRESS_SUFFIX", "ExposureWriter"]

# Published exposure files are named `exposures-<host>-<pid>-<seq>.jsonl`; the pipeline's gates tell the
# server's log from producer data by this prefix.
FILE_PREFIX = "exposures-"


@dataclass(frozen=True, slots=True)
class _Served:
    ts: float
    tenant: str
    surface: str
    session_id: str
    user_id: str | None
    request_id: str
    item_ids: tuple[str, ...]


class ExposureWriter(LandingWriter[_Served]):
    """Buffered, background, rotation-safe writer of exposure events into the raw landing layout."""

    FILE_PREFIX = FILE_PREFIX
    LOG_NAME = "exposure log"
    RECORDS = "exposures"
    CAP_VARIABLE = "RECSYS_EXPOSURE_MAX_BYTES_PER_DAY"
    OVER_CAP_METRIC = "recsys_exposure_events_over_cap_total"

    def __init__(self, raw_root: Path, **options: Any) -> None:
        super().__init__(raw_root, **options)
        # Event ids: this token, then a sequence number per written response, then the rank.
        self._id_token = secrets.token_hex(8)

    @property
    def raw_root(self) -> Path:
        return self.root

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
        return self._enqueue(
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

    def _lines_of(self, record: _Served) -> int:
        return len(record.item_ids)

    def _render(self, record: _Served, moment: dt.datetime) -> list[bytes]:
        """The JSON lines of one served response, one per item."""
        ts = moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
        lines = []
        for rank, item_id in enumerate(record.item_ids):
            event = {
                "v": 1,
                "ts": ts,
                "tenant": record.tenant,
                "surface": record.surface,
                "session_id": record.session_id,
            }
            if record.user_id is not None:
                event["user_id"] = record.user_id
            event["item_id"] = item_id
            event["event_type"] = "exposure"
            event["rank"] = rank
            event["request_id"] = record.request_id
            event["event_id"] = f"x{self._id_token}-{self._records}-{rank}"
            lines.append(orjson.dumps(event, option=orjson.OPT_APPEND_NEWLINE))
        return lines
