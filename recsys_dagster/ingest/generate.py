"""Synthetic contract-v1 event generator.

Writes realistic raw events (JSON lines) into the landing layout ``<raw root>/dt=YYYY-MM-DD/`` so the
pipeline can be exercised at any scale without real data. The traffic model is deliberately simple but has
the shapes that matter downstream: Zipf-like item popularity, heavy and light users coming back over days,
sessions of varying length, ranked requests of 10 exposures followed by a funnel of clicks, add-to-carts
and purchases, users whose clicks follow a taste (a group of items they prefer), anonymous sessions, client-retry duplicates and late arrivals; optionally, malformed lines of
the kinds real producers send, mixed in (each breaks one contract rule, so its quarantine reason is known).

Everything is generated in vectorised numpy chunks and rendered to text with polars string kernels, so
memory stays bounded (one chunk at a time) and 10M events take seconds, not minutes. Output is a pure
function of the arguments: each chunk draws from its own random stream keyed by (seed, day, chunk).
"""

from __future__ import annotations

import datetime as dt
import functools
import math
import os
import re
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from recsys_core.names import validate_name

__all__ = ["GenerateReport", "generate_events"]

# At most this many lines are simulated and written at once; one chunk becomes one file, which keeps every
# file well under the 1,000,000-line limit of the landing layout.
CHUNK_LINES = 500_000

EXPOSURES_PER_REQUEST = 10
# Position bias: the first slots get clicked far more often than the last ones.
CLICK_RATE_BY_RANK = 0.10 / (1.0 + 0.35 * np.arange(EXPOSURES_PER_REQUEST))
# Tastes: every user and every item belongs to one of TASTES groups; a known user clicks an exposed item of
# their own group TASTE_AFFINITY times as often as the rank alone says, an item of another group a fraction
# of that (the two keep the overall click rate about the same). Without this, what a user clicks would
# depend on nothing but popularity and rank, and no personalised model could beat the popular list.
TASTES = 12
TASTE_AFFINITY = 8.0
_OTHER_TASTE_AFFINITY = (TASTES - TASTE_AFFINITY) / (TASTES - 1)
CART_RATE_GIVEN_CLICK = 0.12
PURCHASE_RATE_GIVEN_CART = 0.35
ANONYMOUS_SESSION_RATE = 0.03
DUPLICATE_LINE_RATE = 0.001
LATE_EVENT_RATE = 0.005
# Late events are buffered on a client (app in background, flaky network) and sent the next day.
MAX_LATENESS_MS = 6 * 3_600_000
ITEM_ZIPF_EXPONENT = 1.05
USER_ZIPF_EXPONENT = 0.9
# Mean requests per session is about exp(mu + sigma^2 / 2) ~ 3, with a long tail of long sessions.
SESSION_REQUESTS_MU = 0.65
SESSION_REQUESTS_SIGMA = 0.9
MAX_REQUESTS_PER_SESSION = 60
MEAN_REQUEST_GAP_MS = 40_000
# Expected events per session, used only to size the first simulation batch of a chunk.
_EVENTS_PER_SESSION_GUESS = 30.0

# Relative traffic per UTC hour: quiet nights, a lunch bump, an evening peak.
_HOURLY_TRAFFIC = np.array(
    [3, 2, 1.5, 1, 1, 1.5, 3, 5, 6, 6, 6.5, 7, 8, 7.5, 7, 7, 7.5, 8.5, 10, 11, 11, 9, 7, 5], dtype=np.float64
)
_HOURLY_CDF = np.concatenate([[0.0], np.cumsum(_HOURLY_TRAFFIC) / _HOURLY_TRAFFIC.sum()])

_DAY_MS = 86_400_000
_EVENT_TYPES = ("exposure", "click", "add_to_cart", "purchase")
_CLICK, _PURCHASE = _EVENT_TYPES.index("click"), _EVENT_TYPES.index("purchase")


@dataclass(frozen=True)
class GenerateReport:
    """What `generate_events` wrote. Counts are lines, client-retry duplicates included."""

    files: tuple[Path, ...]
    events_per_day: dict[str, int]
    total_events: int
    duplicate_lines: int
    late_events: int
    # Malformed lines written, by the quarantine reason each must get (not counted in the events).
    malformed_lines: dict[str, int]


