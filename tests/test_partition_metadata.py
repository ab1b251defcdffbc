"""What the Dagster instance records per partition after one run over several days (a single-run backfill).

Every asset materializes the whole range in one step; each partition's materialization must still carry
that day's own figures (rows, path, version), as found on disk, and each check result must belong to its
day, with numbers. The run goes through the `recsys` CLI, as a user starts it, on generated data.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl
import pytest
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus

from recsys_cli import cli
from recsys_core.catalog import item_line, landing_dir, read_catalog_record
from recsys_core.kinds import KINDS
from recsys_core.lake import AGGREGATE_FILE, partition_dir, read_builds, read_checks, read_summary
from recsys_core.manifest import MANIFESTS_DIR, read_registry, target_dir
from recsys_dagster.definitions import build_definitions
from recsys_dagster.evaluation.offline import read_evaluation
from recsys_dagster.ingest.gates import GATE_NAMES
from recsys_dagster.transform.aggregates import DAILY_MODELS

END = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)
DAYS = [END - dt.timedelta(days=offset) for offset in range(3, -1, -1)]
# A day with too many malformed lines: its quarantine_rate check fails (warn-only), the others pass.
BAD_DAY = DAYS[1]
CANONICAL = dg.AssetKey("canonical_events")
CATALOG_ITEMS = [
    {
        "tenant": "demo",
        "item_id": f"i{n:06d}",
        "title": f"Item {n}",
        "categories": [f"c{n % 7}"],
        "available": True,
        "updated_at": f"{DAYS[0]}T00:00:00Z",
    }
    for n in range(2000)
]
CATALOG_CHECKS = ("catalog_reconciled", "catalog_unique_items", "catalog_missing_items")


def recsys(*args: object) -> int:
    return cli.main([str(a) for a in args])


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    config = home / "config.yaml"
    # One day of history is enough for the volume check to compare, so that its ratio is on most days. The
    # evaluation scores every day; its gate is off: on four small days popularity beats the learned models
    # (the gate's own tests are in test_quality_gate.py).
    config.write_text(
        "checks:\n  warn_only: [quarantine_rate]\n  volume_min_history_days: 1\nguardrails:\n  enabled: false\n"
    )
    monkeypatch.setenv("RECSYS_HOME", str(home))
    monkeypatch.setenv("RECSYS_CONFIG", str(config))
    monkeypatch.setenv("RECSYS_START_DATE", (DAYS[0] - dt.timedelta(days=10)).isoformat())
    for var in ("DAGSTER_HOME", "RECSYS_RAW_ROOT", "RECSYS_LAKE_ROOT", "RECSYS_ARTIFACT_ROOT"):
        monkeypatch.delenv(var, raising=False)
    return home


def test_each_partition_of_a_single_run_backfill_reports_its_own_day(
    home: Path, capsys: pytest.CaptureFixture
) -> None:
    """One `recsys run --every-day` over four days (one run, every asset for every day); the days differ in
    volume so that their figures differ."""
    for i, day in enumerate(DAYS):
        assert (
            recsys("generate", "--end", day, "--days", 1, "--events-per-day", 2000 + 400 * i, "--users", 300)
            == 0
        )
    (home / "raw" / f"dt={BAD_DAY}" / "broken.jsonl").write_text("not json\n" * 300)
    # A catalog of part of the generated items, landed on the first day: each day's events then miss a
    # share of their items from it, a figure of its own per day.
    catalog = landing_dir(home / "raw", DAYS[0])
    catalog.mkdir(parents=True)
    (catalog / "items.jsonl").write_bytes(b"".join(item_line(item) for item in CATALOG_ITEMS))
    capsys.readouterr()
    code = recsys("run", "--start", DAYS[0], "--end", DAYS[-1], "--every-day")
    out = capsys.readouterr().out
    assert code == 0, out
    found = re.search(r"^run (\S+): succeeded", out, re.MULTILINE)
    assert found is not None, out
    # The bad day's warn-only check fails once (for its own day), and the run succeeds.
    assert out.count("warning check failed: canonical_events:quarantine_rate") == 1
    assert "blocking check failed" not in out

    instance = dg.DagsterInstance.from_config(str(home / "dagster"))
    try:
        run = {"home": home, "lake": home / "lake", "run_id": found[1], "instance": instance}
        check_canonical_events_and_quarantine(run)
        check_aggregates(run)
        check_artifacts(run)
        check_catalog(run)
        check_evaluation(run)
        check_published_manifest(run)
        check_asset_checks(run)

        # The daily schedule's run: one partition, by partition key rather than a range.
        job = build_definitions().resolve_job_def("daily_pipeline")
        result = job.execute_in_process(
            partition_key=END.isoformat(), instance=instance, raise_on_error=False
        )
        assert result.success
        check_single_day_run({**run, "run_id": result.run_id})
    finally:
        instance.dispose()


def materialization(run: dict[str, Any], asset: str, day: dt.date) -> dict[str, Any]:
    """The metadata of the latest materialization of `asset` for partition `day`: the run's only one."""
    records = (
        run["instance"]
        .fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[day.isoformat()]), limit=10
        )
        .records
    )
    assert records and records[0].run_id == run["run_id"], f"{asset} {day}: not materialized by the run"
    assert sum(r.run_id == run["run_id"] for r in records) == 1, f"{asset} {day}: several in one run"
    event = records[0].asset_materialization
    assert event is not None and event.partition == day.isoformat()
    return {key: value.value for key, value in event.metadata.items()}


