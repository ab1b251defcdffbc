"""One settings object for the whole product, read from environment variables and an optional YAML file.

Environment variables locate things (where data lives, which days exist); the YAML file named by
`RECSYS_CONFIG` tunes the pipeline (limits, thresholds, weights). Every key is documented in
`docs/reference/configuration.md`. Nothing here imports Dagster, so the CLI, the pipeline and the
server all read the same object.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import fnmatch
import math
import os
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from recsys_core.object_store import STORAGE_URL_VAR, StorageConfigError, parse_storage_url

DEFAULT_START_DATE = dt.date(2025, 1, 1)
DEFAULT_EVENT_TYPES = ("exposure", "click", "add_to_cart", "purchase", "rating")
COOC_METRICS = ("cosine", "count", "jaccard", "lift")
# The per-user ranking metrics of the offline evaluation (recsys_dagster.evaluation.metrics), by the names
# `guardrails.metric` takes.
RANKING_METRICS = ("precision", "recall", "ndcg", "map", "hit_rate")


# More API server processes than this is a typo, not a deployment (each loads every artifact).
MAX_SERVE_WORKERS = 256
# More runs in progress at once than this is a typo: each is a process holding a day's data in memory.
MAX_CONCURRENT_RUNS = 1000
# Dagster executors a deployment may choose (RECSYS_EXECUTOR); the first is the default.
EXECUTORS = ("in_process", "multiprocess", "k8s")
# The file tuning writes (under the lake's tuning/ folder) and the sections it may set.
TUNED_FILE = "tuned.yaml"
TUNED_SECTIONS = ("artifacts", "blend")

# Bounds of the numeric settings (validated when the settings are read, so that a value the pipeline would
# fail on hours later is refused up front with its key). Every number must be finite and, unless a rule
# below says otherwise, >= 0.
# Day counts and windows span at most ten years (a million days reaches back before year 1); hour counts
# the same time.
MAX_DAYS = 3660
# Whole numbers reach SQL and Arrow as 64-bit integers.
MAX_INT = 2**63 - 1
# Seeds reach numpy's RandomState, which takes 0 to 2**32 - 1.
MAX_SEED = 2**32 - 1
# Keys (fnmatch patterns) that must be above 0: whole numbers 1 or more.
POSITIVE = (
    "ingest.max_line_bytes",
    "ingest.rows_per_file",
    "checks.volume_trailing_days",
    "artifacts.*.window_days",
    "artifacts.popularity.top_n",
    "artifacts.cooc.top_k",
    "artifacts.cooc.min_support",
    "artifacts.cooc.max_session_items",
    "artifacts.cooc.max_items",
    "artifacts.als.factors",
    "artifacts.als.iterations",
    "artifacts.als.regularization",
    "artifacts.als.alpha",
    "artifacts.user_topn.top_n",
    "guardrails.k",
    "guardrails.holdout_days",
    "guardrails.min_training_days",
    "tuning.trials",
    "tuning.validation_days",
    "catalog.content_top_k",
    "event_value_scales.*",
)
# Keys (fnmatch patterns) with a range of their own: (lowest, highest), both allowed.
NUMBER_RANGES: dict[str, tuple[float, float]] = {
    "checks.max_quarantine_rate": (0, 1),
    "checks.max_duplicate_rate": (0, 1),
    "catalog.max_missing_share": (0, 1),
    "catalog.diversity": (0, 1),
    "guardrails.max_relative_drop": (0, 1),
    # No metric is below 0, so a lift of -1 already never blocks.
    "guardrails.min_*lift_over_popularity.*": (-1, math.inf),
    "artifacts.als.random_state": (0, MAX_SEED),
    "tuning.seed": (0, MAX_SEED),
}


class ConfigError(ValueError):
    """A setting or the config file is invalid; the message says which key and why."""


@dataclass(frozen=True)
class IngestConfig:
    max_line_bytes: int = 1024 * 1024
    max_lateness_days: int = 7
    max_clock_skew_hours: int = 1
    event_types: tuple[str, ...] = DEFAULT_EVENT_TYPES
    # Rows per canonical output file (rows are streamed into the files: this does not bound memory).
    rows_per_file: int = 1_000_000


@dataclass(frozen=True)
class ChecksConfig:
    max_quarantine_rate: float = 0.05
    max_duplicate_rate: float = 0.10
    volume_trailing_days: int = 14
    volume_min_history_days: int = 3
    volume_min_ratio: float = 0.2
    volume_max_ratio: float = 5.0
    # A trailing median below this many rows says nothing about a feed's health (a small tenant, ratings
    # that arrive in bursts): the day is not judged.
    volume_min_median_rows: int = 100
    # Volume blocks only for days at most this many days before today (UTC): the daily run on fresh data.
    # An older day is history being backfilled, whose volume is what it was: a failure there warns.
    volume_block_recent_days: int = 7
    max_events: int = 50_000_000
    max_distinct_items: int = 5_000_000
    max_sessions: int = 10_000_000
    max_items_per_session: int = 10_000
    # Checks named here are reported but never block (Dagster WARN severity).
    warn_only: tuple[str, ...] = ()


@dataclass(frozen=True)
class PopularityConfig:
    window_days: int = 30
    top_n: int = 1000
    # 0 disables decay; otherwise an event's weight halves every `half_life_days` before the as-of day.
    half_life_days: float = 0.0


@dataclass(frozen=True)
class CoocConfig:
    window_days: int = 30
    top_k: int = 50
    min_support: int = 2
    metric: str = "cosine"
    max_session_items: int = 50
    # When there are more items than this, the most popular are kept (never an alphabetical cut).
    max_items: int = 200_000

    def __post_init__(self) -> None:
        if self.metric not in COOC_METRICS:
            raise ConfigError(
                f"artifacts.cooc.metric: must be one of {', '.join(COOC_METRICS)}, got {self.metric!r}"
            )


@dataclass(frozen=True)
class UserHistoryConfig:
    window_days: int = 30
    # 0 keeps every item of the window, so that exclude-seen leaves out all the user interacted with.
    max_items: int = 0


ALS_CONFIDENCE = ("linear", "log")


@dataclass(frozen=True)
class AlsConfig:
    window_days: int = 30
    # Small and strongly regularised: the best of the settings tried on the `make run` sample data. Other
    # data sets want their own: `recsys tune` searches them (docs/quality.md has what it chose on MovieLens).
    factors: int = 16
    regularization: float = 20.0
    # implicit's confidence scaling of the interaction weights.
    alpha: float = 10.0
    iterations: int = 15
    random_state: int = 42
    # 0 disables decay; otherwise a day's weight halves every `half_life_days` before the as-of day.
    half_life_days: float = 0.0
    # How a user-item weight becomes the matrix value: as is ("linear"), or log(1 + weight) ("log"),
    # which keeps a few heavy interactions from drowning the rest.
    confidence: str = "linear"

    def __post_init__(self) -> None:
        if self.confidence not in ALS_CONFIDENCE:
            raise ConfigError(
                f"artifacts.als.confidence: must be one of {', '.join(ALS_CONFIDENCE)}, got {self.confidence!r}"
            )


@dataclass(frozen=True)
class UserTopNConfig:
    """The `user_topn` artifact: each ALS-known user's served blend, precomputed (no window of its own: it
    is computed from the day's als, cooc, popularity and user_history artifacts)."""

    # Candidates kept per user: requests for up to this many items are answered from the list. The API's
    # largest k is 100; each candidate costs 28 bytes (item, three float64 contributions).
    top_n: int = 100


