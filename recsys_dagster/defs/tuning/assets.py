"""tuning: ALS hyperparameters and blend weights searched on a validation split, on demand or on a schedule.

Not part of the daily job (its group is `ON_DEMAND_GROUP`): a search trains ALS once per trial.
"""

import datetime as dt
from typing import Any

import dagster as dg

from recsys_core.settings import Settings
from recsys_dagster.defs.shared import (
    ON_DEMAND_GROUP,
    OWNERS,
    RecsysResource,
    add_partition_metadata,
    daily_partitions,
    markdown_table,
    partition_days,
)
from recsys_dagster.evaluation.tuning import TUNING_ASSET, Trial, TuningOutcome, trials_frame, tune_day
from recsys_dagster.transform.artifacts import require_retraining_inputs

TUNING_JOB = "tuning_job"


def build_tuning(settings: Settings) -> dg.Definitions:
    tuning = settings.pipeline.tuning

    @dg.asset(
        name=TUNING_ASSET,
        description=(
            f"Search of the ALS hyperparameters and blend weights ({tuning.trials} trials, optuna TPE) on the "
            f"last {tuning.validation_days} day(s) before the evaluation's held-out days of the partition. "
            "Trials: lake/tuning/dt=<day>/trials.parquet; the choice goes to lake/tuning/tuned.yaml, which "
            "the daily ALS and the API server use. Reference: docs/reference/configuration.md#tuning"
        ),
        deps=["user_item_daily", "pair_daily", "item_daily"],
        partitions_def=daily_partitions(settings),
        # One run for a range, like every other asset (a job mixing backfill policies runs day by day);
        # each day is tuned in turn and the last one's choice stays.
        backfill_policy=dg.BackfillPolicy.single_run(),
        kinds={"python", "optuna", "parquet"},
        group_name=ON_DEMAND_GROUP,
        owners=OWNERS,
    )
    def tuning_asset(context: dg.AssetExecutionContext, recsys: RecsysResource) -> dg.MaterializeResult:
        cfg = recsys.settings
        metric, k = cfg.pipeline.guardrails.metric, cfg.pipeline.guardrails.k
        trials = cfg.pipeline.tuning.trials

        def progress(trial: Trial, best: Trial) -> None:
            context.log.info(
                f"trial {trial.number}/{trials}: {_describe(trial)}: blend {metric}@{k} "
                f"{trial.score.blend:.4f}, als {trial.score.als:.4f} ({trial.seconds:.1f} s); "
                f"best so far trial {best.number} {best.score.blend:.4f}"
            )

        for as_of in partition_days(context):
            # Tuned parameters are published with the next manifest: learn them from vouched-for data only.
            require_retraining_inputs(cfg.lake_root, as_of, cfg.pipeline, cfg.start_date)
            outcome = tune_day(cfg, as_of, progress)
            best = outcome.result.best
            context.log.info(
                f"{as_of}: chosen trial {best.number} ({_describe(best)}), written to {outcome.tuned_path}"
            )
            add_partition_metadata(context, as_of, _day_metadata(outcome, metric, k))
        return dg.MaterializeResult()

    job = dg.define_asset_job(
        TUNING_JOB,
        selection=dg.AssetSelection.assets(TUNING_ASSET),
        description="Tune ALS and the blend on the data up to a day (one partition at a time).",
    )
    if not tuning.schedule:
        return dg.Definitions(assets=[tuning_asset], jobs=[job])

    @dg.schedule(
        name="tuning_schedule",
        cron_schedule=tuning.schedule,
        execution_timezone="UTC",
        job=job,
        description=f"Tune on yesterday's partition at {tuning.schedule!r} (UTC): tuning.schedule.",
        default_status=dg.DefaultScheduleStatus.RUNNING,
    )
    def tuning_schedule(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
        yesterday = context.scheduled_execution_time.date() - dt.timedelta(days=1)
        return dg.RunRequest(partition_key=yesterday.isoformat())

    return dg.Definitions(assets=[tuning_asset], jobs=[job], schedules=[tuning_schedule])


def _day_metadata(outcome: TuningOutcome, metric: str, k: int) -> dict[str, Any]:
    """One day's search: the chosen trial against the configured start, and every trial."""
    best, baseline = outcome.result.best, outcome.result.baseline
    frame = trials_frame(outcome.result, metric, k)
    rows: list[dict[str, Any]] = [
        {key: round(v, 4) if isinstance(v, float) else v for key, v in row.items()}
        for row in frame.iter_rows(named=True)
    ]
    return {
        f"blend {metric}@{k} chosen": dg.MetadataValue.float(best.score.blend),
        f"blend {metric}@{k} before": dg.MetadataValue.float(baseline.score.blend),
        f"als {metric}@{k} chosen": dg.MetadataValue.float(best.score.als),
        "chosen trial": dg.MetadataValue.int(best.number),
        "validation users": dg.MetadataValue.int(best.score.users),
        "validation days": f"{outcome.validation_days[0]}..{outcome.validation_days[1]}",
        "trials": dg.MetadataValue.md(markdown_table(rows, list(frame.columns))),
        "trials file": dg.MetadataValue.path(str(outcome.trials_path)),
        "tuned parameters": dg.MetadataValue.path(str(outcome.tuned_path)),
    }


def _describe(trial: Trial) -> str:
    params = trial.candidate.params()
    return ", ".join(f"{key} {value}" for key, value in params.items() if key != "blend_als")
