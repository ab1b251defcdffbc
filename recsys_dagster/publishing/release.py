"""From built artifacts to published manifests, one as-of day at a time.

The window-artifact assets record which artifact versions they built for a day in
`lake/<kind>/dt=<day>/builds.json`; `publish_as_of` reads those records, re-verifies that every canonical
partition each artifact was built from is still that exact, unmodified content and passed its blocking
gates (recsys_dagster.transform.lineage), and publishes per tenant and surface. Nothing here imports Dagster.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb

from recsys_core.kinds import ARTIFACT_KINDS, CONTENT, KINDS, USER_TOPN
from recsys_core.lake import BUILDS_FILE, BuildRecord, partition_dir, read_builds
from recsys_core.manifest import ManifestError, read_meta
from recsys_core.rules import RULES_KIND
from recsys_core.settings import Settings
from recsys_core.storage import write_atomic
from recsys_dagster.evaluation.offline import read_evaluation
from recsys_dagster.publishing.protocol import PublishOutcome, publish
from recsys_dagster.transform.artifacts import ArtifactBuild
from recsys_dagster.transform.content import built_content, catalog_input_problems
from recsys_dagster.transform.lineage import artifact_input_problems
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


def lineage_problems(settings: Settings, artifacts: dict[str, Path]) -> tuple[list[str], int]:
    """Reasons the artifacts may not be published because of the canonical data they were built from
    (`lineage.artifact_input_problems`, re-verified from the files now), and the number of canonical
    days confirmed. An artifact whose meta.json cannot be read is left to publish's own validation."""
    problems: list[str] = []
    days: set[str] = set()
    for kind, path in sorted(artifacts.items()):
        try:
            meta: dict[str, Any] = dict(read_meta(path))
        except (ManifestError, OSError):
            continue
        found, _ = artifact_input_problems(settings.lake_root, kind, meta, settings.start_date)
        problems.extend(found + catalog_input_problems(settings.lake_root, kind, meta))
        days.update((meta.get("inputs") or {}).get("canonical_events") or {})
    return problems, len(days)


def artifact_row_problems(artifacts: dict[str, Path], min_support: int) -> list[str]:
    """Violations found by the kinds' row-check queries (dbt_like_sql/checks/), per kind and problem."""
    problems = []
    for kind in ARTIFACT_KINDS.values():
        path = artifacts.get(kind.name)
        if kind.row_check is None or path is None or not (path / kind.table).is_file():
            continue  # a missing artifact or file is reported by publish's own validation
        try:
            violations = run_sql(
                kind.row_check, {"paths": [str(path / kind.table)], "min_support": min_support}
            )
        except duckdb.Error as exc:  # an unreadable file; publish's own validation says more
            problems.append(f"artifact {kind.name}: {kind.table} cannot be read: {str(exc).splitlines()[0]}")
            continue
        if violations.height:
            counts = violations.group_by("problem").len().sort("problem").iter_rows()
            problems.append(
                f"artifact {kind.name} breaks its contract: " + ", ".join(f"{p} x{n}" for p, n in counts)
            )
    return problems


def derived_problems(artifacts: dict[str, Path], blend: dict[str, float]) -> list[str]:
    """Why a derived artifact (`user_topn`) does not fit what is published with it: computed from other
    versions of its input kinds, or with other blend weights than the manifest's."""
    path = artifacts.get(USER_TOPN.name)
    if path is None:
        return []
    try:
        meta: dict[str, Any] = dict(read_meta(path))
    except (ManifestError, OSError):
        return []  # publish's own validation says what is wrong with it
    problems = []
    built_from = (meta.get("inputs") or {}).get("artifacts") or {}
    for kind in USER_TOPN.derived_from:
        published = artifacts[kind].name if kind in artifacts else None
        if built_from.get(kind) != published:
            problems.append(
                f"artifact user_topn was computed from {kind} {str(built_from.get(kind))[:12]}, not the "
                f"{kind} {str(published)[:12]} published with it; re-materialize user_topn"
            )
    recorded = (meta.get("params") or {}).get("blend")
    if recorded != blend:
        problems.append(
            f"artifact user_topn was computed with blend weights {recorded}, the manifest publishes {blend}; "
            "re-materialize user_topn"
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
    # Optional kinds built from the catalog, for the targets whose tenant has one.
    content = built_content(settings.lake_root, as_of)
    outcomes = []
    for (tenant, surface), artifacts in sorted(per_target.items()):
        if (tenant, surface) in content:
            artifacts[CONTENT.name] = content[(tenant, surface)]
        problems, checked = lineage_problems(settings, artifacts)
        absent = [kind for kind in KINDS if kind not in artifacts]
        quality, evaluation = evaluation_problems(settings, as_of, tenant, surface)
        blend = dataclasses.asdict(settings.pipeline.blend)
        outcome = publish(
            settings.artifact_root,
            tenant,
            surface,
            as_of,
            artifacts,
            gate_problems=problems
            + [f"artifact {kind} was not built for this tenant/surface" for kind in absent]
            + artifact_row_problems(artifacts, settings.pipeline.artifacts.cooc.min_support)
            + derived_problems(artifacts, blend)
            + quality,
            checks_summary={
                "canonical_events": {"days": checked, "passed": not problems},
                "evaluation": evaluation,
            },
            run_id=run_id,
            # The weights the evaluation just scored the blend with (tuned ones included).
            blend=blend,
            # The rules in force stay in force: the pipeline builds the models, not the rules.
            carry=(RULES_KIND,),
        )
        outcomes.append(TargetOutcome(tenant, surface, outcome))
    return outcomes