def check_canonical_events_and_quarantine(run: dict[str, Any]) -> None:
    lake = run["lake"]
    rows = []
    for day in DAYS:
        summary = read_summary(lake, day)
        assert summary is not None
        meta = materialization(run, "canonical_events", day)
        assert meta["dagster/row_count"] == summary["canonical_rows"] == meta["events"]
        for key in ("lines_read", "quarantined", "duplicates", "blank_lines", "content_hash"):
            assert meta[key] == summary[key], (day, key)
        assert meta["files_read"] == len(summary["files"])
        assert meta["reconciled"] is True
        assert meta["path"] == str(partition_dir(lake, "canonical_events", day))
        gates = {r["name"]: r["metadata"] for r in read_checks(lake, day)["results"]}
        assert meta["quarantine_rate"] == pytest.approx(gates["quarantine_rate"]["rate"])
        assert meta["duplicate_rate"] == pytest.approx(gates["duplicate_rate"]["rate"])
        if "ratio" in gates["volume"]:
            assert meta["volume_ratio"] == pytest.approx(gates["volume"]["ratio"])
        rows.append(meta["dagster/row_count"])

        quarantine = materialization(run, "quarantine", day)
        folder = partition_dir(lake, "quarantine", day)
        on_disk = pl.read_parquet(folder / "*.parquet").height if list(folder.glob("*.parquet")) else 0
        assert quarantine["dagster/row_count"] == summary["quarantined"] == on_disk
        assert quarantine["path"] == str(folder)
    assert len(set(rows)) == len(DAYS), rows
    assert materialization(run, "quarantine", BAD_DAY)["dagster/row_count"] >= 300
    assert "volume_ratio" in materialization(run, "canonical_events", DAYS[-1])


def check_aggregates(run: dict[str, Any]) -> None:
    for model in DAILY_MODELS:
        rows = []
        for day in DAYS:
            meta = materialization(run, model, day)
            path = partition_dir(run["lake"], model, day) / AGGREGATE_FILE
            assert meta["path"] == str(path)
            assert meta["dagster/row_count"] == pl.read_parquet(path).height
            assert "per_day" not in meta
            rows.append(meta["dagster/row_count"])
        assert len(set(rows)) == len(DAYS), (model, rows)


def check_artifacts(run: dict[str, Any]) -> None:
    for kind in KINDS:
        versions = []
        for day in DAYS:
            meta = materialization(run, kind, day)
            record = read_builds(run["lake"], kind, day)
            assert record is not None and record["as_of"] == day.isoformat()
            (entry,) = record["artifacts"]
            assert (entry["tenant"], entry["surface"]) == ("demo", "home")
            assert meta["version demo/home"] == entry["version"]
            assert meta["path demo/home"] == entry["path"]
            assert meta["rows demo/home"] == entry["rows"] == meta["dagster/row_count"]
            assert meta["build_record"] == str(partition_dir(run["lake"], kind, day) / "builds.json")
            assert meta["window"].endswith(day.isoformat())
            meta_json = json.loads((Path(entry["path"]) / "meta.json").read_text())
            assert meta_json["as_of"] == day.isoformat()
            versions.append(meta["version demo/home"])
        assert len(set(versions)) == len(DAYS), (kind, versions)