@dataclass(frozen=True)
class _Tables:
    """Per-run lookup tables: sampling CDFs and pre-rendered JSON fragments gathered by index."""

    item_cdf: np.ndarray
    item_of_rank: np.ndarray
    user_cdf: np.ndarray
    user_of_rank: np.ndarray
    n_tenants: int
    n_surfaces: int
    item_json: pl.Series
    user_json: pl.Series
    price_json: pl.Series
    scope_json: pl.Series
    type_json: pl.Series
    rank_json: pl.Series
    hms: pl.Series
    millis: pl.Series


@dataclass
class _Events:
    """Column arrays of simulated events; session and request indices are local to one chunk."""

    session: np.ndarray
    request: np.ndarray
    ts: np.ndarray
    etype: np.ndarray
    item: np.ndarray
    rank: np.ndarray

    def take(self, idx: np.ndarray) -> _Events:
        return _Events(*(a[idx] for a in self._arrays()))

    def _arrays(self) -> tuple[np.ndarray, ...]:
        return (self.session, self.request, self.ts, self.etype, self.item, self.rank)

    @staticmethod
    def concat(parts: Sequence[_Events]) -> _Events:
        return _Events(*(np.concatenate(cols) for cols in zip(*(p._arrays() for p in parts), strict=True)))

    def __len__(self) -> int:
        return len(self.ts)


@dataclass
class _Sessions:
    """Per-session (tenant, user) and per-request (session, surface) attributes of one chunk."""

    tenant: np.ndarray
    user: np.ndarray  # -1 = anonymous
    request_session: np.ndarray
    request_surface: np.ndarray

    @staticmethod
    def concat(parts: Sequence[_Sessions]) -> _Sessions:
        """Concatenate, renumbering each part's sessions to follow the previous parts'."""
        offsets = np.cumsum([0] + [len(p.user) for p in parts[:-1]])
        return _Sessions(
            np.concatenate([p.tenant for p in parts]),
            np.concatenate([p.user for p in parts]),
            np.concatenate([p.request_session + off for p, off in zip(parts, offsets, strict=True)]),
            np.concatenate([p.request_surface for p in parts]),
        )


