"""evaluation: every model of the day scored on a temporal holdout through the served ranking code."""

from typing import Any

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
from recsys_dagster.evaluation.offline import EVALUATION_ASSET, evaluate_day


def build_evaluation(settings: Settings) -> dg.Definitions:
    guardrails = settings.pipeline.guardrails

    @dg.asset(
        name=EVALUATION_ASSET,
        description=(
            f"Offline evaluation as of each day: models built on the window without its last "
            f"{guardrails.holdout_days} day(s), asked for {guardrails.k} items per user through the served "
            "ranking, scored on the held-out new items (precision, recall, nDCG, MAP, hit rate, coverage, "
            "long-tail share per model and segment), with the guardrails that publishing enforces. Report: "
            "lake/evaluation/dt=<day>/<tenant>/<surface>/report/report.md. Reference: "
            "docs/reference/configuration.md#guardrails"
        ),
        deps=list(KINDS),
        partitions_def=daily_partitions(settings),
        backfill_policy=dg.BackfillPolicy.single_run(),
        kinds={"python", "parquet"},
        group_name="evaluation",
        owners=OWNERS,
    )
    def evaluation(context: dg.AssetExecutionContext, recsys: RecsysResource) -> dg.MaterializeResult:
        cfg = recsys.settings
        rows: list[dict[str, Any]] = []
        metadata: dict[str, Any] = {}
        for as_of in partition_days(context):
            for outcome in evaluate_day(cfg, as_of):
                verdict = "passed" if outcome.passed else "FAILED: " + "; ".join(outcome.violations)
                context.log.info(
                    f"evaluation {as_of} {outcome.tenant}/{outcome.surface}: {outcome.note or verdict}"
                )
                row: dict[str, Any] = {
                    "as_of": as_of.isoformat(),
                    "target": f"{outcome.tenant}/{outcome.surface}",
                    "verdict": verdict,
                }
                if outcome.result is not None:
                    users = outcome.result.users.get("all", 0)
                    row["users"] = users
                    for model in outcome.result.models:
                        value = outcome.result.value(model, "all", guardrails.metric)
                        if value is not None:
                            row[model] = round(value, 4)
                            # Numeric metadata: the Dagster UI plots it over the partitions.
                            metadata[
                                f"{guardrails.metric}@{guardrails.k} {model} {outcome.tenant}/{outcome.surface}"
                            ] = dg.MetadataValue.float(value)
                    metadata[f"report {outcome.tenant}/{outcome.surface}"] = dg.MetadataValue.path(
                        str(outcome.report)
                    )
                rows.append(row)
        columns = sorted(
            {key for row in rows for key in row}, key=lambda c: (c not in ("as_of", "target", "users"), c)
        )
        metadata["evaluations"] = dg.MetadataValue.md(markdown_table(rows, columns or ["as_of"]))
        return dg.MaterializeResult(metadata=metadata)

    return dg.Definitions(assets=[evaluation])
