"""From built artifacts to published manifests, one as-of day at a time.

The window-artifact assets record which artifact versions they built for a day in
`lake/<kind>/dt=<day>/builds.json`; `publish_as_of` reads those records, re-confirms the blocking gates of
every canonical partition in the window from their stored results (whichever run checked them), and
publishes per tenant and surface. Nothing here imports Dagster.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recsys_core.kinds import ARTIFACT_KINDS, KINDS
from recsys_core.lake import BUILDS_FILE, BuildRecord, partition_dir, read_builds, read_summary
from recsys_core.settings import Settings
from recsys_core.storage import write_atomic
from recsys_dagster.evaluation.offline import read_evaluation
from recsys_dagster.ingest.gates import confirm_gates_passed
from recsys_dagster.publishing.protocol import PublishOutcome, publish
from recsys_dagster.transform.artifacts import ArtifactBuild, window_days
from recsys_dagster.transform.sql import run_sql


@dataclass(frozen=True)
class TargetOutcome:
    tenant: str
    surface: str
    outcome: PublishOutcome


def write_build_record(lake_root: Path, kind: str, as_of: dt.date, builds: list[ArtifactBuild]) -> Path:
    """Record the artifact versions built for `as_of` (the partition of the window-artifact asset)."""
    record: BuildRecord = {
        "kind": kind,
        "as_of": as_of.isoformat(),
        "artifacts": [
            {
                "tenant": b.tenant,
                "surface": b.surface,
                "version": b.version,
                "path": str(b.path),
                "rows": b.rows,
                "window": {"start": b.window_start.isoformat(), "end": b.window_end.isoformat()},
                "missing_days": list(b.missing_days),
            }
            for b in builds
        ],
    }
    path = partition_dir(lake_root, kind, as_of) / BUILDS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())
    return path


def gate_problems(settings: Settings, as_of: dt.date) -> tuple[list[str], int]:
    """Reasons the canonical inputs of the widest window ending at `as_of` may not be published.

    Days before RECSYS_START_DATE and days never materialized are not inputs (the artifacts' meta.json lists
    them as missing); every canonical partition that exists must have passed its blocking gates.
    """
    widest = max(kind.window_days(settings.pipeline) for kind in ARTIFACT_KINDS.values())
    problems, checked = [], 0
    for day in window_days(as_of, widest):
        if day < settings.start_date or read_summary(settings.lake_root, day) is None:
            continue
        checked += 1
        problem = confirm_gates_passed(settings.lake_root, day)
        if problem:
            problems.append(problem)
    return problems, checked


def artifact_row_problems(artifacts: dict[str, Path], min_support: int) -> list[str]:
    """Violations found by the kinds' row-check queries (dbt_like_sql/checks/), per kind and problem."""
    problems = []
    for kind in ARTIFACT_KINDS.values():
        path = artifacts.get(kind.name)
        if kind.row_check is None or path is None or not (path / kind.table).is_file():
            continue  # a missing artifact or file is reported by publish's own validation
        violations = run_sql(kind.row_check, {"paths": [str(path / kind.table)], "min_support": min_support})
        if violations.height:
            counts = violations.group_by("problem").len().sort("problem").iter_rows()
            problems.append(
                f"artifact {kind.name} breaks its contract: " + ", ".join(f"{p} x{n}" for p, n in counts)
            )
    return problems


def evaluation_problems(
    settings: Settings, as_of: dt.date, tenant: str, surface: str
) -> tuple[list[str], dict[str, Any]]:
    """Why the offline evaluation of `as_of` forbids publishing (its guardrail violations), and its summary
    for the manifest. With `guardrails.enabled: false` nothing is required."""
    guardrails = settings.pipeline.guardrails
    if not guardrails.enabled:
        return [], {"enabled": False}
    record = read_evaluation(settings.lake_root, as_of, tenant, surface)
    if record is None:
        return [
            f"evaluation {as_of} {tenant}/{surface}: not evaluated; materialize evaluation for {as_of}"
        ], {}
    summary: dict[str, Any] = {"passed": record["passed"], "note": record["note"] or None}
    result = record.get("result")
    if result is not None:
        metric = f"{guardrails.metric}@{result['k']}"
        summary[metric] = {
            model: values["all"][guardrails.metric]
            for model, values in result["metrics"].items()
            if "all" in values
        }
        summary["users"] = result["users"].get("all", 0)
    return [f"quality gate: {message}" for message in record["violations"]], summary


def publish_as_of(settings: Settings, as_of: dt.date, *, run_id: str | None = None) -> list[TargetOutcome]:
    """Publish every tenant and surface that has artifacts built for `as_of`."""
    records = {kind: read_builds(settings.lake_root, kind, as_of) for kind in KINDS}
    built = {kind: record for kind, record in records.items() if record is not None}
    missing = [kind for kind in KINDS if kind not in built]
    if missing:
        raise FileNotFoundError(
            f"no artifacts built as of {as_of} for: {', '.join(missing)}; materialize them before publishing"
        )
    per_target: dict[tuple[str, str], dict[str, Path]] = defaultdict(dict)
    for kind, record in built.items():
        for entry in record["artifacts"]:
            per_target[(entry["tenant"], entry["surface"])][kind] = Path(entry["path"])
    problems, checked = gate_problems(settings, as_of)
    outcomes = []
    for (tenant, surface), artifacts in sorted(per_target.items()):
        absent = [kind for kind in KINDS if kind not in artifacts]
        quality, evaluation = evaluation_problems(settings, as_of, tenant, surface)
        outcome = publish(
            settings.artifact_root,
            tenant,
            surface,
            as_of,
            artifacts,
            gate_problems=problems
            + [f"artifact {kind} was not built for this tenant/surface" for kind in absent]
            + artifact_row_problems(artifacts, settings.pipeline.artifacts.cooc.min_support)
            + quality,
            checks_summary={
                "canonical_events": {"days": checked, "passed": not problems},
                "evaluation": evaluation,
            },
            run_id=run_id,
            # The weights the evaluation just scored the blend with (tuned ones included).
            blend=dataclasses.asdict(settings.pipeline.blend),
        )
        outcomes.append(TargetOutcome(tenant, surface, outcome))
    return outcomes
