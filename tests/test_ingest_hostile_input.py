"""Hostile raw input through the `recsys` command: no line fails a day, a landing name that leads nowhere
does, and `recsys import` places every event where the pipeline accepts it.

The command runs in a process of its own, as a user runs it (and apart from the definitions other tests
load in this process with other start dates).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import polars as pl

from recsys_core.lake import partition_dir

DAY = dt.date(2025, 3, 10)
EVENT = {"ts": "2025-03-10T12:00:00Z", "tenant": "demo", "surface": "home", "session_id": "s", "item_id": "i"}


def recsys(home: Path, *args: object) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RECSYS_", "DAGSTER_"))}
    env |= {"RECSYS_HOME": str(home), "RECSYS_START_DATE": "2016-12-01"}
    script = Path(sys.executable).with_name("recsys")
    return subprocess.run(
        [script, *map(str, args)], env=env, capture_output=True, text=True, timeout=300, check=False
    )


def canonicalize(home: Path, day: dt.date) -> subprocess.CompletedProcess[str]:
    return recsys(home, "run", "--start", day, "--end", day, "--select", "key:canonical_events", "--quiet")


def quarantine_reasons(home: Path, day: dt.date) -> Counter[str]:
    quarantine = pl.read_parquet(partition_dir(home / "lake", "quarantine", day) / "*.parquet")
    return Counter(quarantine["reason"].to_list())


def test_hostile_lines_are_quarantined_and_a_broken_link_fails_the_day(tmp_path: Path) -> None:
    home = tmp_path / "home"
    generated = recsys(home, "generate", "--end", DAY, "--days", 1, "--events-per-day", 500, "--users", 50)
    assert generated.returncode == 0, generated.stderr
    event = json.dumps(EVENT)[:-1]
    hostile = [
        event + ', "value": 1' + "0" * 309 + "}",  # an integer beyond the float range
        event + f', "rank": {2**64}}}',
        json.dumps(EVENT | {"ts": 18448538687845552}),  # wrapped around to 2026-11-13
        json.dumps(EVENT | {"ts": "-18448538687845552"}),
        event + ', "extra": ' + "[" * 2000 + "]" * 2000 + "}",
    ]
    folder = home / "raw" / f"dt={DAY}"
    (folder / "hostile.jsonl").write_text("\n".join(hostile) + "\n")

    run = canonicalize(home, DAY)
    assert run.returncode == 0, run.stdout + run.stderr
    assert quarantine_reasons(home, DAY) == {
        "non_finite_value": 1,
        "bad_type": 1,
        "ts_out_of_range": 2,
        "invalid_json": 1,
    }
    before = sorted(p.read_bytes() for p in partition_dir(home / "lake", "canonical_events", DAY).iterdir())

    (folder / "late.jsonl").symlink_to("/nonexistent/late.jsonl")
    failed = canonicalize(home, DAY)
    assert failed.returncode == 1
    assert (
        "late.jsonl: it is a symbolic link to /nonexistent/late.jsonl, which does not exist" in failed.stdout
    )
    after = sorted(p.read_bytes() for p in partition_dir(home / "lake", "canonical_events", DAY).iterdir())
    assert after == before


def test_imported_events_in_every_accepted_ts_form_are_accepted_on_their_day(tmp_path: Path) -> None:
    home = tmp_path / "home"
    stamps = {"1483228800000": "2017-01-01", "2016-12-31T23:59:60Z": "2017-01-01", "-1": "1969-12-31"}
    source = tmp_path / "events.jsonl"
    source.write_text(
        "".join(json.dumps(EVENT | {"ts": ts, "item_id": f"i{n}"}) + "\n" for n, ts in enumerate(stamps))
    )
    imported = recsys(home, "import", source)
    assert imported.returncode == 0 and "undatable" not in imported.stdout, imported.stdout
    day = dt.date(2017, 1, 1)
    run = canonicalize(home, day)
    assert run.returncode == 0, run.stdout + run.stderr
    events = pl.read_parquet(partition_dir(home / "lake", "canonical_events", day) / "*.parquet")
    assert sorted(events["item_id"]) == ["i0", "i1"] and quarantine_reasons(home, day) == {}