@dataclass(frozen=True)
class ArtifactsConfig:
    popularity: PopularityConfig = field(default_factory=PopularityConfig)
    cooc: CoocConfig = field(default_factory=CoocConfig)
    user_history: UserHistoryConfig = field(default_factory=UserHistoryConfig)
    als: AlsConfig = field(default_factory=AlsConfig)
    user_topn: UserTopNConfig = field(default_factory=UserTopNConfig)


@dataclass(frozen=True)
class BlendWeights:
    """Weights of the served blend's sources (each source's scores are first scaled to [0, 1])."""

    als: float = 1.0
    cooc: float = 0.3
    popularity: float = 0.05


@dataclass(frozen=True)
class ModelLifts:
    """A minimum relative lift over the popularity baseline for each guarded model.

    lift = (model's metric - popularity's) / popularity's: 0.0 = at least as good as popularity, -0.5 = at
    least half as good; -1 never blocks (no metric is negative).
    """

    als: float
    blend: float


@dataclass(frozen=True)
class GuardrailsConfig:
    """The offline evaluation and the quality gates on its result.

    The defaults, and the measurements that chose them, are in docs/reference/configuration.md.
    """

    enabled: bool = True
    k: int = 10
    holdout_days: int = 1
    cold_start_max_interactions: int = 3
    metric: str = "ndcg"
    min_lift_over_popularity: ModelLifts = field(default_factory=lambda: ModelLifts(als=-0.5, blend=-0.25))
    min_cold_start_lift_over_popularity: ModelLifts = field(
        default_factory=lambda: ModelLifts(als=-1.0, blend=-0.4)
    )
    max_relative_drop: float = 0.2
    min_coverage_vs_popularity: float = 1.0
    # With fewer days of training data, or fewer evaluated users, the evaluation is reported but does not
    # block: a model trained on one or two days says little about the model the full window gives, and a
    # metric averaged over a handful of users is mostly noise (a quiet day of imported history).
    min_training_days: int = 3
    min_users: int = 20

    def __post_init__(self) -> None:
        if self.metric not in RANKING_METRICS:
            raise ConfigError(
                f"guardrails.metric: must be one of {', '.join(RANKING_METRICS)}, got {self.metric!r}"
            )


