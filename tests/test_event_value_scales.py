"""The `event_value_scales` setting: which event types weigh by their `value`, read and checked up front."""

from __future__ import annotations

from pathlib import Path

import pytest

from recsys_core.settings import ConfigError, PipelineConfig, load_pipeline_config


def _load(folder: Path, text: str) -> PipelineConfig:
    path = folder / "recsys.yaml"
    path.write_text(text, encoding="utf-8")
    return load_pipeline_config(path)


def test_ratings_weigh_by_their_stars_out_of_five_by_default(tmp_path: Path) -> None:
    assert PipelineConfig().value_scales() == {"rating": 5.0}
    assert _load(tmp_path, "event_weights:\n  click: 2\n").value_scales() == {"rating": 5.0}


def test_a_given_mapping_replaces_the_default(tmp_path: Path) -> None:
    config = _load(tmp_path, "event_value_scales:\n  rating: 10\n  purchase: 100.0\n")
    assert config.value_scales() == {"purchase": 100.0, "rating": 10.0}
    assert config.value_scale_rows() == [
        {"event_type": "purchase", "scale": 100.0},
        {"event_type": "rating", "scale": 10.0},
    ]
    assert _load(tmp_path, "event_value_scales: {}\n").value_scale_rows() == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "event_value_scales:\n  rating: 0\n",
            "event_value_scales.rating: must be a finite number > 0, got 0.0",
        ),
        ("event_value_scales:\n  rating: -5\n", "event_value_scales.rating: must be a finite number > 0"),
        ("event_value_scales:\n  rating: .inf\n", "event_value_scales.rating: must be a finite number > 0"),
        (
            "event_value_scales:\n  rating: five\n",
            "event_value_scales.rating: must be a number > 0, got 'five'",
        ),
        ("event_value_scales:\n  rating: true\n", "event_value_scales.rating: must be a number > 0"),
        (
            "event_value_scales:\n  stars: 5\n",
            "event_value_scales.stars: 'stars' is not an accepted event type",
        ),
        (
            "event_value_scales: [rating]\n",
            "event_value_scales: must be a mapping of event type to value scale",
        ),
    ],
)
def test_a_wrong_value_scale_is_refused_with_its_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        _load(tmp_path, text)
