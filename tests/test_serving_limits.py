"""What one client can do to the server and to the pipeline: hold connections, flood the exposure log,
steer redirects, or disable hot reload through a setting. Over the manifest `test_serving`'s fixture
publishes, against real servers (`recsys serve` in a child process where its connection handling matters).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from test_serving import FIRST, SURFACE, TENANT, build_published_home, live_server, recs_url, settings_for

from recsys_cli import cli
from recsys_core.settings import ConfigError, load_settings
from recsys_dagster.ingest.canonicalize import canonicalize_partition
from recsys_dagster.ingest.gates import run_gates
from recsys_serving.app import create_app
from recsys_serving.exposures import ExposureWriter


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_published_home(tmp_path_factory.mktemp("serving"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# `recsys serve` as an API-only install runs it: without httptools, so uvicorn's h11 protocol serves.
WITHOUT_HTTPTOOLS = "import sys; sys.modules['httptools'] = None; from recsys_cli.cli import main; sys.exit(main(sys.argv[1:]))"


@contextlib.contextmanager
def recsys_serve(home: Path, *, httptools: bool = True, **env: str) -> Iterator[int]:
    """`recsys serve` in a child process over `home`, with extra environment `env`; yields its port."""
    port = free_port()
    environ = os.environ | {"RECSYS_HOME": str(home), "RECSYS_START_DATE": FIRST.isoformat(), **env}
    command = ["-m", "recsys_cli.cli"] if httptools else ["-c", WITHOUT_HTTPTOOLS]
    process = subprocess.Popen(
        [sys.executable, *command, "serve", "--port", str(port)], env=environ, stdout=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 45
        while True:
            assert process.poll() is None, "recsys serve exited early"
            try:
                httpx.get(f"http://127.0.0.1:{port}/readyz").raise_for_status()
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "recsys serve did not answer in time"
                time.sleep(0.2)
        yield port
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 0


def closed_by_server(sock: socket.socket, wait: float) -> bool:
    """Whether the server closed `sock` (end of stream or reset) within `wait` seconds."""
    sock.settimeout(wait)
    try:
        return sock.recv(4096) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


# ------------------------------------------------------------------------------------- connections


@pytest.mark.parametrize("httptools", [True, False], ids=["httptools", "h11"])
def test_idle_and_slow_connections_are_closed_and_never_crowd_out_a_request(
    home: Path, httptools: bool
) -> None:
    limits = {
        "RECSYS_SERVE_HEADER_TIMEOUT_SECONDS": "1",
        "RECSYS_SERVE_KEEP_ALIVE_SECONDS": "1",
        "RECSYS_SERVE_MAX_CONNECTIONS": "50",
    }
    with recsys_serve(home, httptools=httptools, **limits) as port, contextlib.ExitStack() as stack:
        address = ("127.0.0.1", port)
        popular = f"http://127.0.0.1:{port}/v1/popular?tenant={TENANT}&surface={SURFACE}&k=2"
        held = []
        opened = time.monotonic()
        for n in range(40):  # half say nothing, half send headers that never end
            sock = stack.enter_context(socket.create_connection(address))
            if n % 2:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            held.append(sock)
        assert httpx.get(popular).status_code == 200, "a normal request is answered beside them"
        assert all(closed_by_server(sock, 3) for sock in held), "idle and slow connections are closed"
        assert time.monotonic() - opened >= 0.9, "after RECSYS_SERVE_HEADER_TIMEOUT_SECONDS, not before"

        # Between requests, an idle keep-alive connection is closed after RECSYS_SERVE_KEEP_ALIVE_SECONDS.
        kept = stack.enter_context(socket.create_connection(address))
        kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = kept.recv(4096)
        while not answer.endswith(b"}"):  # the JSON body may come in a packet of its own
            answer += kept.recv(4096)
        assert answer.startswith(b"HTTP/1.1 200")
        assert closed_by_server(kept, 3)

        # Beyond RECSYS_SERVE_MAX_CONNECTIONS, connections are closed as soon as they are accepted.
        crowd = [stack.enter_context(socket.create_connection(address)) for _ in range(70)]
        time.sleep(0.3)
        assert sum(closed_by_server(sock, 0.001) for sock in crowd) >= 20
        assert all(closed_by_server(sock, 3) for sock in crowd)
        assert httpx.get(popular).status_code == 200, "once they are gone, requests are answered again"

        # Headers that never end but keep coming are cut off by size, not only by time.
        flood = stack.enter_context(socket.create_connection(address))
        flood.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"p" * 70_000)
        assert flood.recv(4096).startswith(b"HTTP/1.1 400")


# ---------------------------------------------------------------------------------------- redirects


def test_a_trailing_slash_is_answered_404_never_redirected_to_the_clients_host(home: Path) -> None:
    with live_server(settings_for(home)) as url, httpx.Client(base_url=url) as client:
        for path in (f"/v1/popular/?tenant={TENANT}&surface={SURFACE}", "/healthz/", "/docs/"):
            response = client.get(path, headers={"Host": "evil.example"}, follow_redirects=False)
            assert response.status_code == 404, (path, response.headers)
            assert "location" not in response.headers
            assert response.json()["code"] == "not_found"


# ----------------------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("RECSYS_SERVE_POLL_SECONDS", "inf"),
        ("RECSYS_SERVE_POLL_SECONDS", "nan"),
        ("RECSYS_SERVE_POLL_SECONDS", "1e9"),
        ("RECSYS_SERVE_POLL_SECONDS", "0"),
        ("RECSYS_SERVE_HEADER_TIMEOUT_SECONDS", "Infinity"),
        ("RECSYS_SERVE_KEEP_ALIVE_SECONDS", "1.5"),
        ("RECSYS_SERVE_MAX_CONNECTIONS", "0"),
        ("RECSYS_EXPOSURE_MAX_BYTES_PER_DAY", "-1"),
    ],
)
def test_serving_settings_refuse_non_finite_and_absurd_values(variable: str, value: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{variable}: expected .*, got '{re.escape(value)}'$"):
        load_settings({variable: value})


def test_recsys_serve_refuses_an_infinite_poll_interval_before_starting(tmp_path: Path) -> None:
    environ = os.environ | {"RECSYS_HOME": str(tmp_path), "RECSYS_SERVE_POLL_SECONDS": "inf"}
    result = subprocess.run(
        [sys.executable, "-m", "recsys_cli.cli", "serve", "--port", str(free_port())],
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,  # a server that accepted the value would serve until stopped
    )
    assert result.returncode == cli.EXIT_USAGE
    assert result.stderr == (
        "recsys serve: RECSYS_SERVE_POLL_SECONDS: expected a number of seconds > 0 and <= 3600, got 'inf'\n"
    )


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
    duplicate_rate = next(r for r in gates if r.name == "duplicate_rate")
    assert duplicate_rate.metadata["exposure_log_rows"] == len(events), "the gates know the server's files"


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
