"""Tuning: search the ALS hyperparameters and the blend weights on a validation split of the training window.

For as-of day D, `guardrails.holdout_days` h and `tuning.validation_days` v: the offline evaluation trains
as of D - h and scores the days after it, so tuning never looks at those days. It builds the artifacts as
of D - h - v (popularity, cooc and user_history once, `als` once per trial, each exactly as the pipeline
builds them) and scores each trial's served blend on the new items of days D - h - v + 1 .. D - h, through
the server's own ranking code, the way the evaluation does. The objective is `guardrails.metric` at
`guardrails.k` of the blend over the validation users of every tenant and surface together: the
configuration holds one `artifacts.als` and one `blend`, so one choice serves them all.

The search is optuna's TPE sampler with a fixed seed. Trial 1 is the parameters in use today, so the choice
is never worse on validation than what runs now; the same data and configuration give the same trials and
the same choice (ALS is deterministic, and so is a seeded sampler run sequentially).

Written under `lake/tuning/`: `dt=D/trials.parquet` (one row per trial), `dt=D/tuning.json` (the choice)
and `tuned.yaml` (the chosen `artifacts.als` and `blend` keys), which `recsys_core.settings.load_settings`
applies over the configuration file: the next daily run trains ALS with them and publishes the blend
weights in the manifest, where the API server picks them up. Nothing here imports Dagster.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import functools
import hashlib
import io
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import yaml

from recsys_core.kinds import WINDOW_KINDS, artifact_kind
from recsys_core.lake import partition_dir
from recsys_core.settings import ALS_CONFIDENCE, AlsConfig, BlendWeights, PipelineConfig, Settings, tuned_file
from recsys_core.storage import write_atomic
from recsys_dagster.evaluation.evaluate import evaluate_models
from recsys_dagster.evaluation.holdout import Holdout, item_popularity, temporal_holdout
from recsys_dagster.evaluation.offline import SINGLE_SOURCES, load_built, ranker, window_interactions
from recsys_dagster.transform.artifacts import build_window_artifacts

TUNING_ASSET = "tuning"
TRIALS_FILE = "trials.parquet"
CHOICE_FILE = "tuning.json"

# The searched space. ALS's blend weight stays at 1: the blend's order depends on the weights' ratios only.
FACTORS = (8, 16, 32, 64, 128)
REGULARIZATION = (0.01, 100.0)  # log scale
ALPHA = (0.5, 50.0)  # log scale
ITERATIONS = (5, 30)  # step 5
HALF_LIFE_DAYS = (0.0, 7.0, 14.0, 30.0)
BLEND_COOC = (0.0, 2.0)
BLEND_POPULARITY = (0.0, 0.5)


class TuningError(ValueError):
    """Nothing to tune on: no training data before the validation days, or no validation user."""


@dataclass(frozen=True)
class Candidate:
    als: AlsConfig
    blend: BlendWeights

    def params(self) -> dict[str, Any]:
        """The searched parameters, flat (the trials table's columns)."""
        als = self.als
        return {
            "factors": als.factors,
            "regularization": als.regularization,
            "alpha": als.alpha,
            "iterations": als.iterations,
            "confidence": als.confidence,
            "half_life_days": als.half_life_days,
            "blend_als": self.blend.als,
            "blend_cooc": self.blend.cooc,
            "blend_popularity": self.blend.popularity,
        }


@dataclass(frozen=True)
class Score:
    """A candidate's validation metric: the blend (the objective) and ALS alone, over `users` users."""

    blend: float
    als: float
    users: int


@dataclass(frozen=True)
class Trial:
    number: int
    candidate: Candidate
    score: Score
    seconds: float


@dataclass(frozen=True)
class TuningResult:
    trials: tuple[Trial, ...]

    @property
    def baseline(self) -> Trial:
        """Trial 1: the parameters in use when the search started."""
        return self.trials[0]

    @property
    def best(self) -> Trial:
        """The highest blend score; the earliest trial among equals (so the baseline wins a tie)."""
        return max(self.trials, key=lambda t: (t.score.blend, -t.number))


Objective = Callable[[Candidate], Score]


def search(
    objective: Objective,
    start: Candidate,
    trials: int,
    seed: int,
    progress: Callable[[Trial, Trial], None] | None = None,
) -> TuningResult:
    """Score `start`, then `trials - 1` candidates proposed by optuna's seeded TPE sampler."""
    import optuna  # imported here: only tuning needs it

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    done: list[Trial] = []

    def record(candidate: Candidate) -> Trial:
        started = time.perf_counter()
        score = objective(candidate)
        trial = Trial(len(done) + 1, candidate, score, time.perf_counter() - started)
        done.append(trial)
        if progress is not None:
            progress(trial, TuningResult(tuple(done)).best)
        return trial

    baseline = record(start)
    distributions = _distributions(optuna)
    # Tell the sampler what the starting point scored (unless it was configured outside the space).
    with contextlib.suppress(ValueError):
        study.add_trial(
            optuna.trial.create_trial(
                params=_optuna_params(start), distributions=distributions, value=baseline.score.blend
            )
        )

    def suggested(trial: optuna.Trial) -> float:
        candidate = Candidate(
            als=dataclasses.replace(
                start.als,
                factors=trial.suggest_categorical("factors", FACTORS),
                regularization=_round(trial.suggest_float("regularization", *REGULARIZATION, log=True)),
                alpha=_round(trial.suggest_float("alpha", *ALPHA, log=True)),
                iterations=trial.suggest_int("iterations", *ITERATIONS, step=5),
                confidence=trial.suggest_categorical("confidence", ALS_CONFIDENCE),
                half_life_days=trial.suggest_categorical("half_life_days", HALF_LIFE_DAYS),
            ),
            blend=BlendWeights(
                als=1.0,
                cooc=_round(trial.suggest_float("blend_cooc", *BLEND_COOC)),
                popularity=_round(trial.suggest_float("blend_popularity", *BLEND_POPULARITY)),
            ),
        )
        return record(candidate).score.blend

    if trials > 1:
        study.optimize(suggested, n_trials=trials - 1)
    return TuningResult(tuple(done))


def _distributions(optuna: Any) -> dict[str, Any]:
    d = optuna.distributions
    return {
        "factors": d.CategoricalDistribution(FACTORS),
        "regularization": d.FloatDistribution(*REGULARIZATION, log=True),
        "alpha": d.FloatDistribution(*ALPHA, log=True),
        "iterations": d.IntDistribution(*ITERATIONS, step=5),
        "confidence": d.CategoricalDistribution(ALS_CONFIDENCE),
        "half_life_days": d.CategoricalDistribution(HALF_LIFE_DAYS),
        "blend_cooc": d.FloatDistribution(*BLEND_COOC),
        "blend_popularity": d.FloatDistribution(*BLEND_POPULARITY),
    }


def _optuna_params(candidate: Candidate) -> dict[str, Any]:
    params = candidate.params()
    als_weight = params.pop("blend_als")
    # The space holds ALS's weight at 1: express the start's other weights relative to it.
    for name in ("blend_cooc", "blend_popularity"):
        params[name] = params[name] / als_weight if als_weight else float("inf")
    return params


def _round(value: float) -> float:
    """Three significant digits: finer steps do not change a ranking measurably, and files stay readable."""
    return float(f"{value:.3g}")


# ------------------------------------------------------------------------------------- the lake's data


@dataclass(frozen=True)
class TuningOutcome:
    as_of: dt.date
    trained_as_of: dt.date
    validation_days: tuple[dt.date, dt.date]
    result: TuningResult
    folder: Path
    tuned_path: Path

    @property
    def trials_path(self) -> Path:
        return self.folder / TRIALS_FILE


def tune_day(
    settings: Settings, as_of: dt.date, progress: Callable[[Trial, Trial], None] | None = None
) -> TuningOutcome:
    """Tune on the data before the evaluation days of `as_of`, record the trials and write the choice."""
    config, lake_root = settings.pipeline, settings.lake_root
    guardrails, tuning = config.guardrails, config.tuning
    last_validation_day = as_of - dt.timedelta(days=guardrails.holdout_days)
    train_day = last_validation_day - dt.timedelta(days=tuning.validation_days)
    folder = partition_dir(lake_root, TUNING_ASSET, as_of)
    scratch = folder / "artifacts"
    try:
        objective = _lake_objective(settings, train_day, last_validation_day, scratch)
        start = Candidate(config.artifacts.als, config.blend)
        result = search(objective, start, tuning.trials, tuning.seed, progress)
    finally:
        # Trial artifacts are never served: they go with the search.
        shutil.rmtree(scratch, ignore_errors=True)
    first_validation_day = train_day + dt.timedelta(days=1)
    outcome = TuningOutcome(
        as_of, train_day, (first_validation_day, last_validation_day), result, folder, tuned_file(lake_root)
    )
    _write_outcome(outcome, config)
    return outcome


def _lake_objective(settings: Settings, train_day: dt.date, last_day: dt.date, scratch: Path) -> Objective:
    """Candidate -> its blend and ALS scores on the validation days, every tenant and surface together."""
    config, lake_root = settings.pipeline, settings.lake_root
    guardrails = config.guardrails
    fixed: dict[tuple[str, str], dict[str, Path]] = {}
    for kind in WINDOW_KINDS:
        if artifact_kind(kind).trained:
            continue
        try:
            builds = build_window_artifacts(kind, lake_root, scratch, train_day, config)
        except FileNotFoundError as exc:
            raise TuningError(f"nothing to train on as of {train_day}: {exc}") from exc
        for build in builds:
            fixed.setdefault((build.tenant, build.surface), {})[kind] = build.path
    window = max(artifact_kind(kind).window_days(config) for kind in WINDOW_KINDS)
    interactions = window_interactions(lake_root, last_day, window)
    holdouts: dict[tuple[str, str], Holdout] = {}
    for tenant, surface in sorted(fixed):
        rows = interactions.filter((pl.col("tenant") == tenant) & (pl.col("surface") == surface))
        if rows.is_empty():
            continue
        holdout = temporal_holdout(
            rows,
            holdout_days=(last_day - train_day).days,
            cold_start_max_interactions=guardrails.cold_start_max_interactions,
            as_of=last_day,
        )
        if holdout.held_out:
            holdouts[(tenant, surface)] = _sample_users(holdout, config.tuning.max_users)
    if not holdouts:
        raise TuningError(
            f"no user of the days up to {train_day} turned to a new item in {train_day + dt.timedelta(days=1)}"
            f"..{last_day}: nothing to score a trial on (materialize more days, or raise "
            "tuning.validation_days)"
        )
    return functools.partial(_score, settings, train_day, scratch, fixed, holdouts)


def _score(
    settings: Settings,
    train_day: dt.date,
    scratch: Path,
    fixed: dict[tuple[str, str], dict[str, Path]],
    holdouts: dict[tuple[str, str], Holdout],
    candidate: Candidate,
) -> Score:
    config = _with_candidate(settings.pipeline, candidate)
    guardrails = config.guardrails
    als_paths = {
        (b.tenant, b.surface): b.path
        for b in build_window_artifacts("als", settings.lake_root, scratch, train_day, config)
    }
    blend_total = als_total = 0.0
    users = 0
    for (tenant, surface), holdout in holdouts.items():
        paths = fixed[(tenant, surface)] | {"als": als_paths[(tenant, surface)]}
        target = load_built(scratch, tenant, surface, train_day, paths)
        models = {"blend": ranker(target, candidate.blend), "als": ranker(target, SINGLE_SOURCES["als"])}
        result = evaluate_models(
            models, holdout, guardrails.k, target.n_items, item_popularity(holdout.training)
        )
        n = len(holdout.held_out)
        blend_total += (result.value("blend", "all", guardrails.metric) or 0.0) * n
        als_total += (result.value("als", "all", guardrails.metric) or 0.0) * n
        users += n
    return Score(blend=blend_total / users, als=als_total / users, users=users)


def _with_candidate(config: PipelineConfig, candidate: Candidate) -> PipelineConfig:
    return dataclasses.replace(
        config,
        artifacts=dataclasses.replace(config.artifacts, als=candidate.als),
        blend=candidate.blend,
    )


def _sample_users(holdout: Holdout, max_users: int) -> Holdout:
    """At most `max_users` evaluated users, drawn by a hash of the user id (the same draw every time)."""
    if not max_users or len(holdout.held_out) <= max_users:
        return holdout
    kept = frozenset(
        sorted(holdout.held_out, key=lambda user: hashlib.sha256(user.encode()).digest())[:max_users]
    )
    return Holdout(
        training=holdout.training,
        held_out={user: items for user, items in holdout.held_out.items() if user in kept},
        segments={segment: members & kept for segment, members in holdout.segments.items()},
    )


# ------------------------------------------------------------------------------------------- outputs


def trials_frame(result: TuningResult, metric: str, k: int) -> pl.DataFrame:
    """One row per trial: its number, parameters and validation scores (no timings: files stay identical)."""
    best = result.best.number
    return pl.DataFrame(
        [
            {"trial": t.number}
            | t.candidate.params()
            | {
                f"blend_{metric}@{k}": t.score.blend,
                f"als_{metric}@{k}": t.score.als,
                "users": t.score.users,
                "chosen": t.number == best,
            }
            for t in result.trials
        ]
    )


def tuned_yaml(outcome: TuningOutcome, metric: str, k: int) -> str:
    """The tuned-parameters file: the chosen `artifacts.als` and `blend` keys, and where they come from."""
    best, baseline = outcome.result.best, outcome.result.baseline
    als = {
        key: value
        for key, value in dataclasses.asdict(best.candidate.als).items()
        if key not in ("window_days", "random_state")
    }
    header = (
        f"# Chosen by tuning as of {outcome.as_of} (trial {best.number} of {len(outcome.result.trials)}): "
        f"{metric}@{k} of the blend {best.score.blend:.4f} on the validation days "
        f"{outcome.validation_days[0]}..{outcome.validation_days[1]}, against {baseline.score.blend:.4f} with "
        "the parameters before.\n"
        "# Applied over the configuration file by the pipeline and the API server. Delete this file, or set\n"
        "# tuning.use_tuned: false, to go back to the configuration alone.\n"
    )
    body = {"artifacts": {"als": als}, "blend": dataclasses.asdict(best.candidate.blend)}
    return header + yaml.safe_dump(body, sort_keys=False)


def _write_outcome(outcome: TuningOutcome, config: PipelineConfig) -> None:
    metric, k = config.guardrails.metric, config.guardrails.k
    buffer = io.BytesIO()
    trials_frame(outcome.result, metric, k).write_parquet(buffer, compression="zstd", statistics=True)
    outcome.folder.mkdir(parents=True, exist_ok=True)
    write_atomic(outcome.trials_path, buffer.getvalue())
    best = outcome.result.best
    record = {
        "as_of": outcome.as_of.isoformat(),
        "trained_as_of": outcome.trained_as_of.isoformat(),
        "validation_days": [day.isoformat() for day in outcome.validation_days],
        "metric": f"{metric}@{k}",
        "trials": len(outcome.result.trials),
        "users": best.score.users,
        "baseline": {
            "params": outcome.result.baseline.candidate.params(),
            "score": _score_record(outcome.result.baseline),
        },
        "chosen": {"trial": best.number, "params": best.candidate.params(), "score": _score_record(best)},
    }
    write_atomic(outcome.folder / CHOICE_FILE, (json.dumps(record, indent=1) + "\n").encode())
    outcome.tuned_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(outcome.tuned_path, tuned_yaml(outcome, metric, k).encode())


def _score_record(trial: Trial) -> dict[str, Any]:
    return {"blend": trial.score.blend, "als": trial.score.als, "users": trial.score.users}
