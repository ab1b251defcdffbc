"""Run the benchmarks: `python -m benchmarks.run [--sizes 1000000,10000000] [--only NAME] ...`.

Each benchmark prints its tables and (unless --no-record) rewrites its own section of docs/benchmarks.md.
To add one, write a module exposing `BENCHMARK = Benchmark(name, description, run)` (see
`benchmarks.harness`; child-process tasks go in a module of their own, as `benchmarks.ingest_tasks`) and
append it to `BENCHMARKS` below.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from benchmarks import artifacts, backfill, ingest, ingest_http, quality, serving, storage
from benchmarks.harness import DEFAULT_WORKDIR, DOC_PATH, REPO_ROOT, Benchmark, Options, record_section

# Extension point: every benchmark is listed here (`artifacts.BENCHMARKS`: co-occurrence, daily-run, als).
BENCHMARKS: list[Benchmark] = [
    ingest.BENCHMARK,
    serving.BENCHMARK,
    ingest_http.BENCHMARK,
    *artifacts.BENCHMARKS,
    quality.BENCHMARK,
    backfill.BENCHMARK,
    storage.BENCHMARK,
]

DEFAULT_SIZES = (1_000_000, 10_000_000)
DEFAULT_SEED = 42


def parse_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part.replace("_", "")) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated event counts, got {text!r}") from exc
    if not sizes or any(size < 1 for size in sizes):
        raise argparse.ArgumentTypeError(f"expected positive event counts, got {text!r}")
    return sizes


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    names = [b.name for b in BENCHMARKS]
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="Benchmarks next to bare-library baselines; figures go to docs/benchmarks.md.",
        epilog="Benchmarks: " + "; ".join(f"{b.name}: {b.description}" for b in BENCHMARKS),
    )
    parser.add_argument(
        "--sizes",
        type=parse_sizes,
        default=",".join(str(size) for size in DEFAULT_SIZES),
        help="comma-separated events per day to measure (default: %(default)s)",
    )
    parser.add_argument("--only", choices=names, help="run only this benchmark")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=DEFAULT_WORKDIR,
        help="where generated data is cached and outputs are written (default: bench-data/ in the repo)",
    )
    parser.add_argument(
        "--repeats",
        type=positive_int,
        help="runs per measurement, best reported (default: 3 up to 1M events, 1 above)",
    )
    parser.add_argument(
        "--seed", type=int, default=DEFAULT_SEED, help="generator seed (default: %(default)s)"
    )
    parser.add_argument("--no-record", action="store_true", help="print only; do not rewrite the doc")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = Options(
        sizes=args.sizes,
        workdir=args.workdir.expanduser().absolute(),
        seed=args.seed,
        repeats=args.repeats,
        record=not args.no_record,
    )
    options.workdir.mkdir(parents=True, exist_ok=True)
    selected = [b for b in BENCHMARKS if args.only in (None, b.name)]
    for benchmark in selected:
        started = time.perf_counter()
        print(f"== {benchmark.name}: {benchmark.description}", flush=True)
        section = benchmark.run(options)
        print()
        print(section.text)
        if options.record:
            record_section(benchmark.name, section.markdown)
            print(f"\nrecorded in {DOC_PATH.relative_to(REPO_ROOT)}")
        print(f"== {benchmark.name} done in {time.perf_counter() - started:.0f} s\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