def check_catalog(run: dict[str, Any]) -> None:
    """The catalog state and the content artifact of each day, and the figure of items missing from it,
    recomputed from the day's canonical events."""
    lake, known = run["lake"], {item["item_id"] for item in CATALOG_ITEMS}
    shares = []
    for day in DAYS:
        meta = materialization(run, "catalog", day)
        record = read_catalog_record(lake, day)
        assert record is not None and record["items"] == meta["items"] == meta["dagster/row_count"] == 2000
        assert meta["path"] == str(partition_dir(lake, "catalog", day))
        seen = set(pl.read_parquet(partition_dir(lake, "canonical_events", day) / "*.parquet")["item_id"])
        share = len(seen - known) / len(seen)
        assert 0 < share < 1
        assert meta["missing_share"] == pytest.approx(share) == record["missing_share"]
        shares.append(share)
        content = materialization(run, "content", day)
        (entry,) = read_builds(lake, "content", day)["artifacts"]
        assert content["version demo/home"] == entry["version"]
        assert content["rows demo/home"] == entry["rows"] == 2000 * 20
    assert len(set(shares)) == len(DAYS), shares


def check_evaluation(run: dict[str, Any]) -> None:
    scored = {}
    for day in DAYS:
        meta = materialization(run, "evaluation", day)
        record = read_evaluation(run["lake"], day, "demo", "home")
        assert record is not None and record["as_of"] == day.isoformat()
        assert meta["passed demo/home"] == record["passed"]
        assert meta["record demo/home"].endswith(f"dt={day.isoformat()}/demo/home/evaluation.json")
        metrics = {key: value for key, value in meta.items() if key.startswith("ndcg@")}
        if record["result"] is None:
            assert not metrics and "report demo/home" not in meta
            continue
        assert meta["users demo/home"] == record["result"]["users"]["all"]
        for model, values in record["result"]["metrics"].items():
            assert metrics[f"ndcg@10 {model} demo/home"] == pytest.approx(values["all"]["ndcg"])
        assert Path(meta["report demo/home"]).is_file()
        scored[day] = tuple(sorted(metrics.items()))
    assert len(scored) >= 2 and len(set(scored.values())) == len(scored), scored


def check_published_manifest(run: dict[str, Any]) -> None:
    records = [
        r for r in read_registry(run["home"] / "artifacts", "demo", "home") if r["run_id"] == run["run_id"]
    ]
    by_day = {r["as_of"]: r for r in records}
    versions = []
    for day in DAYS:
        meta = materialization(run, "published_manifest", day)
        record = by_day[day.isoformat()]
        assert meta["manifest demo/home"] == record["manifest_version"]
        assert meta["published"] == 1 and meta["noop"] == meta["history_only"] == 0
        history = target_dir(run["home"] / "artifacts", "demo", "home") / MANIFESTS_DIR
        assert meta["path demo/home"] == str(history / f"{record['manifest_version']}.json")
        manifest = json.loads(Path(meta["path demo/home"]).read_text())
        assert manifest["as_of"] == day.isoformat()
        versions.append(record["manifest_version"])
    assert len(set(versions)) == len(DAYS)