@dataclass(frozen=True)
class TuningConfig:
    """The search for ALS parameters and blend weights (recsys_dagster.evaluation.tuning)."""

    trials: int = 30
    # The last days of the training window that score each trial (the evaluation's held-out days, after
    # the training window, are never used).
    validation_days: int = 1
    # Each trial is scored on at most this many validation users (drawn the same way every time); 0 = all.
    max_users: int = 2000
    seed: int = 42
    # Cron expression (UTC) of the optional tuning schedule, e.g. "0 4 * * 0"; empty = on demand only.
    schedule: str = ""
    # Whether the pipeline and the server use the parameters the last tuning chose (TUNED_FILE).
    use_tuned: bool = True


@dataclass(frozen=True)
class CatalogConfig:
    """The item catalog (recsys_core.catalog) and the content artifact built from it."""

    # The `catalog_missing_items` check warns when more than this share of the items seen in a day's events
    # (of tenants that have a catalog) are not in the catalog.
    max_missing_share: float = 0.05
    # Neighbours kept per item in the `content` artifact.
    content_top_k: int = 20
    # The server's default diversity re-ranking (a request's `diversity` / `max_per_category` override
    # them): the MMR trade-off in [0, 1] (0: off) and the most items of one category in a list (0: no cap).
    diversity: float = 0.0
    max_per_category: int = 0


@dataclass(frozen=True)
class PipelineConfig:
    ingest: IngestConfig = field(default_factory=IngestConfig)
    checks: ChecksConfig = field(default_factory=ChecksConfig)
    artifacts: ArtifactsConfig = field(default_factory=ArtifactsConfig)
    blend: BlendWeights = field(default_factory=BlendWeights)
    guardrails: GuardrailsConfig = field(default_factory=GuardrailsConfig)
    tuning: TuningConfig = field(default_factory=TuningConfig)
    catalog: CatalogConfig = field(default_factory=CatalogConfig)
    event_weights: Mapping[str, float] = field(
        default_factory=lambda: {
            "exposure": 0.0,
            "click": 1.0,
            "add_to_cart": 3.0,
            "purchase": 5.0,
            "rating": 1.0,
        }
    )
    # Event types whose `value` scales an event's weight: weight x clamp(value / scale, 0, 1), so the value
    # `scale` (5 stars) counts fully and a 0.5-star rating a tenth of that. Types not listed ignore `value`
    # (a purchase's price must not inflate it); an event of a listed type without a value counts fully.
    event_value_scales: Mapping[str, float] = field(default_factory=lambda: {"rating": 5.0})

    def interest_weights(self) -> dict[str, float]:
        """Event types that count as interest (weight > 0) and their weights, sorted by type."""
        return {name: float(w) for name, w in sorted(self.event_weights.items()) if w > 0}

    def interest_weight_rows(self) -> list[dict[str, Any]]:
        """`interest_weights` as rows `{event_type, weight}`, the shape the SQL models take."""
        return [{"event_type": name, "weight": w} for name, w in self.interest_weights().items()]

    def value_scales(self) -> dict[str, float]:
        """`event_value_scales` sorted by type: the event types whose `value` scales their weight."""
        return {name: float(scale) for name, scale in sorted(self.event_value_scales.items())}

    def value_scale_rows(self) -> list[dict[str, Any]]:
        """`value_scales` as rows `{event_type, scale}`, the shape the SQL models take."""
        return [{"event_type": name, "scale": scale} for name, scale in self.value_scales().items()]


