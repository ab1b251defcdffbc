"""evaluation: every model of the day scored on a temporal holdout through the served ranking code."""

from typing import Any

import dagster as dg

from recsys_core.kinds import WINDOW_KINDS
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
from recsys_dagster.evaluation.offline import EVALUATION_ASSET, TargetEvaluation, evaluate_day
from recsys_dagster.transform.artifacts import require_retraining_inputs


def build_evaluation(settings: Settings) -> dg.Definitions:
    guardrails = settings.pipeline.guardrails

    @dg.asset(
        name=EVALUATION_ASSET,
        description=(
            f"Offline evaluation as of each day: models built on the window without its last "
            f"{guardrails.holdout_days} day(s), asked for {guardrails.k} items per user through the served "
            "ranking, scored on the held-out new items (precision, recall, nDCG, MAP, hit rate, coverage, "
            "long-tail share per model and segment), with the guardrails that publishing enforces; for a "
            "tenant with an item catalog, the blend's intra-list diversity and category coverage next to its "
            "accuracy per diversity setting. Report: "
            "lake/evaluation/dt=<day>/<tenant>/<surface>/report/report.md. Reference: "
            "docs/reference/configuration.md#guardrails"
        ),
        # The catalog state of the day: the diversity figures of tenants that have one.
        deps=[*WINDOW_KINDS, "catalog"],
        partitions_def=daily_partitions(settings),
        backfill_policy=dg.BackfillPolicy.single_run(),
        kinds={"python", "parquet"},
        group_name="evaluation",
        owners=OWNERS,
    )
    def evaluation(context: dg.AssetExecutionContext, recsys: RecsysResource) -> dg.MaterializeResult:
        cfg = recsys.settings
        log = DayLog(context)
        for as_of in partition_days(context):
            # The evaluation retrains from the window's aggregates: they must be what publishing vouches for.
            require_retraining_inputs(cfg.lake_root, as_of, cfg.pipeline, cfg.start_date)
            outcomes = evaluate_day(cfg, as_of)
            for outcome in outcomes:
                verdict = "passed" if outcome.passed else "FAILED: " + "; ".join(outcome.violations)
                log.info(
                    as_of, f"evaluation {as_of} {outcome.tenant}/{outcome.surface}: {outcome.note or verdict}"
                )
            add_partition_metadata(context, as_of, _day_metadata(outcomes, guardrails.metric, guardrails.k))
        return dg.MaterializeResult()

    return dg.Definitions(assets=[evaluation])


def _day_metadata(outcomes: list[TargetEvaluation], metric: str, k: int) -> dict[str, Any]:
    """One as-of day: per tenant and surface its metric per model (numeric: the UI plots it over the
    partitions), evaluated users, verdict and record; and a table of them all."""
    rows: list[dict[str, Any]] = []
    metadata: dict[str, Any] = {}
    for outcome in outcomes:
        target = f"{outcome.tenant}/{outcome.surface}"
        verdict = "passed" if outcome.passed else "FAILED: " + "; ".join(outcome.violations)
        row: dict[str, Any] = {"target": target, "verdict": verdict}
        metadata[f"passed {target}"] = dg.MetadataValue.bool(outcome.passed)
        metadata[f"record {target}"] = dg.MetadataValue.path(str(outcome.path))
        if outcome.result is not None:
            users = outcome.result.users.get("all", 0)
            row["users"] = users
            metadata[f"users {target}"] = dg.MetadataValue.int(users)
            for model in outcome.result.models:
                value = outcome.result.value(model, "all", metric)
                if value is not None:
                    row[model] = round(value, 4)
                    metadata[f"{metric}@{k} {model} {target}"] = dg.MetadataValue.float(value)
            metadata[f"report {target}"] = dg.MetadataValue.path(str(outcome.report))
        if outcome.note:
            row["note"] = outcome.note
        rows.append(row)
    columns = sorted(
        {key for row in rows for key in row}, key=lambda c: (c not in ("target", "users"), c == "note", c)
    )
    metadata["evaluations"] = dg.MetadataValue.md(markdown_table(rows, columns or ["target"]))
    return metadata
