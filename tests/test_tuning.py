"""Tuning: the search on real ratings, what it writes, and how the pipeline and the server pick it up.

MovieLens latest-small ratings, each moved to one of eight days at random (seeded; its time of day kept),
imported with `recsys import` and run through canonicalize and the daily aggregates: a day-partitioned
lake of real user-item structure, in which the last days hold about an eighth of every user's ratings.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import json
import random
from pathlib import Path

import polars as pl
import pytest
import yaml
from shared_data import shared_data_dir

from recsys_cli import cli
from recsys_core.manifest import read_current, read_meta, resolve_uri
from recsys_core.settings import AlsConfig, BlendWeights, ConfigError, load_settings
from recsys_dagster.evaluation.tuning import (
    CHOICE_FILE,
    TRIALS_FILE,
    Candidate,
    Score,
    TuningError,
    search,
    tune_day,
)
from recsys_dagster.ingest.canonicalize import canonicalize_partition
from recsys_dagster.ingest.gates import run_gates
from recsys_dagster.transform.aggregates import DAILY_MODELS, build_daily_aggregates, daily_aggregate_params

LAST = dt.date(2025, 3, 8)
DAYS = [LAST - dt.timedelta(days=n) for n in range(7, -1, -1)]
# A deliberately bad start: a one-factor ALS fitted once, and a blend of that ALS alone.
BAD_ALS = {"factors": 1, "iterations": 1, "regularization": 0.01, "alpha": 1.0}
BAD_BLEND = {"als": 1.0, "cooc": 0.0, "popularity": 0.0}


def environment(home: Path, config: Path) -> dict[str, str]:
    return {
        "RECSYS_HOME": str(home),
        "RECSYS_START_DATE": DAYS[0].isoformat(),
        "RECSYS_CONFIG": str(config),
    }


@pytest.fixture(scope="module")
def movielens_lake(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(RECSYS_HOME, config file) with the re-dated MovieLens ratings canonicalized and aggregated."""
    data = shared_data_dir()
    if data is None:
        pytest.fail("the MovieLens data set is missing: set RECSYS_SHARED_DATA to the shared data folder")
    root = tmp_path_factory.mktemp("tuning")
    home = root / "home"
    config = root / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "artifacts": {"als": BAD_ALS},
                "blend": BAD_BLEND,
                "tuning": {"trials": 8, "max_users": 300},
            }
        )
    )
    ratings = root / "ratings.csv"
    rng = random.Random(11)
    with open(data / "ml-latest-small" / "ratings.csv", newline="") as source, open(ratings, "w") as out:
        rows = csv.reader(source)
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(next(rows))
        for user, movie, rating, seconds in rows:
            day = rng.choice(DAYS)
            moved = dt.datetime.combine(day, dt.time(), dt.UTC).timestamp() + int(seconds) % 86_400
            writer.writerow([user, movie, rating, int(moved)])
    env = environment(home, config)
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        assert (
            cli.main(
                ["import", str(ratings), "--format", "movielens", "--tenant", "ml", "--surface", "movies"]
            )
            == 0
        )
    settings = load_settings(env)
    for day in DAYS:
        canonicalize_partition(settings.raw_root, settings.lake_root, day, settings.pipeline.ingest)
        run_gates(settings.lake_root, day, settings.pipeline.ingest, settings.pipeline.checks)
    for model in DAILY_MODELS:
        build_daily_aggregates(
            model, settings.lake_root, DAYS, daily_aggregate_params(model, settings.pipeline)
        )
    return home, config


