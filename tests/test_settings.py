"""Settings: environment variables with working defaults, and the optional YAML pipeline config."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import pytest

from recsys_core.settings import (
    DEFAULT_EVENT_TYPES,
    ChecksConfig,
    ConfigError,
    IngestConfig,
    PipelineConfig,
    load_pipeline_config,
    load_settings,
)

ROOTS = {
    "RECSYS_RAW_ROOT": ("raw_root", "raw"),
    "RECSYS_LAKE_ROOT": ("lake_root", "lake"),
    "RECSYS_ARTIFACT_ROOT": ("artifact_root", "artifacts"),
    "DAGSTER_HOME": ("dagster_home", "dagster"),
}


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in an empty working directory, with HOME pointing into it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path


def config_file(folder: Path, text: str) -> Path:
    path = folder / "recsys.yaml"
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------
# Environment


def test_defaults(in_tmp: Path) -> None:
    settings = load_settings({})
    home = in_tmp / ".recsys"
    assert settings.home == home
    assert settings.raw_root == home / "raw"
    assert settings.lake_root == home / "lake"
    assert settings.artifact_root == home / "artifacts"
    assert settings.dagster_home == home / "dagster"
    assert settings.start_date == dt.date(2025, 1, 1)
    assert settings.config_file is None
    assert settings.postgres_url is None and settings.max_concurrent_runs == 4
    assert settings.pipeline == PipelineConfig()
    assert settings.pipeline.ingest.max_line_bytes == 1024 * 1024
    assert settings.pipeline.ingest.max_lateness_days == 7
    assert settings.pipeline.ingest.max_clock_skew_hours == 1
    assert settings.pipeline.ingest.event_types == DEFAULT_EVENT_TYPES
    assert set(DEFAULT_EVENT_TYPES) == {"exposure", "click", "add_to_cart", "purchase", "rating"}


def test_home_override_moves_every_root(in_tmp: Path) -> None:
    settings = load_settings({"RECSYS_HOME": str(in_tmp / "elsewhere")})
    assert settings.home == in_tmp / "elsewhere"
    for attr, default in ROOTS.values():
        assert getattr(settings, attr) == in_tmp / "elsewhere" / default


def test_relative_and_home_relative_paths_become_absolute(in_tmp: Path) -> None:
    assert load_settings({"RECSYS_HOME": "data/recsys"}).home == in_tmp / "data" / "recsys"
    assert load_settings({"RECSYS_HOME": "~/recsys"}).home == in_tmp / "home" / "recsys"
    assert load_settings({"RECSYS_LAKE_ROOT": "~/lake"}).lake_root == in_tmp / "home" / "lake"
    assert load_settings({"RECSYS_RAW_ROOT": "landing"}).raw_root == in_tmp / "landing"


@pytest.mark.parametrize("var", list(ROOTS))
def test_each_root_can_be_overridden(in_tmp: Path, var: str) -> None:
    attr, _ = ROOTS[var]
    settings = load_settings({"RECSYS_HOME": str(in_tmp / "home-dir"), var: str(in_tmp / "custom")})
    assert getattr(settings, attr) == in_tmp / "custom"
    for other_var, (other_attr, default) in ROOTS.items():
        if other_var != var:
            assert getattr(settings, other_attr) == in_tmp / "home-dir" / default


@pytest.mark.parametrize("var", ["RECSYS_HOME", *ROOTS, "RECSYS_START_DATE", "RECSYS_CONFIG"])
def test_empty_variables_mean_the_default(in_tmp: Path, var: str) -> None:
    assert load_settings({var: ""}) == load_settings({})


def test_process_environment_is_the_default_source(in_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECSYS_HOME", str(in_tmp / "from-env"))
    monkeypatch.setenv("RECSYS_START_DATE", "2024-06-01")
    for var in ROOTS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("RECSYS_CONFIG", raising=False)
    settings = load_settings()
    assert settings.home == in_tmp / "from-env"
    assert settings.lake_root == in_tmp / "from-env" / "lake"
    assert settings.start_date == dt.date(2024, 6, 1)


@pytest.mark.parametrize(
    ("value", "expected"), [("2024-02-29", dt.date(2024, 2, 29)), ("2025-12-31", dt.date(2025, 12, 31))]
)
def test_start_date(in_tmp: Path, value: str, expected: dt.date) -> None:
    assert load_settings({"RECSYS_START_DATE": value}).start_date == expected


@pytest.mark.parametrize(
    "value", ["2025-02-29", "2024-13-01", "yesterday", "2024/01/01", "01-02-2024", "2024-1-1x"]
)
def test_bad_start_date_is_a_clear_error(in_tmp: Path, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({"RECSYS_START_DATE": value})
    message = str(info.value)
    assert "RECSYS_START_DATE" in message and repr(value) in message


# --------------------------------------------------------------------------------------------------
# YAML config


def test_yaml_config_is_loaded(in_tmp: Path) -> None:
    path = config_file(
        in_tmp,
        """
