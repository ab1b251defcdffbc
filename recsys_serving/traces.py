"""Decision traces written by the server: why each recommendation response held what it held.

For every recommendation response (or a share of them, `RECSYS_DECISION_SAMPLE_RATE`, chosen by the
request id so that a request is traced or not whatever the worker), the route renders one JSON line of
the contract in `recsys_core.decisions`: the request, the manifest, artifact and rules versions served,
the blend's candidates with their per-source scores, and the returned items with the ids of the rules that
touched them. Rendering there (some microseconds) keeps only bytes alive until the line is written, not
the response's objects. Off the request path, a `landing.LandingWriter` appends the lines to
`<raw root>/decisions/dt=YYYY-MM-DD/decisions-<host>-<pid>-<seq>.jsonl`, which the pipeline's `decisions`
asset lands in the lake.

The most recent traces are also kept in memory (`RECENT_TRACES`), so the audit endpoint finds a response
of a moment ago before the pipeline has landed it. Looked-up traces are given in the landed form
(`recsys_core.decisions.as_response`), so a trace read from memory and the same trace read from the lake
are equal.
"""

from __future__ import annotations

import collections
import datetime as dt
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import orjson

from recsys_core.decisions import DECISIONS, TRACE_VERSION, TraceError, as_response, parse_trace
from recsys_serving.landing import LandingWriter
from recsys_serving.recommender import Recommendation

# Traces kept in memory per worker, newest last, and queued for writing at most: each holds its response's
# candidates (up to 2 x 100 with their per-source shares, some 50 kB), so the bounds keep a worker's
# traces within a few hundred MB even then (a few MB at k = 10).
RECENT_TRACES = 2_000
MAX_PENDING_TRACES = 10_000
FILE_PREFIX = "decisions-"
_CRC_RANGE = 1 << 32


@dataclass(frozen=True, slots=True)
class Decision:
    """One traced response, as queued on the request path (references only, rendered later)."""

    ts: float
    request_id: str
    tenant: str
    surface: str
    user_id: str | None
    endpoint: str
    params: dict[str, Any]
    manifest_version: str
    artifacts: dict[str, str]
    result: Recommendation

    def trace(self) -> dict[str, Any]:
        """The trace in the landing files' shape (docs/reference/decisions.md)."""
        result = self.result
        rule_ids = result.rule_ids
        return {
            "v": TRACE_VERSION,
            "request_id": self.request_id,
            "ts": _iso(dt.datetime.fromtimestamp(self.ts, dt.UTC)),
            "tenant": self.tenant,
            "surface": self.surface,
            "user_id": self.user_id,
            "endpoint": self.endpoint,
            "params": self.params,
            "manifest_version": self.manifest_version,
            "artifacts": self.artifacts,
            "rules_version": result.rules_version,
            "candidates": [
                {"item_id": item, "score": score, "sources": sources}
                for item, score, sources in zip(
                    result.candidate_ids,
                    result.candidate_scores,
                    result.candidate_contributions,
                    strict=True,
                )
            ],
            "items": [
                {"item_id": item, "score": score, "rule_ids": rule_ids[n] if rule_ids else []}
                for n, (item, score) in enumerate(zip(result.item_ids, result.scores, strict=True))
            ],
        }


class _Trace(NamedTuple):
    """A rendered trace as kept in memory and queued for the landing files.

    Strings, a float and bytes only, one object per trace for the garbage collector: keeping the responses
    themselves (their lists and dicts, some fifty objects each) for a while had them promoted to the oldest
    generation and rescanned, which cost about a third of the request path's time.
    """

    ts: float
    tenant: str
    surface: str
    request_id: str
    user_id: str | None
    line: bytes


class DecisionWriter(LandingWriter[_Trace]):
    """Queues the traces of sampled responses, keeps the recent ones in memory, writes them to landing."""

    FILE_PREFIX = FILE_PREFIX
    LOG_NAME = "decision log"
    RECORDS = "traces"
    CAP_VARIABLE = "RECSYS_DECISION_MAX_BYTES_PER_DAY"
    OVER_CAP_METRIC = "recsys_decision_traces_over_cap_total"

    def __init__(self, raw_root: Path, *, sample_rate: float = 1.0, **options: Any) -> None:
        super().__init__(Path(raw_root) / DECISIONS, **({"max_pending": MAX_PENDING_TRACES} | options))
        if not 0 <= sample_rate <= 1:
            raise ValueError(f"sample_rate must be from 0 to 1, got {sample_rate!r}")
        self.sample_rate = sample_rate
        self._threshold = int(sample_rate * _CRC_RANGE)
        self._recent: collections.deque[_Trace] = collections.deque(maxlen=RECENT_TRACES)

    def sampled(self, request_id: str) -> bool:
        """Whether the response to `request_id` is traced: a fixed share of request ids, the same ones on
        every worker and server."""
        if self._threshold >= _CRC_RANGE:
            return True
        return zlib.crc32(request_id.encode()) < self._threshold

    def record(self, decision: Decision) -> bool:
        """Render one traced response, keep it in memory and queue it for the landing zone (never
        blocks); False if the queue is full and it was not queued."""
        trace = _Trace(
            decision.ts,
            decision.tenant,
            decision.surface,
            decision.request_id,
            decision.user_id,
            orjson.dumps(decision.trace(), option=orjson.OPT_APPEND_NEWLINE),
        )
        self._recent.append(trace)
        return self._enqueue(trace)

    def recent(
        self,
        tenant: str,
        surface: str,
        *,
        request_id: str | None = None,
        user_id: str | None = None,
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
    ) -> Iterator[dict[str, Any]]:
        """The traces kept in memory that match, newest first, in the landed form."""
        start = since.timestamp() if since is not None else None
        end = until.timestamp() if until is not None else None
        for trace in reversed(list(self._recent)):
            if (
                trace.tenant == tenant
                and trace.surface == surface
                and (request_id is None or trace.request_id == request_id)
                and (user_id is None or trace.user_id == user_id)
                and (start is None or trace.ts >= start)
                and (end is None or trace.ts < end)
            ):
                yield landed_form(trace.ts, trace.line)

    def _lines_of(self, record: _Trace) -> int:
        return 1

    def _render(self, record: _Trace, moment: dt.datetime) -> list[bytes]:
        return [record.line]


def landed_form(ts: float, line: bytes) -> dict[str, Any]:
    """The trace `line` of time `ts` as the lake gives it back (`find_decisions`): canonical params, sorted
    maps, rules applied. A trace the landing would quarantine is given as written."""
    day = dt.datetime.fromtimestamp(ts, dt.UTC).date()
    try:
        return as_response(parse_trace(line.rstrip(b"\n"), day, sys.maxsize))
    except TraceError:
        written: dict[str, Any] = orjson.loads(line)
        return written


def _iso(moment: dt.datetime) -> str:
    """UTC with microseconds, as the lake gives times back (isoformat: a third of strftime's cost)."""
    return moment.isoformat(timespec="microseconds").removesuffix("+00:00") + "Z"
