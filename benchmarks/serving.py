"""HTTP API benchmark: the recsys API next to a bare FastAPI hello-world, loaded with `wrk` over loopback.

Data: synthetic events run through the pipeline's plain-Python steps (canonicalize, gates, daily aggregates,
window artifacts, evaluation, publish) until about 100k users have a history over 20k items; the pipeline
config (RECSYS_CONFIG, also the server's) gives the `als` artifact 64 factors, so the server loads an ALS
model of about 100k users x 20k items x 64 factors. Cached under `<workdir>/serving/` by generator,
pipeline sources, config and sizes. Every run serves a fresh copy of the artifact tree (data files
hard-linked), so publishing and rolling back never touch the cache.

Measured, each server alone on 127.0.0.1 with the same uvicorn settings (1 worker, uvloop + httptools,
no access log) and the same wrk Lua script (the same request paths; the hello-world answers them with a tiny
orjson body, ignoring the query string):
- throughput and latency percentiles of GET /v1/recommendations (mostly users the ALS model knows, some
  unknown users with context items, whose factors are folded in, some unknown users alone) vs the
  hello-world, runs alternating, best run of each reported;
- a manifest swap under load: a new as-of day is published, then rolled back, while wrk runs; every
  non-2xx response and socket error counts as a failed request;
- the same load with 1,000 active merchandising rules published (blocks, boosts and buries for everyone,
  pins and replace lists for users of the request mix), in runs alternating with runs without rules (the
  manifest rolled back and forth between them), reported as a ratio to the runs without rules.

`wrk` is installed with apt-get when missing (only when this benchmark runs). The event-count sizes of
`benchmarks.run --sizes` do not apply here.
"""

from __future__ import annotations

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
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.harness import (
    REPO_ROOT,
    Benchmark,
    BenchmarkError,
    Options,
    Section,
    machine_description,
    markdown_table,
    measure,
    source_fingerprint,
    text_table,
)

NAME = "serving"
TENANT, SURFACE = "bench", "home"
AS_OF = dt.date(2025, 1, 15)  # the manifest served at the start
NEXT_DAY = AS_OF + dt.timedelta(days=1)  # published (then rolled back) during the swap run
HISTORY_DAYS = 4  # days of events up to AS_OF
EVENTS_PER_DAY = 4_000_000
# The generator draws users with a Zipf-like activity; out of this pool, about 100k are active (with a
# click, cart or purchase) over the HISTORY_DAYS days.
USER_POOL = 300_000
N_ITEMS = 20_000
# The pipeline config of the data build and of the served API: the `als` artifact with 64 factors (the
# default is 16), the model size the serving target is stated for.
ALS_FACTORS = 64
PIPELINE_CONFIG = {"artifacts": {"als": {"factors": ALS_FACTORS}}}
CONFIG_FILE = "recsys.yaml"

CONNECTIONS = 32
THREADS = 2
DURATION_SECONDS = 10
WARMUP_SECONDS = 2
SWAP_DURATION_SECONDS = 14
POLL_SECONDS = 0.5
DEFAULT_RUNS = 3
REQUEST_PATHS = 2_000

# The rules variant: how many active rules, of which action (the rest are pins and replace lists for
# users of the request mix), and how many items each names.
RULES_COUNT = 1_000
RULES_MIX = (("block", 400, 1), ("boost", 300, 2), ("bury", 150, 2), ("pin", 100, 1), ("replace", 50, 5))

# Thresholds this benchmark judges (the targets are listed in docs/benchmarks.md#targets), against the
# hello-world measured in the same run: its throughput and its p99.
THROUGHPUT_RATIO_TARGET = 0.60
P99_RATIO_TARGET = 2.0


# ------------------------------------------------------------------------------------- data build


# What shapes the cached data: generator, every pipeline step up to the published manifest, the SQL models
# (see `harness.source_fingerprint`: a directory covers every module under it; a missing path is an error).
DATA_SOURCES = (
    "recsys_core",
    "recsys_dagster/ingest",
    "recsys_dagster/transform",
    "recsys_dagster/publishing",
    "dbt_like_sql",
    # user_topn is computed by the serving code's blend.
    "recsys_serving/blend.py",
    "recsys_serving/recommender.py",
    "recsys_serving/ranking.py",
    "recsys_serving/store.py",
)


def _home(options: Options) -> Path:
    return (
        options.workdir
        / NAME
        / f"home-u{USER_POOL}-i{N_ITEMS}-e{EVENTS_PER_DAY}-f{ALS_FACTORS}-seed{options.seed}"
    )


def _write_config(home: Path) -> Path:
    """The YAML pipeline config (RECSYS_CONFIG) the data build and the API server both read."""
    import yaml

    path = home / CONFIG_FILE
    text = yaml.safe_dump(PIPELINE_CONFIG, sort_keys=True)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    return path


