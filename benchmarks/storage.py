"""`daily-run-s3`: the daily run with the landing zone, lake and artifacts in an S3-compatible bucket, next to
the same run on local disk.

E events per day (BENCH_STORAGE_EVENTS, default 100,000) for 3 days are generated with `recsys generate`
(same seed on both sides), and the first two days are run and published (not timed). Then the last day's
whole daily run, `recsys run --start <day 3>` as a user runs it (canonicalize, gates, daily aggregates,
window artifacts, evaluation, publish), is timed:

- local disk: RECSYS_HOME is the system of record;
- S3, warm cache: RECSYS_STORAGE_URL points at a SeaweedFS server on loopback (started here) and the run's
  RECSYS_HOME is the cache the earlier days left (a daily run on the same machine);
- S3, cold cache: the same run of another copy from an empty RECSYS_HOME, so everything the day needs is
  downloaded first (a new machine or pod).

Each is a fresh copy of the state after day 2, run REPEATS times (`--repeats`, default 3); the best wall time
is reported. The bucket's cost is the ratio to local disk.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import time
import uuid

from benchmarks.harness import (
    Benchmark,
    BenchmarkError,
    Options,
    Section,
    events,
    machine_description,
    render_section,
    run_recsys,
)
from benchmarks.seaweedfs import S3Server, running_server

NAME = "daily-run-s3"
DAYS = 3
DEFAULT_EVENTS = 100_000
DEFAULT_REPEATS = 3


def _events_per_day() -> int:
    text = os.environ.get("BENCH_STORAGE_EVENTS", "").strip().replace("_", "")
    if not text:
        return DEFAULT_EVENTS
    if not text.isdigit() or int(text) < 1000:
        raise BenchmarkError(f"BENCH_STORAGE_EVENTS: expected a whole number >= 1000, got {text!r}")
    return int(text)


def _timed(variables: dict[str, str], *args: str) -> float:
    started = time.perf_counter()
    run_recsys(variables, *args)
    return time.perf_counter() - started


def _copy_bucket_prefix(server: S3Server, bucket: str, source: str, target: str) -> None:
    """Copy every object under `source/` to `target/` (a fresh copy of the bucket's state for one run)."""
    import obstore

    store = server.store(bucket)
    for key in server.keys(bucket, source):
        obstore.copy(store, key, target + key.removeprefix(source))


def run(options: Options) -> Section:
    per_day = _events_per_day()
    repeats = options.repeats or DEFAULT_REPEATS
    end = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)
    days = [(end - dt.timedelta(days=DAYS - 1 - i)).isoformat() for i in range(DAYS)]
    root = options.workdir / NAME
    shutil.rmtree(root, ignore_errors=True)
    common = {"RECSYS_START_DATE": days[0]}
    generate = ["generate", "--end", end.isoformat(), "--days", str(DAYS), "--events-per-day", str(per_day)]
    generate += ["--seed", str(options.seed)]
    history = ["run", "--start", days[0], "--end", days[-2], "--quiet"]
    daily = ["run", "--start", days[-1], "--quiet"]

    local_base = {**common, "RECSYS_HOME": str(root / "local-base")}
    run_recsys(local_base, *generate)
    run_recsys(local_base, *history)
    local: list[float] = []
    for n in range(repeats):
        home = root / f"local-{n}"
        shutil.copytree(root / "local-base", home, symlinks=True)
        local.append(_timed({**common, "RECSYS_HOME": str(home)}, *daily))

    warm: list[float] = []
    cold: list[float] = []
    with running_server() as server:
        bucket = server.new_bucket()
        s3_base = {**common, **server.environ(bucket, "base"), "RECSYS_HOME": str(root / "s3-base")}
        run_recsys(s3_base, *generate)
        run_recsys(s3_base, *history)
        for n in range(repeats):
            for kind, times in (("warm", warm), ("cold", cold)):
                prefix = f"{kind}-{n}-{uuid.uuid4().hex[:6]}"
                _copy_bucket_prefix(server, bucket, "base/", f"{prefix}/")
                home = root / f"s3-{prefix}"
                if kind == "warm":
                    shutil.copytree(root / "s3-base", home, symlinks=True)
                variables = {**common, **server.environ(bucket, prefix), "RECSYS_HOME": str(home)}
                times.append(_timed(variables, *daily))
    shutil.rmtree(root, ignore_errors=True)

    best_local, best_warm, best_cold = min(local), min(warm), min(cold)
    rows = [
        ["local disk", f"{best_local:.1f}", "1.00"],
        ["S3 (SeaweedFS), warm cache", f"{best_warm:.1f}", f"{best_warm / best_local:.2f}"],
        ["S3 (SeaweedFS), cold cache", f"{best_cold:.1f}", f"{best_cold / best_local:.2f}"],
    ]
    headers = ["storage", "daily run (s)", "ratio to local disk"]
    description = (
        f"The daily run of one day (`recsys run --start <day>`: canonicalize, gates, daily aggregates, window "
        f"artifacts, evaluation, publish) with {events(per_day)} events per day and {DAYS - 1} earlier days "
        f"already run, on local disk and with `RECSYS_STORAGE_URL` pointing at a SeaweedFS server on loopback; "
        f"best of {repeats} (`python -m benchmarks.run --only {NAME}`, BENCH_STORAGE_EVENTS sets the size)."
    )
    return render_section(
        title=f"{NAME}: {events(per_day)} events/day",
        heading="Daily run on S3 next to local disk",
        machine=machine_description(),
        description=description,
        tables=[(headers, rows)],
        targets=[
            [
                "the bucket's cost of a warm daily run is reported (no target set)",
                f"{best_warm / best_local:.2f}x",
            ]
        ],
        notes=[
            "warm cache: the RECSYS_HOME the earlier days left; only what changed is transferred (one listing "
            "per tree plus the new landing day before the run, the day's lake files and the published "
            "artifacts after it)",
            "cold cache: an empty RECSYS_HOME; the whole landing zone and lake are downloaded before the run",
        ],
    )


BENCHMARK = Benchmark(NAME, "the daily run with storage on S3 (SeaweedFS) next to local disk", run)
