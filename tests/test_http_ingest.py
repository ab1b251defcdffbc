"""The ingestion API (POST /v1/events, POST /v1/admin/items) over a real HTTP server: off without
RECSYS_INGEST_TOKEN, the bearer token, accepted and rejected elements with the quarantine's reason codes,
the limits, durability before 202 (group commit), and end to end through `recsys run`: a batch retried by
the client lands in the lake once, posted catalog records are in the catalog asset."""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import polars as pl
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_serving import live_server

from recsys_cli import cli
from recsys_core.catalog import read_catalog
from recsys_core.event_contract import Rejection, validate_event
from recsys_core.settings import Settings, load_settings
from recsys_dagster.ingest.contract import PARSED_SCHEMA, validate_events
from recsys_serving import ingest
from recsys_serving.ingest import IngestLog, NotStored

TOKEN = "s3cret-ingest-token-0123456789abcdef"
AUTH = {"authorization": f"Bearer {TOKEN}"}
PROBLEM = "application/problem+json"
TODAY = dt.datetime.now(dt.UTC).date()
# The end-to-end test's server receives its requests a day ago: `recsys run` lands complete days only.
DAY = TODAY - dt.timedelta(days=1)


def settings_for(home: Path, **env: str) -> Settings:
    return load_settings(
        {
            "RECSYS_HOME": str(home),
            "RECSYS_START_DATE": DAY.isoformat(),
            "RECSYS_INGEST_TOKEN": TOKEN,
            **env,
        }
    )


def event(n: int, days_ago: int = 0, **fields: Any) -> dict[str, Any]:
    moment = dt.datetime.now(dt.UTC) - dt.timedelta(days=days_ago)
    return {
        "ts": moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "tenant": "shop",
        "surface": "home",
        "session_id": f"s{n % 7}",
        "user_id": f"u{n % 11}",
        "item_id": f"i{n % 13}",
        "event_type": "click",
        "event_id": f"e{n}",
        **fields,
    }


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def api(home: Path) -> Iterator[httpx.Client]:
    with live_server(settings_for(home)) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client


def test_without_a_token_the_ingestion_routes_do_not_exist(home: Path) -> None:
    settings = load_settings({"RECSYS_HOME": str(home), "RECSYS_START_DATE": TODAY.isoformat()})
    with live_server(settings) as url, httpx.Client(base_url=url) as client:
        assert client.post("/v1/events", json={"events": [event(1)]}, headers=AUTH).status_code == 404
        assert client.post("/v1/admin/items?tenant=shop", json={"items": []}, headers=AUTH).status_code == 404
        spec = client.get("/openapi.json").json()
    assert "/v1/events" not in spec["paths"] and "/v1/admin/items" not in spec["paths"]
    assert not (home / "raw").exists()


