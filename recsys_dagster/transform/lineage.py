"""Lineage: what every derived partition was built from, and the proof that it is still good to use.

A canonical_events partition records its content hash when written (`_summary.json`) and the gate results
of that exact content (`_checks.json`). Each daily aggregate partition records, beside its file, the
SHA-256 of that file and the canonical content hash it was computed from (`_lineage.json`); each artifact
records the canonical hashes of its window (`meta.json` inputs) from those records. Before anything is
derived further, and again at publish, the chain is re-verified against the files themselves:

- the canonical partition exists, its files hash to the recorded content hash (nobody edited them), and
  its blocking gates passed on that content;
- the aggregate's file hashes to its recorded SHA-256, and the canonical content it was built from is the
  current one (re-materializing a day makes its old aggregates stale, not silently valid).

Whatever order assets are selected in, nothing derived from data that failed a gate, changed after it
was checked, or no longer exists gets past these checks. Hashes are recomputed from the bytes
(`recsys_core.storage.files_sha256`, which hashes a file once per process while it is unchanged).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypedDict, cast

from recsys_core.lake import (
    AGGREGATE_FILE,
    confirm_gates_passed,
    content_hash,
    parquet_files,
    partition_dir,
    read_json_record,
    read_summary,
)
from recsys_core.storage import file_sha256, write_atomic

LINEAGE_FILE = "_lineage.json"


class AggregateLineage(TypedDict):
    """`_lineage.json` of a daily aggregate partition."""

    model: str
    day: str
    sha256: str  # of the partition's AGGREGATE_FILE
    canonical_events: str  # the content hash of the canonical partition it was computed from


class LineageError(Exception):
    """Derived data may not be built or published: the problems say which day and what to re-run."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def rerun_hint(day: dt.date, select: str | None = None) -> str:
    """The command that rebuilds `day` (from canonicalization when `select` is None)."""
    selection = f' --select "{select}"' if select else ""
    return f"recsys run --start {day} --end {day}{selection}"


# ------------------------------------------------------------------------------------------ canonical


def canonical_problem(lake_root: Path, day: dt.date) -> str | None:
    """None if the canonical partition of `day` exists, is unmodified and passed its blocking gates."""
    folder = partition_dir(lake_root, "canonical_events", day)
    summary = read_summary(lake_root, day)
    files = parquet_files(folder)
    if summary is None or not files:
        return f"canonical_events {day} is missing ({folder}): materialize it first ({rerun_hint(day)})"
    found = content_hash(folder)
    if found != summary["content_hash"]:
        return (
            f"canonical_events {day}: its files changed after they were written (content hash "
            f"{summary['content_hash'][:12]} recorded, {found[:12]} found); re-materialize the day "
            f"from its landing files ({rerun_hint(day)})"
        )
    gates = confirm_gates_passed(lake_root, day)
    if gates:
        return f"{gates}; fix the cause and re-run the day ({rerun_hint(day)})"
    return None


def require_canonical(lake_root: Path, days: Iterable[dt.date]) -> None:
    """Verify each day's canonical partition before aggregates are computed from it (`canonical_problem`);
    LineageError listing every day that fails."""
    problems = [problem for day in sorted(set(days)) if (problem := canonical_problem(lake_root, day))]
    if problems:
        raise LineageError(problems)


# ------------------------------------------------------------------------------------------ aggregates


def write_aggregate_lineage(lake_root: Path, model: str, day: dt.date, canonical_hash: str) -> None:
    """Record, beside a freshly written aggregate partition, its file's hash and its canonical input."""
    folder = partition_dir(lake_root, model, day)
    record: AggregateLineage = {
        "model": model,
        "day": day.isoformat(),
        "sha256": file_sha256(folder / AGGREGATE_FILE),
        "canonical_events": canonical_hash,
    }
    write_atomic(folder / LINEAGE_FILE, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())


def read_aggregate_lineage(lake_root: Path, model: str, day: dt.date) -> AggregateLineage | None:
    try:
        record = read_json_record(partition_dir(lake_root, model, day) / LINEAGE_FILE)
    except ValueError:  # not JSON: treated as absent, which refuses the partition
        return None
    return cast(AggregateLineage | None, record)