def _ensure_data(options: Options) -> Path:
    """The cached RECSYS_HOME with AS_OF published and NEXT_DAY's artifacts built; built unless cached."""
    home = _home(options)
    marker = home / "_built.json"
    key = {
        "user_pool": USER_POOL,
        "items": N_ITEMS,
        "events_per_day": EVENTS_PER_DAY,
        "days": HISTORY_DAYS + 1,
        "as_of": AS_OF.isoformat(),
        "seed": options.seed,
        # Every served kind is built and published (a cache from before `als` existed lacks it).
        "kinds": list(_kinds()),
        "config": PIPELINE_CONFIG,
        "sources": source_fingerprint(*DATA_SOURCES),
    }
    if marker.exists() and json.loads(marker.read_text()).get("key") == key:
        print(f"[{NAME}] using cached data in {_shown(home, options)}", flush=True)
        _write_config(home)
        return home
    # Days already in the lake of an interrupted build with the same key are kept (each step replaces
    # its partition atomically); anything else starts from scratch.
    started = home / "_building.json"
    if not started.exists() or json.loads(started.read_text()) != key:
        shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True, exist_ok=True)
    started.write_text(json.dumps(key))
    _write_config(home)
    total = EVENTS_PER_DAY * (HISTORY_DAYS + 1)
    print(
        f"[{NAME}] building data: {total:,} events through the pipeline (a few minutes, cached) ...",
        flush=True,
    )
    built = measure("benchmarks.serving:build_task", {"home": str(home), "seed": options.seed})
    print(f"[{NAME}] built in {built.seconds:.0f} s: {built.output}", flush=True)
    marker.write_text(json.dumps({"key": key, "built": built.output}, indent=2))
    started.unlink()
    return home


def build_task(params: dict) -> dict:
    """Child-process task: generate, canonicalize, check, aggregate, build and publish (see module doc)."""
    from recsys_core.kinds import KINDS
    from recsys_dagster.evaluation.offline import evaluate_day
    from recsys_dagster.ingest.canonicalize import canonicalize_partition
    from recsys_dagster.ingest.gates import run_gates
    from recsys_dagster.ingest.generate import generate_events
    from recsys_dagster.publishing.release import publish_as_of, write_build_record
    from recsys_dagster.transform.aggregates import (
        DAILY_MODELS,
        build_daily_aggregate,
        daily_aggregate_params,
    )
    from recsys_dagster.transform.artifacts import build_window_artifacts

    home = Path(params["home"])
    settings = _settings(home)
    first = AS_OF - dt.timedelta(days=HISTORY_DAYS - 1)
    days = [first + dt.timedelta(days=i) for i in range(HISTORY_DAYS + 1)]
    failed_gates = []
    for day in days:
        done = [
            settings.lake_root / model / f"dt={day.isoformat()}" / "part-00000.parquet"
            for model in DAILY_MODELS
        ]
        if all(path.is_file() for path in done):
            print(f"[{NAME}] {day}: already in the lake", flush=True)
            continue
        started = time.perf_counter()
        generate_events(
            settings.raw_root,
            end_date=day,
            days=1,
            events_per_day=EVENTS_PER_DAY,
            seed=params["seed"],
            tenants=(TENANT,),
            surfaces=(SURFACE,),
            n_users=USER_POOL,
            n_items=N_ITEMS,
        )
        canonicalize_partition(settings.raw_root, settings.lake_root, day, settings.pipeline.ingest)
        # Raw landing files are several GB; the lake holds everything the artifacts need.
        shutil.rmtree(settings.raw_root / f"dt={day.isoformat()}")
        results = run_gates(settings.lake_root, day, settings.pipeline.ingest, settings.pipeline.checks)
        failed_gates += [f"{day}: {r}" for r in results if getattr(r, "blocking", False) and not r.passed]
        for model in DAILY_MODELS:
            build_daily_aggregate(
                model, settings.lake_root, day, daily_aggregate_params(model, settings.pipeline)
            )
        print(
            f"[{NAME}] {day}: {EVENTS_PER_DAY:,} events in the lake ({time.perf_counter() - started:.0f} s)",
            flush=True,
        )
    topn_seconds: dict[str, float] = {}
    for as_of in (AS_OF, NEXT_DAY):
        for kind in KINDS:
            started = time.perf_counter()
            builds = build_window_artifacts(
                kind, settings.lake_root, settings.artifact_root, as_of, settings.pipeline
            )
            if kind == "user_topn":
                topn_seconds[as_of.isoformat()] = round(time.perf_counter() - started, 2)
            write_build_record(settings.lake_root, kind, as_of, builds)
    evaluate_day(settings, AS_OF)
    outcomes = publish_as_of(settings, AS_OF)
    actions = [o.outcome.action for o in outcomes]
    if actions != ["publish"]:
        raise BenchmarkError(f"publishing {AS_OF} did not publish: {[o.outcome.message for o in outcomes]}")
    from recsys_core.manifest import read_current

    manifest = read_current(settings.artifact_root, TENANT, SURFACE)
    missing = sorted(set(KINDS) - set(manifest["current"]))
    if missing:
        raise BenchmarkError(f"the published manifest of {AS_OF} has no {', '.join(missing)} artifact")
    return {
        "manifest_version": manifest["manifest_version"],
        "rows": {kind: entry["rows"] for kind, entry in manifest["artifacts"].items()},
        "failed_gates": failed_gates,
        "user_topn_seconds": topn_seconds,
    }


def _kinds() -> tuple[str, ...]:
    from recsys_core.kinds import KINDS

    return KINDS