def test_recsys_tune_beats_a_bad_start_on_movielens_and_the_pipeline_uses_the_choice(
    movielens_lake: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    home, config = movielens_lake
    for key, value in environment(home, config).items():
        monkeypatch.setenv(key, value)
    assert cli.main(["tune", "--as-of", LAST.isoformat(), "--quiet"]) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert "chosen parameters:" in out

    settings = load_settings()
    folder = settings.lake_root / "tuning" / f"dt={LAST.isoformat()}"
    choice = json.loads((folder / CHOICE_FILE).read_text())
    # Evaluation day LAST is never looked at: trained up to LAST - 2, validated on LAST - 1.
    assert choice["trained_as_of"] == (LAST - dt.timedelta(days=2)).isoformat()
    assert choice["validation_days"] == [(LAST - dt.timedelta(days=1)).isoformat()] * 2
    assert choice["users"] == 300
    before, chosen = choice["baseline"]["score"]["blend"], choice["chosen"]["score"]["blend"]
    assert choice["baseline"]["params"]["factors"] == 1
    # A one-factor, one-iteration ALS ranks items about as popularity does; the search finds far better.
    assert chosen > 1.5 * before, (before, chosen)

    trials = pl.read_parquet(folder / TRIALS_FILE)
    assert trials.height == 8
    assert trials["trial"].to_list() == list(range(1, 9))
    assert trials.filter(pl.col("chosen"))["trial"].to_list() == [choice["chosen"]["trial"]]
    assert trials["blend_ndcg@10"].max() == pytest.approx(chosen)

    # The choice is applied over the configuration file...
    assert settings.tuned_file is not None
    tuned = yaml.safe_load(settings.tuned_file.read_text())
    assert settings.pipeline.artifacts.als.factors == tuned["artifacts"]["als"]["factors"] != 1
    assert dataclasses.asdict(settings.pipeline.blend) == tuned["blend"]
    # ... so the daily run trains ALS with it and publishes the blend weights for the server.
    assert cli.main(["run", "--start", LAST.isoformat(), "--quiet"]) == cli.EXIT_OK
    manifest = read_current(settings.artifact_root, "ml", "movies")
    assert manifest is not None
    assert manifest["blend"] == tuned["blend"]
    als_dir = resolve_uri(settings.artifact_root, "ml", "movies", manifest["current"]["als"])
    assert read_meta(als_dir)["params"]["factors"] == tuned["artifacts"]["als"]["factors"]
    cli.main(["status"])
    assert f"tuned parameters in use: {settings.tuned_file}" in capsys.readouterr().out

    # With tuning.use_tuned: false the configuration alone counts again.
    config_text = yaml.safe_load(config.read_text())
    off = config.with_name("off.yaml")
    off.write_text(yaml.safe_dump(config_text | {"tuning": {"use_tuned": False}}))
    plain = load_settings(environment(home, off))
    assert plain.tuned_file is None
    assert plain.pipeline.artifacts.als.factors == 1


def test_the_same_lake_and_config_give_the_same_trials_and_choice(movielens_lake: tuple[Path, Path]) -> None:
    home, config = movielens_lake
    env = environment(home, config) | {"RECSYS_TUNING_TRIALS": "3"}
    settings = dataclasses.replace(load_settings(env), tuned_file=None)
    # Start from the configuration alone whatever an earlier test wrote.
    settings = dataclasses.replace(
        settings,
        pipeline=dataclasses.replace(
            settings.pipeline,
            artifacts=dataclasses.replace(settings.pipeline.artifacts, als=AlsConfig(**BAD_ALS)),
            blend=BlendWeights(**BAD_BLEND),
        ),
    )
    first = tune_day(settings, LAST)
    written = [(first.folder / name).read_bytes() for name in (TRIALS_FILE, CHOICE_FILE)]
    tuned = first.tuned_path.read_bytes()
    second = tune_day(settings, LAST)
    assert [(second.folder / name).read_bytes() for name in (TRIALS_FILE, CHOICE_FILE)] == written
    assert second.tuned_path.read_bytes() == tuned
    assert not (first.folder / "artifacts").exists()  # trial artifacts do not outlive the search


def test_tuning_without_validation_data_says_why(tmp_path: Path) -> None:
    settings = load_settings({"RECSYS_HOME": str(tmp_path / "home")})
    with pytest.raises(TuningError, match="nothing to train on"):
        tune_day(settings, LAST)


def test_search_starts_from_the_current_parameters_and_keeps_them_unless_beaten() -> None:
    start = Candidate(AlsConfig(), BlendWeights())

    def objective(candidate: Candidate) -> Score:
        # Best at the start: nothing the sampler proposes may replace it.
        value = 1.0 if candidate == start else 0.5
        return Score(blend=value, als=value, users=10)

    result = search(objective, start, trials=5, seed=3)
    assert [t.number for t in result.trials] == [1, 2, 3, 4, 5]
    assert result.baseline.candidate == start
    assert result.best.number == 1
    proposed = {t.candidate for t in result.trials[1:]}
    assert len(proposed) == 4 and start not in proposed
    # Seeded: the same proposals again.
    again = search(objective, start, trials=5, seed=3)
    assert [t.candidate for t in again.trials] == [t.candidate for t in result.trials]


def test_a_broken_tuned_file_is_a_clear_error(tmp_path: Path) -> None:
    home = tmp_path / "home"
    tuned = home / "lake" / "tuning" / "tuned.yaml"
    tuned.parent.mkdir(parents=True)
    tuned.write_text("artifacts:\n  als:\n    factors: 0\n")
    with pytest.raises(ConfigError, match=r"artifacts\.als\.factors"):
        load_settings({"RECSYS_HOME": str(home)})
    tuned.write_text("guardrails:\n  k: 5\n")
    with pytest.raises(ConfigError, match="unknown config key"):
        load_settings({"RECSYS_HOME": str(home)})


def test_the_tuning_asset_is_on_demand_or_on_its_own_schedule(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from recsys_dagster.definitions import build_definitions

    monkeypatch.setenv("RECSYS_HOME", str(tmp_path / "home"))
    defs = build_definitions()
    daily = {
        key.to_user_string() for key in defs.resolve_job_def("daily_pipeline").asset_layer.selected_asset_keys
    }
    assert "tuning" not in daily and "evaluation" in daily
    assert {
        key.to_user_string() for key in defs.resolve_job_def("tuning_job").asset_layer.selected_asset_keys
    } == {"tuning"}
    assert [s.name for s in defs.schedules or []] == ["daily_pipeline_schedule"]

    config = tmp_path / "config.yaml"
    config.write_text("tuning:\n  schedule: '0 4 * * 0'\n")
    monkeypatch.setenv("RECSYS_CONFIG", str(config))
    schedule = build_definitions().resolve_schedule_def("tuning_schedule")
    assert schedule.cron_schedule == "0 4 * * 0"
    assert schedule.job_name == "tuning_job"
    config.write_text("tuning:\n  schedule: 'weekly'\n")
    with pytest.raises(ConfigError, match=r"tuning\.schedule"):
        load_settings()
