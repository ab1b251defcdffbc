"""`recsys serve` with several workers and several replicas, against real servers (child processes, real
HTTP): /metrics adds up every worker, SIGTERM lets in-flight requests finish and writes out the exposure
log, the daily cap holds across workers, and a publish and a rollback reach every replica under load
without a failed request. Over the manifest `test_serving`'s fixture publishes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_serving import DAY, FIRST, SURFACE, TENANT, build_day, build_published_home, recs_url, settings_for
from test_serving_limits import free_port

from recsys_cli import cli
from recsys_core.manifest import read_current
from recsys_core.settings import ConfigError, load_settings
from recsys_dagster.evaluation.offline import evaluate_day
from recsys_dagster.publishing.release import publish_as_of

# Exposure files, while written and once published: `[.]exposures-<host>-<pid>-<seq>.jsonl[.inprogress]`.
EXPOSURE_FILE = re.compile(r"\.?exposures-.+-(\d+)-\d+\.jsonl(\.inprogress)?")


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_published_home(tmp_path_factory.mktemp("serving"))


@dataclasses.dataclass
class Server:
    """A `recsys serve` child process and what it logged on stderr so far."""

    process: subprocess.Popen[bytes]
    url: str
    log: list[str]

    def wait_for_log(self, text: str, count: int = 1, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while sum(text in line for line in self.log) < count:
            assert time.monotonic() < deadline, f"{text!r} not logged {count} time(s): {self.log[-10:]}"
            time.sleep(0.05)

    def stop(self) -> int:
        """SIGTERM, as a service manager or an orchestrator stops it; the exit status."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(30)