@dataclass(frozen=True)
class Settings:
    home: Path
    raw_root: Path
    lake_root: Path
    artifact_root: Path
    dagster_home: Path
    start_date: dt.date
    config_file: Path | None
    pipeline: PipelineConfig
    # The tuned parameters applied over the configuration file (None: none applied).
    tuned_file: Path | None = None
    # How Dagster runs the steps of a run (EXECUTORS): in the run's process, one process per step, or one
    # Kubernetes job per step.
    executor: str = "in_process"
    alert_sink: str = "log"
    # API server: how often it looks for a new manifest, and whether it logs served items as exposures.
    serve_poll_seconds: float = 2.0
    exposure_log: bool = False
    # API server limits against clients that hold connections or flood the exposure log
    # (docs/reference/http-api.md#settings).
    serve_max_connections: int = 1000
    serve_header_timeout_seconds: float = 10.0
    serve_keep_alive_seconds: int = 5
    exposure_max_bytes_per_day: int = 1 << 30
    # API server processes (`recsys serve --workers` overrides it), and how long in-flight requests may
    # take to finish once the server is told to stop (docs/reference/http-api.md#workers-and-shutdown).
    serve_workers: int = 1
    serve_shutdown_grace_seconds: int = 10
    # Where the Dagster instance keeps runs, event logs and schedules: a PostgreSQL URL, or None for
    # SQLite files under dagster_home.
    postgres_url: str | None = None
    # API server: the share of recommendation responses that get a decision trace (0 = none, 1 = all),
    # and the traces' daily cap in the landing zone (docs/reference/decisions.md).
    decision_sample_rate: float = 1.0
    decision_max_bytes_per_day: int = 1 << 30
    # The bearer token of the admin API (RECSYS_ADMIN_TOKEN); None: the admin API is off. Kept out of the
    # settings' repr, so that printing or logging the settings never shows it.
    admin_token: str | None = field(default=None, repr=False)
    # The ingestion API (docs/reference/http-api.md#ingestion-api): its bearer token (RECSYS_INGEST_TOKEN;
    # None: off, kept out of the repr like the admin token), the events or items a request may carry, its
    # body size limit, and the daily cap of what it writes to the landing zone.
    ingest_token: str | None = field(default=None, repr=False)
    ingest_max_events: int = 1000
    ingest_max_body_bytes: int = 4 << 20
    ingest_max_bytes_per_day: int = 1 << 36
    # How many runs the Dagster daemon's run queue lets be in progress at once (runs that share a day never
    # are, whatever this says: recsys_dagster.run_queue).
    max_concurrent_runs: int = 4
    # The system of record for landing, lake and artifacts: `s3://bucket/prefix`, or None for the local
    # trees under `home` (recsys_core.object_store; docs/how-to/deploy.md#storage-on-s3).
    storage_url: str | None = None


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Build the settings from `environ` (default: the process environment)."""
    env = os.environ if environ is None else environ
    home = Path(env.get("RECSYS_HOME") or ".recsys").expanduser().absolute()

    def root(var: str, default: str) -> Path:
        return Path(env[var]).expanduser().absolute() if env.get(var) else home / default

    config_file = Path(env["RECSYS_CONFIG"]).expanduser().absolute() if env.get("RECSYS_CONFIG") else None
    lake_root = root("RECSYS_LAKE_ROOT", "lake")
    pipeline = _with_window_override(load_pipeline_config(config_file), env.get("RECSYS_WINDOW_DAYS"))
    pipeline = _with_trials_override(pipeline, env.get("RECSYS_TUNING_TRIALS"))
    tuned = tuned_file(lake_root)
    applied = pipeline.tuning.use_tuned and tuned.is_file()
    return Settings(
        home=home,
        raw_root=root("RECSYS_RAW_ROOT", "raw"),
        lake_root=lake_root,
        artifact_root=root("RECSYS_ARTIFACT_ROOT", "artifacts"),
        dagster_home=root("DAGSTER_HOME", "dagster"),
        start_date=_parse_date("RECSYS_START_DATE", env.get("RECSYS_START_DATE"), DEFAULT_START_DATE),
        config_file=config_file,
        alert_sink=_parse_alert_sink(env.get("RECSYS_ALERT_SINK") or "log"),
        serve_poll_seconds=_parse_seconds(
            "RECSYS_SERVE_POLL_SECONDS", env.get("RECSYS_SERVE_POLL_SECONDS"), 2.0
        ),
        exposure_log=_parse_bool("RECSYS_EXPOSURE_LOG", env.get("RECSYS_EXPOSURE_LOG"), False),
        serve_max_connections=_parse_whole(
            "RECSYS_SERVE_MAX_CONNECTIONS",
            env.get("RECSYS_SERVE_MAX_CONNECTIONS"),
            1000,
            1_000_000,
            "connections",
        ),
        serve_header_timeout_seconds=_parse_seconds(
            "RECSYS_SERVE_HEADER_TIMEOUT_SECONDS", env.get("RECSYS_SERVE_HEADER_TIMEOUT_SECONDS"), 10.0
        ),
        serve_keep_alive_seconds=_parse_whole(
            "RECSYS_SERVE_KEEP_ALIVE_SECONDS", env.get("RECSYS_SERVE_KEEP_ALIVE_SECONDS"), 5, 3600, "seconds"
        ),
        exposure_max_bytes_per_day=_parse_whole(
            "RECSYS_EXPOSURE_MAX_BYTES_PER_DAY",
            env.get("RECSYS_EXPOSURE_MAX_BYTES_PER_DAY"),
            1 << 30,
            1 << 50,
            "bytes",
        ),
        serve_workers=_parse_whole(
            "RECSYS_SERVE_WORKERS", env.get("RECSYS_SERVE_WORKERS"), 1, MAX_SERVE_WORKERS, "worker processes"
        ),
        serve_shutdown_grace_seconds=_parse_whole(
            "RECSYS_SERVE_SHUTDOWN_GRACE_SECONDS",
            env.get("RECSYS_SERVE_SHUTDOWN_GRACE_SECONDS"),
            10,
            3600,
            "seconds",
        ),
        pipeline=apply_tuned(pipeline, tuned) if applied else pipeline,
        tuned_file=tuned if applied else None,
        executor=_parse_choice("RECSYS_EXECUTOR", env.get("RECSYS_EXECUTOR"), EXECUTORS),
        postgres_url=_parse_postgres_url(env.get("RECSYS_POSTGRES_URL")),
        decision_sample_rate=_parse_fraction(
            "RECSYS_DECISION_SAMPLE_RATE", env.get("RECSYS_DECISION_SAMPLE_RATE"), 1.0
        ),
        decision_max_bytes_per_day=_parse_whole(
            "RECSYS_DECISION_MAX_BYTES_PER_DAY",
            env.get("RECSYS_DECISION_MAX_BYTES_PER_DAY"),
            1 << 30,
            1 << 50,
            "bytes",
        ),
        admin_token=_parse_admin_token(env.get("RECSYS_ADMIN_TOKEN")),
        ingest_token=_parse_admin_token(env.get("RECSYS_INGEST_TOKEN"), "RECSYS_INGEST_TOKEN"),
        ingest_max_events=_parse_whole(
            "RECSYS_INGEST_MAX_EVENTS", env.get("RECSYS_INGEST_MAX_EVENTS"), 1000, 100_000, "events"
        ),
        ingest_max_body_bytes=_parse_whole(
            "RECSYS_INGEST_MAX_BODY_BYTES", env.get("RECSYS_INGEST_MAX_BODY_BYTES"), 4 << 20, 1 << 30, "bytes"
        ),
        ingest_max_bytes_per_day=_parse_whole(
            "RECSYS_INGEST_MAX_BYTES_PER_DAY",
            env.get("RECSYS_INGEST_MAX_BYTES_PER_DAY"),
            1 << 36,
            1 << 50,
            "bytes",
        ),
        max_concurrent_runs=_parse_whole(
            "RECSYS_MAX_CONCURRENT_RUNS",
            env.get("RECSYS_MAX_CONCURRENT_RUNS"),
            4,
            MAX_CONCURRENT_RUNS,
            "runs",
        ),
        storage_url=_parse_storage_url(env.get(STORAGE_URL_VAR)),
    )


def _parse_storage_url(value: str | None) -> str | None:
    try:
        location = parse_storage_url(value)
    except StorageConfigError as exc:
        raise ConfigError(str(exc)) from exc
    return location.url if location else None


def tuned_file(lake_root: Path) -> Path:
    """Where tuning writes the parameters it chose: read over the configuration file by `load_settings`."""
    return lake_root / "tuning" / TUNED_FILE


def apply_tuned(config: PipelineConfig, path: Path) -> PipelineConfig:
    """`config` with the `artifacts.als` and `blend` keys of the tuned-parameters file at `path`."""
    raw = _read_yaml(path, "tuned parameters")
    _reject_unknown("", raw, set(TUNED_SECTIONS))
    artifacts = raw.get("artifacts") or {}
    if not isinstance(artifacts, dict):
        raise ConfigError(f"tuned parameters {path}: artifacts must be a mapping")
    _reject_unknown("artifacts.", artifacts, {"als"})
    tuned = dataclasses.replace(
        config,
        artifacts=dataclasses.replace(
            config.artifacts, als=_section(config.artifacts.als, "artifacts.als", artifacts.get("als"))
        ),
        blend=_section(config.blend, "blend", raw.get("blend")),
    )
    _validate(tuned)
    return tuned


def _with_trials_override(config: PipelineConfig, value: str | None) -> PipelineConfig:
    """RECSYS_TUNING_TRIALS sets `tuning.trials` (what `recsys tune --trials` passes to the pipeline)."""
    if not value:
        return config
    trials = _parse_whole("RECSYS_TUNING_TRIALS", value, config.tuning.trials, MAX_INT, "trials")
    return dataclasses.replace(config, tuning=dataclasses.replace(config.tuning, trials=trials))


def _with_window_override(config: PipelineConfig, value: str | None) -> PipelineConfig:
    """RECSYS_WINDOW_DAYS sets the trailing window of every artifact kind at once."""
    if not value:
        return config
    days = _parse_whole("RECSYS_WINDOW_DAYS", value, 0, MAX_DAYS, "days")
    artifacts = config.artifacts
    return dataclasses.replace(
        config,
        artifacts=ArtifactsConfig(
            **{
                kind: dataclasses.replace(getattr(artifacts, kind), window_days=days)
                if hasattr(getattr(artifacts, kind), "window_days")
                else getattr(artifacts, kind)
                for kind in _artifact_sections()
            }
        ),
    )


def load_pipeline_config(path: Path | None) -> PipelineConfig:
    """Read the optional YAML file; unknown keys are errors so that typos never pass silently."""
    if path is None:
        return PipelineConfig()
    raw = _read_yaml(path, "RECSYS_CONFIG")
    known = {
        "ingest",
        "checks",
        "event_weights",
        "event_value_scales",
        "artifacts",
        "blend",
        "guardrails",
        "tuning",
        "catalog",
    }
    _reject_unknown("", raw, known)
    ingest = _section(IngestConfig(), "ingest", raw.get("ingest"))
    defaults = PipelineConfig()
    weights = dict(defaults.event_weights) | _event_type_numbers(
        "event_weights", raw.get("event_weights"), ingest.event_types, "weight", "a number >= 0"
    )
    # Given, the mapping replaces the default whole: `event_value_scales: {}` makes every type ignore `value`.
    value_scales = (
        _event_type_numbers(
            "event_value_scales", raw["event_value_scales"], ingest.event_types, "value scale", "a number > 0"
        )
        if "event_value_scales" in raw
        else dict(defaults.event_value_scales)
    )
    config = PipelineConfig(
        ingest=ingest,
        checks=_section(ChecksConfig(), "checks", raw.get("checks")),
        artifacts=_section(ArtifactsConfig(), "artifacts", raw.get("artifacts")),
        guardrails=_section(GuardrailsConfig(), "guardrails", raw.get("guardrails")),
        tuning=_section(TuningConfig(), "tuning", raw.get("tuning")),
        catalog=_section(CatalogConfig(), "catalog", raw.get("catalog")),
        event_weights=weights,
        event_value_scales=value_scales,
        blend=_section(BlendWeights(), "blend", raw.get("blend")),
    )
    _validate(config)
    return config


def _event_type_numbers(
    section: str, given: Any, event_types: tuple[str, ...], what: str, expected: str
) -> dict[str, float]:
    """The YAML mapping `section` of event type to number: each type accepted (`ingest.event_types`), each
    value a number (its range is checked with every other setting's, by `_validate`)."""
    if given is None:
        return {}
    if not isinstance(given, dict):
        raise ConfigError(f"{section}: must be a mapping of event type to {what}")
    numbers = {}
    for name, number in given.items():
        if str(name) not in event_types:
            raise ConfigError(
                f"{section}.{name}: {name!r} is not an accepted event type "
                f"(ingest.event_types: {', '.join(event_types)})"
            )
        if isinstance(number, bool) or not isinstance(number, int | float):
            raise ConfigError(f"{section}.{name}: must be {expected}, got {number!r}")
        numbers[str(name)] = _as_float(f"{section}.{name}", number)
    return numbers


def _read_yaml(path: Path, what: str) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
        repeated = _repeated_key(yaml.compose(text, Loader=yaml.SafeLoader))
        raw = yaml.safe_load(text) or {}
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what}: {path} is not valid YAML: {exc}") from exc
    if repeated:
        raise ConfigError(f"{what}: {path}: {repeated}")
    if not isinstance(raw, dict):
        raise ConfigError(f"{what}: {path} must hold a mapping at the top level")
    return raw


