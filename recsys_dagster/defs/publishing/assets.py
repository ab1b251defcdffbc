"""published_manifest: validate, confirm gates, register and atomically swap each tenant/surface manifest."""

import dagster as dg

from recsys_core.kinds import KINDS
from recsys_core.settings import Settings
from recsys_dagster.defs.shared import (
    OWNERS,
    RecsysResource,
    daily_partitions,
    markdown_table,
    partition_days,
)
from recsys_dagster.publishing.release import publish_as_of


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
        deps=[*KINDS, "evaluation"],
        partitions_def=daily_partitions(settings),
        backfill_policy=dg.BackfillPolicy.single_run(),
        kinds={"json"},
        group_name="publishing",
        owners=OWNERS,
        metadata={"artifact_root": dg.MetadataValue.path(str(settings.artifact_root))},
    )
    def published_manifest(context: dg.AssetExecutionContext, recsys: RecsysResource) -> dg.MaterializeResult:
        cfg = recsys.settings
        rows, refused = [], []
        for as_of in partition_days(context):
            for result in publish_as_of(cfg, as_of, run_id=context.run.run_id):
                outcome = result.outcome
                rows.append(
                    {
                        "as_of": as_of.isoformat(),
                        "target": f"{result.tenant}/{result.surface}",
                        "action": outcome.action,
                        "manifest": (outcome.manifest_version or "")[:12],
                        "message": outcome.message,
                    }
                )
                log = context.log.error if outcome.action == "refused" else context.log.info
                log(f"{as_of} {result.tenant}/{result.surface}: {outcome.action} - {outcome.message}")
                if outcome.action == "refused":
                    refused.append(f"{as_of} {result.tenant}/{result.surface}: {outcome.message}")
        if refused:
            # Failing the step makes the refusal visible in the UI, the CLI exit code and the failure alert.
            raise PublishRefusedError("publishing refused for " + "; ".join(refused))
        return dg.MaterializeResult(
            metadata={
                "published": sum(r["action"] == "publish" for r in rows),
                "noop": sum(r["action"] == "noop" for r in rows),
                "history_only": sum(r["action"] == "history_only" for r in rows),
                "outcomes": dg.MetadataValue.md(
                    markdown_table(rows, ["as_of", "target", "action", "manifest", "message"])
                ),
            }
        )

    return dg.Definitions(assets=[published_manifest])