def generate_events(
    raw_root: Path,
    *,
    end_date: dt.date,
    days: int = 14,
    events_per_day: int = 100_000,
    seed: int = 42,
    tenants: Sequence[str] = ("demo",),
    surfaces: Sequence[str] = ("home",),
    n_users: int = 20_000,
    n_items: int = 5_000,
    malformed_per_day: int = 0,
    progress: Callable[[str], None] | None = None,
) -> GenerateReport:
    """Write `days` days of synthetic contract-v1 events ending at `end_date` (inclusive).

    Each day D gets exactly `events_per_day` event lines in ``raw_root/dt=D/events-NNNNN.jsonl`` (D is the
    arrival day: about 0.5% of them carry a `ts` from the evening before), plus `malformed_per_day`
    malformed lines at random places (copies of event lines broken in one way each, see `MALFORMATIONS`).
    Files are replaced atomically; generator files of an earlier, larger run of the same day are removed so
    the folder matches this run.
    """
    if days < 1:
        raise ValueError(f"days must be >= 1, got {days}")
    if events_per_day < 0:
        raise ValueError(f"events_per_day must be >= 0, got {events_per_day}")
    if malformed_per_day < 0:
        raise ValueError(f"malformed_per_day must be >= 0, got {malformed_per_day}")
    if malformed_per_day and not events_per_day:
        raise ValueError("malformed lines are copies of event lines: events_per_day must be > 0")
    if n_users < 1:
        raise ValueError(f"n_users must be >= 1, got {n_users}")
    if n_items < EXPOSURES_PER_REQUEST:
        raise ValueError(f"n_items must be >= {EXPOSURES_PER_REQUEST} (one request shows that many items)")
    for kind, names in (("tenant", tenants), ("surface", surfaces)):
        if not names:
            raise ValueError(f"at least one {kind} is required")
        for name in names:
            # Names are spliced into JSON unescaped, so they must be plain identifiers (contract rule too).
            validate_name(kind, name)

    tables = _build_tables(seed, tuple(tenants), tuple(surfaces), n_users, n_items)
    raw_root = Path(raw_root)
    files: list[Path] = []
    per_day: dict[str, int] = {}
    duplicates = late = 0
    malformed: dict[str, int] = {}
    # One background writer overlaps file output with simulating the next chunk (both release the GIL);
    # waiting for the previous write before submitting the next keeps at most two chunks in memory.
    with ThreadPoolExecutor(max_workers=1) as writer:
        pending: Future[None] | None = None
        for offset in range(days - 1, -1, -1):
            day = end_date - dt.timedelta(days=offset)
            day_dir = raw_root / f"dt={day.isoformat()}"
            day_dir.mkdir(parents=True, exist_ok=True)
            n_chunks = math.ceil(events_per_day / CHUNK_LINES)
            day_files = []
            for chunk in range(n_chunks):
                n_lines = events_per_day // n_chunks + (1 if chunk < events_per_day % n_chunks else 0)
                rng = np.random.default_rng([seed, day.toordinal(), chunk])
                lines, n_dup, n_late = _chunk_lines(rng, tables, day, chunk, n_chunks, n_lines)
                n_bad = malformed_per_day // n_chunks + (1 if chunk < malformed_per_day % n_chunks else 0)
                if n_bad:
                    lines, reasons = _mix_in_malformed(rng, lines, n_bad)
                    for reason in reasons:
                        malformed[reason] = malformed.get(reason, 0) + 1
                path = day_dir / f"events-{chunk:05d}.jsonl"
                if pending is not None:
                    pending.result()
                pending = writer.submit(_write_atomic, path, lines)
                day_files.append(path)
                duplicates += n_dup
                late += n_late
            if pending is not None:
                # The day is complete (and reported) only once its last file is in place.
                pending.result()
                pending = None
            _remove_stale_files(day_dir, n_chunks)
            files.extend(day_files)
            per_day[day.isoformat()] = events_per_day
            if progress is not None:
                progress(f"{day.isoformat()}: {events_per_day:,} events in {len(day_files)} file(s)")
    return GenerateReport(
        files=tuple(files),
        events_per_day=per_day,
        total_events=events_per_day * days,
        duplicate_lines=duplicates,
        late_events=late,
        malformed_lines=dict(sorted(malformed.items())),
    )


def _build_tables(
    seed: int, tenants: tuple[str, ...], surfaces: tuple[str, ...], n_users: int, n_items: int
) -> _Tables:
    rng = np.random.default_rng([seed, 0x7AB1E5])
    item_w = 1.0 / np.arange(1, n_items + 1, dtype=np.float64) ** ITEM_ZIPF_EXPONENT
    user_w = 1.0 / np.arange(1, n_users + 1, dtype=np.float64) ** USER_ZIPF_EXPONENT
    # Prices in cents, log-normal around 25.00, kept as integers so they render without float noise.
    cents = np.clip(np.exp(rng.normal(math.log(2500), 0.9, n_items)), 99, 99_999).astype(np.int64)
    item_width = max(6, len(str(n_items - 1)))
    user_width = max(5, len(str(n_users - 1)))
    return _Tables(
        item_cdf=np.cumsum(item_w) / item_w.sum(),
        # Popularity rank -> item index, shuffled so popular items are not simply the lowest ids.
        item_of_rank=rng.permutation(n_items).astype(np.int32),
        user_cdf=np.cumsum(user_w) / user_w.sum(),
        user_of_rank=rng.permutation(n_users).astype(np.int32),
        n_tenants=len(tenants),
        n_surfaces=len(surfaces),
        item_json=pl.Series([f',"item_id":"i{i:0{item_width}d}"' for i in range(n_items)]),
        # The last slot of user, price and rank tables is "" for events without that field.
        user_json=pl.Series([f',"user_id":"u{u:0{user_width}d}"' for u in range(n_users)] + [""]),
        price_json=pl.Series([f',"value":{c // 100}.{c % 100:02d}' for c in cents.tolist()] + [""]),
        scope_json=pl.Series([f',"tenant":"{t}","surface":"{s}"' for t in tenants for s in surfaces]),
        type_json=pl.Series([f',"event_type":"{t}"' for t in _EVENT_TYPES]),
        rank_json=pl.Series([f',"rank":{r}' for r in range(EXPOSURES_PER_REQUEST)] + [""]),
        hms=_clock_text()[0],
        millis=_clock_text()[1],
    )


