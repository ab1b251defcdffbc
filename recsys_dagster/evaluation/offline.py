"""The offline evaluation of one as-of day, as the pipeline runs it before publishing.

For as-of day D and `guardrails.holdout_days` h: every artifact kind is built as of D - h (the window
without its last h days) into a scratch artifact root under `lake/evaluation/dt=D/`, loaded the way the
API server loads a manifest, and asked for each evaluated user's top k through the server's own
`recsys_serving.recommender.recommend`: so the metrics are what the API would have returned. The held-out
interactions are the new items of the last h days (`holdout.temporal_holdout`). Models: `popularity`,
`cooc`, `als` (each alone) and `blend` (the configured weights, as served).

Each tenant and surface gets `lake/evaluation/dt=D/<tenant>/<surface>/evaluation.json` (metrics, guardrail
violations, passed) and a report (`report/report.md` with PNG charts). Publishing refuses a day whose
evaluation did not pass (`publishing.release`). Nothing here imports Dagster.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from recsys_core.catalog import catalog_problem, read_catalog, read_catalog_record
from recsys_core.kinds import ARTIFACT_KINDS, WINDOW_KINDS
from recsys_core.lake import AGGREGATE_FILE, partition_dir, read_builds, read_json_record
from recsys_core.manifest import (
    read_current,
)
from recsys_core.settings import BlendWeights, GuardrailsConfig, Settings
from recsys_core.storage import write_atomic
from recsys_dagster.evaluation.diversity import diversity_tradeoff, with_catalog
from recsys_dagster.evaluation.evaluate import EvaluationResult, Ranker, evaluate_models
from recsys_dagster.evaluation.guardrails import check_guardrails
from recsys_dagster.evaluation.holdout import Holdout, item_popularity, temporal_holdout
from recsys_dagster.evaluation.report import write_report
from recsys_dagster.transform.artifacts import build_window_artifacts, load_built, window_days
from recsys_serving import recommender
from recsys_serving.store import LoadedTarget

EVALUATION_ASSET = "evaluation"
EVALUATION_FILE = "evaluation.json"
# Each source alone, through the served ranking (a tiny popularity weight only orders what the source
# leaves tied or unscored, as a served list would be filled).
SINGLE_SOURCES = {
    "popularity": BlendWeights(als=0.0, cooc=0.0, popularity=1.0),
    "cooc": BlendWeights(als=0.0, cooc=1.0, popularity=1e-6),
    "als": BlendWeights(als=1.0, cooc=0.0, popularity=1e-6),
}


@dataclass(frozen=True)
class TargetEvaluation:
    """One tenant and surface: the result (None when there was nothing to evaluate) and its verdict."""

    tenant: str
    surface: str
    as_of: dt.date
    result: EvaluationResult | None
    violations: tuple[str, ...]
    note: str
    path: Path

    @property
    def passed(self) -> bool:
        return not self.violations

    @property
    def report(self) -> Path:
        return self.path.parent / "report" / "report.md"


def evaluation_dir(lake_root: Path, as_of: dt.date, tenant: str, surface: str) -> Path:
    return partition_dir(lake_root, EVALUATION_ASSET, as_of) / tenant / surface


def read_evaluation(lake_root: Path, as_of: dt.date, tenant: str, surface: str) -> dict[str, Any] | None:
    """The recorded evaluation of a tenant and surface as of a day; None if it was never evaluated."""
    return read_json_record(evaluation_dir(lake_root, as_of, tenant, surface) / EVALUATION_FILE)


def rankers(target: LoadedTarget, blend: BlendWeights) -> dict[str, Ranker]:
    """The evaluated models as (user, k) -> items, all through the served recommender."""
    models = {**SINGLE_SOURCES, "blend": blend}
    if target.als is None:
        models.pop("als")
    return {name: ranker(target, weights) for name, weights in models.items()}


def ranker(target: LoadedTarget, weights: BlendWeights) -> Ranker:
    """(user, k) -> the items the server would return with these blend weights (seen items excluded)."""
    return functools.partial(_recommend, target, weights)


def _recommend(target: LoadedTarget, weights: BlendWeights, user: str, k: int) -> Sequence[str]:
    return recommender.recommend(target, user_id=user, k=k, exclude_seen=True, weights=weights).item_ids


def evaluate_day(settings: Settings, as_of: dt.date) -> list[TargetEvaluation]:
    """Evaluate every tenant and surface with data in the window ending at `as_of`, and record it."""
    config, lake_root = settings.pipeline, settings.lake_root
    guardrails = config.guardrails
    train_day = as_of - dt.timedelta(days=guardrails.holdout_days)
    scratch = partition_dir(lake_root, EVALUATION_ASSET, as_of) / "artifacts"
    built: dict[tuple[str, str], dict[str, Path]] = {}
    for kind in WINDOW_KINDS:
        try:
            builds = build_window_artifacts(kind, lake_root, scratch, train_day, config)
        except FileNotFoundError:
            continue  # no aggregate in the training window: nothing to learn from for this kind
        for build in builds:
            built.setdefault((build.tenant, build.surface), {})[kind] = build.path
    interactions = window_interactions(
        lake_root, as_of, max(k.window_days(config) for k in ARTIFACT_KINDS.values())
    )
    outcomes = []
    # Every target with artifacts as of the day gets a record, also one with nothing before the held-out
    # days to learn from (its first days): publishing looks for it.
    record = read_builds(lake_root, "popularity", as_of)
    for entry in record["artifacts"] if record else []:
        built.setdefault((entry["tenant"], entry["surface"]), {})
    for (tenant, surface), paths in sorted(built.items()):
        rows = interactions.filter((pl.col("tenant") == tenant) & (pl.col("surface") == surface))
        outcomes.append(_evaluate_target(settings, tenant, surface, as_of, scratch, paths, rows))
    return outcomes


def window_interactions(lake_root: Path, as_of: dt.date, days: int) -> pl.DataFrame:
    """The user_item_daily rows of the window ending at `as_of` (training days and held-out days)."""
    files = [
        partition_dir(lake_root, "user_item_daily", day) / AGGREGATE_FILE for day in window_days(as_of, days)
    ]
    existing = [str(path) for path in files if path.is_file()]
    if not existing:
        return pl.DataFrame(
            schema={
                "day": pl.Date,
                "tenant": pl.String,
                "surface": pl.String,
                "user_id": pl.String,
                "item_id": pl.String,
                "weight": pl.Float64,
            }
        )
    return pl.read_parquet(existing, columns=["day", "tenant", "surface", "user_id", "item_id", "weight"])


def _evaluate_target(
    settings: Settings,
    tenant: str,
    surface: str,
    as_of: dt.date,
    scratch: Path,
    paths: dict[str, Path],
    interactions: pl.DataFrame,
) -> TargetEvaluation:
    guardrails = settings.pipeline.guardrails
    folder = evaluation_dir(settings.lake_root, as_of, tenant, surface)
    folder.mkdir(parents=True, exist_ok=True)
    result: EvaluationResult | None = None
    violations: tuple[str, ...] = ()
    note = ""
    if "popularity" not in paths:
        note = "no data before the held-out day(s) to train on: nothing to evaluate yet"
    else:
        holdout = temporal_holdout(
            interactions,
            holdout_days=guardrails.holdout_days,
            cold_start_max_interactions=guardrails.cold_start_max_interactions,
            as_of=as_of,
        )
        if not holdout.held_out:
            note = "no user of the training days turned to a new item in the held-out days: nothing to score"
        else:
            train_day = as_of - dt.timedelta(days=guardrails.holdout_days)
            target = load_built(scratch, tenant, surface, train_day, paths)
            result = evaluate_models(
                rankers(target, settings.pipeline.blend),
                holdout,
                guardrails.k,
                target.n_items,
                item_popularity(holdout.training),
            )
            published = _published_result(settings, tenant, surface, as_of)
            found = check_guardrails(result, published, guardrails) if guardrails.enabled else []
            too_little = _too_little_to_enforce(holdout, result, guardrails)
            if found and too_little:
                note = f"{too_little}: not enforced: " + "; ".join(v.message for v in found)
            else:
                violations = tuple(v.message for v in found)
    diversity = _diversity(settings, as_of, target, holdout) if result is not None else None
    record: dict[str, Any] = {
        "tenant": tenant,
        "surface": surface,
        "as_of": as_of.isoformat(),
        "passed": not violations,
        "violations": list(violations),
        "note": note,
        "result": json.loads(result.to_json()) if result is not None else None,
        # Per diversity setting, accuracy next to diversity (None: the tenant has no catalog as of the day).
        "diversity": diversity,
    }
    write_atomic(folder / EVALUATION_FILE, (json.dumps(record, indent=1) + "\n").encode())
    outcome = TargetEvaluation(tenant, surface, as_of, result, violations, note, folder / EVALUATION_FILE)
    if result is not None:
        context = {
            "tenant / surface": f"{tenant}/{surface}",
            "as of": as_of.isoformat(),
            "trained as of": (as_of - dt.timedelta(days=guardrails.holdout_days)).isoformat(),
            "guardrails": "passed" if not violations else "; ".join(violations),
        }
        write_report(
            result, outcome.report.parent, f"Offline evaluation {tenant}/{surface} as of {as_of}", context
        )
    return outcome


def _diversity(
    settings: Settings, as_of: dt.date, target: LoadedTarget, holdout: Holdout
) -> list[dict[str, Any]] | None:
    """The blend's accuracy and diversity per diversity setting (`evaluation.diversity`), with the tenant's
    catalog as of `as_of`; None when the tenant has none (or it did not pass its checks)."""
    lake_root = settings.lake_root
    catalog = read_catalog_record(lake_root, as_of)
    if catalog is None or target.tenant not in catalog["tenants"] or catalog_problem(lake_root, as_of):
        return None
    state = pl.from_arrow(read_catalog(lake_root, as_of))
    assert isinstance(state, pl.DataFrame)
    served = with_catalog(
        target, state.filter(pl.col("tenant") == target.tenant), settings.pipeline.catalog.content_top_k
    )
    rows = diversity_tradeoff(served, holdout, settings.pipeline.guardrails.k, settings.pipeline.blend)
    return [dataclasses.asdict(row) for row in rows]


def _too_little_to_enforce(holdout: Holdout, result: EvaluationResult, guardrails: GuardrailsConfig) -> str:
    """Why the evaluation is too small to block publishing ("" when it is not)."""
    reasons = []
    training_days = holdout.training.get_column("day").n_unique()
    if training_days < guardrails.min_training_days:
        reasons.append(
            f"only {training_days} day(s) of training data (guardrails.min_training_days = "
            f"{guardrails.min_training_days})"
        )
    users = result.users.get("all", 0)
    if users < guardrails.min_users:
        reasons.append(f"only {users} user(s) evaluated (guardrails.min_users = {guardrails.min_users})")
    return " and ".join(reasons)


def _published_result(
    settings: Settings, tenant: str, surface: str, as_of: dt.date
) -> EvaluationResult | None:
    """The evaluation recorded for the version currently published (if older than `as_of` and recorded)."""
    current = read_current(settings.artifact_root, tenant, surface)
    if current is None or current["as_of"] >= as_of.isoformat():
        return None
    record = read_evaluation(settings.lake_root, dt.date.fromisoformat(current["as_of"]), tenant, surface)
    if not record or record.get("result") is None:
        return None
    return EvaluationResult.from_json(json.dumps(record["result"]))