def test_a_missing_or_wrong_token_is_refused_and_never_logged(
    api: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": f"Basic {TOKEN}"}):
        for response in (
            api.post("/v1/events", json={"events": [event(1)]}, headers=headers),
            api.post("/v1/admin/items?tenant=shop", json={"items": []}, headers=headers),
        ):
            assert response.status_code == 401, headers
            assert response.headers["content-type"] == PROBLEM
            assert response.headers["www-authenticate"] == 'Bearer realm="recsys-ingest"'
            assert response.json()["code"] == "unauthorized"
    assert TOKEN not in caplog.text
    spec = api.get("/openapi.json").json()
    assert spec["paths"]["/v1/events"]["post"]["security"] == [{"ingestToken": []}]
    assert spec["components"]["securitySchemes"]["ingestToken"] == {"type": "http", "scheme": "bearer"}


def test_bad_bodies_and_too_many_events_are_problems(home: Path) -> None:
    settings = settings_for(home, RECSYS_INGEST_MAX_EVENTS="5", RECSYS_INGEST_MAX_BODY_BYTES="10000")
    with live_server(settings) as url, httpx.Client(base_url=url) as api:
        cases = [
            (api.post("/v1/events", content=b"{not json", headers=AUTH), 400, "invalid_json_body"),
            (api.post("/v1/events", json=[event(1)], headers=AUTH), 422, "invalid_body"),
            (api.post("/v1/events", json={"items": []}, headers=AUTH), 422, "invalid_body"),
            (
                api.post("/v1/events", json={"events": [event(n) for n in range(6)]}, headers=AUTH),
                413,
                "too_many_events",
            ),
            (
                api.post("/v1/events", json={"events": [event(1, item_id="i" * 20_000)]}, headers=AUTH),
                413,
                "body_too_large",
            ),
            (
                api.post("/v1/admin/items?tenant=a/b", json={"items": []}, headers=AUTH),
                422,
                "invalid_parameter",
            ),
            (api.post("/v1/admin/items", json={"items": []}, headers=AUTH), 422, "invalid_parameter"),
        ]
        for response, status, code in cases:
            assert (response.status_code, response.json()["code"]) == (status, code), response.text
            assert response.headers["content-type"] == PROBLEM
    assert not list((home / "raw").rglob("*.jsonl"))


def test_rejected_events_come_back_with_the_quarantine_reason_codes(api: httpx.Client, home: Path) -> None:
    bad = [
        event(1, v=2),
        event(2, item_id=None),
        event(3, session_id="  "),
        event(4, tenant="no/slash"),
        event(5, ts="yesterday"),
        event(6, ts="2001-01-01T00:00:00Z"),
        event(7, event_type="hover"),
        event(8, rank=-1),
        event(9, value="high"),
        "not an event",
    ]
    response = api.post("/v1/events", json={"events": [event(100), *bad, event(101)]}, headers=AUTH)
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["accepted"] == 2
    reasons = [(r["index"], r["reason"]) for r in body["rejected"]]
    assert reasons == [
        (1, "unsupported_version"),
        (2, "missing_field"),
        (3, "empty_id"),
        (4, "bad_identifier"),
        (5, "bad_ts"),
        (6, "ts_out_of_range"),
        (7, "unknown_event_type"),
        (8, "negative_rank"),
        (9, "bad_type"),
        (10, "not_an_object"),
    ]
    # 202 means on disk: the accepted lines are in the landing zone already (in the in-progress file).
    written = [
        json.loads(line)
        for path in (home / "raw" / f"dt={TODAY}").glob(".ingest-*")
        for line in path.read_text().splitlines()
    ]
    assert [row["event_id"] for row in written] == ["e100", "e101"]


def test_events_and_items_posted_with_retries_land_once_after_recsys_run(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_time = ingest.time.time
    monkeypatch.setattr(ingest, "time", SimpleNamespace(time=lambda: real_time() - 86_400))
    distinct = [event(n, days_ago=1) for n in range(300)]
    retried = [event(n, days_ago=1) for n in range(1000, 1010)]
    # Without event ids the pipeline derives them from the content: a verbatim retry is a duplicate too.
    anonymous = [
        {k: v for k, v in event(n, days_ago=1).items() if k != "event_id"} for n in range(2000, 2005)
    ]
    updated_at = distinct[0]["ts"]
    items = [
        {"item_id": "i1", "title": "Blue shoes", "categories": ["shoes"], "updated_at": updated_at},
        {"item_id": "i2", "title": "Red hat", "available": False, "updated_at": updated_at},
        {"item_id": "", "updated_at": updated_at},
    ]
    settings = settings_for(home)
    with live_server(settings) as url, httpx.Client(base_url=url, timeout=30) as api:
        for start in range(0, len(distinct), 100):
            assert (
                api.post("/v1/events", json={"events": distinct[start : start + 100]}, headers=AUTH).json()[
                    "accepted"
                ]
                == 100
            )
        for batch in (retried, anonymous):
            for _ in range(2):  # the client did not get the first answer and sends the batch again
                assert api.post("/v1/events", json={"events": batch}, headers=AUTH).status_code == 202
        posted = api.post("/v1/admin/items?tenant=shop", json={"items": items}, headers=AUTH)
        assert posted.status_code == 202
        assert posted.json()["accepted"] == 2
        assert [(r["index"], r["reason"]) for r in posted.json()["rejected"]] == [(2, "empty_id")]
    # A retry after a restart of the server lands in another file, and is still one event.
    with live_server(settings) as url, httpx.Client(base_url=url, timeout=30) as api:
        assert api.post("/v1/events", json={"events": retried}, headers=AUTH).status_code == 202
    landed = list((home / "raw" / f"dt={DAY}").glob("ingest-*.jsonl"))
    assert len(landed) == 2 and not list((home / "raw").rglob(".ingest-*"))

    monkeypatch.setenv("RECSYS_HOME", str(home))
    monkeypatch.setenv("RECSYS_START_DATE", DAY.isoformat())
    status = cli.main(
        ["run", "--start", str(DAY), "--end", str(DAY), "--select", "key:canonical_events or key:catalog"]
    )
    assert status == 0
    lake = home / "lake"
    events = pq.read_table(lake / "canonical_events" / f"dt={DAY}").to_pylist()
    ids = [row["event_id"] for row in events]
    assert len(ids) == len(set(ids)) == 300 + 10 + 5
    assert set(ids) >= {e["event_id"] for e in distinct + retried}
    catalog = read_catalog(lake, DAY).to_pylist()
    assert [(row["item_id"], row["title"], row["available"]) for row in catalog] == [
        ("i1", "Blue shoes", True),
        ("i2", "Red hat", False),
    ]


def test_concurrent_requests_share_fsyncs_and_are_durable_when_answered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    syncs: list[int] = []
    real_fsync = ingest.os.fsync

    def counted(fd: int) -> None:
        syncs.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(ingest.os, "fsync", counted)
    log = IngestLog(tmp_path, host="h", pid=4321)
    log.start()
    try:
        now = dt.datetime.now(dt.UTC).timestamp()
        futures = []
        barrier = threading.Barrier(8)

        def client(n: int) -> None:
            barrier.wait()
            for k in range(25):
                futures.append(log.append([b'{"n":%d,"k":%d}\n' % (n, k)], now))

        threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for future in futures:
            assert future.result(timeout=10) is None
        hidden = list(tmp_path.rglob(".ingest-h-4321-*"))
        assert len(hidden) == 1 and len(hidden[0].read_bytes().splitlines()) == 200
        assert 1 <= len(syncs) < 200
    finally:
        log.close()
    assert len(list(tmp_path.rglob("ingest-h-4321-*.jsonl"))) == 1


def test_over_the_daily_cap_nothing_is_acknowledged(tmp_path: Path) -> None:
    log = IngestLog(tmp_path, host="h", pid=4321, max_bytes_per_day=100)
    log.start()
    try:
        now = dt.datetime.now(dt.UTC).timestamp()
        assert log.append([b"x" * 60 + b"\n"], now).result(timeout=10) is None
        with pytest.raises(NotStored, match="cap"):
            log.append([b"y" * 60 + b"\n"], now).result(timeout=10)
    finally:
        log.close()


# ------------------------------------------------- the server's validator and the pipeline's agree

_TS = [
    "2026-03-10T12:00:00Z",
    "2026-03-10t12:00:00.5z",
    "2026-03-10 23:30:00.123456789+01:00",
    "2026-03-11T00:30:00-00:00",
    "2026-03-11T01:00:00Z",
    "2026-03-03T00:00:00Z",
    "2026-03-02T23:59:59.999999Z",
    "1773144000000",
    "99999999999999999",
    "0001-01-01T00:00:00+01:00",
    "2026-02-30T00:00:00Z",
    "2026-03-10T12:00:00",
    "2026-03-10T12:00:00+24:00",
    "yesterday",
    "",
]
_NAMES = ["shop", " shop\t", "", "   ", "a/b", ".", "x" * 65, "\u2003tenant\u3000", None]
_IDS = ["s1", " s1 ", "", " ", "\x1cs\x1c", "s" * 256, "s" * 257, None]


@given(
    st.fixed_dictionaries(
        {
            "v": st.sampled_from([None, 1, 2]),
            "ts": st.sampled_from([*_TS, None]),
            "tenant": st.sampled_from(_NAMES),
            "surface": st.sampled_from(_NAMES),
            "session_id": st.sampled_from(_IDS),
            "user_id": st.sampled_from(_IDS),
            "item_id": st.sampled_from(_IDS),
            "event_type": st.sampled_from([None, "click", "hover", " click"]),
            "request_id": st.sampled_from(_IDS),
            "event_id": st.sampled_from(_IDS),
            "value": st.sampled_from([None, 1.5, -2.0, math.inf, math.nan]),
            "rank": st.sampled_from([None, 0, 3, -1]),
        }
    )
)
@settings(max_examples=400, deadline=None)
def test_validate_event_agrees_with_the_pipelines_validate_events(row: dict[str, Any]) -> None:
    """One row through the server's `validate_event` and through the pipeline's `validate_events`: the same
    reason code, or the same event. The one allowed difference: a `ts` outside the strict RFC 3339 grammar
    the server reads is bad_ts there (documented), wherever the pipeline's lenient reader takes it."""
    day = dt.date(2026, 3, 10)
    rules = {"event_types": ("click", "exposure"), "max_lateness_days": 7, "max_clock_skew_hours": 1}
    served = validate_event(dict(row), day, **rules)
    landed = validate_events(pl.DataFrame([row], schema=PARSED_SCHEMA), day, **rules)
    reason = landed.get_column("reason")[0]
    if isinstance(served, Rejection):
        strict_form = row["ts"] is None or row["ts"] in _TS[:10]
        if served.reason != "bad_ts" or strict_form:
            assert served.reason == reason, (served, landed.get_column("detail")[0])
        return
    assert reason is None, landed.get_column("detail")[0]
    assert served == landed.drop("reason", "detail").row(0, named=True)