@contextlib.contextmanager
def recsys_serve(home: Path, *options: str, **env: str) -> Iterator[Server]:
    """`recsys serve OPTIONS` in a child process over `home` with extra environment `env`, once every worker
    is ready (the example requests printed at start use the first stdout line; readiness is /readyz)."""
    port = free_port()
    environ = os.environ | {"RECSYS_HOME": str(home), "RECSYS_START_DATE": FIRST.isoformat(), **env}
    process = subprocess.Popen(
        [sys.executable, "-m", "recsys_cli.cli", "serve", "--port", str(port), *options],
        env=environ,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    log: list[str] = []
    assert process.stderr is not None
    reader = threading.Thread(
        target=lambda: log.extend(line.decode() for line in process.stderr), daemon=True
    )
    reader.start()
    server = Server(process, f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + 60
        while not (
            sum("Application startup complete" in line for line in log) >= _workers(options, env)
            and _answers(server.url + "/readyz")
        ):
            assert process.poll() is None, f"recsys serve exited early: {log[-10:]}"
            assert time.monotonic() < deadline, f"recsys serve did not start in time: {log[-10:]}"
            time.sleep(0.1)
        yield server
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)


def _workers(options: tuple[str, ...], env: dict[str, str]) -> int:
    if "--workers" in options:
        return int(options[options.index("--workers") + 1])
    return int(env.get("RECSYS_SERVE_WORKERS", "1"))


def _answers(url: str) -> bool:
    try:
        return httpx.get(url).status_code == 200
    except httpx.TransportError:
        return False


def scrape(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """/metrics as {sample name: [(labels, value)]}."""
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def value(samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels`."""
    return sum(v for found, v in samples.get(name, []) if labels.items() <= found.items())


def exposure_lines(raw_root: Path) -> dict[int, list[dict]]:
    """The exposure events on disk (published or being written, complete lines), by writing process."""
    lines: dict[int, list[dict]] = {}
    for path in raw_root.glob("dt=*/*exposures-*"):
        match = EXPOSURE_FILE.fullmatch(path.name)
        if match:
            data = path.read_bytes()
            complete = data[: data.rfind(b"\n") + 1]
            lines.setdefault(int(match.group(1)), []).extend(
                json.loads(line) for line in complete.splitlines()
            )
    return lines


def eventually(check: Callable[[], bool], what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


# ---------------------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("RECSYS_SERVE_WORKERS", "0"),
        ("RECSYS_SERVE_WORKERS", "257"),
        ("RECSYS_SERVE_WORKERS", "two"),
        ("RECSYS_SERVE_SHUTDOWN_GRACE_SECONDS", "0"),
        ("RECSYS_SERVE_SHUTDOWN_GRACE_SECONDS", "1.5"),
        ("RECSYS_SERVE_SHUTDOWN_GRACE_SECONDS", "3601"),
    ],
)
def test_worker_and_shutdown_settings_refuse_absurd_values(variable: str, value: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{variable}: expected a whole number of .*, got '{value}'$"):
        load_settings({variable: value})


def test_recsys_serve_refuses_a_worker_count_out_of_range_before_starting(tmp_path: Path) -> None:
    environ = os.environ | {"RECSYS_HOME": str(tmp_path)}
    for option in ("0", "300"):
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "recsys_cli.cli",
                "serve",
                "--port",
                str(free_port()),
                "--workers",
                option,
            ],
            env=environ,
            capture_output=True,
            text=True,
            timeout=60,  # a server that accepted the value would serve until stopped
        )
        assert result.returncode == cli.EXIT_USAGE
        assert result.stderr == f"recsys serve: --workers must be 1-256, got {option}\n"


# ----------------------------------------------------------------------------------------- metrics


def test_metrics_add_up_every_worker_and_the_daily_cap_holds_across_them(home: Path, tmp_path: Path) -> None:
    raw_root = tmp_path / "raw"
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    cap = 150_000  # about 130 responses of 5 items
    env = {
        "RECSYS_EXPOSURE_LOG": "true",
        "RECSYS_RAW_ROOT": str(raw_root),
        "RECSYS_EXPOSURE_MAX_BYTES_PER_DAY": str(cap),
        "TMPDIR": str(scratch),
    }
    sent = 0
    with recsys_serve(home, "--workers", "2", **env) as server:

        def send(n: int) -> None:
            nonlocal sent
            for _ in range(n):  # a new connection each time: either worker may accept it
                response = httpx.get(server.url + recs_url(user_id=f"u{sent % 400:05d}", k=5))
                assert response.status_code == 200 and len(response.json()["items"]) == 5
                sent += 1

        # Until both workers have served (and logged) some.
        deadline = time.monotonic() + 30
        while len([pid for pid, lines in exposure_lines(raw_root).items() if lines]) < 2:
            assert time.monotonic() < deadline, "one worker answered every request"
            send(4)
            time.sleep(0.6)  # the exposure writers write every half second
        pids = {str(pid) for pid in exposure_lines(raw_root)}

        # Every scrape, whichever worker answers it, counts every request.
        for _ in range(4):
            samples = scrape(server.url)
            route = {"route": "/v1/recommendations", "method": "GET", "status": "200"}
            assert value(samples, "recsys_http_requests_total", **route) == sent
            assert value(samples, "recsys_http_request_duration_seconds_count", **route) == sent
            assert value(samples, "recsys_http_request_duration_seconds_bucket", le="+Inf", **route) == sent
            # Gauges are per worker: each worker reports the manifest it serves.
            served = samples["recsys_manifest_info"]
            assert {labels["pid"] for labels, _ in served} == pids
            assert all(labels["tenant"] == TENANT and v == 1 for labels, v in served)
            assert value(samples, "recsys_manifest_loads_total", tenant=TENANT) == 2, "one load per worker"

        # The exposure counters of both workers add up to what is on disk (each worker's state reaches
        # the others within a second).
        def counted() -> bool:
            samples = scrape(server.url)
            written = sum(len(lines) for lines in exposure_lines(raw_root).values())
            return value(samples, "recsys_exposure_events_written_total") == written == 5 * sent

        eventually(counted, "exposure counters do not add up")

        # Past the daily cap, together: neither worker writes beyond what the other wrote.
        send(150)
        eventually(
            lambda: value(scrape(server.url), "recsys_exposure_events_over_cap_total") > 0,
            "cap never reached",
        )
        assert server.stop() == 0
    samples_written = exposure_lines(raw_root)
    day_folder = raw_root / f"dt={dt.datetime.now(dt.UTC).date().isoformat()}"
    assert sum(p.stat().st_size for p in day_folder.glob("exposures-*.jsonl")) <= cap
    assert not list(day_folder.glob(".exposures-*")), "every file published at shutdown"
    assert len(samples_written) == 2 and all(samples_written.values())
    assert not list(scratch.iterdir()), "the workers' shared metrics directory is removed"


# ---------------------------------------------------------------------------------------- shutdown


def _post_head(request_id: str, body: bytes) -> bytes:
    return (
        b"POST /v1/recommend HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"X-Request-Id: {request_id}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    )


def _response(sock: socket.socket) -> bytes:
    sock.settimeout(10)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_finishes_requests_in_flight_writes_out_the_exposure_log_and_exits_0(
    home: Path, tmp_path: Path, workers: int
) -> None:
    raw_root = tmp_path / "raw"
    env = {
        "RECSYS_EXPOSURE_LOG": "true",
        "RECSYS_RAW_ROOT": str(raw_root),
        "RECSYS_SERVE_SHUTDOWN_GRACE_SECONDS": "3",
        "RECSYS_SERVE_WORKERS": str(workers),
    }
    body = json.dumps({"tenant": TENANT, "surface": SURFACE, "user_id": "u00001", "k": 4}).encode()
    with recsys_serve(home, **env) as server:
        address = ("127.0.0.1", int(server.url.rsplit(":", 1)[1]))
        # Two requests in flight: their headers are in, their bodies are not (yet, or ever).
        with socket.create_connection(address) as slow, socket.create_connection(address) as stuck:
            slow.sendall(_post_head("slow-in-flight", body) + body[:10])
            stuck.sendall(_post_head("never-finished", body) + body[:10])
            time.sleep(0.5)
            stopped_at = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            server.wait_for_log("Shutting down", count=workers)
            with pytest.raises(httpx.TransportError):  # no longer accepted
                httpx.get(server.url + "/healthz", timeout=1)
            slow.sendall(body[10:])
            answer = _response(slow)
            assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
            assert len(json.loads(answer.split(b"\r\n\r\n", 1)[1])["items"]) == 4
            # The other one is cut off once the grace period (3 s) is over, and the server exits 0.
            assert server.process.wait(20) == 0
            assert 2.5 < time.monotonic() - stopped_at < 15
    day_folder = next(raw_root.glob("dt=*"))
    assert not list(day_folder.glob(".exposures-*")), "every exposure file is published"
    events = [event for lines in exposure_lines(raw_root).values() for event in lines]
    assert Counter(e["request_id"] for e in events) == {"slow-in-flight": 4}


# ------------------------------------------------------------------------------ replicas and publish


def test_two_replicas_under_load_pick_up_a_publish_and_a_rollback_without_a_failed_request(
    home: Path, tmp_path: Path
) -> None:
    clone = tmp_path / "home"
    shutil.copytree(home, clone, symlinks=True)
    settings = settings_for(clone)
    new_day = DAY + dt.timedelta(days=1)
    build_day(settings, new_day)
    evaluate_day(settings, new_day)
    current = read_current(settings.artifact_root, TENANT, SURFACE)
    assert current is not None
    old = current["manifest_version"]
    env = {"RECSYS_SERVE_POLL_SECONDS": "0.2"}
    # Two replicas over the same RECSYS_HOME, one of them with two workers.
    with recsys_serve(clone, "--workers", "2", **env) as first, recsys_serve(clone, **env) as second:
        replicas = {first.url: 2, second.url: 1}
        stop = threading.Event()
        lock = threading.Lock()
        outcomes: dict[str, Counter[str]] = {url: Counter() for url in replicas}
        versions: dict[str, list[str]] = {url: [] for url in replicas}

        def hammer(url: str, offset: int) -> None:
            with httpx.Client(base_url=url, timeout=10) as client:
                n = offset
                while not stop.is_set():
                    n += 1
                    try:
                        response = client.get(recs_url(user_id=f"u{n % 500:05d}", k=10))
                        version = response.json()["manifest_version"] if response.status_code == 200 else None
                        agree = version == response.headers.get("x-manifest-version")
                        outcome = (
                            "ok" if version and agree else f"{response.status_code} {response.text[:80]}"
                        )
                    except httpx.HTTPError as exc:
                        outcome, version = repr(exc), None
                    with lock:
                        outcomes[url][outcome] += 1
                        if version and (not versions[url] or versions[url][-1] != version):
                            versions[url].append(version)

        def every_worker_serves(version: str) -> Callable[[], bool]:
            def check() -> bool:
                for url, workers in replicas.items():
                    served = scrape(url).get("recsys_manifest_info", [])
                    if len(served) != workers or any(
                        labels["manifest_version"] != version for labels, _ in served
                    ):
                        return False
                return True

            return check

        threads = [threading.Thread(target=hammer, args=(url, n * 97)) for n in range(2) for url in replicas]
        for thread in threads:
            thread.start()
        try:
            time.sleep(0.5)
            (outcome,) = publish_as_of(settings, new_day)
            new = outcome.outcome.manifest_version
            assert outcome.outcome.action == "publish" and new != old
            eventually(every_worker_serves(new), "a worker did not pick up the new manifest", timeout=20)
            time.sleep(0.5)
            environ = os.environ | {"RECSYS_HOME": str(clone), "RECSYS_START_DATE": FIRST.isoformat()}
            rollback = [sys.executable, "-m", "recsys_cli.cli", "rollback", "--tenant", TENANT, "--surface"]
            subprocess.run(
                [*rollback, SURFACE, "--steps", "1", "--reason", "load test"], env=environ, check=True
            )
            eventually(every_worker_serves(old), "a worker did not pick up the rollback", timeout=20)
            time.sleep(0.3)
        finally:
            stop.set()
            for thread in threads:
                thread.join(15)
        assert first.stop() == 0 and second.stop() == 0
    for url in replicas:
        assert set(outcomes[url]) == {"ok"}, (url, outcomes[url].most_common(5))
        assert outcomes[url]["ok"] > 50, outcomes[url]
        assert versions[url][0] == old and new in versions[url] and versions[url][-1] == old, versions[url]