@functools.cache
def _clock_text() -> tuple[pl.Series, pl.Series]:
    """'THH:MM:SS.' for every second of a day and 'mmmZ"' for every millisecond, gathered by index."""
    hms = [f"T{h:02d}:{m:02d}:{s:02d}." for h in range(24) for m in range(60) for s in range(60)]
    return pl.Series(hms), pl.Series([f'{ms:03d}Z"' for ms in range(1000)])


def _sample(rng: np.random.Generator, cdf: np.ndarray, size: int | tuple[int, ...]) -> np.ndarray:
    """Draw popularity ranks from a discrete distribution given by its CDF (inverse transform)."""
    idx = np.searchsorted(cdf, rng.random(size), side="right")
    return np.minimum(idx, len(cdf) - 1)


def _diurnal_ms(u: np.ndarray) -> np.ndarray:
    """Map uniforms in [0, 1) to a millisecond of the day following the hourly traffic profile."""
    hour = np.searchsorted(_HOURLY_CDF, u, side="right") - 1
    frac = (u - _HOURLY_CDF[hour]) / (_HOURLY_CDF[hour + 1] - _HOURLY_CDF[hour])
    return ((hour + frac) * 3_600_000).astype(np.int64)


def _simulate_batch(
    rng: np.random.Generator, tables: _Tables, starts: np.ndarray
) -> tuple[_Events, _Sessions, np.ndarray]:
    """Simulate one session per start time; returns events, session attributes, events per session."""
    n_sessions = len(starts)
    n_req = np.clip(
        np.rint(rng.lognormal(SESSION_REQUESTS_MU, SESSION_REQUESTS_SIGMA, n_sessions)),
        1,
        MAX_REQUESTS_PER_SESSION,
    ).astype(np.int64)
    anonymous = rng.random(n_sessions) < ANONYMOUS_SESSION_RATE
    users = tables.user_of_rank[_sample(rng, tables.user_cdf, n_sessions)]
    # Requests: a session's requests follow each other with exponential think times.
    req_session = np.repeat(np.arange(n_sessions, dtype=np.int32), n_req)
    n_requests = len(req_session)
    sessions = _Sessions(
        tenant=rng.integers(0, tables.n_tenants, n_sessions),
        user=np.where(anonymous, -1, users),
        request_session=req_session,
        request_surface=rng.integers(0, tables.n_surfaces, n_requests),
    )
    gaps = rng.exponential(MEAN_REQUEST_GAP_MS, n_requests).astype(np.int64) + 500
    first = np.concatenate([[0], np.cumsum(n_req)[:-1]])
    gaps[first] = 0
    csum = np.cumsum(gaps)
    req_ts = starts[req_session] + csum - csum[first][req_session]

    # Exposures: 10 distinct popularity-weighted items per request. Sorting the sampled popularity ranks
    # and forcing them strictly increasing makes them distinct without a per-row rejection loop.
    k = EXPOSURES_PER_REQUEST
    pop = np.sort(_sample(rng, tables.item_cdf, (n_requests, k)), axis=1)
    slot = np.arange(k)
    pop = np.maximum.accumulate(pop - slot, axis=1) + slot
    pop = np.minimum(pop, len(tables.item_cdf) - k + slot)
    pop = np.take_along_axis(pop, rng.random((n_requests, k)).argsort(axis=1), axis=1)
    exp_item = tables.item_of_rank[pop.ravel()]
    exp_req = np.repeat(np.arange(n_requests, dtype=np.int32), k)
    exp_rank = np.tile(slot.astype(np.int8), n_requests)
    exp_ts = req_ts[exp_req]

    viewer = sessions.user[req_session[exp_req]]
    affinity = np.where(
        viewer < 0,
        1.0,
        np.where(viewer % TASTES == exp_item % TASTES, TASTE_AFFINITY, _OTHER_TASTE_AFFINITY),
    )
    clicked = rng.random(n_requests * k) < CLICK_RATE_BY_RANK[exp_rank] * affinity
    clk_req, clk_item, clk_rank = exp_req[clicked], exp_item[clicked], exp_rank[clicked]
    clk_ts = exp_ts[clicked] + 1_000 + rng.exponential(8_000, len(clk_req)).astype(np.int64)

    carted = rng.random(len(clk_req)) < CART_RATE_GIVEN_CLICK
    cart_req, cart_item = clk_req[carted], clk_item[carted]
    cart_ts = clk_ts[carted] + 2_000 + rng.exponential(30_000, len(cart_req)).astype(np.int64)

    bought = rng.random(len(cart_req)) < PURCHASE_RATE_GIVEN_CART
    buy_req, buy_item = cart_req[bought], cart_item[bought]
    buy_ts = cart_ts[bought] + 5_000 + rng.exponential(120_000, len(buy_req)).astype(np.int64)

    request = np.concatenate([exp_req, clk_req, cart_req, buy_req])
    no_rank = np.full(len(cart_req) + len(buy_req), -1, dtype=np.int8)
    events = _Events(
        session=req_session[request],
        request=request,
        ts=np.concatenate([exp_ts, clk_ts, cart_ts, buy_ts]),
        etype=np.repeat(
            np.arange(4, dtype=np.int8), [len(exp_req), len(clk_req), len(cart_req), len(buy_req)]
        ),
        item=np.concatenate([exp_item, clk_item, cart_item, buy_item]),
        rank=np.concatenate([exp_rank, clk_rank, no_rank]),
    )
    return events, sessions, np.bincount(events.session, minlength=n_sessions)


