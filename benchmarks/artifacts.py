"""Window-artifact benchmarks: co-occurrence next to a bare DuckDB query, the daily run's cost as the
history grows, and the ALS artifact next to a bare `implicit` fit.

`cooc`: N events over a W-day window (default 10M events over 7 days), generated once and canonicalized,
with item_daily and pair_daily built for every day (cached under `<workdir>/cooc/`, keyed by sizes, seed
and the generator and pipeline sources). Measured, each in a fresh process, runs alternating:
- baseline: one bare DuckDB statement over the W days of canonical Parquet (session-distinct interest
  items, self-join within sessions, count, cosine, top-K per item, written to one Parquet file);
- recsys full rebuild, in one process: `build_daily_aggregates("pair_daily", ...)` of the W days (one
  batched query from canonical events, as a backfill run does), then `build_window_artifacts("cooc", ...,
  as_of=last day)` with a W-day window (reads the W pair_daily partitions, writes the artifact). The
  target compares this with the baseline;
- recsys steady state, in one process: pair_daily of the last day only (the older days' are already
  built), then the same cooc window artifact: what a daily run pays.

`daily-run`: E events per day (default 1M). One day D's whole incremental run, from the canonical events
through the published manifest (canonicalize D, gates, item_daily / pair_daily / user_item_daily of D,
popularity / cooc / user_history / als as of D, the offline evaluation of D, publish), is measured with a
H-day window (default 30) twice: with only D in the lake (1 day of history) and with the H-1 previous days
already canonicalized, checked and aggregated (cached under `<workdir>/daily-run/`). Each step (asset) is
timed inside the run; the evaluation is split into its rebuild of every kind as of D minus the held-out
days and the rest (scoring through the served ranking, guardrails, report).

`als`: E events per day over a W-day window (default 2M events per day over 30 days, from a pool of 150k
users over 20k items: about 100k users and 2M user-item interactions), each day generated, canonicalized
and its landing files removed, then item_daily and user_item_daily built for every day (cached under
`<workdir>/als/`). Measured, each in a fresh process, runs alternating:
- baseline: a bare `implicit.cpu.als.AlternatingLeastSquares` fit (the artifact's parameters, BLAS held to
  one thread) on the CSR matrix the artifact trains on, built outside the timed region from the same SQL
  rows with `interaction_matrix`;
- recsys: `build_window_artifacts("als", ...)` as of the last day into an empty artifact root: the SQL over
  the window, the matrix, the fit, the files, their hashes and the version directory. Its steps are timed
  by wrapping the functions the build calls (see `artifacts_tasks.ALS_STEPS`).
Every run must give the same artifact version, and the artifact's factors must be bit-identical to the
baseline's: both sides did the same work, and the output does not depend on the run.

Sizes are environment variables, so `make bench` stays short by default (`--sizes` is the ingest
benchmark's and does not apply here):
    BENCH_COOC_EVENTS (10000000), BENCH_COOC_DAYS (7),
    BENCH_DAILY_EVENTS (events per day, 1000000), BENCH_DAILY_HISTORY_DAYS (30),
    BENCH_ALS_EVENTS (events per day, 2000000), BENCH_ALS_DAYS (30), BENCH_ALS_USERS (user pool, 150000).
Every measured process runs under a memory guard, BENCH_MEMORY_LIMIT_MIB (8192): one that exceeds it is
stopped and reported as stopped (no time), rather than left to the kernel's OOM killer on a shared machine.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.harness import (
    Benchmark,
    BenchmarkError,
    Measurement,
    Options,
    Section,
    events,
    machine_description,
    measure,
    render_section,
    source_fingerprint,
)

TASKS = "benchmarks.artifacts_tasks"
COOC = "cooc"
DAILY = "daily-run"
ALS = "als"
DEFAULT_REPEATS = 3
# A measured process whose resident memory exceeds this is stopped (BENCH_MEMORY_LIMIT_MIB overrides).
DEFAULT_MEMORY_LIMIT_MIB = 8192

# Synthetic traffic shape (see recsys_dagster.ingest.generate): Zipf-like popularity over this many items and users.
N_USERS = 200_000
N_ITEMS = 20_000
COOC_AS_OF = dt.date(2025, 1, 15)
DAILY_DAY = dt.date(2025, 3, 15)
ALS_AS_OF = dt.date(2025, 2, 14)

# Thresholds these benchmarks judge (the targets are listed in docs/benchmarks.md#targets), as multiples
# of a measurement of the same run: the bare DuckDB statement (cooc), the run with one day of history.
COOC_STEADY_RATIO_TARGET = 1.0
COOC_REBUILD_RATIO_TARGET = 2.0
HISTORY_RATIO_TARGET = 1.5
# The whole als artifact build as a multiple of the bare implicit fit on the same matrix.
ALS_RATIO_TARGET = 1.2

# What shapes the cached data (see `harness.source_fingerprint`: a directory covers every module under it,
# and a path that no longer exists is an error). The cached lakes hold canonical events, gate results and
# daily aggregates; window artifacts are always built by the measured run, so the window models' SQL
# (popularity, cooc, user_history, als_interactions) is not part of the key.
GENERATOR_SOURCES = ("recsys_dagster/ingest/generate.py",)
PIPELINE_SOURCES = (
    "recsys_core",
    "recsys_dagster/ingest",
    "recsys_dagster/transform/aggregates.py",
    "recsys_dagster/transform/sql.py",
    "dbt_like_sql/item_daily.sql",
    "dbt_like_sql/pair_daily.sql",
    "dbt_like_sql/user_item_daily.sql",
    "dbt_like_sql/checks",
)


# ----------------------------------------------------------------------------------------- options


def _env_int(name: str, default: int, minimum: int) -> int:
    text = os.environ.get(name, "").strip().replace("_", "")
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise BenchmarkError(f"{name}: expected a whole number >= {minimum}, got {os.environ[name]!r}")
    return value


def _repeats(options: Options) -> int:
    return options.repeats or DEFAULT_REPEATS


# ------------------------------------------------------------------------------------ cached data


def _shown(path: Path, options: Options) -> str:
    try:
        return str(path.relative_to(options.workdir.parent))
    except ValueError:
        return str(path)


def _cached(
    name: str, folder: Path, key: dict, what: str, options: Options, build: Callable[[], dict]
) -> Path:
    """`folder` as built by `build()` for `key`; rebuilt (from scratch) unless its marker matches."""
    marker = folder / "_cache_key.json"
    if marker.exists() and json.loads(marker.read_text()).get("key") == key:
        print(f"[{name}] using cached {what} in {_shown(folder, options)}", flush=True)
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    print(f"[{name}] building {what} (cached for later runs) ...", flush=True)
    built = build()
    marker.write_text(json.dumps({"key": key, "built": built}, indent=2))
    return folder


def _raw(name: str, options: Options, end_day: dt.date, days: int, events_per_day: int) -> tuple[Path, dict]:
    """The raw landing root of `days` days of `events_per_day` events ending at `end_day`."""
    key = {
        "end_day": end_day.isoformat(),
        "days": days,
        "events_per_day": events_per_day,
        "seed": options.seed,
        "users": N_USERS,
        "items": N_ITEMS,
        "generator": source_fingerprint(*GENERATOR_SOURCES),
    }
    folder = options.workdir / name / f"raw-e{events_per_day}-d{days}-seed{options.seed}"

    def build() -> dict:
        generated = measure(
            f"{TASKS}:generate",
            {
                "raw_root": str(folder),
                "end_day": end_day.isoformat(),
                "days": days,
                "events_per_day": events_per_day,
                "seed": options.seed,
                "n_users": N_USERS,
                "n_items": N_ITEMS,
            },
        )
        print(f"[{name}] generated {generated.output['total_events']:,} events in {generated.seconds:.0f} s")
        return generated.output

    what = f"raw events ({days} days x {events_per_day:,})"
    return _cached(name, folder, key, what, options, build), key


def _env(home: Path, raw_root: Path, start: dt.date, window_days: int) -> dict[str, str]:
    return {
        "RECSYS_HOME": str(home),
        "RECSYS_RAW_ROOT": str(raw_root),
        "RECSYS_START_DATE": start.isoformat(),
        "RECSYS_WINDOW_DAYS": str(window_days),
    }


def _link_tree(src: Path, dst: Path) -> None:
    """Copy a tree, hard-linking Parquet files (never modified in place) and copying everything else
    (registries are appended to), so a run never changes the cache."""

    def copy(source: str, target: str) -> None:
        if source.endswith(".parquet"):
            try:
                os.link(source, target)
                return
            except OSError:
                pass
        shutil.copy2(source, target)

    shutil.copytree(src, dst, copy_function=copy)


def _fresh_dir(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def _window(as_of: dt.date, days: int) -> list[dt.date]:
    return [as_of - dt.timedelta(days=back) for back in range(days - 1, -1, -1)]


def _iso(days: list[dt.date]) -> list[str]:
    return [d.isoformat() for d in days]


@dataclass(frozen=True)
class Stopped:
    """A measurement the memory guard stopped: what it saw and which steps had finished."""

    rss_mib: float
    limit_mib: int
    seconds: float
    step: str | None
    done: dict[str, float]

    def describe(self) -> str:
        where = f" in {self.step}" if self.step else ""
        return (
            f"stopped{where}: resident memory {self.rss_mib:,.0f} MiB > the {self.limit_mib:,} MiB guard "
            f"after {self.seconds:.1f} s"
        )


@dataclass
class Runs:
    """The runs of one measured thing; once the guard stops it, it is not run again."""

    runs: list[Measurement] = field(default_factory=list)
    stopped: Stopped | None = None

    @property
    def ok(self) -> bool:
        return self.stopped is None and bool(self.runs)

    def best(self) -> Measurement:
        return min(self.runs, key=lambda m: m.seconds)

    def peak(self) -> float:
        return max(m.peak_rss_mib for m in self.runs)

    def add(self, result: Measurement | Stopped) -> None:
        if isinstance(result, Stopped):
            self.stopped = result
        else:
            self.runs.append(result)

    def seconds_cell(self) -> str:
        return f"{self.best().seconds:.2f}" if self.ok else "stopped"

    def peak_cell(self) -> str:
        if self.stopped is not None:
            return f"> {self.stopped.limit_mib:,}"
        return f"{self.peak():,.0f}"


def _memory_limit_mib() -> int:
    return _env_int("BENCH_MEMORY_LIMIT_MIB", DEFAULT_MEMORY_LIMIT_MIB, 256)


def _measure_guarded(task: str, params: dict, guard_file: Path) -> Measurement | Stopped:
    """`measure` with the memory guard of `benchmarks.artifacts_tasks`; a guarded stop is a result."""
    guard_file.parent.mkdir(parents=True, exist_ok=True)
    guard_file.unlink(missing_ok=True)
    limit = _memory_limit_mib()
    try:
        return measure(task, params | {"memory_limit_mib": limit, "guard_file": str(guard_file)})
    except BenchmarkError:
        if not guard_file.exists():
            raise
        report = json.loads(guard_file.read_text())
        guard_file.unlink()
        return Stopped(
            report["rss_mib"], report["limit_mib"], report["seconds"], report["step"], report["done"]
        )


def _said(result: Measurement | Stopped) -> str:
    if isinstance(result, Stopped):
        return result.describe()
    return f"{result.seconds:.2f} s, {result.peak_rss_mib:,.0f} MiB"


def _met(ok: bool) -> str:
    return "met" if ok else "NOT MET"


def _baseline_verdict(runs: Runs, baseline: Runs, limit: float, what: str) -> str:
    """Whether the best of `runs` took at most `limit` x the best of the bare-library `baseline`."""
    if not baseline.ok:
        return f"not judged: the baseline {_not_done(baseline)}"
    if not runs.ok:
        return f"NOT MET: the {what} {_not_done(runs)}"
    ours, base = runs.best().seconds, baseline.best().seconds
    return f"{_met(ours / base <= limit)} ({ours / base:.2f}x: {ours:.2f} s vs {base:.2f} s)"


def _not_done(runs: Runs) -> str:
    return runs.stopped.describe() if runs.stopped is not None else "did not run"


def _threads(runs: list[Measurement]) -> str:
    seen = {(m.output["duckdb_threads"], m.output["polars_threads"]) for m in runs}
    return ", ".join(f"DuckDB {d} / polars {p}" for d, p in sorted(seen)) or "unknown"


def _idle(runs: list[Measurement]) -> str:
    return f"{min(m.idle_rss_mib for m in runs):,.0f}" if runs else "?"


# ---------------------------------------------------------------------------------- co-occurrence


@dataclass(frozen=True)
class CoocResult:
    total_events: int
    days: list[dt.date]
    baseline: Runs
    full: Runs
    steady: Runs
    agreement: dict

    def best_step(self, runs: Runs, step: str) -> float:
        return min(m.output["steps"][step] for m in runs.runs)


def run_cooc(options: Options) -> Section:
    machine = machine_description()  # before measuring, so the load average is the one at the start
    total = _env_int("BENCH_COOC_EVENTS", 10_000_000, 1_000)
    n_days = _env_int("BENCH_COOC_DAYS", 7, 1)
    per_day = math.ceil(total / n_days)
    days = _window(COOC_AS_OF, n_days)
    raw_root, raw_key = _raw(COOC, options, COOC_AS_OF, n_days, per_day)

    lake_key = raw_key | {"pipeline": source_fingerprint(*PIPELINE_SOURCES), "window_days": n_days}
    home = options.workdir / COOC / f"home-e{per_day}-d{n_days}-seed{options.seed}"
    env = _env(home, raw_root, days[0], n_days)

    def prepare() -> dict:
        prepared = measure(
            f"{TASKS}:prepare_days",
            {"env": env, "days": _iso(days), "gates": False, "models": ["item_daily", "pair_daily"]},
        )
        print(f"[{COOC}] canonicalized and aggregated {n_days} days in {prepared.seconds:.0f} s", flush=True)
        return prepared.output

    _cached(COOC, home, lake_key, "canonical events + item_daily + pair_daily", options, prepare)

    run_root = options.workdir / COOC / "run"
    guard = run_root / "guard.json"
    baseline, full, steady = Runs(), Runs(), Runs()
    agreement: dict = {}
    repeats = _repeats(options)
    # The full rebuild starts from canonical events only; the steady state also has the older days' pair_daily.
    recsys_runs = (
        ("full rebuild", full, ("canonical_events",), days),
        ("steady state", steady, ("canonical_events", "pair_daily"), days[-1:]),
    )
    for attempt in range(1, repeats + 1):
        said = []
        out_dir = _fresh_dir(run_root / "baseline")
        if baseline.stopped is None:
            result = _measure_guarded(
                f"{TASKS}:cooc_baseline",
                {"env": env, "days": _iso(days), "out": str(out_dir / "neighbors.parquet")},
                guard,
            )
            baseline.add(result)
            said.append(f"baseline {_said(result)}")
        for label, runs, assets, build_days in recsys_runs:
            if runs.stopped is not None:
                continue
            recsys_home = _fresh_dir(run_root / "recsys")
            for asset in assets:
                _link_tree(home / "lake" / asset, recsys_home / "lake" / asset)
            result = _measure_guarded(
                f"{TASKS}:cooc_recsys",
                {
                    "env": _env(recsys_home, raw_root, days[0], n_days),
                    "as_of": days[-1].isoformat(),
                    "build_days": _iso(build_days),
                },
                guard,
            )
            if isinstance(result, Measurement):
                if result.output["missing_days"]:
                    raise BenchmarkError(
                        f"cooc window missed pair_daily days {result.output['missing_days']}"
                    )
                if not agreement and baseline.ok:
                    agreement = _agreement(
                        out_dir / "neighbors.parquet", [Path(p) for p in result.output["paths"]]
                    )
            shutil.rmtree(recsys_home)
            runs.add(result)
            said.append(f"recsys {label} {_said(result)}")
        shutil.rmtree(out_dir)
        if not said:
            break
        print(f"[{COOC}] run {attempt}/{repeats}: " + " | ".join(said), flush=True)
    raw_total = json.loads((raw_root / "_cache_key.json").read_text())["built"]["total_events"]
    result = CoocResult(raw_total, days, baseline, full, steady, agreement)
    return _render_cooc(result, machine)


def _agreement(baseline_path: Path, recsys_paths: list[Path]) -> dict:
    """How far the two tables agree: rows, shared (item, neighbour) rows, identical top-1 neighbours."""
    import polars as pl

    keys = ["tenant", "surface", "item_id", "neighbor_id"]
    base = pl.read_parquet(baseline_path)
    # <artifact root>/<tenant>/<surface>/cooc/<version>/neighbors.parquet
    ours = pl.concat(
        [
            pl.read_parquet(p).with_columns(tenant=pl.lit(p.parts[-5]), surface=pl.lit(p.parts[-4]))
            for p in recsys_paths
        ]
    )
    shared = ours.join(base, on=keys, how="semi").height
    top_ours = ours.filter(pl.col("rank") == 1).select(keys)
    top_base = base.filter(pl.col("rank") == 1).select(keys)
    same_top = top_ours.join(top_base, on=keys, how="semi").height
    result = {
        "baseline_rows": base.height,
        "recsys_rows": ours.height,
        "shared_rows": shared,
        "items": top_ours.height,
        "same_top1": same_top,
    }
    if ours.height == 0 or shared / ours.height < 0.5:
        raise BenchmarkError(f"baseline and recsys co-occurrence tables disagree: {result}")
    return result


def _ratio_cell(runs: Runs, baseline: Runs) -> str:
    if runs.ok and baseline.ok:
        return f"{runs.best().seconds / baseline.best().seconds:.2f}x"
    return "-"


def _rows_cell(runs: Runs) -> str:
    return f"{runs.best().output['rows']:,}" if runs.ok else "-"


def _recsys_row(work: str, runs: Runs, baseline: Runs) -> list[str]:
    return [
        "recsys",
        work,
        str(len(runs.runs)),
        runs.seconds_cell(),
        _ratio_cell(runs, baseline),
        runs.peak_cell(),
        _rows_cell(runs),
    ]


def _render_cooc(r: CoocResult, machine: str) -> Section:
    n_days = len(r.days)
    headers = ["side", "work", "runs", "best s", "x baseline", "peak MiB", "rows out"]
    baseline_row = [
        "baseline",
        f"one DuckDB statement over {n_days} days of canonical events",
        str(len(r.baseline.runs)),
        r.baseline.seconds_cell(),
        "1.00x" if r.baseline.ok else "-",
        r.baseline.peak_cell(),
        _rows_cell(r.baseline),
    ]
    rows = [
        baseline_row,
        _recsys_row(f"full rebuild: pair_daily of {n_days} days + cooc window", r.full, r.baseline),
        _recsys_row("steady state: pair_daily of the new day + cooc window", r.steady, r.baseline),
    ]
    target_rows = [
        [
            f"daily steady state <= {COOC_STEADY_RATIO_TARGET:.1f}x the bare DuckDB statement",
            _baseline_verdict(r.steady, r.baseline, COOC_STEADY_RATIO_TARGET, "steady state"),
        ],
        [
            f"full rebuild <= {COOC_REBUILD_RATIO_TARGET:.1f}x the bare DuckDB statement",
            _baseline_verdict(r.full, r.baseline, COOC_REBUILD_RATIO_TARGET, "full rebuild"),
        ],
    ]

    measured = r.baseline.runs + r.full.runs + r.steady.runs
    notes = [
        f"{r.total_events:,} events ({n_days} days x {math.ceil(r.total_events / n_days):,}) from "
        f"{N_USERS:,} users over {N_ITEMS:,} items; window {r.days[0]}..{r.days[-1]}. Interest events are "
        "click, add_to_cart, purchase and rating (weight > 0); exposures, the bulk of the events, are ignored "
        "by both sides.",
        "Wall seconds of the measured call: best of the runs; peak MiB: highest of the runs.",
        f"Threads: {_threads(measured)} (defaults, the same on both sides); each process holds about "
        f"{_idle(measured)} MiB after imports, included in every peak.",
    ]
    for label, runs in (("full rebuild", r.full), ("steady state", r.steady)):
        if runs.ok:
            notes.append(
                f"Steps of the {label} (best of the runs): pair_daily {r.best_step(runs, 'pair_daily'):.2f} s, "
                f"cooc window {r.best_step(runs, 'cooc'):.2f} s; {runs.best().output['pair_daily_rows']:,} "
                "pair_daily rows built."
            )
    if r.agreement:
        a = r.agreement
        notes.append(
            f"Same result: the recsys artifact has {a['recsys_rows']:,} rows, the baseline "
            f"{a['baseline_rows']:,}; {a['shared_rows'] / max(a['recsys_rows'], 1):.1%} of the recsys (item, "
            f"neighbour) rows are in the baseline and {a['same_top1'] / max(a['items'], 1):.1%} of the "
            f"{a['items']:,} items have the same top neighbour. Differences are by design: recsys counts a "
            "session per day partition (a session across midnight counts on both days) and caps sessions at "
            "`max_session_items` distinct items."
        )
    notes.append(
        "Both recsys cases are judged: the steady state, what a daily run pays, and the full rebuild, the "
        "like-for-like comparison; recsys keeps a per-day intermediate (pair_daily) so that the steady state "
        "costs one day plus a merge."
    )
    notes.append(
        "Every measured process runs under a memory guard (`BENCH_MEMORY_LIMIT_MIB`, default "
        f"{DEFAULT_MEMORY_LIMIT_MIB:,} MiB): one that exceeds it is stopped and reported as such, with no time."
    )
    return render_section(
        title=f"Co-occurrence: {events(r.total_events)} events over {n_days} days, recsys pair_daily + cooc "
        "window vs one bare DuckDB statement",
        heading=f"Co-occurrence: {events(r.total_events)} events over a {n_days}-day window",
        machine=machine,
        description=f"Baseline: one bare DuckDB statement over the {n_days} days of canonical Parquet: "
        "session-distinct interest items, self-join within sessions, count (min support 2), cosine, top 50 per "
        'item, `COPY ... TO` one Parquet file. Recsys full rebuild: `build_daily_aggregates("pair_daily")` of '
        f"the {n_days} days from the same canonical events (one batched query, as a backfill run does), then "
        f'`build_window_artifacts("cooc")` as of the last day with a {n_days}-day window (default config '
        "otherwise). Recsys steady state: the same with only the last day's pair_daily to build. Each in "
        "a fresh process; runs alternate baseline, full rebuild, steady state.",
        tables=[(headers, rows)],
        targets=target_rows,
        notes=notes,
        doc_notes=[
            "Sizes: `BENCH_COOC_EVENTS` (default 10000000) and `BENCH_COOC_DAYS` (default 7) in the environment."
        ],
    )


# ------------------------------------------------------------------------------------- daily run

HISTORY_MODELS = ("item_daily", "pair_daily", "user_item_daily")
# The steps of one day's run in the pipeline's order, each with the asset it materializes.
STEPS = (
    ("canonicalize", "canonical_events: canonicalize D (raw JSON lines -> canonical Parquet)"),
    ("gates", "canonical_events checks: blocking gates on D"),
    ("item_daily", "item_daily of D"),
    ("pair_daily", "pair_daily of D"),
    ("user_item_daily", "user_item_daily of D"),
    ("popularity", "popularity as of D (reads the window's item_daily)"),
    ("cooc", "cooc as of D (reads the window's pair_daily)"),
    ("user_history", "user_history as of D (reads the window's user_item_daily)"),
    ("als", "als as of D (trains on the window's user_item_daily)"),
    ("evaluation_build", "evaluation of D: every kind rebuilt as of D - 1 (als trained again)"),
    ("evaluation", "evaluation of D: scoring through the served ranking, guardrails, report"),
    ("publish", "published_manifest: publish D (re-confirms the window's gates and D's evaluation)"),
)
# Steps whose work grows with the window by nature: they train on it (als), rebuild and train every kind on
# it again (the evaluation's rebuild), or score the users who have a training history in it (the
# evaluation's scoring: with one day of history there is nobody to score).
WINDOW_GROWTH_STEPS = ("als", "evaluation_build", "evaluation")


@dataclass(frozen=True)
class DailyResult:
    events_per_day: int
    history_days: int
    one: Runs
    full: Runs

    @property
    def ok(self) -> bool:
        return self.one.ok and self.full.ok

    @property
    def ratio(self) -> float:
        return self.full.best().seconds / self.one.best().seconds

    @staticmethod
    def step(case: Runs, name: str) -> float | None:
        """Best seconds of one step over the runs (a stopped run counts for the steps it finished)."""
        values = [m.output["steps"][name] for m in case.runs]
        if case.stopped is not None and name in case.stopped.done:
            values.append(case.stopped.done[name])
        return min(values) if values else None

    @staticmethod
    def without(case: Runs, *names: str) -> float:
        """Best seconds of the whole run less some of its steps."""
        return min(m.seconds - sum(m.output["steps"].get(name, 0.0) for name in names) for m in case.runs)

    @classmethod
    def step_cell(cls, case: Runs, name: str) -> str:
        value = cls.step(case, name)
        if value is not None:
            return f"{value:.2f}"
        if case.stopped is not None and case.stopped.step == name:
            return "stopped"
        return "not reached"


def run_daily(options: Options) -> Section:
    machine = machine_description()
    per_day = _env_int("BENCH_DAILY_EVENTS", 1_000_000, 1_000)
    history = _env_int("BENCH_DAILY_HISTORY_DAYS", 30, 2)
    days = _window(DAILY_DAY, history)
    raw_root, raw_key = _raw(DAILY, options, DAILY_DAY, history, per_day)

    history_key = raw_key | {
        "pipeline": source_fingerprint(*PIPELINE_SOURCES),
        "window_days": history,
        "history": ["canonical_events", "gates", *HISTORY_MODELS],
    }
    history_home = options.workdir / DAILY / f"history-e{per_day}-d{history}-seed{options.seed}"
    history_env = _env(history_home, raw_root, days[0], history)

    def prepare() -> dict:
        prepared = measure(
            f"{TASKS}:prepare_days",
            {"env": history_env, "days": _iso(days[:-1]), "gates": True, "models": list(HISTORY_MODELS)},
        )
        print(f"[{DAILY}] {history - 1} days of history built in {prepared.seconds:.0f} s", flush=True)
        return prepared.output

    what = f"{history - 1} days of history (canonical events, gate results, daily aggregates)"
    _cached(DAILY, history_home, history_key, what, options, prepare)

    run_home = options.workdir / DAILY / "run"
    guard = options.workdir / DAILY / "guard.json"
    one, full = Runs(), Runs()
    repeats = _repeats(options)
    for attempt in range(1, repeats + 1):
        for label, case in (("1 day", one), (f"{history} days", full)):
            if case.stopped is not None:
                continue
            home = _fresh_dir(run_home)
            if case is full:
                _link_tree(history_home / "lake", home / "lake")
            start = days[0] if case is full else days[-1]
            result = _measure_guarded(
                f"{TASKS}:daily_run",
                {
                    "env": _env(home, raw_root, start, history),
                    "day": days[-1].isoformat(),
                    "window_days": history,
                },
                guard,
            )
            shutil.rmtree(home)
            if isinstance(result, Measurement):
                out = result.output
                if out["failed_gates"] or out["publish"] != ["publish"]:
                    raise BenchmarkError(f"daily run with {label} of history did not publish: {out}")
                expected = history if case is full else 1
                used = {kind: a["days_used"] for kind, a in out["artifacts"].items()}
                if set(used.values()) != {expected}:
                    raise BenchmarkError(f"daily run with {label} of history used window days {used}")
                if case is full and not out["steps"]["evaluation_build"]:
                    # With history the evaluation rebuilds every kind; no time means the wrapper that
                    # times it was not called (the evaluation no longer looks the builder up by name).
                    raise BenchmarkError("daily run: the evaluation's rebuild was not timed")
                steps = ", ".join(f"{k} {v:.2f}" for k, v in out["steps"].items())
            else:
                steps = ", ".join(f"{k} {v:.2f}" for k, v in result.done.items())
            case.add(result)
            print(
                f"[{DAILY}] run {attempt}/{repeats}, {label} of history: {_said(result)} ({steps})",
                flush=True,
            )
    return _render_daily(DailyResult(per_day, history, one, full), machine)


def _render_daily(r: DailyResult, machine: str) -> Section:
    h = r.history_days
    headers = [
        "step (asset)",
        "1 day s",
        f"{h} days s",
        f"{h}d - 1d s",
        f"{h}d / 1d",
        f"share of the {h}-day run",
    ]
    rows = []
    growth = []
    whole_full = r.full.best().seconds if r.full.ok else None
    for name, label in STEPS:
        a, b = r.step(r.one, name), r.step(r.full, name)
        both = a is not None and b is not None
        if both:
            growth.append((b - a, name))
        rows.append(
            [
                label,
                r.step_cell(r.one, name),
                r.step_cell(r.full, name),
                f"{b - a:+.2f}" if both else "-",
                # A step with (almost) nothing to do with one day has no meaningful ratio.
                f"{b / a:.2f}x" if both and a >= 0.05 else "-",
                f"{b / whole_full:.0%}" if b is not None and whole_full else "-",
            ]
        )

    def total(case: Runs) -> str:
        return f"{case.best().seconds:.2f}" if case.ok else "did not finish"

    rows.append(
        [
            "**whole run** (best run)",
            total(r.one),
            total(r.full),
            f"{r.full.best().seconds - r.one.best().seconds:+.2f}" if r.ok else "-",
            f"{r.ratio:.2f}x" if r.ok else "-",
            "100%" if whole_full else "-",
        ]
    )
    rows.append(["peak RSS MiB (highest run)", r.one.peak_cell(), r.full.peak_cell(), "", "", ""])

    if r.ok:
        one_s, full_s = r.one.best().seconds, r.full.best().seconds
        verdict = f"{_met(r.ratio <= HISTORY_RATIO_TARGET)} ({r.ratio:.2f}x: {full_s:.2f} s vs {one_s:.2f} s)"
    else:
        stops = [
            f"the run with {label} of history {case.stopped.describe()}"
            for label, case in (("1 day", r.one), (f"{h} days", r.full))
            if case.stopped is not None
        ]
        verdict = "NOT MET: " + "; ".join(stops)
    target_rows = [[f"{h} days of history cost <= {HISTORY_RATIO_TARGET}x one day", verdict]]

    measured = r.one.runs + r.full.runs
    notes = [
        f"{r.events_per_day:,} events per day from {N_USERS:,} users over {N_ITEMS:,} items; day D = "
        f"{DAILY_DAY}; every artifact has a {h}-day window. '1 day': the lake holds only D (the other "
        f"{h - 1} window days are missing). '{h} days': the {h - 1} days before D are already canonicalized, "
        "checked and aggregated (item_daily, pair_daily, user_item_daily), as the previous daily runs leave "
        "them. Both start from an empty artifact root.",
        "Each run in a fresh process, the two cases alternating; steps are timed inside the run. Step "
        "seconds: best of the runs for that step; whole run: the best run (so the steps need not add up to "
        "it exactly). The evaluation's two rows add up to the `evaluate_day` call: its rebuild is timed by "
        "wrapping `build_window_artifacts` as the evaluation calls it (into a scratch root under the lake).",
    ]
    if growth:
        notes.append(
            "Largest growth with history: "
            + ", ".join(f"{n} {d:+.2f} s" for d, n in sorted(growth, reverse=True)[:3])
            + "."
        )
    if r.ok:
        one, full = r.without(r.one, *WINDOW_GROWTH_STEPS), r.without(r.full, *WINDOW_GROWTH_STEPS)
        grown = sum(r.step(r.full, name) or 0.0 for name in WINDOW_GROWTH_STEPS)
        notes.append(
            "Steps whose work grows with the window by nature: the als artifact (trains on the window's "
            "interactions), the evaluation's rebuild (every kind again as of D - 1, als trained again) and its "
            "scoring (only users with a training history in the window are scored: with one day of history "
            f"there is nobody to score). Together {grown:.2f} s of the {h}-day run "
            f"({grown / r.full.best().seconds:.0%}). Without them (each run's total minus those steps, best "
            f"run): {one:.2f} s with 1 day, {full:.2f} s with {h} days ({full / one:.2f}x); the target is "
            "judged on the whole run."
        )
    for label, case in (("1 day", r.one), (f"{h} days", r.full)):
        if case.runs:
            verdicts = case.best().output.get("evaluation", [])
            said = "; ".join(
                (f"{v['users']:,} users scored, " if v["users"] else "")
                + ("passed" if v["passed"] else "FAILED")
                + (f" ({v['note']})" if v["note"] else "")
                for v in verdicts
            )
            notes.append(f"Evaluation with {label} of history: {said or 'no target evaluated'}.")
    if r.full.ok:
        calls = sum(v["users"] * v["models"] for v in r.full.best().output.get("evaluation", []))
        scoring = r.step(r.full, "evaluation")
        if calls and scoring is not None:
            notes.append(
                f"The evaluation's scoring with {h} days asks the served ranking (`recommender.recommend`) for "
                f"{calls:,} lists (each evaluated user, once per model): at most {scoring / calls * 1000:.2f} ms "
                "a list on average (the row also holds the holdout split, guardrails and report)."
            )
    for label, case in (("1 day", r.one), (f"{h} days", r.full)):
        if case.runs:
            rows_out = case.best().output["artifacts"]
            notes.append(
                f"Artifact rows with {label} of history: "
                + ", ".join(f"{k} {v['rows']:,}" for k, v in rows_out.items())
                + "."
            )
    notes += [
        f"Threads: {_threads(measured)}; each process holds about {_idle(measured)} MiB after imports.",
        "Every run is under a memory guard (`BENCH_MEMORY_LIMIT_MIB`, default "
        f"{DEFAULT_MEMORY_LIMIT_MIB:,} MiB): a run that exceeds it is stopped; the steps it finished are "
        "still shown, the step it was in reads 'stopped'.",
    ]
    return render_section(
        title=f"Daily run: one day of {events(r.events_per_day)} events with 1 vs {h} days of history",
        heading=f"Daily run cost vs history length ({events(r.events_per_day)} events per day)",
        machine=machine,
        description="One day D's whole incremental run, canonical events through the published manifest: the "
        "plain-Python steps of the pipeline's assets in order, `canonicalize_partition`, `run_gates`, "
        "`build_daily_aggregate` (item_daily, pair_daily, user_item_daily), `build_window_artifacts` + "
        "`write_build_record` (popularity, cooc, user_history, als), `evaluate_day` (the offline evaluation, "
        "which publishing requires) and `publish_as_of`, with 1 day vs "
        f"{h} days of history in the window.",
        tables=[(headers, rows)],
        targets=target_rows,
        notes=notes,
        doc_notes=[
            "Sizes: `BENCH_DAILY_EVENTS` (events per day, default 1000000) and `BENCH_DAILY_HISTORY_DAYS` "
            "(default 30) in the environment."
        ],
    )


# ------------------------------------------------------------------------------------------------ ALS

# The steps of the als build (see `artifacts_tasks.ALS_STEPS`), in the order the build runs them.
ALS_STEPS = (
    ("sql", "SQL over the window (als_interactions -> polars)"),
    ("scopes", "tenants and surfaces of the window (item_daily)"),
    ("split", "rows per tenant and surface"),
    ("matrix", "CSR matrix (interaction_matrix)"),
    ("fit", "ALS fit (fit_factors)"),
    ("write", "write .npy and .parquet files"),
    ("fsync", "fsync the files"),
    ("hash", "SHA-256 of the files"),
    ("other", "the rest (meta, version, directory commit)"),
)


@dataclass(frozen=True)
class AlsResult:
    total_events: int
    days: list[dt.date]
    baseline: Runs
    recsys: Runs
    version: str | None

    def step(self, name: str) -> float:
        return min(m.output["steps"].get(name, 0.0) for m in self.recsys.runs)


def _cpu(runs: Runs) -> float:
    """The least CPU time (all threads) of the runs: less sensitive than wall time to a busy machine."""
    return min(m.output["cpu_seconds"] for m in runs.runs)


def run_als(options: Options) -> Section:
    machine = machine_description()
    per_day = _env_int("BENCH_ALS_EVENTS", 2_000_000, 1_000)
    n_days = _env_int("BENCH_ALS_DAYS", 30, 1)
    n_users = _env_int("BENCH_ALS_USERS", 150_000, 10)
    days = _window(ALS_AS_OF, n_days)
    generate = {"events_per_day": per_day, "seed": options.seed, "n_users": n_users, "n_items": N_ITEMS}
    key = generate | {
        "days": _iso(days),
        "generator": source_fingerprint(*GENERATOR_SOURCES),
        "pipeline": source_fingerprint(*PIPELINE_SOURCES),
    }
    home = options.workdir / ALS / f"home-e{per_day}-d{n_days}-u{n_users}-seed{options.seed}"
    env = _env(home, home / "raw", days[0], n_days)

    def prepare() -> dict:
        prepared = measure(
            f"{TASKS}:prepare_days",
            {
                "env": env,
                "days": _iso(days),
                "gates": False,
                "models": ["item_daily", "user_item_daily"],
                "generate": generate,
            },
        )
        print(f"[{ALS}] generated, canonicalized and aggregated {n_days} days in {prepared.seconds:.0f} s")
        return prepared.output

    what = f"{n_days} days x {per_day:,} events: canonical events + item_daily + user_item_daily"
    _cached(ALS, home, key, what, options, prepare)

    run_root = options.workdir / ALS / "run"
    guard = run_root / "guard.json"
    params = {"as_of": days[-1].isoformat()}
    baseline, recsys = Runs(), Runs()
    versions: set[str] = set()
    expected: dict[str, str] = {}
    repeats = _repeats(options)
    for attempt in range(1, repeats + 1):
        said = []
        if baseline.stopped is None:
            result = _measure_guarded(f"{TASKS}:als_baseline", params | {"env": env}, guard)
            if isinstance(result, Measurement):
                # The measured call of the baseline is the fit; its matrix was built before the clock started.
                result = dataclasses.replace(result, seconds=result.output["fit_seconds"])
                _same_factors(expected, result.output["factors_sha256"], "baseline")
            baseline.add(result)
            said.append(f"baseline {_said(result)}")
        if recsys.stopped is None:
            artifact_root = _fresh_dir(run_root / "artifacts")
            env_run = env | {"RECSYS_ARTIFACT_ROOT": str(artifact_root)}
            result = _measure_guarded(f"{TASKS}:als_recsys", params | {"env": env_run}, guard)
            if isinstance(result, Measurement):
                if result.output["missing_days"]:
                    raise BenchmarkError(
                        f"als window missed user_item_daily days {result.output['missing_days']}"
                    )
                versions.add(result.output["version"])
                _same_factors(expected, _factor_hashes(Path(result.output["path"])), "recsys")
            shutil.rmtree(artifact_root)
            recsys.add(result)
            said.append(f"recsys {_said(result)}")
        if not said:
            break
        print(f"[{ALS}] run {attempt}/{repeats}: " + " | ".join(said), flush=True)
    if len(versions) > 1:
        raise BenchmarkError(f"als: the same input gave different artifact versions {sorted(versions)}")
    total = json.loads((home / "_cache_key.json").read_text())["built"]["canonical_rows"]
    result = AlsResult(total, days, baseline, recsys, next(iter(versions), None))
    return _render_als(result, machine)


def _factor_hashes(path: Path) -> dict[str, str]:
    """SHA-256 of the factor arrays' float32 bytes, as `artifacts_tasks.als_baseline` hashes them."""
    import numpy as np

    return {
        name: hashlib.sha256(
            np.ascontiguousarray(np.load(path / name), dtype=np.float32).tobytes()
        ).hexdigest()
        for name in ("user_factors.npy", "item_factors.npy")
    }


