"""published_manifest: validate, confirm gates, register and atomically swap each tenant/surface manifest."""

from pathlib import Path
from typing import Any

import dagster as dg

from recsys_core.kinds import CATALOG_KINDS, KINDS
from recsys_core.manifest import MANIFESTS_DIR, target_dir
from recsys_core.settings import Settings
from recsys_dagster.defs.shared import (
    OWNERS,
    DayLog,
    RecsysResource,
    add_partition_metadata,
    daily_partitions,
    markdown_table,
    partition_days,
)
from recsys_dagster.publishing.release import TargetOutcome, publish_as_of

MAX_TARGETS_SHOWN = 3


class PublishRefusedError(Exception):
    """At least one tenant/surface could not be published; current manifests were left untouched."""


def build_publishing(settings: Settings) -> dg.Definitions:
    @dg.asset(
        name="published_manifest",
        description=(
            "Publishes the day's artifacts per tenant/surface: validates each artifact, re-confirms the blocking "
            "gates of every canonical partition in the window, appends to the registry, then swaps manifest.json "
            "(forward-only in as-of). Format: docs/reference/artifacts.md"
        ),
        deps=[*KINDS, *CATALOG_KINDS, "evaluation"],
        partitions_def=daily_partitions(settings),
        backfill_policy=dg.BackfillPolicy.single_run(),
        kinds={"json"},
        group_name="publishing",
        owners=OWNERS,
        metadata={"artifact_root": dg.MetadataValue.path(str(settings.artifact_root))},
    )
    def published_manifest(context: dg.AssetExecutionContext, recsys: RecsysResource) -> dg.MaterializeResult:
        cfg = recsys.settings
        refused = []
        log = DayLog(context)
        for as_of in partition_days(context):
            results = publish_as_of(cfg, as_of, run_id=context.run.run_id)
            for result in results:
                outcome = result.outcome
                line = f"{as_of} {result.tenant}/{result.surface}: {outcome.action} - {outcome.message}"
                if outcome.action == "refused":
                    context.log.error(line)
                    refused.append(f"{as_of} {result.tenant}/{result.surface}: {outcome.message}")
                else:
                    log.info(as_of, line)
            add_partition_metadata(context, as_of, _day_metadata(results, cfg.artifact_root))
        if refused:
            # Failing the step makes the refusal visible in the UI, the CLI exit code and the failure alert.
            raise PublishRefusedError("publishing refused for " + "; ".join(refused))
        return dg.MaterializeResult()

    return dg.Definitions(assets=[published_manifest])


def _day_metadata(results: list[TargetOutcome], artifact_root: Path) -> dict[str, Any]:
    """One as-of day: what publishing did per tenant and surface, with the manifest version it stands for
    and that manifest's file (kept in the target's history whatever the action)."""
    rows = [
        {
            "target": f"{result.tenant}/{result.surface}",
            "action": result.outcome.action,
            "manifest": (result.outcome.manifest_version or "")[:12],
            "message": result.outcome.message,
        }
        for result in results
    ]
    metadata: dict[str, Any] = {
        label: dg.MetadataValue.int(sum(row["action"] == action for row in rows))
        for action, label in (("publish", "published"), ("noop", "noop"), ("history_only", "history_only"))
    }
    metadata["outcomes"] = dg.MetadataValue.md(
        markdown_table(rows, ["target", "action", "manifest", "message"])
    )
    for result in results[:MAX_TARGETS_SHOWN]:
        label, version = f"{result.tenant}/{result.surface}", result.outcome.manifest_version
        if version is None:
            continue
        metadata[f"manifest {label}"] = version
        metadata[f"path {label}"] = dg.MetadataValue.path(
            str(target_dir(artifact_root, result.tenant, result.surface) / MANIFESTS_DIR / f"{version}.json")
        )
    return metadata
