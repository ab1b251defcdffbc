"""Decision traces: landing a day of raw traces (quarantine, repeats, reconciliation), the audit lookup, and
the `decisions` asset materialized through the Dagster definitions."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from recsys_core.decisions import (
    DATA_FILE,
    QUARANTINE,
    find_decisions,
    landing_dir,
    partition_dir,
    trace_line,
)
from recsys_dagster.ingest.decisions import land_decisions

DAY = dt.date(2026, 12, 3)
MAX_LINE = 4096


def trace(request_id: str, *, user: str | None = "u1", minute: int = 0, **fields) -> dict:
    return {
        "v": 1,
        "request_id": request_id,
        "ts": f"2026-12-03T10:{minute:02d}:00.250Z",
        "tenant": "demo",
        "surface": "home",
        "user_id": user,
        "params": {"k": 2, "exclude_seen": True},
        "manifest_version": "a" * 64,
        "artifacts": {"popularity": "b" * 64, "rules": "c" * 64},
        "rules_version": "c" * 64,
        "candidates": [
            {"item_id": "i1", "score": 0.9, "sources": {"als": 0.6, "popularity": 0.3}},
            {"item_id": "i2", "score": 0.5, "sources": {"cooc": 0.5}},
        ],
        "items": [{"item_id": "i9", "score": None, "rule_ids": ["pin-9"]}, {"item_id": "i1", "score": 0.9}],
        **fields,
    }


@pytest.fixture
def roots(tmp_path: Path) -> tuple[Path, Path]:
    raw, lake = tmp_path / "raw", tmp_path / "lake"
    folder = landing_dir(raw, DAY)
    folder.mkdir(parents=True)
    lines = [
        trace_line(trace("r1")),
        b"\n",
        b"{not json\n",
        trace_line(trace("r2", user="u2", minute=5)),
        trace_line(trace("r1", minute=9)),  # a repeated request id: the first is kept
        trace_line({**trace("r3"), "ts": "2026-12-04T00:00:00Z"}),
        trace_line({**trace("r4"), "v": 2}),
        trace_line({**trace("r5"), "tenant": "../x"}),
        trace_line({**trace("r6"), "items": "i1"}),
        b'{"v": 1, "request_id": "r7"}\n',
        b"x" * (MAX_LINE + 10) + b"\n",
    ]
    (folder / "decisions-host-1-000001.jsonl").write_bytes(b"".join(lines))
    (folder / ".decisions-host-2-000001.jsonl.inprogress").write_bytes(trace_line(trace("hidden")))
    (folder / "decisions-host-3-000001.jsonl").write_bytes(trace_line(trace("r8", minute=30)))
    return raw, lake


def test_a_day_is_landed_with_every_line_accounted_for(roots: tuple[Path, Path]) -> None:
    raw, lake = roots
    summary = land_decisions(raw, lake, DAY, MAX_LINE)
    assert summary["reconciled"] is True
    assert (summary["lines_read"], summary["traces"], summary["duplicates"], summary["blank_lines"]) == (
        12,
        3,
        1,
        1,
    )
    assert summary["reasons"] == {
        "bad_type": 1,
        "invalid_json": 1,
        "invalid_name": 1,
        "line_too_long": 1,
        "missing_field": 1,
        "unsupported_version": 1,
        "wrong_day": 1,
    }
    table = pq.read_table(partition_dir(lake, DAY) / DATA_FILE)
    assert table.column("request_id").to_pylist() == ["r1", "r2", "r8"]
    first = table.slice(0, 1).to_pylist()[0]
    assert first["ts"] == dt.datetime(2026, 12, 3, 10, 0, 0, 250000, tzinfo=dt.UTC)
    assert first["rules_applied"] == ["pin-9"]
    quarantine = pq.read_table(partition_dir(lake, DAY, QUARANTINE) / DATA_FILE).to_pylist()
    assert [(row["line"], row["reason"]) for row in quarantine][:2] == [(3, "invalid_json"), (6, "wrong_day")]
    assert len(quarantine[-1]["raw"]) == 4096  # a long line keeps its first characters only
    assert raw.joinpath("decisions", f"dt={DAY}", ".decisions-host-2-000001.jsonl.inprogress").exists()


def test_landing_again_gives_the_same_bytes(roots: tuple[Path, Path]) -> None:
    raw, lake = roots
    land_decisions(raw, lake, DAY, MAX_LINE)
    first = (partition_dir(lake, DAY) / DATA_FILE).read_bytes()
    land_decisions(raw, lake, DAY, MAX_LINE)
    assert (partition_dir(lake, DAY) / DATA_FILE).read_bytes() == first
    assert sorted(p.name for p in lake.joinpath("decisions").iterdir()) == [f"dt={DAY}"]


def test_a_day_without_traces_lands_an_empty_table(tmp_path: Path) -> None:
    summary = land_decisions(tmp_path / "raw", tmp_path / "lake", DAY, MAX_LINE)
    assert (summary["traces"], summary["reconciled"]) == (0, True)
    assert pq.read_table(partition_dir(tmp_path / "lake", DAY) / DATA_FILE).num_rows == 0


def test_a_trace_is_found_by_request_id_and_by_user_and_time(roots: tuple[Path, Path]) -> None:
    raw, lake = roots
    land_decisions(raw, lake, DAY, MAX_LINE)
    found = find_decisions(lake, "demo", "home", request_id="r1")
    # The landed form: times in microseconds, the endpoint and the rules applied filled in.
    expected = {
        **trace("r1"),
        "ts": "2026-12-03T10:00:00.250000Z",
        "endpoint": "recommendations",
        "rules_applied": ["pin-9"],
    }
    expected["items"][1]["rule_ids"] = []
    assert found == [json.loads(json.dumps(expected))]
    assert find_decisions(lake, "demo", "other", request_id="r1") == []
    since = dt.datetime(2026, 12, 3, 10, 1, tzinfo=dt.UTC)
    by_user = find_decisions(lake, "demo", "home", user_id="u1", since=since)
    assert [row["request_id"] for row in by_user] == ["r8"]
    newest_first = find_decisions(lake, "demo", "home", since=dt.datetime(2026, 12, 3, tzinfo=dt.UTC))
    assert [row["request_id"] for row in newest_first] == ["r8", "r2", "r1"]
    assert find_decisions(lake, "demo", "home", until=dt.datetime(2026, 12, 2, tzinfo=dt.UTC)) == []


def test_the_decisions_asset_lands_the_day_with_checks_per_partition(
    roots: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import dagster as dg

    from recsys_core.settings import load_settings
    from recsys_dagster.defs.audit.assets import QUARANTINE_RATE, RECONCILED, build_audit
    from recsys_dagster.defs.shared import RecsysResource

    raw, lake = roots
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path))
    monkeypatch.setenv("RECSYS_START_DATE", "2026-12-01")
    settings = load_settings()
    assert (settings.raw_root, settings.lake_root) == (raw, lake)
    assets = build_audit(settings).assets
    result = dg.materialize(
        list(assets or []),
        partition_key=DAY.isoformat(),
        resources={"recsys": RecsysResource()},
        instance=dg.DagsterInstance.ephemeral(),
    )
    assert result.success
    (materialization,) = result.asset_materializations_for_node("decisions")
    assert materialization.metadata["traces"].value == 3
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert checks[RECONCILED].passed
    # 8 of 11 lines quarantined: far above the 5% limit, a warning (traces feed no model).
    assert not checks[QUARANTINE_RATE].passed
    assert checks[QUARANTINE_RATE].severity == dg.AssetCheckSeverity.WARN
    assert (partition_dir(lake, DAY) / DATA_FILE).is_file()


def test_recsys_audit_prints_the_landed_traces(
    roots: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys
) -> None:
    from recsys_cli import cli

    raw, lake = roots
    land_decisions(raw, lake, DAY, MAX_LINE)
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path))
    target = ["audit", "--tenant", "demo", "--surface", "home"]
    assert cli.main([*target, "--request-id", "r2"]) == cli.EXIT_OK
    (line,) = capsys.readouterr().out.splitlines()
    assert json.loads(line) == find_decisions(lake, "demo", "home", request_id="r2")[0]
    assert cli.main([*target, "--user-id", "u1", "--since", "2026-12-03", "--until", "2026-12-03"]) == 0
    assert [json.loads(row)["request_id"] for row in capsys.readouterr().out.splitlines()] == ["r8", "r1"]
    assert cli.main([*target, "--user-id", "u1", "--since", "2026-12-04"]) == cli.EXIT_FAILED
    assert "no landed trace of demo/home matches" in capsys.readouterr().err
    assert cli.main([*target, "--request-id", "r2", "--since", "2026-12-03"]) == cli.EXIT_USAGE