def aggregate_problem(lake_root: Path, model: str, day: dt.date) -> str | None:
    """None if the aggregate partition is unmodified and was built from the current, passed canonical
    content of its day; else why not and what to re-run."""
    folder = partition_dir(lake_root, model, day)
    rebuild = f"re-run its aggregates ({rerun_hint(day, 'group:aggregates')})"
    lineage = read_aggregate_lineage(lake_root, model, day)
    if lineage is None:
        return (
            f"{model} {day}: no lineage record ({LINEAGE_FILE}), so its input cannot be confirmed; {rebuild}"
        )
    found = file_sha256(folder / AGGREGATE_FILE)
    if found != lineage["sha256"]:
        return (
            f"{model} {day}: {AGGREGATE_FILE} changed after it was written (sha256 {lineage['sha256'][:12]} "
            f"recorded, {found[:12]} found); {rebuild}"
        )
    canonical = canonical_problem(lake_root, day)
    if canonical:
        return f"{model} {day} was built from canonical_events {day}, which is not usable: {canonical}"
    current = cast(dict, read_summary(lake_root, day))["content_hash"]
    if current != lineage["canonical_events"]:
        return (
            f"{model} {day} was built from canonical content {lineage['canonical_events'][:12]}, but "
            f"canonical_events {day} is now {current[:12]} (re-materialized since); {rebuild}"
        )
    return None


def require_aggregates(
    lake_root: Path, models: Iterable[str], days: Iterable[dt.date], start_date: dt.date
) -> None:
    """Verify the aggregate partitions of a window before anything is computed from them; LineageError
    listing every problem.

    A day with no aggregate partition is left out (an artifact lists it as missing) unless its canonical
    partition exists from `start_date` on: data that exists but was not aggregated would silently be left
    out of the window.
    """
    problems = []
    for model in models:
        for day in sorted(set(days)):
            if not (partition_dir(lake_root, model, day) / AGGREGATE_FILE).is_file():
                if day >= start_date and read_summary(lake_root, day) is not None:
                    problems.append(
                        f"canonical_events {day} exists but {model} {day} was never built from it; "
                        f"re-run its aggregates ({rerun_hint(day, 'group:aggregates')})"
                    )
            elif problem := aggregate_problem(lake_root, model, day):
                problems.append(problem)
    if problems:
        raise LineageError(problems)


# ------------------------------------------------------------------------------------------ artifacts


def artifact_input_problems(
    lake_root: Path, kind: str, meta: dict[str, Any], start_date: dt.date
) -> tuple[list[str], int]:
    """Why an artifact may not be published because of what it was built from, and how many canonical
    days were confirmed. Every canonical partition it records must still be that exact content, unmodified
    and passed; every window day it lists as missing must still have no canonical data."""
    inputs = meta.get("inputs") or {}
    recorded: dict[str, str | None] = inputs.get("canonical_events") or {}
    problems = []
    for text, expected in sorted(recorded.items()):
        day = dt.date.fromisoformat(text)
        problem = canonical_problem(lake_root, day)
        if problem:
            problems.append(f"artifact {kind} was built from {problem}")
            continue
        current = cast(dict, read_summary(lake_root, day))["content_hash"]
        if expected != current:
            problems.append(
                f"artifact {kind} was built from canonical_events {day} content "
                f"{(expected or 'unknown')[:12]}, which is now {current[:12]}; re-run the aggregates "
                f"and artifacts ({rerun_hint(day, 'group:aggregates')}, then the as-of days after it)"
            )
    for text in inputs.get("missing_days") or []:
        day = dt.date.fromisoformat(text)
        if day >= start_date and read_summary(lake_root, day) is not None:
            problems.append(
                f"artifact {kind} was built without canonical_events {day}, which exists now; "
                f"re-run the aggregates and artifacts ({rerun_hint(day, 'group:aggregates')}, then the as-of "
                "days after it)"
            )
    return problems, len(recorded)
