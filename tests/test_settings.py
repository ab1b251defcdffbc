"""Settings: environment variables with working defaults, and the optional YAML pipeline config."""

from __future__ import annotations

import datetime as dt
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
    ],
)
def test_out_of_range_values_are_rejected_with_the_key(in_tmp: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"\b{key}\b"):
        load_settings({"RECSYS_CONFIG": str(config_file(in_tmp, text))})


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
