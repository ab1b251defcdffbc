"""Shared machinery of the benchmarks: options, fresh-process measurements, tables, the benchmarks doc.

A benchmark is a `Benchmark(name, description, run)`; `run(options)` does its measurements and returns a
`Section`: plain text for stdout and a Markdown body that `record_section` puts between the markers
`<!-- bench:NAME:start -->` / `<!-- bench:NAME:end -->` of `docs/benchmarks.md`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
DOC_PATH = REPO_ROOT / "docs" / "benchmarks.md"
DEFAULT_WORKDIR = REPO_ROOT / "bench-data"

DOC_INTRO = """\
# Benchmarks

Figures written by `make bench` (`python -m benchmarks.run`). Each recsys step is measured next to a
bare-library baseline doing the comparable work on the same data **in the same run**, so a busy machine
slows both sides and the ratio stays meaningful; absolute figures are only as quiet as the machine was.

How things are measured:
- every measurement runs in a fresh Python process; wall time covers the measured call only (interpreter
  start-up and imports excluded); the best of R runs is reported;
- peak memory is the maximum resident set size of that process (`ru_maxrss`, MiB), interpreter and
  imports included, so both sides of a comparison carry the same fixed overhead;
- input data is synthetic (`recsys_dagster.ingest.generate`), fixed by size and seed, and cached in `bench-data/`.

The targets are listed under [Targets](#targets); every row of a section's targets table says whether it
is met. Each section below is rewritten by its benchmark and states the machine, versions and date it was
measured on. Do not edit between the markers by hand.

Re-run everything with `make bench` (ingest at 1M and 10M events; about ten minutes on 2 cores once the
generated data is cached in `bench-data/`, which the first run builds in about half an hour more), or one
benchmark with `.venv/bin/python -m benchmarks.run --only NAME` (the ingest benchmark at one size with
`--only ingest --sizes 1000000`); `--no-record` prints the tables without touching this file.

## Targets

Every target compares two measurements taken in the same run:

- **Ingest**: canonicalization of one day of 10M events takes at most 2.0x a bare polars parse-and-write
  of the same files, with bounded peak memory; its checks take at most 10% of the canonicalization, and a
  whole `recsys run` of that day at most 1.3x the canonicalization alone.
- **Backfill** (the one absolute target): 215 days of real rating history (MovieLens, a few hundred ratings
  a day) through `recsys run` in at most 60 s on the 2-core reference machine.
- **History**: a daily run with 30 days of history takes at most 1.5x the same run with one day.
- **Co-occurrence**: the daily steady state takes at most 1.0x the bare DuckDB statement, a full rebuild
  at most 2.0x.
- **ALS**: building the `als` artifact (the SQL over the window, the matrix, the fit, the files) takes at
  most 1.2x a bare `implicit` fit on the same matrix.
- **HTTP API**: serving with the `als` model loaded (100k users, 20k items, 64 factors), at 32
  connections: throughput at least 0.60x a bare FastAPI hello-world's and p99 at most 2.0x its p99;
  zero failed requests across a manifest swap; with 1,000 active merchandising rules published, p99 still
  at most 2.0x the hello-world's (the throughput with rules is reported as a ratio to the runs without).
"""


# The columns of every section's targets table.
TARGET_HEADERS = ("target", "result")


class BenchmarkError(RuntimeError):
    """A measurement failed; the run stops and nothing is recorded for that benchmark."""


@dataclass(frozen=True)
class Options:
    sizes: tuple[int, ...]
    workdir: Path
    seed: int
    repeats: int | None  # None: each benchmark's default (by size)
    record: bool


@dataclass(frozen=True)
class Section:
    text: str  # printed to stdout
    markdown: str  # recorded in docs/benchmarks.md between the benchmark's markers


@dataclass(frozen=True)
class Benchmark:
    name: str
    description: str
    run: Callable[[Options], Section]


@dataclass(frozen=True)
class Measurement:
    seconds: float  # wall time of the measured call, taken inside the child
    peak_rss_mib: float  # ru_maxrss of the child over its whole life
    idle_rss_mib: float  # ru_maxrss of the child after imports, before the call
    output: dict  # what the task returned


def measure(task: str, params: dict, *, env: dict[str, str] | None = None) -> Measurement:
    """Run `task` ("module:function") once in a fresh interpreter; see `benchmarks.child`."""
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        params_path, result_path = Path(tmp) / "params.json", Path(tmp) / "result.json"
        params_path.write_text(json.dumps(params))
        command = [sys.executable, "-m", "benchmarks.child", task, str(params_path), str(result_path)]
        proc = subprocess.Popen(command, cwd=REPO_ROOT, env=os.environ | (env or {}))
        try:
            # wait4 gives the resource usage of exactly this child (RUSAGE_CHILDREN would be the maximum
            # over every child waited for so far).
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0 or not result_path.exists():
            raise BenchmarkError(f"{task} failed (exit code {proc.returncode}); see its output above")
        result = json.loads(result_path.read_text())
    return Measurement(
        seconds=result["seconds"],
        peak_rss_mib=usage.ru_maxrss / 1024,
        idle_rss_mib=result["idle_rss_kb"] / 1024,
        output=result["output"],
    )


def run_recsys(variables: dict[str, str], *args: str) -> None:
    """The installed `recsys` command as a user runs it, in its own process, with `variables` (RECSYS_HOME,
    ...) set and none of the caller's RECSYS_* or DAGSTER_HOME settings; an error with its output if it
    fails."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECSYS_") and k != "DAGSTER_HOME"}
    command = [str(Path(sys.executable).with_name("recsys")), *args]
    done = subprocess.run(command, env=env | variables, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")


def source_fingerprint(*sources: str) -> str:
    """Hash of the named sources, the key that invalidates a cache of data they produced.

    Each source is a file or a directory relative to the repository root; a directory stands for every
    `.py` and `.sql` file under it, so a module added to a package is covered without being listed. A
    source that does not exist is an error: a stale path would otherwise hash as nothing and leave a cache
    valid whatever the code does.
    """
    digest = hashlib.sha256()
    for source in sources:
        path = REPO_ROOT / source
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix in (".py", ".sql") and p.is_file())
            if not files:
                raise BenchmarkError(f"cache fingerprint: no .py or .sql file under {source}")
        elif path.is_file():
            files = [path]
        else:
            raise BenchmarkError(f"cache fingerprint: {source} does not exist (moved? update the list)")
        for file in files:
            digest.update(file.relative_to(REPO_ROOT).as_posix().encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def machine_description() -> str:
    """One Markdown paragraph: where and when the figures were measured."""
    import duckdb
    import polars

    cpu = "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        match = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.MULTILINE)
        if match:
            cpu = match.group(1).strip()
    memory = "unknown"
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        match = re.search(r"^MemTotal:\s*(\d+) kB", meminfo.read_text(), re.MULTILINE)
        if match:
            memory = f"{int(match.group(1)) / 1024**2:.1f} GiB"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"Measured {when} on {cpu}, {cores} cores usable (nproc), {memory} RAM; "
        f"Python {platform.python_version()}, polars {polars.__version__}, duckdb {duckdb.__version__}; "
        f"git {_git_revision()}; load average at start {load} (1/5/15 min)."
    )