def _simulate(
    rng: np.random.Generator,
    tables: _Tables,
    n_events: int,
    draw_starts: Callable[[int], np.ndarray],
    window_end_ms: int,
) -> tuple[_Events, _Sessions]:
    """Simulate whole sessions until `n_events` events exist, then keep exactly that many.

    Sessions are shifted earlier where needed so no event of theirs reaches `window_end_ms`: an event
    after midnight would belong to the next arrival day.
    """
    if n_events == 0:
        empty = np.empty(0, dtype=np.int64)
        return _Events(empty, empty, empty, empty.astype(np.int8), empty, empty), _Sessions(
            empty, empty, empty, empty
        )
    parts: list[tuple[_Events, _Sessions, np.ndarray]] = []
    total = 0
    while total < n_events:
        n_new = max(16, math.ceil((n_events - total) / _EVENTS_PER_SESSION_GUESS * 1.1))
        part = _simulate_batch(rng, tables, draw_starts(n_new))
        parts.append(part)
        total += len(part[0])
    # Renumber sessions and requests of later batches so indices stay unique within the chunk.
    ev_parts, sess_parts, counts = [], [], []
    s_off = r_off = 0
    for events, sessions, per_session in parts:
        events.session = events.session + s_off
        events.request = events.request + r_off
        s_off += len(per_session)
        r_off += len(sessions.request_surface)
        ev_parts.append(events)
        sess_parts.append(sessions)
        counts.append(per_session)
    events = _Events.concat(ev_parts)
    sessions = _Sessions.concat(sess_parts)
    per_session = np.concatenate(counts)

    # Keep whole sessions up to the one that crosses n_events, then that session's earliest events.
    ends = np.cumsum(per_session)
    last = int(np.searchsorted(ends, n_events))
    keep = events.session < last
    tail = np.flatnonzero(events.session == last)
    need = n_events - int(keep.sum())
    keep[tail[np.argsort(events.ts[tail], kind="stable")[:need]]] = True
    events = events.take(np.flatnonzero(keep))

    latest = np.full(s_off, np.iinfo(np.int64).min)
    np.maximum.at(latest, events.session, events.ts)
    overflow = np.maximum(latest - (window_end_ms - 1), 0)
    events.ts = events.ts - overflow[events.session]
    return events, sessions