def _repeated_key(root: yaml.Node | None) -> str | None:
    """The first key given twice in one mapping of a YAML document, with both lines; None if there is none.

    PyYAML keeps the last of the two silently, so the setting written first would be ignored.
    """
    pending, seen = [(root, "")], set()
    while pending:
        node, prefix = pending.pop(0)
        if node is None or id(node) in seen:  # an alias repeats a node already walked (or itself)
            continue
        seen.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            pending.extend((item, prefix) for item in node.value)
        elif isinstance(node, yaml.MappingNode):
            lines: dict[str, int] = {}
            for key_node, value_node in node.value:
                key, line = f"{prefix}{key_node.value}", key_node.start_mark.line + 1
                if key in lines:
                    return f"{key} is given twice (lines {lines[key]} and {line}); keep one"
                lines[key] = line
                pending.append((value_node, f"{key}."))
    return None


def _section(default: Any, name: str, values: Any) -> Any:
    """The dataclass `default` with the keys of the YAML mapping `values` replaced, each type-checked.

    A key whose default is itself a dataclass is a nested section (`artifacts.cooc`), read the same way.
    """
    if values is None:
        return default
    if not isinstance(values, dict):
        raise ConfigError(f"{name}: must be a mapping")
    _reject_unknown(f"{name}.", values, {f.name for f in dataclasses.fields(default)})
    kwargs = {}
    for key, value in values.items():
        current = getattr(default, key)
        expected = type(current)
        if dataclasses.is_dataclass(current):
            value = _section(current, f"{name}.{key}", value)
        elif expected is tuple:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{name}.{key}: must be a list of strings")
            value = tuple(value)
        elif expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = _as_float(f"{name}.{key}", value)
        # bool is a subclass of int: `true` is refused where a number is expected, and only there.
        elif not isinstance(value, expected) or (isinstance(value, bool) and expected is not bool):
            raise ConfigError(f"{name}.{key}: must be {expected.__name__}, got {value!r}")
        kwargs[key] = value
    return dataclasses.replace(default, **kwargs)


