"""HTTP ingestion benchmark: `POST /v1/events` of the recsys API next to a bare FastAPI hello-world that
takes the same POST, both loaded with `wrk` over loopback exactly as the serving benchmark loads its GETs
(same servers: uvicorn, 1 worker, no access log; same threads and connections).

Every request carries a batch of BATCH contract-v1 events with unique event ids. The recsys API validates
each event and answers 202 only once the accepted lines are fsync'd (group commit); the hello-world reads
the body and answers 202 without looking at it. After the load the recsys API is stopped (its files are
published) and the lines in its landing zone are counted: the events accepted per second are those lines
over the run's duration, and every answered request's events must be there.
"""

from __future__ import annotations

import datetime as dt
import shutil
import tempfile
from pathlib import Path

from benchmarks.harness import Benchmark, BenchmarkError, Options, Section
from benchmarks.serving import (
    CONNECTIONS,
    DURATION_SECONDS,
    THREADS,
    WARMUP_SECONDS,
    WrkResult,
    _ensure_wrk,
    _start,
    _wrk,
)

NAME = "ingest_http"
BATCH = 100
RUNS = 3
TARGET_EVENTS_PER_SECOND = 20_000
TOKEN = "benchmark-ingest-token-0123456789"


def hello_ingest_app():
    """The baseline: a bare FastAPI app that reads the posted body and answers 202 with a small body."""
    import orjson
    from fastapi import FastAPI
    from fastapi.responses import Response

    app = FastAPI()

    @app.get("/healthz")
    async def healthz() -> Response:
        return Response(b"{}", media_type="application/json")

    async def events(request) -> Response:  # a plain Starlette route: the request is not a parameter
        body = await request.body()
        return Response(orjson.dumps({"bytes": len(body)}), status_code=202, media_type="application/json")

    app.add_route("/v1/events", events, methods=["POST"])
    return app


def _lua_script(path: Path) -> Path:
    """Each request: BATCH events, ids unique per wrk thread, request and position."""
    ts = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    template = (
        '{"ts":"' + ts + '","tenant":"bench","surface":"home","session_id":"s%d","user_id":"u%d",'
        '"item_id":"i%d","event_type":"click","event_id":"t%d-%d-%d"}'
    )
    path.write_text(
        "\n".join(
            [
                "local threads = 0",
                "function setup(thread) threads = threads + 1; thread:set('tid', threads) end",
                "local n = 0",
                f'wrk.headers["Authorization"] = "Bearer {TOKEN}"',
                'wrk.headers["Content-Type"] = "application/json"',
                "request = function()",
                "  n = n + 1",
                "  local parts = {}",
                f"  for k = 1, {BATCH} do",
                f"    parts[k] = string.format('{template}', n % 997, (n * k) % 5000, (n + k) % 2000, tid, n, k)",
                "  end",
                "  return wrk.format('POST', '/v1/events', nil, '{\"events\":[' .. table.concat(parts, ',') .. ']}')",
                "end",
            ]
        )
        + "\n"
    )
    return path


def _landed_lines(raw_root: Path) -> int:
    return sum(len(path.read_bytes().splitlines()) for path in raw_root.glob("dt=*/ingest-*.jsonl"))


def run(options: Options) -> Section:
    wrk = _ensure_wrk()
    work = Path(
        tempfile.mkdtemp(prefix="ingest-http-", dir=options.workdir if options.workdir.is_dir() else None)
    )
    try:
        script = _lua_script(work / "ingest.lua")
        home = work / "home"
        hello = _start("hello-world", "benchmarks.ingest_http:hello_ingest_app", {}, "/healthz")
        api = _start(
            "recsys API",
            "recsys_serving.app:create_app",
            {"RECSYS_HOME": str(home), "RECSYS_INGEST_TOKEN": TOKEN},
            "/healthz",
        )
        results: dict[str, list[WrkResult]] = {"hello-world": [], "recsys API": []}
        try:
            for server in (hello, api):
                _wrk(wrk, server.url, script, WARMUP_SECONDS)
            for _ in range(RUNS):
                for server in (hello, api):
                    results[server.name].append(_wrk(wrk, server.url, script, DURATION_SECONDS))
        finally:
            hello.stop()
            api.stop()
        landed = _landed_lines(home / "raw")
        answered = sum(r.requests for r in results["recsys API"]) * BATCH
        failed = sum(r.errors for rs in results.values() for r in rs)
        if failed:
            raise BenchmarkError(f"{failed} failed requests (non-2xx or socket errors)")
        if landed < answered:
            raise BenchmarkError(f"{answered:,} events answered 202 but only {landed:,} lines landed")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    best = {name: max(rs, key=lambda r: r.rps) for name, rs in results.items()}
    lines = [
        f"wrk {THREADS} threads, {CONNECTIONS} connections, {DURATION_SECONDS} s per run after a "
        f"{WARMUP_SECONDS} s warm-up, {RUNS} runs alternating, best run of each; batches of {BATCH} events "
        f"(about 170 bytes each), 127.0.0.1 only; both servers: uvicorn, 1 worker, no "
        "access log; wrk shares the 2 cores with the server.",
        "",
        "| server | requests/s | events/s | p50 ms | p90 ms | p99 ms | failed |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, result in best.items():
        lines.append(
            f"| {name} | {result.rps:,.0f} | {result.rps * BATCH:,.0f} | {result.p50_ms:.2f} | "
            f"{result.p90_ms:.2f} | {result.p99_ms:.2f} | {result.errors} |"
        )
    events_per_second = best["recsys API"].rps * BATCH
    verdict = "met" if events_per_second >= TARGET_EVENTS_PER_SECOND else "NOT MET"
    lines += [
        "",
        f"Target: >= {TARGET_EVENTS_PER_SECOND:,} events/s accepted at {CONNECTIONS} connections: **{verdict}** "
        f"({events_per_second:,.0f} events/s; recsys / hello-world requests/s "
        f"{best['recsys API'].rps / best['hello-world'].rps:.2f}).",
        f"Checked after the load: {landed:,} lines in the landing zone for {answered:,} events answered 202 "
        "in the measured runs (the warm-up's events, and those of requests in flight when wrk stopped, land too), "
        "0 failed requests. Every 202 is answered after "
        "the batch's lines are fsync'd; concurrent requests share one fsync (group commit).",
        "",
        "Command: `python -m benchmarks.run --only ingest_http`.",
    ]
    return Section(text="\n".join(lines), markdown="## HTTP ingestion (`ingest_http`)\n\n" + "\n".join(lines))


BENCHMARK = Benchmark(NAME, f"POST /v1/events, batches of {BATCH}, next to a hello-world POST", run)