def _settings(home: Path):
    from recsys_core.settings import load_settings

    env = {
        "RECSYS_HOME": str(home),
        "RECSYS_START_DATE": (AS_OF - dt.timedelta(days=60)).isoformat(),
        "RECSYS_CONFIG": str(home / CONFIG_FILE),
    }
    settings = load_settings(env)
    if settings.pipeline.artifacts.als.factors != ALS_FACTORS:
        raise BenchmarkError(f"{CONFIG_FILE}: the als artifact should have {ALS_FACTORS} factors")
    return settings


def _run_tree(options: Options, home: Path) -> Path:
    """A fresh artifact root for this run: data files hard-linked, mutable files (registry) copied."""
    run_root = options.workdir / NAME / "run" / "artifacts"
    shutil.rmtree(run_root.parent, ignore_errors=True)

    def copy(src: str, dst: str) -> None:
        if src.endswith((".parquet", ".npy")):
            try:
                os.link(src, dst)
                return
            except OSError:
                pass
        shutil.copy2(src, dst)

    shutil.copytree(home / "artifacts", run_root, copy_function=copy)
    return run_root


def _next_day_artifacts(home: Path, run_root: Path) -> dict[str, Path]:
    artifacts = {}
    for kind in _kinds():
        record = json.loads((home / "lake" / kind / f"dt={NEXT_DAY.isoformat()}" / "builds.json").read_text())
        (entry,) = [a for a in record["artifacts"] if (a["tenant"], a["surface"]) == (TENANT, SURFACE)]
        artifacts[kind] = run_root / TENANT / SURFACE / kind / entry["version"]
    return artifacts


# --------------------------------------------------------------------------------------- servers


def hello_app():
    """The baseline: a bare FastAPI app answering the benchmark's path with a small orjson body."""
    import orjson
    from fastapi import FastAPI
    from fastapi.responses import Response

    app = FastAPI()

    @app.get("/v1/recommendations")
    async def hello() -> Response:
        return Response(orjson.dumps({"hello": "world"}), media_type="application/json")

    return app


_UVICORN = (
    "import sys, uvicorn; uvicorn.run(sys.argv[1], factory=True, host='127.0.0.1', port=int(sys.argv[2]), "
    "workers=1, log_level='warning', access_log=False, timeout_graceful_shutdown=10)"
)


@dataclass
class Server:
    name: str
    process: subprocess.Popen
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(name: str, factory: str, env: dict[str, str], ready_path: str, timeout: float = 300) -> Server:
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-c", _UVICORN, factory, str(port)], cwd=REPO_ROOT, env=os.environ | env
    )
    server = Server(name, process, port)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchmarkError(f"{name} server exited with code {process.returncode}")
        try:
            with urllib.request.urlopen(server.url + ready_path, timeout=2) as response:
                if response.status == 200:
                    return server
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    server.stop()
    raise BenchmarkError(f"{name} server not ready after {timeout:.0f} s")


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


# ------------------------------------------------------------------------------------------ wrk


@dataclass
class WrkResult:
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    non_2xx: int
    socket_errors: int

    @property
    def errors(self) -> int:
        return self.non_2xx + self.socket_errors


def _ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    apt = shutil.which("apt-get")
    if apt is None:
        raise BenchmarkError("wrk is not installed and apt-get is not available: install wrk and re-run")
    print(f"[{NAME}] installing wrk with apt-get ...", flush=True)
    if subprocess.run([apt, "install", "-y", "wrk"], capture_output=True).returncode != 0:
        subprocess.run([apt, "update"], capture_output=True)
        subprocess.run([apt, "install", "-y", "wrk"], capture_output=True)
    found = shutil.which("wrk")
    if not found:
        raise BenchmarkError("could not install wrk (apt-get install -y wrk failed); install it and re-run")
    return found