def _as_float(key: str, value: float) -> float:
    """A YAML number as a float; a whole number too large for one is refused rather than crashing."""
    try:
        return float(value)
    except OverflowError:
        raise ConfigError(f"{key}: must be a finite number, got {value!r}") from None


def _artifact_sections() -> list[str]:
    """The per-kind sections of `artifacts:` (one per artifact kind)."""
    return [f.name for f in dataclasses.fields(ArtifactsConfig)]


def _reject_unknown(prefix: str, values: dict[str, Any], known: set[str]) -> None:
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown config key(s): {', '.join(prefix + k for k in unknown)}")


def _validate(config: PipelineConfig) -> None:
    """Refuse a configuration the pipeline would fail on later, naming the key.

    General rules first (every number finite and in its range, every list of names without blanks or
    repeats), then the rules that relate keys to each other.
    """
    for key, value in _leaves(config):
        if isinstance(value, int | float) and not isinstance(value, bool):
            _check_number(key, value)
        elif isinstance(value, tuple):
            _check_names(key, value)
    if not config.ingest.event_types:
        raise ConfigError("ingest.event_types: must list at least one event type")
    checks = config.checks
    for low, high in (
        ("volume_min_ratio", "volume_max_ratio"),
        ("volume_min_history_days", "volume_trailing_days"),
    ):
        if getattr(checks, low) > getattr(checks, high):
            raise ConfigError(
                f"checks.{low}: must be <= checks.{high} ({getattr(checks, high)}), got {getattr(checks, low)}"
            )
    if not any(dataclasses.asdict(config.blend).values()):
        raise ConfigError("blend: at least one weight must be > 0")
    tuning = config.tuning
    if tuning.schedule and len(tuning.schedule.split()) != 5:
        raise ConfigError(f"tuning.schedule: expected a 5-field cron expression, got {tuning.schedule!r}")


