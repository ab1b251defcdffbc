"""What one client can do to the server and to the pipeline: flood the exposure log. Over the manifest
`test_serving`'s fixture publishes.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections import defaultdict
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from test_serving import build_published_home, recs_url, settings_for

from recsys_dagster.ingest.canonicalize import canonicalize_partition
from recsys_dagster.ingest.gates import run_gates
from recsys_serving.app import create_app
from recsys_serving.exposures import ExposureWriter


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_published_home(tmp_path_factory.mktemp("serving"))


# ------------------------------------------------------------------------------------- exposure log


def test_repeated_identical_requests_are_distinct_exposures_that_pass_the_gates(
    home: Path, tmp_path: Path
) -> None:
    raw_root = tmp_path / "raw"
    settings = settings_for(home, RECSYS_EXPOSURE_LOG="true", RECSYS_RAW_ROOT=str(raw_root))
    with TestClient(create_app(settings)) as client:
        for _ in range(30):  # the same request, request id included, as one client can repeat it
            response = client.get(recs_url(user_id="u00001", k=5), headers={"X-Request-Id": "same"})
            assert response.status_code == 200
    events = [json.loads(line) for path in raw_root.rglob("exposures-*.jsonl") for line in path.open()]
    assert len(events) == 30 * 5
    assert len({e["event_id"] for e in events}) == len(events), "every served item has its own event id"
    assert all(re.fullmatch(r"x[0-9a-f]{16}-\d+-[0-4]", e["event_id"]) for e in events)
    day = dt.date.fromisoformat(events[0]["ts"][:10])
    summary = canonicalize_partition(raw_root, tmp_path / "lake", day, settings.pipeline.ingest)
    assert summary.duplicates == 0 and summary.canonical_rows == len(events)
    gates = run_gates(tmp_path / "lake", day, settings.pipeline.ingest, settings.pipeline.checks)
    assert all(r.passed for r in gates), [r.summary for r in gates if not r.passed]


def test_the_exposure_log_stops_at_its_daily_cap_and_counts_what_it_leaves_out(
    home: Path, tmp_path: Path
) -> None:
    raw_root = tmp_path / "raw"
    today = raw_root / f"dt={dt.datetime.now(dt.UTC).date().isoformat()}"
    today.mkdir(parents=True)
    # Written earlier today by another server process: it counts against the same cap.
    (today / "exposures-other-1-1.jsonl").write_bytes(b"x" * 1000 + b"\n")
    cap = 6000
    settings = settings_for(
        home,
        RECSYS_EXPOSURE_LOG="true",
        RECSYS_RAW_ROOT=str(raw_root),
        RECSYS_EXPOSURE_MAX_BYTES_PER_DAY=str(cap),
    )
    served = {}
    with TestClient(create_app(settings)) as client:
        for n in range(20):
            body = client.get(recs_url(user_id="u00001", k=5), headers={"X-Request-Id": f"r{n}"}).json()
            served[body["request_id"]] = len(body["items"])
        writer: ExposureWriter = client.app.state.exposures
        writer.flush()
        metrics = client.get("/metrics").text
    logged: defaultdict[str, list[int]] = defaultdict(list)
    for path in today.glob("exposures-*.jsonl"):
        if path.name != "exposures-other-1-1.jsonl":
            for line in path.open():
                event = json.loads(line)
                logged[event["request_id"]].append(event["rank"])
    assert sum(p.stat().st_size for p in today.iterdir()) <= cap
    assert 0 < len(logged) < len(served)
    assert all(ranks == list(range(served[r])) for r, ranks in logged.items()), "responses are whole"
    left_out = sum(served.values()) - sum(len(ranks) for ranks in logged.values())
    assert writer.events_over_cap == left_out > 0
    assert f"recsys_exposure_events_over_cap_total {float(left_out)}" in metrics