def _lua_script(path: Path, paths: list[str]) -> Path:
    lines = ["local paths = {"]
    lines += [f'  "{p}",' for p in paths]
    lines += [
        "}",
        "local i = 0",
        "request = function()",
        "  i = i % #paths + 1",
        "  return wrk.format('GET', paths[i])",
        "end",
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


# The request mix: what fraction of the paths exercises which part of the serving path.
KNOWN_USERS = "known user"  # ALS user factors + co-occurrence of the history + popularity, exclude_seen
FOLD_IN = "unknown user, 3 context items"  # ALS factors folded in from the context items + co-occurrence
COLD = "unknown user"  # popularity only
MIX = ((KNOWN_USERS, 0.90), (FOLD_IN, 0.05), (COLD, 0.05))
CONTEXT_ITEMS = 3
# Requests of each kind sent once before the load, to check that each exercises what it should.
CHECKED_PER_KIND = 50


@dataclass
class AlsServed:
    users: int
    items: int
    factors: int


def _served_manifest(run_root: Path):
    from recsys_core.manifest import read_current

    manifest = read_current(run_root, TENANT, SURFACE)
    if manifest is None:
        raise BenchmarkError(f"no manifest published for {TENANT}/{SURFACE}")
    return manifest


def _als_served(run_root: Path) -> AlsServed:
    """The size of the served manifest's `als` artifact (its id tables and factor arrays)."""
    import numpy as np
    import pyarrow.parquet as pq

    from recsys_core.manifest import resolve_uri

    manifest = _served_manifest(run_root)
    if "als" not in manifest["current"]:
        raise BenchmarkError("the served manifest has no als artifact")
    folder = resolve_uri(run_root, TENANT, SURFACE, manifest["current"]["als"])
    users = np.load(folder / "user_factors.npy", mmap_mode="r")
    items = np.load(folder / "item_factors.npy", mmap_mode="r")
    if users.shape[0] != pq.read_metadata(folder / "users.parquet").num_rows:
        raise BenchmarkError("als artifact: user factors and users.parquet disagree")
    return AlsServed(users=users.shape[0], items=items.shape[0], factors=items.shape[1])


def _request_paths(run_root: Path, seed: int) -> list[tuple[str, str]]:
    """(kind, path) of every request path, kinds drawn at random by MIX: known users are drawn from the
    users the ALS model knows, context items from the 500 most popular items; unknown users have ids no
    artifact holds."""
    import numpy as np
    import pyarrow.parquet as pq

    from recsys_core.manifest import resolve_uri

    manifest = _served_manifest(run_root)
    als_dir = resolve_uri(run_root, TENANT, SURFACE, manifest["current"]["als"])
    users = pq.read_table(als_dir / "users.parquet", columns=["user_id"])["user_id"].to_pylist()
    popular_dir = resolve_uri(run_root, TENANT, SURFACE, manifest["current"]["popularity"])
    items = pq.read_table(popular_dir / "items.parquet", columns=["item_id"])["item_id"].to_pylist()[:500]
    rng = np.random.default_rng(seed)
    base = f"/v1/recommendations?tenant={TENANT}&surface={SURFACE}"
    bounds = np.cumsum([share for _, share in MIX])
    paths: list[tuple[str, str]] = []
    for n in range(REQUEST_PATHS):
        kind = MIX[min(int(np.searchsorted(bounds, rng.random(), side="right")), len(MIX) - 1)][0]
        if kind == KNOWN_USERS:
            path = f"{base}&user_id={users[rng.integers(len(users))]}"
        elif kind == FOLD_IN:
            picked = rng.choice(len(items), size=CONTEXT_ITEMS, replace=False)
            path = f"{base}&user_id=cold-user-{n}" + "".join(f"&context_items={items[i]}" for i in picked)
        else:
            path = f"{base}&user_id=cold-user-{n}"
        paths.append((kind, path))
    return paths


def _check_mix(url: str, paths: list[tuple[str, str]]) -> dict[str, str]:
    """Send the first requests of each kind once; fail unless each kind is answered as it should be.

    Known users and fold-in requests must be answered with the ALS source contributing (the `als` entry of
    an item's `sources`), unknown users from popularity with the unknown-user warning; every request must
    return items. Returns the counts per kind for the notes.
    """
    summary = {}
    for kind, _ in MIX:
        checked = [path for of_kind, path in paths if of_kind == kind][:CHECKED_PER_KIND]
        with_als = warned = answered = 0
        for path in checked:
            body = _get_json(url + path)
            answered += bool(body["items"])
            with_als += any("als" in item["sources"] for item in body["items"])
            warned += any(w["code"] == "unknown_user_popularity_fallback" for w in body["warnings"])
        if kind == COLD:
            ok = warned > 0 and with_als == 0
            summary[kind] = (
                f"{warned} of {len(checked)} answered from popularity with the unknown-user warning"
            )
        else:
            ok = with_als > 0 and warned == 0
            summary[kind] = f"{with_als} of {len(checked)} answered with an ALS contribution"
        if not checked or not ok or answered < len(checked):
            raise BenchmarkError(f"request mix: {kind} requests are not served as expected: {summary[kind]}")
    return summary


_UNIT = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _wrk(wrk: str, url: str, script: Path, seconds: int) -> WrkResult:
    command = [wrk, f"-t{THREADS}", f"-c{CONNECTIONS}", f"-d{seconds}s", "--latency", "-s", str(script), url]
    out = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    if out.returncode != 0:
        raise BenchmarkError(f"wrk failed: {out.stderr or out.stdout}")
    text = out.stdout

    def latency(percent: str) -> float:
        match = re.search(rf"^\s+{percent}%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.MULTILINE)
        if not match:
            raise BenchmarkError(f"no {percent}% latency in wrk output:\n{text}")
        return float(match.group(1)) * _UNIT[match.group(2)]

    done = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", text)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if not done or not rps:
        raise BenchmarkError(f"unexpected wrk output:\n{text}")
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    return WrkResult(
        requests=int(done.group(1)),
        seconds=float(done.group(2)) * _UNIT[done.group(3)] / 1e3,
        rps=float(rps.group(1)),
        p50_ms=latency("50"),
        p90_ms=latency("90"),
        p99_ms=latency("99"),
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=sum(int(g) for g in sockets.groups()) if sockets else 0,
    )


# ------------------------------------------------------------------------------------------- run


@dataclass
class SwapResult:
    load: WrkResult
    published: str
    rolled_back_to: str
    publish_seen_after_s: float | None
    rollback_seen_after_s: float | None
    versions_seen: list[str] = field(default_factory=list)


def run(options: Options) -> Section:
    machine = machine_description()
    wrk = _ensure_wrk()
    home = _ensure_data(options)
    run_root = _run_tree(options, home)
    als_served = _als_served(run_root)
    paths = _request_paths(run_root, options.seed)
    script = _lua_script(run_root.parent / "requests.lua", [path for _, path in paths])
    runs = options.repeats or DEFAULT_RUNS

    api_env = {
        "RECSYS_HOME": str(home),
        "RECSYS_CONFIG": str(home / CONFIG_FILE),
        "RECSYS_ARTIFACT_ROOT": str(run_root),
        "RECSYS_SERVE_POLL_SECONDS": str(POLL_SECONDS),
        "RECSYS_EXPOSURE_LOG": "false",
        # Decision traces are on, as deployed; written under this run's tree, so that every run starts
        # below their daily cap (a run writes some hundreds of MB of them).
        "RECSYS_RAW_ROOT": str(run_root.parent / "raw"),
    }
    hello = _start("hello-world", "benchmarks.serving:hello_app", {}, "/v1/recommendations")
    api = None
    try:
        api = _start("recsys API", "recsys_serving.app:create_app", api_env, "/readyz")
        served = _get_json(f"{api.url}/v1/manifest?tenant={TENANT}&surface={SURFACE}")
        rss_mib = _rss_mib(api.process.pid)
        print(
            f"[{NAME}] serving {served['users']:,} users, {served['items']:,} items "
            f"(loaded in {served['load_seconds']:.2f} s, server RSS {rss_mib:,.0f} MiB)",
            flush=True,
        )
        if not served["artifacts"].get("als", {}).get("served"):
            raise BenchmarkError("the API server does not serve the manifest's als artifact")
        if not served["user_topn"]["served"]:
            raise BenchmarkError(f"the API server does not serve user_topn: {served['user_topn']['reason']}")
        mix = _check_mix(api.url, paths)
        print(f"[{NAME}] request mix checked: " + "; ".join(f"{k}: {v}" for k, v in mix.items()), flush=True)
        for server in (hello, api):
            _wrk(wrk, server.url, script, WARMUP_SECONDS)
        results: dict[str, list[WrkResult]] = {"hello-world": [], "recsys API": []}
        for attempt in range(1, runs + 1):
            for server in (hello, api):
                result = _wrk(wrk, server.url, script, DURATION_SECONDS)
                results[server.name].append(result)
                print(
                    f"[{NAME}] run {attempt}/{runs} {server.name}: {result.rps:,.0f} req/s, "
                    f"p50 {result.p50_ms:.2f} ms, p99 {result.p99_ms:.2f} ms, errors {result.errors}",
                    flush=True,
                )
        swap = _swap_under_load(wrk, api, script, home, run_root)
        print(
            f"[{NAME}] swap: {swap.load.requests:,} requests, {swap.load.errors} failed; publish seen after "
            f"{_secs(swap.publish_seen_after_s)}, rollback seen after {_secs(swap.rollback_seen_after_s)}",
            flush=True,
        )
        rules = _rules_variant(wrk, api, script, run_root, paths, runs, options.seed)
    finally:
        hello.stop()
        if api is not None:
            api.stop()
    counts = {kind: sum(of_kind == kind for of_kind, _ in paths) for kind, _ in MIX}
    topn_seconds = json.loads((home / "_built.json").read_text())["built"]["user_topn_seconds"]
    return _render(machine, served, rss_mib, als_served, counts, mix, results, swap, topn_seconds, rules)


def _swap_under_load(wrk: str, api: Server, script: Path, home: Path, run_root: Path) -> SwapResult:
    from recsys_dagster.publishing.protocol import publish, rollback

    manifest_url = f"{api.url}/v1/manifest?tenant={TENANT}&surface={SURFACE}"
    before = _get_json(manifest_url)["manifest_version"]
    outcome: dict[str, object] = {}
    seen: list[str] = []

    def wait_for(version: str, since: float, limit: float = 15.0) -> float | None:
        while time.monotonic() - since < limit:
            current = _get_json(manifest_url)["manifest_version"]
            if not seen or seen[-1] != current:
                seen.append(current)
            if current == version:
                return time.monotonic() - since
            time.sleep(0.05)
        return None

    def swapper() -> None:
        try:
            time.sleep(3)
            started = time.monotonic()
            result = publish(run_root, TENANT, SURFACE, NEXT_DAY, _next_day_artifacts(home, run_root))
            if result.action != "publish":
                raise BenchmarkError(f"publishing {NEXT_DAY} during the load: {result.message}")
            outcome["published"] = result.manifest_version
            outcome["publish_seen"] = wait_for(result.manifest_version, started)
            time.sleep(2)
            started = time.monotonic()
            back = rollback(run_root, TENANT, SURFACE, steps=1, reason="benchmark swap", actor="benchmark")
            outcome["rolled_back_to"] = back.manifest_version
            outcome["rollback_seen"] = wait_for(back.manifest_version, started)
        except Exception as exc:  # reported after the load finishes
            outcome["error"] = exc

    thread = threading.Thread(target=swapper, name="swapper")
    thread.start()
    load = _wrk(wrk, api.url, script, SWAP_DURATION_SECONDS)
    thread.join()
    if "error" in outcome:
        raise BenchmarkError(f"manifest swap failed: {outcome['error']}")
    if outcome.get("rolled_back_to") != before:
        raise BenchmarkError(f"rollback went to {outcome.get('rolled_back_to')}, expected {before}")
    return SwapResult(
        load=load,
        published=str(outcome["published"]),
        rolled_back_to=str(outcome["rolled_back_to"]),
        publish_seen_after_s=outcome.get("publish_seen"),  # type: ignore[arg-type]
        rollback_seen_after_s=outcome.get("rollback_seen"),  # type: ignore[arg-type]
        versions_seen=seen,
    )


@dataclass
class RulesResult:
    with_rules: list[WrkResult]
    without: list[WrkResult]
    checked: str  # what was checked before the load


def _rules_document(run_root: Path, paths: list[tuple[str, str]], seed: int) -> dict:
    """RULES_COUNT rules, all in force now (half of them inside a validity window), by RULES_MIX: blocks,
    boosts and buries of random catalog items for every request; pins and replace lists for users of the
    request mix. No pinned item is blocked (the validator refuses that)."""
    import numpy as np
    import pyarrow.parquet as pq

    from recsys_core.manifest import resolve_uri

    manifest = _served_manifest(run_root)
    als_dir = resolve_uri(run_root, TENANT, SURFACE, manifest["current"]["als"])
    items = pq.read_table(als_dir / "items.parquet", columns=["item_id"])["item_id"].to_pylist()
    users = sorted({path.split("user_id=")[1].split("&")[0] for kind, path in paths if kind == KNOWN_USERS})
    rng = np.random.default_rng(seed)
    now = dt.datetime.now(dt.UTC)
    window = {
        "from": (now - dt.timedelta(days=1)).isoformat(),
        "until": (now + dt.timedelta(days=30)).isoformat(),
    }
    blocked: set[str] = set()
    rules = []
    for action, count, per_rule in RULES_MIX:
        for n in range(count):
            pool = items if action in ("block", "boost", "bury") else [i for i in items if i not in blocked]
            chosen = [pool[i] for i in rng.choice(len(pool), size=per_rule, replace=False)]
            rule: dict = {"id": f"{action}-{n}", "action": action, "items": chosen, "reason": "benchmark"}
            if action == "block":
                blocked.update(chosen)
            if action == "boost":
                rule["factor"] = round(float(rng.uniform(1.2, 3.0)), 2)
            if action == "bury":
                rule["factor"] = round(float(rng.uniform(0.2, 0.8)), 2)
            if action == "pin":
                rule["position"] = int(rng.integers(1, 6))
            if action in ("pin", "replace"):
                rule["audience"] = {"users": [users[int(rng.integers(len(users)))]]}
            if n % 2:
                rule |= window
            rules.append(rule)
    if len(rules) != RULES_COUNT:
        raise BenchmarkError(f"RULES_MIX makes {len(rules)} rules, not {RULES_COUNT}")
    return {"rules": rules}


def _rules_variant(
    wrk: str, api: Server, script: Path, run_root: Path, paths: list[tuple[str, str]], runs: int, seed: int
) -> RulesResult:
    """Publish RULES_COUNT rules; check they are applied; then wrk runs alternating with and without them
    (the manifest rolled back to the one without rules, then forward again, between runs)."""
    from recsys_core.rules import RulesDocument
    from recsys_dagster.publishing.protocol import rollback
    from recsys_dagster.publishing.rules import publish_rules

    manifest_url = f"{api.url}/v1/manifest?tenant={TENANT}&surface={SURFACE}"
    plain = _get_json(manifest_url)["manifest_version"]
    document = _rules_document(run_root, paths, seed)
    published = publish_rules(
        run_root,
        TENANT,
        SURFACE,
        RulesDocument.model_validate(document),
        reason="benchmark",
        actor="benchmark",
    )
    if published.action != "publish":
        raise BenchmarkError(f"publishing the benchmark's rules: {published.message}")
    ruled = published.manifest_version

    def serve(version: str) -> None:
        if _served_manifest(run_root)["manifest_version"] != version:
            rollback(
                run_root, TENANT, SURFACE, to_version=version, reason="benchmark rules", actor="benchmark"
            )
        deadline = time.monotonic() + 15
        while _get_json(manifest_url)["manifest_version"] != version:
            if time.monotonic() > deadline:
                raise BenchmarkError(f"the server did not pick up manifest {version[:12]}")
            time.sleep(0.05)

    serve(ruled)
    blocked = {i for rule in document["rules"] if rule["action"] == "block" for i in rule["items"]}
    # The users with a replace list and no other rule of their own get exactly their list first.
    targeted = [rule["audience"]["users"][0] for rule in document["rules"] if "audience" in rule]
    vip = {
        rule["audience"]["users"][0]: rule["items"]
        for rule in document["rules"]
        if rule["action"] == "replace" and targeted.count(rule["audience"]["users"][0]) == 1
    }
    touched = served_blocked = vip_ok = 0
    for _, path in paths[: CHECKED_PER_KIND * 4]:
        items = _get_json(api.url + path)["items"]
        touched += any(item["rules"] for item in items)
        served_blocked += any(item["item_id"] in blocked for item in items)
    for user, listed in list(vip.items())[:10]:
        items = _get_json(f"{api.url}/v1/recommendations?tenant={TENANT}&surface={SURFACE}&user_id={user}")[
            "items"
        ]
        vip_ok += [item["item_id"] for item in items[: len(listed)]] == listed
    checked = (
        f"of the first {CHECKED_PER_KIND * 4} request paths, {touched} had an item changed by a rule and "
        f"{served_blocked} a blocked item; {vip_ok} of {min(10, len(vip))} users with a replace list got it"
    )
    if served_blocked or not touched or vip_ok < min(10, len(vip)):
        raise BenchmarkError(f"the rules are not applied as expected: {checked}")
    print(f"[{NAME}] {RULES_COUNT:,} rules in force: {checked}", flush=True)
    result = RulesResult([], [], checked)
    for attempt in range(1, runs + 1):
        for version, runs_of in ((ruled, result.with_rules), (plain, result.without)):
            serve(version)
            _wrk(wrk, api.url, script, WARMUP_SECONDS)
            measured = _wrk(wrk, api.url, script, DURATION_SECONDS)
            runs_of.append(measured)
            label = f"{RULES_COUNT:,} rules" if version == ruled else "no rules"
            print(
                f"[{NAME}] rules run {attempt}/{runs} {label}: {measured.rps:,.0f} req/s, "
                f"p50 {measured.p50_ms:.2f} ms, p99 {measured.p99_ms:.2f} ms, errors {measured.errors}",
                flush=True,
            )
    return result


def _rss_mib(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


def _secs(value: float | None) -> str:
    return "never (timed out)" if value is None else f"{value:.2f} s"


def _shown(path: Path, options: Options) -> str:
    try:
        return str(path.relative_to(options.workdir.parent))
    except ValueError:
        return str(path)


def _met(ok: bool) -> str:
    return "met" if ok else "NOT MET"


def _best_run_row(name: str, runs: list[WrkResult]) -> list[str]:
    """A table row of the best run (by req/s) of `runs`: name, runs, req/s, latencies, requests, failed."""
    r = max(runs, key=lambda run: run.rps)
    return [
        name,
        str(len(runs)),
        f"{r.rps:,.0f}",
        f"{r.p50_ms:.2f}",
        f"{r.p90_ms:.2f}",
        f"{r.p99_ms:.2f}",
        f"{r.requests:,}",
        str(r.errors),
    ]


def _render(
    machine: str,
    served: dict,
    rss_mib: float,
    als: AlsServed,
    counts: dict[str, int],
    mix: dict[str, str],
    results: dict[str, list[WrkResult]],
    swap: SwapResult,
    topn_seconds: dict[str, float],
    rules: RulesResult,
) -> Section:
    best = {name: max(runs, key=lambda r: r.rps) for name, runs in results.items()}
    base, ours = best["hello-world"], best["recsys API"]
    ratio = ours.rps / base.rps
    headers = ["server", "runs", "req/s (best run)", "p50 ms", "p90 ms", "p99 ms", "requests", "failed"]
    rows = [_best_run_row(name, results[name]) for name in best]
    all_runs = "; ".join(
        f"{name}: " + ", ".join(f"{r.rps:,.0f} req/s p99 {r.p99_ms:.2f} ms" for r in runs)
        for name, runs in results.items()
    )
    swap_headers = [
        "requests",
        "req/s",
        "p99 ms",
        "failed",
        "publish picked up after",
        "rollback picked up after",
    ]
    swap_rows = [
        [
            f"{swap.load.requests:,}",
            f"{swap.load.rps:,.0f}",
            f"{swap.load.p99_ms:.2f}",
            str(swap.load.errors),
            _secs(swap.publish_seen_after_s),
            _secs(swap.rollback_seen_after_s),
        ]
    ]
    target_headers = ["target", "result"]
    p99_ratio = ours.p99_ms / base.p99_ms
    target_rows = [
        [
            f"throughput recsys / hello-world >= {THROUGHPUT_RATIO_TARGET:.2f} at {CONNECTIONS} connections",
            f"{_met(ratio >= THROUGHPUT_RATIO_TARGET)} ({ratio:.2f}: {ours.rps:,.0f} vs {base.rps:,.0f} req/s)",
        ],
        [
            f"p99 recsys / hello-world <= {P99_RATIO_TARGET:.1f} at {CONNECTIONS} connections",
            f"{_met(p99_ratio <= P99_RATIO_TARGET)} ({p99_ratio:.2f}: {ours.p99_ms:.2f} ms vs "
            f"{base.p99_ms:.2f} ms)",
        ],
        [
            "zero failed requests across a manifest swap",
            f"{_met(swap.load.errors == 0 and swap.publish_seen_after_s is not None and swap.rollback_seen_after_s is not None)} "
            f"({swap.load.errors} failed of {swap.load.requests:,})",
        ],
    ]
    with_rules = max(rules.with_rules, key=lambda r: r.rps)
    without_rules = max(rules.without, key=lambda r: r.rps)
    rules_headers = [
        "manifest",
        "runs",
        "req/s (best run)",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "requests",
        "failed",
    ]
    rules_rows = [
        _best_run_row(f"{RULES_COUNT:,} active rules", rules.with_rules),
        _best_run_row("no rules", rules.without),
    ]
    rules_rps_ratio = with_rules.rps / without_rules.rps
    rules_p99_ratio = with_rules.p99_ms / without_rules.p99_ms
    rules_vs_hello = with_rules.p99_ms / base.p99_ms
    target_rows.append(
        [
            f"p99 recsys with {RULES_COUNT:,} active rules / hello-world <= {P99_RATIO_TARGET:.1f} at "
            f"{CONNECTIONS} connections",
            f"{_met(rules_vs_hello <= P99_RATIO_TARGET)} ({rules_vs_hello:.2f}: {with_rules.p99_ms:.2f} ms vs "
            f"{base.p99_ms:.2f} ms)",
        ]
    )
    rules_summary = (
        f"With {RULES_COUNT:,} rules / without: throughput {rules_rps_ratio:.2f}, p99 {rules_p99_ratio:.2f}"
    )
    # The als entry's rows count the rows of all its files; its size is stated above.
    rows_text = ", ".join(
        f"{kind} {entry['rows']:,}" for kind, entry in served["artifacts"].items() if kind != "als"
    )
    data = (
        f"ALS model loaded: {als.users:,} users, {als.items:,} items, {als.factors} factors. "
        f"{served['users']:,} users with a history and {served['items']:,} items served "
        f"(artifact rows: {rows_text}); "
        f"loaded in {served['load_seconds']:.2f} s; API server RSS {rss_mib:,.0f} MiB after loading. "
        f"user_topn: {served['user_topn']['users']:,} users x top {served['user_topn']['top_n']}, built in "
        + ", ".join(f"{seconds:.1f} s (as of {day})" for day, seconds in topn_seconds.items())
        + " in the data build (as `build_window_artifacts`, in a child process)."
    )
    shares = ", ".join(f"{counts[kind]:,} {kind}" for kind, _ in MIX)
    notes = [
        f"wrk {THREADS} threads, {CONNECTIONS} connections, {DURATION_SECONDS} s per run after a "
        f"{WARMUP_SECONDS} s warm-up, 127.0.0.1 only; both servers: uvicorn, 1 worker, no access log. wrk "
        "shares the 2 cores with the server, as any client on this machine would.",
        f"Request mix ({REQUEST_PATHS:,} paths, cycled, k=10, exclude_seen): {shares}. A known user (drawn "
        "from the users the ALS model knows) is scored by the blend of their ALS factors, the co-occurrence "
        "neighbours of their recent items and popularity; an unknown user with context items by factors "
        "folded in from those items, their neighbours and popularity; an unknown user alone by popularity.",
        f"Checked before the load (the first {CHECKED_PER_KIND} paths of each kind, once): "
        + "; ".join(f"{kind}: {summary}" for kind, summary in mix.items())
        + ".",
        f"Swap: {SWAP_DURATION_SECONDS} s of load; after 3 s as-of {NEXT_DAY} is published, 2 s after the "
        f"server serves it the manifest is rolled back; the server polls every {POLL_SECONDS:g} s. "
        "Failed = non-2xx responses + socket errors (connect, read, write, timeout).",
        f"All runs: {all_runs}.",
        f"Rules: {RULES_COUNT:,} rules in force ("
        + ", ".join(f"{count} {action}" for action, count, _ in RULES_MIX)
        + "; blocks, boosts and buries apply to every request, pins and replace lists to one user of the "
        "request mix each; half of the rules inside a validity window), published with `recsys rules "
        f"publish`'s code on the served manifest. Checked before the load: {rules.checked}. Runs with and "
        f"without the rules alternate ({WARMUP_SECONDS} s warm-up each, after the server picked up the "
        "manifest); the best run of each is compared.",
        "Throughput and p99 targets are judged on the rows above: the best run (by req/s) of each server.",
        f"wrk keeps all {CONNECTIONS} connections busy, so the mean latency is about {CONNECTIONS} / req/s: "
        f"recsys API {CONNECTIONS / ours.rps * 1e3:.2f} ms, hello-world {CONNECTIONS / base.rps * 1e3:.2f} ms "
        f"(ratio {base.rps / ours.rps:.2f}); the p99 ratio is judged on the measured p99s above.",
    ]
    title = "HTTP API: GET /v1/recommendations vs a bare FastAPI hello-world"
    text = "\n".join(
        [
            title,
            data,
            text_table(headers, rows),
            f"recsys/hello-world throughput: {ratio:.2f}, p99: {p99_ratio:.2f}",
            "",
            "Manifest swap under load",
            text_table(swap_headers, swap_rows),
            "",
            f"{RULES_COUNT:,} active merchandising rules",
            text_table(rules_headers, rules_rows),
            rules_summary,
            "",
            "Targets (docs/benchmarks.md#targets)",
            text_table(target_headers, target_rows),
            "",
            *notes,
        ]
    )
    markdown = "\n".join(
        [
            f"## {title}",
            "",
            machine,
            "",
            data,
            "",
            markdown_table(headers, rows),
            "",
            f"Recsys / hello-world: throughput **{ratio:.2f}**, p99 **{p99_ratio:.2f}**.",
            "",
            "Manifest swap under load (publish a new as-of day, then roll back):",
            "",
            markdown_table(swap_headers, swap_rows),
            "",
            f"{RULES_COUNT:,} active merchandising rules, runs alternating with runs without rules:",
            "",
            markdown_table(rules_headers, rules_rows),
            "",
            f"{rules_summary}.",
            "",
            "Targets (see [Targets](#targets)):",
            "",
            markdown_table(target_headers, target_rows),
            "",
            *(f"- {note}" for note in notes),
        ]
    )
    return Section(text=text, markdown=markdown)


BENCHMARK = Benchmark(
    name=NAME,
    description=(
        "HTTP API with the ALS model loaded (100k users, 20k items, 64 factors) vs a bare FastAPI "
        "hello-world under wrk, plus a manifest swap"
    ),
    run=run,
)