def _chunk_lines(
    rng: np.random.Generator, tables: _Tables, day: dt.date, chunk: int, n_chunks: int, n_lines: int
) -> tuple[pl.Series, int, int]:
    """Simulate and render one chunk of an arrival day: (lines, duplicate lines, late events)."""
    day_start = int(dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp() * 1000)
    day_end = day_start + _DAY_MS
    # Capped so a tiny chunk still has an original for every repeat.
    n_dup = min(int(rng.binomial(n_lines, DUPLICATE_LINE_RATE)), n_lines // 2)
    n_events = n_lines - n_dup
    n_late = int(rng.binomial(n_events, LATE_EVENT_RATE))

    # Chunk c of C covers the c-th slice of the day's traffic (by quantile), so the numbered files of a
    # day are in time order like a real log shipper's output.
    def regular_starts(n: int) -> np.ndarray:
        return day_start + _diurnal_ms((chunk + rng.random(n)) / n_chunks)

    def late_starts(n: int) -> np.ndarray:
        return day_start - MAX_LATENESS_MS + (rng.random(n) * MAX_LATENESS_MS).astype(np.int64)

    regular, reg_sessions = _simulate(rng, tables, n_events - n_late, regular_starts, day_end)
    late, late_sessions = _simulate(rng, tables, n_late, late_starts, day_start)
    late.session = late.session + len(reg_sessions.user)
    late.request = late.request + len(reg_sessions.request_surface)
    events = _Events.concat([regular, late])
    sessions = _Sessions.concat([reg_sessions, late_sessions])

    # Lines are in arrival order. Regular events arrive as they happen; late ones show up at random
    # moments of this chunk's time slice.
    arrival = events.ts.copy()
    if n_late and len(regular):
        lo, hi = int(regular.ts.min()), int(regular.ts.max()) + 1
        arrival[len(regular) :] = rng.integers(lo, hi, n_late)
    order = np.argsort(arrival, kind="stable")

    # Client retries: a line is sent again a few lines later (it is an exact copy of the earlier line).
    if n_dup:
        src = rng.integers(0, n_events, n_dup)
        at = np.minimum(src + rng.integers(1, 20, n_dup), n_events - 1)
        order = np.concatenate([order, order[src]])[_order_with_inserts(n_events, after=at)]
    events = events.take(order)
    session_prefix = f"s{day:%Y%m%d}-{chunk}-"
    request_prefix = f"r{day:%Y%m%d}-{chunk}-"
    return _render(tables, events, sessions, day_start, session_prefix, request_prefix), n_dup, n_late


def _render(
    tables: _Tables,
    events: _Events,
    sessions: _Sessions,
    day_start: int,
    session_prefix: str,
    request_prefix: str,
) -> pl.Series:
    """Render events as compact JSON lines by gathering pre-rendered fragments (no per-row Python).

    Optional fields are gathered from a table slot holding "" when absent, so each line is one
    concatenation of gathered columns; request-level text (scope, session, user, request id) is rendered
    once per request rather than once per event.
    """
    n_requests = len(sessions.request_session)
    req_session = sessions.request_session
    session_text = pl.concat_str(
        [
            pl.lit(f',"session_id":"{session_prefix}'),
            pl.Series(np.arange(len(sessions.user))).cast(pl.String),
            pl.lit('"'),
            tables.user_json.gather(np.where(sessions.user < 0, len(tables.user_json) - 1, sessions.user)),
        ],
        ignore_nulls=False,
    )
    request_head = pl.concat_str(
        [
            tables.scope_json.gather(
                sessions.tenant[req_session] * tables.n_surfaces + sessions.request_surface
            ),
            pl.select(session_text).to_series().gather(req_session),
        ]
    )
    request_id = pl.concat_str(
        [
            pl.lit(f',"request_id":"{request_prefix}'),
            pl.Series(np.arange(n_requests)).cast(pl.String),
            pl.lit('"'),
        ]
    )
    # Slot r: the request's text with its request id (exposures, clicks); slot n + r: without (carts, buys).
    request_text = pl.select(pl.concat([pl.concat_str([request_head, request_id]), request_head])).to_series()

    # Late events are on the previous day, so dates come from a two-entry table around the arrival day.
    first_day = day_start // _DAY_MS - 1
    dates = pl.Series(
        [
            '{"v":1,"ts":"' + (dt.date(1970, 1, 1) + dt.timedelta(days=first_day + i)).isoformat()
            for i in range(2)
        ]
    )
    ts = events.ts
    is_purchase = events.etype == _PURCHASE
    frame = pl.DataFrame(
        {
            "date": dates.gather(ts // _DAY_MS - first_day),
            "hms": tables.hms.gather((ts // 1000) % 86_400),
            "ms": tables.millis.gather(ts % 1000),
            "request": request_text.gather(np.where(events.etype <= _CLICK, 0, n_requests) + events.request),
            "item": tables.item_json.gather(events.item),
            "etype": tables.type_json.gather(events.etype),
            "rank": tables.rank_json.gather(
                np.where(events.rank < 0, len(tables.rank_json) - 1, events.rank)
            ),
            "price": tables.price_json.gather(np.where(is_purchase, events.item, len(tables.price_json) - 1)),
        }
    )
    return frame.select(pl.concat_str([*frame.columns, pl.lit("}")]).alias("line")).to_series()


# How a copy of an event line is broken, by the quarantine reason that must result under the default
# ingest settings (a lateness window back to 2001 or an event type "hover" would let some through):
# `re.sub` steps (pattern, replacement) applied in order to the compact JSON that `_render` writes.
MALFORMATIONS: dict[str, tuple[tuple[str, str], ...]] = {
    "invalid_json": ((r',"[a-z_]+":[^,]*}$', ',"'),),  # cut off in the middle of a member
    "not_an_object": ((r"^(.*)$", r"[\1]"),),
    "bad_type": ((r'^\{"v":1,', '{"v":"1",'),),
    "unsupported_version": ((r'^\{"v":1,', '{"v":2,'),),
    "missing_field": ((r',"item_id":"[^"]*"', ""),),
    "empty_id": ((r'"session_id":"[^"]*"', '"session_id":"  "'),),
    "id_too_long": ((r'"item_id":"[^"]*"', '"item_id":"' + "x" * 300 + '"'),),
    "bad_identifier": ((r'"tenant":"([^"]*)"', r'"tenant":"\1/.."'),),
    "bad_ts": ((r'"ts":"[^"]*"', '"ts":"yesterday"'),),
    "ts_out_of_range": ((r'"ts":"[^"]*"', '"ts":"2001-01-01T00:00:00Z"'),),
    "unknown_event_type": ((r'"event_type":"[^"]*"', '"event_type":"hover"'),),
    "negative_rank": ((r',"rank":\d+', ""), (r"}$", ',"rank":-1}')),
}


def _mix_in_malformed(rng: np.random.Generator, lines: pl.Series, n_bad: int) -> tuple[pl.Series, list[str]]:
    """Insert `n_bad` broken copies of random lines at random places; returns the lines and the reasons."""
    names = list(MALFORMATIONS)
    reasons = [names[i] for i in rng.integers(0, len(names), n_bad)]
    copies = lines.gather(rng.integers(0, len(lines), n_bad)).to_list()
    for i, reason in enumerate(reasons):
        for pattern, replacement in MALFORMATIONS[reason]:
            copies[i] = re.sub(pattern, replacement, copies[i], count=1)
    after = rng.integers(-1, len(lines), n_bad)  # -1: before the first line
    mixed = pl.concat([lines, pl.Series(copies, dtype=pl.String)]).gather(
        _order_with_inserts(len(lines), after=after)
    )
    return mixed, reasons


def _order_with_inserts(n: int, *, after: np.ndarray) -> np.ndarray:
    """Indices into `n` items followed by `len(after)` extra ones that put extra j right after item
    `after[j]` (-1: before the first), extras at the same place in their own order."""
    keys = np.concatenate([np.arange(n) * 2, after * 2 + 1])
    return np.argsort(keys, kind="stable")


def _write_atomic(path: Path, lines: pl.Series) -> None:
    """Write lines to a hidden temporary file beside `path`, then rename it into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        pl.DataFrame({"line": lines}).write_csv(tmp, include_header=False, quote_style="never")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _remove_stale_files(day_dir: Path, n_written: int) -> None:
    """Remove generator files numbered beyond this run's, left by an earlier run with more events."""
    for path in day_dir.glob("events-*.jsonl"):
        match = re.fullmatch(r"events-(\d{5})\.jsonl", path.name)
        if match and int(match.group(1)) >= n_written:
            path.unlink()