ingest:
  max_line_bytes: 4096
  max_lateness_days: 2
  max_clock_skew_hours: 0
  event_types: [exposure, click, view]
  rows_per_file: 1000
checks:
  max_quarantine_rate: 0.2
  max_duplicate_rate: 1
  volume_trailing_days: 28
  max_items_per_session: 50
  warn_only: [volume]
event_weights:
  click: 2
  view: 0.5
""",
    )
    settings = load_settings({"RECSYS_CONFIG": str(path)})
    assert settings.config_file == path
    assert settings.pipeline.ingest == IngestConfig(
        max_line_bytes=4096,
        max_lateness_days=2,
        max_clock_skew_hours=0,
        event_types=("exposure", "click", "view"),
        rows_per_file=1000,
    )
    checks = settings.pipeline.checks
    assert checks.max_quarantine_rate == 0.2
    assert checks.max_duplicate_rate == 1.0 and isinstance(checks.max_duplicate_rate, float)
    assert checks.volume_trailing_days == 28
    assert checks.max_items_per_session == 50
    assert checks.warn_only == ("volume",)
    assert checks.max_events == ChecksConfig().max_events  # untouched keys keep their default
    assert settings.pipeline.event_weights["click"] == 2.0
    assert settings.pipeline.event_weights["view"] == 0.5
    assert settings.pipeline.event_weights["purchase"] == PipelineConfig().event_weights["purchase"]


def test_relative_config_path_is_resolved_from_the_working_directory(in_tmp: Path) -> None:
    config_file(in_tmp, "ingest:\n  max_line_bytes: 10\n")
    settings = load_settings({"RECSYS_CONFIG": "recsys.yaml"})
    assert settings.config_file == in_tmp / "recsys.yaml"
    assert settings.pipeline.ingest.max_line_bytes == 10


@pytest.mark.parametrize("text", ["", "# only a comment\n", "ingest:\n", "ingest:\nchecks:\n"])
def test_empty_config_gives_defaults(in_tmp: Path, text: str) -> None:
    pipeline = load_pipeline_config(config_file(in_tmp, text))
    assert pipeline.ingest == IngestConfig()
    assert pipeline.checks == ChecksConfig()


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("ingestion:\n  max_line_bytes: 1\n", "ingestion"),
        ("ingest:\n  max_line_byte: 1\n", "ingest.max_line_byte"),
        ("checks:\n  max_quarantine: 0.1\n", "checks.max_quarantine"),
        ("checks:\n  warnonly: [volume]\n", "checks.warnonly"),
    ],
)
def test_unknown_keys_are_rejected_by_name(in_tmp: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"\b{key}\b"):
        load_settings({"RECSYS_CONFIG": str(config_file(in_tmp, text))})


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("ingest:\n  max_line_bytes: big\n", "ingest.max_line_bytes"),
        ("ingest:\n  max_line_bytes: 1.5\n", "ingest.max_line_bytes"),
        ("ingest:\n  max_line_bytes: true\n", "ingest.max_line_bytes"),
        ("ingest:\n  max_lateness_days: '7'\n", "ingest.max_lateness_days"),
        ("ingest:\n  event_types: click\n", "ingest.event_types"),
        ("ingest:\n  event_types: [1, 2]\n", "ingest.event_types"),
        ("checks:\n  max_quarantine_rate: high\n", "checks.max_quarantine_rate"),
        ("checks:\n  max_quarantine_rate: true\n", "checks.max_quarantine_rate"),
        ("checks:\n  max_events: 1.0e6\n", "checks.max_events"),
        ("checks:\n  warn_only: volume\n", "checks.warn_only"),
        ("ingest: 5\n", "ingest"),
        ("checks: [volume]\n", "checks"),
        ("event_weights:\n  click: -1\n", "event_weights.click"),
        ("event_weights:\n  click: lots\n", "event_weights.click"),
        ("event_weights:\n  click: true\n", "event_weights.click"),
        ("event_weights: [1, 2]\n", "event_weights"),
        ("event_weights: 3\n", "event_weights"),
    ],
)
def test_wrong_types_are_rejected_with_the_key(in_tmp: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"(?<![\w.]){key}(?![\w])"):
        load_settings({"RECSYS_CONFIG": str(config_file(in_tmp, text))})


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("ingest:\n  max_line_bytes: 0\n", "ingest.max_line_bytes"),
        ("ingest:\n  rows_per_file: -5\n", "ingest.rows_per_file"),
        ("ingest:\n  max_lateness_days: -1\n", "ingest.max_lateness_days"),
        ("ingest:\n  max_clock_skew_hours: -1\n", "ingest.max_clock_skew_hours"),
        ("ingest:\n  event_types: []\n", "ingest.event_types"),
        ("checks:\n  max_quarantine_rate: 1.5\n", "checks.max_quarantine_rate"),
        ("checks:\n  max_duplicate_rate: -0.1\n", "checks.max_duplicate_rate"),
        ("checks:\n  volume_trailing_days: 0\n", "checks.volume_trailing_days"),
        ("catalog:\n  max_missing_share: 1.5\n", "catalog.max_missing_share"),
        ("catalog:\n  content_top_k: 0\n", "catalog.content_top_k"),
        ("catalog:\n  top_k: 5\n", "catalog.top_k"),
    ],
)
def test_out_of_range_values_are_rejected_with_the_key(in_tmp: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"\b{key}\b"):
        load_settings({"RECSYS_CONFIG": str(config_file(in_tmp, text))})


# Values that passed validation before and made the pipeline fail later (some after a good partition had
# already been replaced): each is refused when the settings are read, with its key.
@pytest.mark.parametrize(
    ("text", "key"),
    [
        # numbers that are not finite
        ("event_weights:\n  click: .nan\n", "event_weights.click"),
        ("event_weights:\n  purchase: .inf\n", "event_weights.purchase"),
        ("blend:\n  cooc: .nan\n", "blend.cooc"),
        ("blend:\n  als: .inf\n", "blend.als"),
        ("artifacts:\n  popularity:\n    half_life_days: .inf\n", "artifacts.popularity.half_life_days"),
        ("artifacts:\n  als:\n    half_life_days: .nan\n", "artifacts.als.half_life_days"),
        ("artifacts:\n  als:\n    regularization: .inf\n", "artifacts.als.regularization"),
        ("artifacts:\n  als:\n    alpha: " + "9" * 400 + "\n", "artifacts.als.alpha"),
        ("checks:\n  volume_min_ratio: .nan\n", "checks.volume_min_ratio"),
        ("checks:\n  volume_max_ratio: .inf\n", "checks.volume_max_ratio"),
        ("guardrails:\n  min_coverage_vs_popularity: .inf\n", "guardrails.min_coverage_vs_popularity"),
        (
            "guardrails:\n  min_lift_over_popularity:\n    als: .nan\n",
            "guardrails.min_lift_over_popularity.als",
        ),
        # day counts beyond any calendar
        ("ingest:\n  max_lateness_days: 1000000\n", "ingest.max_lateness_days"),
        ("ingest:\n  max_clock_skew_hours: 100000000\n", "ingest.max_clock_skew_hours"),
        ("checks:\n  volume_trailing_days: 1000000\n", "checks.volume_trailing_days"),
        ("checks:\n  volume_block_recent_days: 1000000\n", "checks.volume_block_recent_days"),
        ("artifacts:\n  cooc:\n    window_days: 1000000\n", "artifacts.cooc.window_days"),
        ("artifacts:\n  als:\n    half_life_days: 1.0e7\n", "artifacts.als.half_life_days"),
        ("guardrails:\n  holdout_days: 1000000\n", "guardrails.holdout_days"),
        ("tuning:\n  validation_days: 1000000\n", "tuning.validation_days"),
        # negative limits and counts
        ("checks:\n  max_events: -1\n", "checks.max_events"),
        ("checks:\n  max_items_per_session: -10\n", "checks.max_items_per_session"),
        ("checks:\n  volume_min_history_days: -1\n", "checks.volume_min_history_days"),
        ("checks:\n  volume_min_ratio: -0.5\n", "checks.volume_min_ratio"),
        ("artifacts:\n  user_history:\n    max_items: -1\n", "artifacts.user_history.max_items"),
        ("artifacts:\n  als:\n    random_state: -1\n", "artifacts.als.random_state"),
        ("artifacts:\n  als:\n    alpha: 0\n", "artifacts.als.alpha"),
        ("blend:\n  popularity: -0.1\n", "blend.popularity"),
        ("tuning:\n  max_users: -5\n", "tuning.max_users"),
        ("tuning:\n  seed: 99999999999\n", "tuning.seed"),
        ("checks:\n  max_sessions: 99999999999999999999\n", "checks.max_sessions"),
        # keys that contradict each other
        ("checks:\n  volume_min_ratio: 3.0\n  volume_max_ratio: 1.0\n", "checks.volume_min_ratio"),
        (
            "checks:\n  volume_trailing_days: 5\n  volume_min_history_days: 6\n",
            "checks.volume_min_history_days",
        ),
        ("blend:\n  als: 0\n  cooc: 0\n  popularity: 0\n", "blend"),
        # lists of names
        ("ingest:\n  event_types: [click, purchase, click]\n", "ingest.event_types"),
        ("ingest:\n  event_types: [click, '']\n", "ingest.event_types"),
        ("ingest:\n  event_types: ['  ']\n", "ingest.event_types"),
        ("checks:\n  warn_only: [volume, volume]\n", "checks.warn_only"),
        # a weight for an event type the contract does not accept
        ("event_weights:\n  view: 1\n", "event_weights.view"),
        ("ingest:\n  event_types: [click]\nevent_weights:\n  purchase: 5\n", "event_weights.purchase"),
        # a key given twice: the YAML parser would keep the last silently
        ("ingest:\n  max_line_bytes: 10\ningest:\n  rows_per_file: 5\n", "ingest"),
        ("ingest:\n  max_line_bytes: 10\n  max_line_bytes: 20\n", "ingest.max_line_bytes"),
        ("artifacts:\n  als:\n    factors: 8\n    factors: 16\n", "artifacts.als.factors"),
        ("event_weights:\n  click: 1\n  click: 2\n", "event_weights.click"),
    ],
)
def test_values_the_pipeline_would_fail_on_are_refused_at_load(in_tmp: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"(?<![\w.]){re.escape(key)}(?![\w])"):
        load_settings({"RECSYS_CONFIG": str(config_file(in_tmp, text))})


def test_a_repeated_key_names_both_lines(in_tmp: Path) -> None:
    path = config_file(in_tmp, "checks:\n  max_events: 10\n  warn_only: []\n  max_events: 20\n")
    with pytest.raises(ConfigError) as info:
        load_settings({"RECSYS_CONFIG": str(path)})
    assert str(info.value) == (
        f"RECSYS_CONFIG: {path}: checks.max_events is given twice (lines 2 and 4); keep one"
    )


def test_the_same_key_in_different_sections_is_not_a_repeat(in_tmp: Path) -> None:
    text = "artifacts:\n  cooc:\n    window_days: 7\n  als:\n    window_days: 14\n"
    artifacts = load_settings({"RECSYS_CONFIG": str(config_file(in_tmp, text))}).pipeline.artifacts
    assert (artifacts.cooc.window_days, artifacts.als.window_days) == (7, 14)


def test_the_largest_allowed_values_are_accepted(in_tmp: Path) -> None:
    text = (
        "ingest:\n  max_lateness_days: 3660\n  event_types: [click, view]\n"
        "event_weights:\n  view: 0.5\n"
        "artifacts:\n  als:\n    random_state: 4294967295\n    half_life_days: 3660\n"
        "checks:\n  volume_min_ratio: 1\n  volume_max_ratio: 1\n  max_events: 9223372036854775807\n"
    )
    pipeline = load_settings({"RECSYS_CONFIG": str(config_file(in_tmp, text))}).pipeline
    assert pipeline.ingest.max_lateness_days == 3660
    assert pipeline.event_weights["view"] == 0.5


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("RECSYS_WINDOW_DAYS", "1000000"),
        ("RECSYS_WINDOW_DAYS", "0"),
        ("RECSYS_WINDOW_DAYS", "-3"),
        ("RECSYS_WINDOW_DAYS", "7.5"),
        ("RECSYS_WINDOW_DAYS", "nan"),
        ("RECSYS_TUNING_TRIALS", "0"),
        ("RECSYS_TUNING_TRIALS", "-1"),
        ("RECSYS_TUNING_TRIALS", "99999999999999999999"),
        ("RECSYS_TUNING_TRIALS", "ten"),
        ("RECSYS_SERVE_POLL_SECONDS", "inf"),
        ("RECSYS_SERVE_POLL_SECONDS", "nan"),
        ("RECSYS_SERVE_POLL_SECONDS", "0"),
        ("RECSYS_SERVE_POLL_SECONDS", "-1"),
        ("RECSYS_MAX_CONCURRENT_RUNS", "0"),
        ("RECSYS_MAX_CONCURRENT_RUNS", "1001"),
        ("RECSYS_MAX_CONCURRENT_RUNS", "two"),
    ],
)
def test_bad_environment_overrides_are_refused_with_the_variable(in_tmp: Path, var: str, value: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{var}: .*{re.escape(repr(value))}"):
        load_settings({var: value})


def test_environment_overrides_within_bounds_apply(in_tmp: Path) -> None:
    settings = load_settings(
        {
            "RECSYS_WINDOW_DAYS": "3660",
            "RECSYS_TUNING_TRIALS": "5",
            "RECSYS_SERVE_POLL_SECONDS": "0.5",
            "RECSYS_MAX_CONCURRENT_RUNS": "1000",
        }
    )
    assert settings.max_concurrent_runs == 1000
    assert settings.pipeline.artifacts.als.window_days == 3660
    assert settings.pipeline.tuning.trials == 5
    assert settings.serve_poll_seconds == 0.5


@pytest.mark.parametrize("text", ["- ingest\n- checks\n", "just text\n", "42\n"])
def test_top_level_must_be_a_mapping(in_tmp: Path, text: str) -> None:
    with pytest.raises(ConfigError, match="mapping"):
        load_settings({"RECSYS_CONFIG": str(config_file(in_tmp, text))})


def test_invalid_yaml_is_a_config_error(in_tmp: Path) -> None:
    path = config_file(in_tmp, "ingest: [unclosed\n  - x: : y\n")
    with pytest.raises(ConfigError, match="RECSYS_CONFIG"):
        load_settings({"RECSYS_CONFIG": str(path)})


def test_missing_config_file_is_a_config_error(in_tmp: Path) -> None:
    with pytest.raises(ConfigError, match=r"RECSYS_CONFIG.*missing\.yaml"):
        load_settings({"RECSYS_CONFIG": str(in_tmp / "missing.yaml")})


def test_the_documented_complete_example_is_every_default(tmp_path: Path) -> None:
    doc = (Path(__file__).parent.parent / "docs" / "reference" / "configuration.md").read_text()
    example = doc.split("### Complete example", 1)[1].split("```yaml", 1)[1].split("```", 1)[0]
    path = tmp_path / "recsys.yaml"
    path.write_text(example)
    assert load_pipeline_config(path) == PipelineConfig()
