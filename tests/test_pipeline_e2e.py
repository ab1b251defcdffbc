"""End to end through the `recsys` CLI and the Dagster definitions it runs in-process.

Each test gets its own RECSYS_HOME; runs are real (Parquet, DuckDB, a SQLite Dagster instance).
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
from shared_data import shared_data_dir

from recsys_cli import cli
from recsys_core.lake import partition_dir
from recsys_core.manifest import read_current, read_registry
from recsys_dagster.defs import shared

END = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)
START = END - dt.timedelta(days=2)


def write_config(home: Path, monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    home.mkdir(parents=True, exist_ok=True)
    path = home / "config.yaml"
    path.write_text(text)
    monkeypatch.setenv("RECSYS_CONFIG", str(path))


def recsys(*args: str) -> int:
    return cli.main([str(a) for a in args])


def generate(days: int = 3, events: int = 3000) -> None:
    assert (
        recsys(
            "generate",
            "--end",
            END,
            "--days",
            days,
            "--events-per-day",
            events,
            "--users",
            300,
            "--items",
            200,
        )
        == 0
    )


def canonical_bytes(home: Path, day: dt.date) -> dict[str, bytes]:
    folder = partition_dir(home / "lake", "canonical_events", day)
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.parquet"))}


def test_generate_run_publish_and_rerun_is_idempotent(
    home: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    generate()
    assert recsys("run", "--start", START, "--end", END) == 0
    out = capsys.readouterr().out
    # A range is two runs: the earlier days' ingestion and aggregates, then the daily job as of the last day.
    runs = re.findall(r"^run ([0-9a-f-]{36}): succeeded  \((.*)\)$", out, re.M)
    assert [what for _, what in runs] == [
        f"{START}..{END - dt.timedelta(days=1)}: ingestion and daily aggregates",
        f"{END}: the daily job, as of the last day",
    ]
    urls = re.findall(
        r"^inspect it in the Dagster UI: make ui, then http://127\.0\.0\.1:3000/runs/(\S+)$", out, re.M
    )
    assert urls == [run_id for run_id, _ in runs]
    manifest = read_current(home / "artifacts", "demo", "home")
    assert manifest is not None and manifest["v"] == 1 and manifest["as_of"] == END.isoformat()
    assert set(manifest["current"]) == {"popularity", "cooc", "user_history", "als", "user_topn"}
    # Only the last day's manifest can become current (forward-only): the earlier days are not published.
    assert [r["action"] for r in read_registry(home / "artifacts", "demo", "home")] == ["publish"]
    first_bytes = {day: canonical_bytes(home, day) for day in (START, END)}
    first_version = manifest["manifest_version"]

    # --every-day builds and publishes as of every day: the older days go to history, the last is a no-op.
    monkeypatch.setenv("RECSYS_UI_URL", "http://127.0.0.1:3123/")  # make run UI_PORT=3123
    assert recsys("run", "--start", START, "--end", END, "--every-day") == 0
    out = capsys.readouterr().out
    assert len(re.findall(r"^run \S+: succeeded$", out, re.M)) == 1
    assert "make ui, then http://127.0.0.1:3123/runs/" in out
    assert {day: canonical_bytes(home, day) for day in (START, END)} == first_bytes
    again = read_current(home / "artifacts", "demo", "home")
    assert again["manifest_version"] == first_version
    actions = [r["action"] for r in read_registry(home / "artifacts", "demo", "home")]
    assert actions == ["publish", "history_only", "history_only", "noop"]

    capsys.readouterr()
    assert recsys("status", "--json", "--start", START, "--end", END) == 0
    status = json.loads(capsys.readouterr().out)
    assert [p["checks"] for p in status["partitions"]] == ["passed"] * 3
    assert status["manifests"][0]["manifest_version"] == first_version


def test_failed_gate_exits_1_stops_downstream_and_never_reaches_current(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    generate()
    assert recsys("run", "--start", START, "--end", END) == 0
    published = read_current(home / "artifacts", "demo", "home")["manifest_version"]
    capsys.readouterr()

    # A new day arrives, and its volume breaks a resource limit.
    write_config(home, monkeypatch, "checks:\n  max_events: 100\n")
    assert recsys("run", "--start", END, "--end", END) == 1
    out = capsys.readouterr().out
    assert "blocking check failed: canonical_events:resource_limits" in out
    # The reason and what relaxes it, without opening _checks.json.
    assert re.search(rf"{END} resource_limits: .*> 100 \(set checks\.max_events, .*checks\.warn_only", out)
    assert not (partition_dir(home / "lake", "item_daily", END) / "builds.json").exists()
    assert read_current(home / "artifacts", "demo", "home")["manifest_version"] == published

    # With the limit lifted but the partition not re-checked, nothing is derived from it: the stored gate
    # result of the exact partition is what counts, not the current run.
    monkeypatch.delenv("RECSYS_CONFIG")
    assert (
        recsys(
            "run",
            "--start",
            END,
            "--end",
            END,
            "--select",
            "key:item_daily+ or key:pair_daily+ or key:user_item_daily+",
        )
        == 1
    )
    out = capsys.readouterr().out
    assert f"canonical_events {END}: blocking check(s) failed: resource_limits; fix the cause" in out
    assert read_current(home / "artifacts", "demo", "home")["manifest_version"] == published

    # Re-materializing the partition under the lifted limit lets it through.
    assert recsys("run", "--start", END, "--end", END) == 0


def test_bad_usage_exits_2(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    assert recsys("run", "--start", END, "--end", START) == 2
    assert recsys("run", "--start", END, "--select", "not a :: selection") == 2
    assert recsys("run", "--start", END, "--select", "key:no_such_asset") == 2
    assert "selects no asset" in capsys.readouterr().err
    for tenant in ("../demo", "a/b", ".."):
        assert (
            recsys("rollback", "--tenant", tenant, "--surface", "home", "--steps", "1", "--reason", "r") == 2
        )
        assert "invalid tenant name" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        recsys("run", "--start", "2025-13-45")
    assert exc.value.code == 2
    write_config(home, monkeypatch, "ingest:\n  max_line_byte: 5\n")
    assert recsys("status") == 2
    assert "ingest.max_line_byte" in capsys.readouterr().err


def test_unreadable_landing_file_fails_the_partition_and_writes_nothing(
    home: Path, capsys: pytest.CaptureFixture
) -> None:
    generate(days=1)
    folder = home / "raw" / f"dt={END.isoformat()}"
    good = (folder / "events-00000.jsonl").read_bytes()
    (folder / "broken.jsonl.gz").write_bytes(gzip.compress(good)[:200])
    assert recsys("run", "--start", END, "--end", END, "--select", "key:canonical_events") == 1
    out = capsys.readouterr().out
    assert "cannot read landing file" in out and "broken.jsonl.gz" in out
    assert not partition_dir(home / "lake", "canonical_events", END).exists()
    assert not partition_dir(home / "lake", "quarantine", END).exists()


def test_cli_entry_point_exit_codes(home: Path) -> None:
    """The installed console script itself (not just `cli.main`) reports usage errors with code 2."""
    env = os.environ | {"RECSYS_HOME": str(home)}
    script = Path(sys.executable).with_name("recsys")
    bad = subprocess.run([script, "run", "--start", "2025-02-30"], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "expected a date" in bad.stderr
    ok = subprocess.run([script, "status", "--json"], env=env, capture_output=True, text=True)
    assert ok.returncode == 0 and json.loads(ok.stdout)["manifests"] == []


def _require_shared(name: str) -> Path:
    root = shared_data_dir()
    if root is None:
        pytest.skip("shared data sets not found: set RECSYS_SHARED_DATA to the folder holding them")
    return root / name


def test_movielens_end_to_end(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    ratings = _require_shared("ml-latest-small") / "ratings.csv"
    monkeypatch.setenv("RECSYS_START_DATE", "2018-09-01")
    # No configuration: ratings arrive in bursts, which the volume gate does not hold against backfilled
    # history (it warns), and the printed next step sets the start date it needs.
    assert recsys("import", ratings, "--tenant", "movielens", "--surface", "ratings") == 0
    out = capsys.readouterr().out
    assert (
        "next (8,215 days): RECSYS_START_DATE=1996-03-29 recsys run --start 1996-03-29 --end 2018-09-24"
        in out
    )
    assert recsys("run", "--start", "2018-09-01", "--end", "2018-09-24") == 0
    expected = (
        pl.read_csv(ratings)
        .with_columns(pl.from_epoch("timestamp").dt.date().alias("day"))
        .filter(pl.col("day") >= dt.date(2018, 9, 1))
    )
    canonical = pl.read_parquet(home / "lake" / "canonical_events" / "*" / "*.parquet")
    assert canonical.height == expected.height
    assert canonical["event_type"].unique().to_list() == ["rating"]
    manifest = read_current(home / "artifacts", "movielens", "ratings")
    assert manifest["as_of"] == "2018-09-24"
    assert manifest["artifacts"]["popularity"]["rows"] > 0


def test_otto_end_to_end(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sessions = _require_shared("otto-sample") / "train.jsonl"
    monkeypatch.setenv("RECSYS_START_DATE", "2022-07-31")
    assert recsys("import", sessions, "--tenant", "otto", "--surface", "shop") == 0
    days = sorted(p.name.removeprefix("dt=") for p in (home / "raw").iterdir())
    assert recsys("run", "--start", days[0], "--end", days[-1]) == 0
    canonical = pl.read_parquet(home / "lake" / "canonical_events" / "*" / "*.parquet")
    assert canonical.height == 862
    assert canonical.group_by("event_type").len().sort("event_type").rows() == [
        ("add_to_cart", 52),
        ("click", 800),
        ("purchase", 10),
    ]
    quarantine = pl.read_parquet(home / "lake" / "quarantine" / "*" / "*.parquet")
    assert quarantine.height == 0
    assert read_current(home / "artifacts", "otto", "shop")["as_of"] == days[-1]


# ------------------------------------------------------------------------------ integrity of lineage


def bot_events(day: dt.date, count: int) -> list[bytes]:
    """Valid events that push one item to the top of every ranking (a bot)."""
    ts = dt.datetime.combine(day, dt.time(12), dt.UTC).isoformat().replace("+00:00", "Z")
    return [
        json.dumps(
            {
                "v": 1,
                "event_id": f"bot-{day}-{n}",
                "ts": ts,
                "tenant": "demo",
                "surface": "home",
                "session_id": f"bot-session-{n}",
                "user_id": f"bot-user-{n}",
                "item_id": "bot-item",
                "event_type": "purchase",
            }
        ).encode()
        for n in range(count)
    ]


def aggregate_files(home: Path, day: dt.date) -> list[Path]:
    return [partition_dir(home / "lake", m, day) / "part-00000.parquet" for m in ("item_daily", "pair_daily")]


def test_failed_day_cannot_be_published_through_any_selection_order(
    home: Path, capsys: pytest.CaptureFixture
) -> None:
    """The gate bypass: aggregate the failed day, fix and re-check canonical only, then build and publish."""
    generate(days=2, events=2000)
    assert recsys("run", "--start", START + dt.timedelta(days=1), "--end", END - dt.timedelta(days=1)) == 0
    published = read_current(home / "artifacts", "demo", "home")["manifest_version"]
    bad = home / "raw" / f"dt={END.isoformat()}" / "producer-bot.jsonl"
    bad.write_bytes(b"\n".join([*bot_events(END, 500), *[b"{not json"] * 400]) + b"\n")
    assert recsys("run", "--start", END, "--end", END) == 1
    capsys.readouterr()

    assert recsys("run", "--start", END, "--end", END, "--select", "group:aggregates") == 1
    out = capsys.readouterr().out
    assert f"canonical_events {END}: blocking check(s) failed: quarantine_rate" in out
    assert not any(path.exists() for path in aggregate_files(home, END))

    bad.unlink()
    assert recsys("run", "--start", END, "--end", END, "--select", "key:canonical_events") == 0
    assert recsys("run", "--start", END, "--end", END, "--select", "group:artifacts or group:publishing") == 1
    out = capsys.readouterr().out
    assert f"canonical_events {END} exists but item_daily {END} was never built from it" in out
    assert f'recsys run --start {END} --end {END} --select "group:aggregates"' in out
    assert read_current(home / "artifacts", "demo", "home")["manifest_version"] == published

    # Following the hint publishes the day, without the bot.
    assert recsys("run", "--start", END, "--end", END) == 0
    manifest = read_current(home / "artifacts", "demo", "home")
    assert manifest["as_of"] == END.isoformat()
    top = pl.read_parquet(
        home / "artifacts" / "demo" / "home" / manifest["current"]["popularity"] / "items.parquet"
    )
    assert "bot-item" not in top["item_id"].to_list()


def test_stale_or_missing_canonical_input_is_refused_at_build_and_at_publish(
    home: Path, capsys: pytest.CaptureFixture
) -> None:
    generate(days=2, events=2000)
    assert recsys("run", "--start", START + dt.timedelta(days=1), "--end", END) == 0
    published = read_current(home / "artifacts", "demo", "home")["manifest_version"]
    capsys.readouterr()

    # A late file re-materializes the day: its aggregates and artifacts were built from the old content.
    late = home / "raw" / f"dt={END.isoformat()}" / "late.jsonl"
    late.write_bytes(b"\n".join(bot_events(END, 50)) + b"\n")
    assert recsys("run", "--start", END, "--end", END, "--select", "key:canonical_events") == 0
    assert recsys("run", "--start", END, "--end", END, "--select", "group:publishing") == 1
    out = capsys.readouterr().out
    assert re.search(
        rf"artifact \w+ was built from canonical_events {END} content \w{{12}}, which is now", out
    )
    assert recsys("run", "--start", END, "--end", END, "--select", "group:artifacts") == 1
    assert f"item_daily {END} was built from canonical content" in capsys.readouterr().out

    # Deleting the day's canonical partition is a refusal, not a skip.
    shutil.rmtree(partition_dir(home / "lake", "canonical_events", END))
    assert recsys("run", "--start", END, "--end", END, "--select", "group:artifacts or group:publishing") == 1
    assert f"canonical_events {END} is missing" in capsys.readouterr().out
    assert recsys("run", "--start", END, "--end", END, "--select", "group:publishing") == 1
    assert f"canonical_events {END} is missing" in capsys.readouterr().out
    assert read_current(home / "artifacts", "demo", "home")["manifest_version"] == published


def test_tampered_files_are_refused(home: Path, capsys: pytest.CaptureFixture) -> None:
    generate(days=1, events=2000)
    assert recsys("run", "--start", END, "--end", END) == 0
    published = read_current(home / "artifacts", "demo", "home")["manifest_version"]
    capsys.readouterr()

    # A hand-edited canonical file: items replaced, one event duplicated.
    (canonical,) = partition_dir(home / "lake", "canonical_events", END).glob("*.parquet")
    original = canonical.read_bytes()
    frame = pl.read_parquet(canonical)
    edited = frame.with_columns(pl.lit("bot-item").alias("item_id"))
    pl.concat([edited, edited.head(1)]).write_parquet(canonical)
    for selection in ("group:aggregates", "group:publishing"):
        assert recsys("run", "--start", END, "--end", END, "--select", selection) == 1
        assert f"canonical_events {END}: its files changed after they were written" in capsys.readouterr().out
    canonical.write_bytes(original)

    # A hand-edited aggregate.
    item_daily = aggregate_files(home, END)[0]
    pl.read_parquet(item_daily).with_columns(pl.lit("bot-item").alias("item_id")).write_parquet(item_daily)
    assert recsys("run", "--start", END, "--end", END, "--select", "group:artifacts") == 1
    assert f"item_daily {END}: part-00000.parquet changed after it was written" in capsys.readouterr().out

    # A hand-edited artifact.
    popularity = (
        home
        / "artifacts"
        / "demo"
        / "home"
        / read_current(home / "artifacts", "demo", "home")["current"]["popularity"]
    )
    (popularity / "items.parquet").write_bytes(b"PAR1 not what was built")
    assert recsys("run", "--start", END, "--end", END, "--select", "group:publishing") == 1
    assert "items.parquet sha256 mismatch" in capsys.readouterr().out
    assert read_current(home / "artifacts", "demo", "home")["manifest_version"] == published


def test_a_long_range_logs_progress_not_every_day(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each log line is a stored event: past DAYS_LOGGED_IN_FULL days, every LOG_EVERY-th day and the last."""
    generate(days=3, events=500)
    monkeypatch.setattr(shared, "DAYS_LOGGED_IN_FULL", 2)
    monkeypatch.setattr(shared, "LOG_EVERY", 2)
    assert recsys("run", "--start", START, "--end", END, "--select", "key:canonical_events") == 0
    instance = dg.DagsterInstance.get()
    (run,) = instance.get_runs(limit=1)
    messages = [entry.user_message for entry in instance.all_logs(run.run_id) if not entry.is_dagster_event]
    days = [m for m in messages if re.match(r"\[day \d/3\] \d{4}-\d\d-\d\d: \d+ events", m)]
    assert [m.split("]")[0] for m in days] == ["[day 2/3", "[day 3/3"]
    assert not any(": read " in m or m.startswith(f"{START}:") for m in messages)