def _leaves(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every setting of a (nested) settings dataclass with its dotted key, e.g. `artifacts.als.factors`."""
    if dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            yield from _leaves(getattr(value, f.name), f"{prefix}{f.name}.")
    elif isinstance(value, Mapping):
        for name, item in value.items():
            yield from _leaves(item, f"{prefix}{name}.")
    else:
        yield prefix.removesuffix("."), value


def _check_number(key: str, value: float) -> None:
    """`value` is finite and within the range of `key`: NUMBER_RANGES, or >= 0 (> 0 for POSITIVE keys)."""
    whole = isinstance(value, int)
    lowest, highest = next(
        (bounds for pattern, bounds in NUMBER_RANGES.items() if fnmatch.fnmatchcase(key, pattern)),
        (0, _highest(key, whole)),
    )
    above = any(fnmatch.fnmatchcase(key, pattern) for pattern in POSITIVE)
    if above and whole:
        lowest, above = 1, False
    if math.isfinite(value) and (value > lowest if above else value >= lowest) and value <= highest:
        return
    # The 64-bit limit is named only to a value beyond it: for any other it is noise.
    shown = highest != math.inf and (highest != MAX_INT or value > highest)
    limits = ("> " if above else ">= ") + str(lowest) + (f" and <= {highest}" if shown else "")
    raise ConfigError(
        f"{key}: must be {'a whole number' if whole else 'a finite number'} {limits}, got {value!r}"
    )


def _highest(key: str, whole: bool) -> float:
    """The general upper bound of a number: day and hour counts span at most MAX_DAYS."""
    if key.endswith("_days"):
        return MAX_DAYS
    if key.endswith("_hours"):
        return MAX_DAYS * 24
    return MAX_INT if whole else math.inf


def _check_names(key: str, names: tuple[str, ...]) -> None:
    """A list of names (event types, checks) names each one once, none blank."""
    for index, name in enumerate(names):
        if not name.strip():
            raise ConfigError(f"{key}: entry {index + 1} is blank")
        if name in names[:index]:
            raise ConfigError(f"{key}: {name!r} is listed twice")


def _parse_choice(var: str, value: str | None, choices: tuple[str, ...]) -> str:
    """`value` if it is one of `choices`; the first choice when unset."""
    if not value:
        return choices[0]
    if value not in choices:
        raise ConfigError(f"{var}: expected one of {', '.join(choices)}, got {value!r}")
    return value


def _parse_alert_sink(value: str) -> str:
    if value in ("log", "file") or value.startswith(("file:", "http://", "https://")):
        return value
    raise ConfigError(f"RECSYS_ALERT_SINK: expected log, file, file:PATH or an http(s) URL, got {value!r}")


def _parse_postgres_url(value: str | None) -> str | None:
    """`value` if it names a PostgreSQL server, user and database. The error never shows the password."""
    if not value:
        return None
    url = urllib.parse.urlsplit(value)
    problems = [
        problem
        for problem, present in (
            (f"the scheme {url.scheme!r}", url.scheme in ("postgresql", "postgres")),
            ("no host", bool(url.hostname)),
            ("no user", bool(url.username)),
            ("no database", bool(url.path.strip("/"))),
            ("a port that is not a number from 1 to 65535", _port_valid(url)),
        )
        if not present
    ]
    if problems:
        raise ConfigError(
            "RECSYS_POSTGRES_URL: expected postgresql://USER:PASSWORD@HOST:PORT/DATABASE; the value has "
            + ", ".join(problems)
        )
    return value


# An admin token shorter than this is guessable; at most this long, it fits in any HTTP header.
MIN_ADMIN_TOKEN_CHARS = 16
MAX_ADMIN_TOKEN_CHARS = 512


def _parse_admin_token(value: str | None, variable: str = "RECSYS_ADMIN_TOKEN") -> str | None:
    """A bearer token (the admin API's, or the ingestion API's): printable ASCII without spaces, 16-512
    characters. The error never shows the value."""
    if not value:
        return None
    if not (
        MIN_ADMIN_TOKEN_CHARS <= len(value) <= MAX_ADMIN_TOKEN_CHARS
        and all("!" <= char <= "~" for char in value)
    ):
        raise ConfigError(
            f"{variable}: expected {MIN_ADMIN_TOKEN_CHARS}-{MAX_ADMIN_TOKEN_CHARS} printable ASCII "
            f"characters without spaces (for example the output of `openssl rand -hex 32`); the value has "
            f"{len(value)} characters"
            + ("" if value.isascii() and value.isprintable() and " " not in value else ", some not allowed")
        )
    return value


def _port_valid(url: urllib.parse.SplitResult) -> bool:
    try:
        return url.port is None or url.port > 0
    except ValueError:
        return False


# A longer interval or timeout than this is a mistake (`inf` would silently turn hot reload off).
MAX_SECONDS = 3600.0


def _parse_seconds(var: str, value: str | None, default: float) -> float:
    if not value:
        return default
    parsed = _float_or_nan(value)
    if not 0 < parsed <= MAX_SECONDS:  # also refuses nan and inf
        raise ConfigError(f"{var}: expected a number of seconds > 0 and <= {MAX_SECONDS:g}, got {value!r}")
    return parsed


def _parse_fraction(var: str, value: str | None, default: float) -> float:
    """A number from 0 to 1; `default` if unset."""
    if not value:
        return default
    parsed = _float_or_nan(value)
    if not 0 <= parsed <= 1:  # also refuses nan
        raise ConfigError(f"{var}: expected a number from 0 to 1, got {value!r}")
    return parsed


def _float_or_nan(value: str) -> float:
    """`value` as a number; nan (which every range check refuses) when it is not one."""
    try:
        return float(value)
    except ValueError:
        return math.nan


def _parse_whole(var: str, value: str | None, default: int, maximum: int, unit: str) -> int:
    """A whole number from 1 to `maximum` (the bounds of the setting the variable sets); `default` if unset."""
    if not value:
        return default
    if not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= maximum:
        raise ConfigError(f"{var}: expected a whole number of {unit} from 1 to {maximum}, got {value!r}")
    return int(value)


def _parse_bool(var: str, value: str | None, default: bool) -> bool:
    if not value:
        return default
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{var}: expected true/false, got {value!r}")


def _parse_date(var: str, value: str | None, default: dt.date) -> dt.date:
    if not value:
        return default
    try:
        return dt.date.fromisoformat(value)
    except ValueError as exc:
        raise ConfigError(f"{var}: expected a date like 2025-01-31, got {value!r}") from exc