def _same_factors(expected: dict[str, str], hashes: dict[str, str], side: str) -> None:
    """The first run's factor hashes become the expected ones; every later run must match them."""
    if not expected:
        expected.update(hashes)
    elif hashes != expected:
        raise BenchmarkError(f"als: the {side} factors differ from the first run's: {hashes} vs {expected}")


def _render_als(r: AlsResult, machine: str) -> Section:
    n_days = len(r.days)
    shape = r.baseline.best().output if r.baseline.ok else None
    both = r.baseline.ok and r.recsys.ok
    headers = ["side", "work", "runs", "best s", "x baseline", "CPU s", "CPU x baseline", "peak MiB"]
    rows = [
        [
            "baseline",
            "bare implicit ALS fit on the same CSR matrix",
            str(len(r.baseline.runs)),
            r.baseline.seconds_cell(),
            "1.00x" if r.baseline.ok else "-",
            f"{_cpu(r.baseline):.2f}" if r.baseline.ok else "-",
            "1.00x" if r.baseline.ok else "-",
            r.baseline.peak_cell(),
        ],
        [
            "recsys",
            f'build_window_artifacts("als"): {n_days}-day window -> artifact directory',
            str(len(r.recsys.runs)),
            r.recsys.seconds_cell(),
            _ratio_cell(r.recsys, r.baseline),
            f"{_cpu(r.recsys):.2f}" if r.recsys.ok else "-",
            f"{_cpu(r.recsys) / _cpu(r.baseline):.2f}x" if both else "-",
            r.recsys.peak_cell(),
        ],
    ]
    step_headers = ["step of the recsys build", "best s", "share of the build"]
    step_rows = []
    if r.recsys.ok:
        whole = r.recsys.best().seconds
        step_rows = [
            [label, f"{r.step(name):.2f}", f"{r.step(name) / whole:.0%}"] for name, label in ALS_STEPS
        ]
    target_rows = [
        [
            f"the whole als artifact build <= {ALS_RATIO_TARGET:.1f}x the bare implicit fit",
            _baseline_verdict(r.recsys, r.baseline, ALS_RATIO_TARGET, "recsys build"),
        ]
    ]

    measured = r.baseline.runs + r.recsys.runs
    notes = []
    if shape is not None:
        notes.append(
            f"{r.total_events:,} canonical events ({n_days} days) -> a matrix of {shape['users']:,} users x "
            f"{shape['items']:,} items with {shape['nnz']:,} interactions (the window's decayed, "
            "event-type-weighted user-item weights; exposures carry no weight)."
        )
    notes += [
        "Wall seconds: best of the runs (the target is judged on them); CPU s: the least CPU time of all the "
        "process's threads over the same region, which a busy machine inflates less than wall time; peak "
        "MiB: highest of the runs. The baseline's process also ran the SQL and built the matrix before its "
        "clock started, so its peak is not the fit's alone.",
        "All runs (wall / CPU s): baseline "
        + ", ".join(f"{m.seconds:.2f} / {m.output['cpu_seconds']:.2f}" for m in r.baseline.runs)
        + "; recsys "
        + ", ".join(f"{m.seconds:.2f} / {m.output['cpu_seconds']:.2f}" for m in r.recsys.runs)
        + ".",
        f"Threads: {_threads(measured)}; implicit uses every core (num_threads=0) with BLAS held to one "
        f"thread, on both sides; each process holds about {_idle(measured)} MiB after imports (implicit "
        "included, so its import is not timed).",
        "Steps are timed by wrapping the functions the build calls; each is its best over the runs, so the "
        "steps need not add up to the best build exactly.",
    ]
    if r.version is not None:
        notes.append(
            f"Deterministic: every run built version `{r.version[:16]}`, and its factors are bit-identical to "
            "the baseline's."
        )
    notes.append(
        "Every measured process runs under a memory guard (`BENCH_MEMORY_LIMIT_MIB`, default "
        f"{DEFAULT_MEMORY_LIMIT_MIB:,} MiB)."
    )
    title = f"ALS: the als artifact over {n_days} days vs a bare implicit fit"
    return render_section(
        title=title,
        heading=title,
        machine=machine,
        description="Baseline: `implicit.cpu.als.AlternatingLeastSquares(...).fit` with the artifact's "
        "parameters (factors, regularization, alpha, iterations, random_state) under "
        '`threadpool_limits(1, "blas")`, on the CSR matrix `interaction_matrix` builds from the rows of the '
        'artifact\'s SQL (built before the clock starts). Recsys: `build_window_artifacts("als")` as of the '
        "last day into an empty artifact root (SQL over the window's user_item_daily, matrix, fit, files, "
        "hashes, version directory). Each in a fresh process, runs alternating.",
        tables=[(headers, rows), (step_headers, step_rows)] if step_rows else [(headers, rows)],
        targets=target_rows,
        notes=notes,
        doc_notes=[
            "Sizes: `BENCH_ALS_EVENTS` (events per day, default 2000000), `BENCH_ALS_DAYS` (default 30) and "
            "`BENCH_ALS_USERS` (user pool, default 150000) in the environment."
        ],
    )


COOC_BENCHMARK = Benchmark(
    name=COOC,
    description="pair_daily + cooc window artifact vs one bare DuckDB co-occurrence query on the same window",
    run=run_cooc,
)
DAILY_BENCHMARK = Benchmark(
    name=DAILY,
    description="one day's whole run (canonical through publish, als and evaluation included) with 1 vs 30 "
    "days of history, timed per step",
    run=run_daily,
)
ALS_BENCHMARK = Benchmark(
    name=ALS,
    description="the als artifact build (30 days, ~100k users x 20k items) vs a bare implicit fit on the same matrix",
    run=run_als,
)
BENCHMARKS = [COOC_BENCHMARK, DAILY_BENCHMARK, ALS_BENCHMARK]