def _git_revision() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        # This doc is rewritten by every benchmark of a run, so it does not make the code "uncommitted".
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", ".", f":!{DOC_PATH.relative_to(REPO_ROOT).as_posix()}"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "(no commit)"
    return f"{head}{' + uncommitted changes' if dirty else ''}"


def text_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" for _ in headers) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def render_section(
    *,
    title: str,
    heading: str,
    machine: str,
    description: str,
    tables: Sequence[tuple[Sequence[str], Sequence[Sequence[str]]]],
    targets: Sequence[Sequence[str]],
    notes: Sequence[str],
    doc_notes: Sequence[str] = (),
) -> Section:
    """A section laid out as usual: the tables, a (target, result) table, then the notes.

    The text (stdout) starts with `title`; the Markdown with `## heading`, `machine` and `description`, and
    ends with `doc_notes` after the notes. Markdown bold in a table cell is dropped from the text.
    """
    text = [title]
    markdown = [f"## {heading}", "", machine, "", description, ""]
    for headers, rows in tables:
        text += [text_table(headers, [[cell.replace("**", "") for cell in row] for row in rows]), ""]
        markdown += [markdown_table(headers, rows), ""]
    text += ["Targets (docs/benchmarks.md#targets)", text_table(TARGET_HEADERS, targets), "", *notes]
    markdown += ["Targets (see [Targets](#targets)):", "", markdown_table(TARGET_HEADERS, targets), ""]
    markdown += [f"- {note}" for note in (*notes, *doc_notes)]
    return Section(text="\n".join(text), markdown="\n".join(markdown))


def record_section(name: str, markdown: str, path: Path = DOC_PATH) -> None:
    """Replace the benchmark's section of the doc (append it if absent; create the doc if missing)."""
    start, end = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
    block = f"{start}\n{markdown.strip()}\n{end}"
    text = path.read_text() if path.exists() else DOC_INTRO
    if start in text and end in text and text.index(start) < text.index(end):
        before, rest = text.split(start, 1)
        after = rest.split(end, 1)[1]
        text = before + block + after
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def events(n: int) -> str:
    """1000000 -> '1M', 2500000 -> '2.5M', 50000 -> '50k'."""
    for unit, scale in (("M", 1_000_000), ("k", 1_000)):
        if n >= scale:
            return f"{n / scale:g}{unit}"
    return str(n)


def fit_bare_als(matrix: Any, config: Any) -> Any:
    """The baselines' ALS: implicit's CPU model with `config`'s parameters (an `AlsConfig`) fitted on the
    CSR `matrix`, the library called directly (BLAS held to one thread, as implicit asks), no recsys code."""
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, "blas"):
        model = AlternatingLeastSquares(
            factors=config.factors,
            regularization=config.regularization,
            alpha=config.alpha,
            iterations=config.iterations,
            random_state=config.random_state,
            calculate_training_loss=False,
            num_threads=0,
        )
        model.fit(matrix, show_progress=False)
    return model