def check_asset_checks(run: dict[str, Any]) -> None:
    instance: dg.DagsterInstance = run["instance"]
    evaluations: dict[tuple[str, str | None], Any] = {}
    for entry in instance.all_logs(run["run_id"], of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION):
        data = entry.dagster_event.asset_check_evaluation_data
        key = (data.check_name, data.partition)
        assert key not in evaluations, key
        evaluations[key] = data
    # The gates of canonical_events, and the decision traces' and the catalog's own checks, each once per day.
    names = (*GATE_NAMES, "decisions_reconciled", "decisions_quarantine_rate", *CATALOG_CHECKS)
    assert set(evaluations) == {(name, day.isoformat()) for name in names for day in DAYS}
    for day in DAYS:
        record = read_catalog_record(run["lake"], day)
        missing = evaluations[("catalog_missing_items", day.isoformat())]
        assert isinstance(missing.metadata["share"], dg.FloatMetadataValue)
        assert missing.metadata["share"].value == pytest.approx(record["missing_share"])
        assert missing.metadata["missing_items"].value == record["missing_items"]
        assert missing.severity == dg.AssetCheckSeverity.WARN and not missing.passed
        unique = evaluations[("catalog_unique_items", day.isoformat())]
        assert unique.passed and unique.blocking and unique.metadata["items"].value == 2000
        reconciled = evaluations[("catalog_reconciled", day.isoformat())]
        assert reconciled.passed and reconciled.blocking
        assert reconciled.metadata["records"].value == (2000 if day == DAYS[0] else 0)

    for day in DAYS:
        stored = {r["name"]: r for r in read_checks(run["lake"], day)["results"]}
        summary = read_summary(run["lake"], day)
        for name in GATE_NAMES:
            data = evaluations[(name, day.isoformat())]
            assert data.passed == stored[name]["passed"], (name, day)
            assert data.metadata["summary"].value == stored[name]["summary"]
            assert data.description == stored[name]["summary"]
        quarantine = evaluations[("quarantine_rate", day.isoformat())]
        assert isinstance(quarantine.metadata["rate"], dg.FloatMetadataValue)
        assert quarantine.metadata["rate"].value == pytest.approx(
            stored["quarantine_rate"]["metadata"]["rate"]
        )
        assert quarantine.metadata["count"].value == summary["quarantined"]
        assert quarantine.severity == dg.AssetCheckSeverity.WARN
        duplicates = evaluations[("duplicate_rate", day.isoformat())]
        assert isinstance(duplicates.metadata["rate"], dg.FloatMetadataValue)
        assert duplicates.metadata["count"].value == summary["duplicates"]
        assert duplicates.severity == dg.AssetCheckSeverity.ERROR and duplicates.blocking
        volume = evaluations[("volume", day.isoformat())]
        assert isinstance(volume.metadata["rows"], dg.IntMetadataValue)
        assert volume.metadata["rows"].value == summary["canonical_rows"]
        if day != DAYS[0]:  # the first day has no history in this lake
            assert isinstance(volume.metadata["ratio"], dg.FloatMetadataValue)
            assert volume.metadata["ratio"].value == pytest.approx(stored["volume"]["metadata"]["ratio"])
        assert evaluations[("quarantine_rate", day.isoformat())].passed == (day != BAD_DAY)

    # What the UI lists per check and partition: one finished execution each, none left planned.
    for name in GATE_NAMES:
        history = instance.event_log_storage.get_asset_check_execution_history(
            dg.AssetCheckKey(CANONICAL, name), limit=50
        )
        assert sorted(record.partition for record in history) == [day.isoformat() for day in DAYS]
        for record in history:
            failed = name == "quarantine_rate" and record.partition == BAD_DAY.isoformat()
            expected = (
                AssetCheckExecutionRecordStatus.FAILED
                if failed
                else AssetCheckExecutionRecordStatus.SUCCEEDED
            )
            assert record.status == expected, (name, record.partition)


def check_single_day_run(run: dict[str, Any]) -> None:
    """Re-running the last day alone: its partition's new materializations and checks say the same."""
    lake = run["lake"]
    summary = read_summary(lake, END)
    canonical = materialization(run, "canonical_events", END)
    assert canonical["dagster/row_count"] == summary["canonical_rows"]
    assert canonical["path"] == str(partition_dir(lake, "canonical_events", END))
    for kind in KINDS:
        (entry,) = read_builds(lake, kind, END)["artifacts"]
        assert materialization(run, kind, END)["version demo/home"] == entry["version"]
    published = materialization(run, "published_manifest", END)
    assert published["noop"] == 1 and published["published"] == 0
    assert (
        published["manifest demo/home"]
        == read_registry(run["home"] / "artifacts", "demo", "home")[-1]["manifest_version"]
    )
    entries = run["instance"].all_logs(run["run_id"], of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION)
    evaluations = [entry.dagster_event.asset_check_evaluation_data for entry in entries]
    names = (*GATE_NAMES, "decisions_reconciled", "decisions_quarantine_rate", *CATALOG_CHECKS)
    assert sorted((e.check_name, e.partition) for e in evaluations) == sorted(
        (name, END.isoformat()) for name in names
    )
    volume = next(e for e in evaluations if e.check_name == "volume")
    assert volume.metadata["rows"].value == summary["canonical_rows"]
    history = run["instance"].event_log_storage.get_asset_check_execution_history(
        dg.AssetCheckKey(CANONICAL, "volume"), limit=50
    )
    assert [r.partition for r in history if r.run_id == run["run_id"]] == [END.isoformat()]
