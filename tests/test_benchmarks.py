"""What the benchmarks rely on without running them: their cache keys hash sources that exist (a module
that moves must fail here, in `make test`, rather than hash as nothing and leave cached benchmark data valid
whatever the code does), and docs/benchmarks.md opens with the harness's intro (targets included); and the
quality report's data loading and its handling of a protocol that leaves nobody to evaluate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import artifacts, ingest, quality, serving
from benchmarks.harness import DOC_INTRO, DOC_PATH, BenchmarkError, source_fingerprint


@pytest.mark.parametrize(
    "sources",
    [
        artifacts.GENERATOR_SOURCES,
        artifacts.PIPELINE_SOURCES,
        serving.DATA_SOURCES,
        (ingest.GENERATOR_SOURCE,),
    ],
)
def test_every_fingerprinted_source_exists(sources: tuple[str, ...]) -> None:
    assert len(source_fingerprint(*sources)) == 16


def test_a_missing_source_is_an_error() -> None:
    with pytest.raises(BenchmarkError, match="does not exist"):
        source_fingerprint("recsys_dagster/generate.py")


def test_the_benchmarks_doc_opens_with_the_harness_intro() -> None:
    # The doc is rewritten section by section; its intro (with the targets) is DOC_INTRO, kept in step by hand.
    assert DOC_PATH.read_text().startswith(DOC_INTRO)


# ------------------------------------------------------------------------------ the quality report


def otto_file(path: Path, sessions: list[list[tuple[int, int, str]]]) -> Path:
    """An OTTO-format JSONL file: one line per session of (aid, ts in ms, type) events."""
    lines = [
        json.dumps({"session": n, "events": [{"aid": a, "ts": ts, "type": t} for a, ts, t in events]})
        for n, events in enumerate(sessions)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


DAY_MS = 86_400_000
T0 = 1_659_304_800_000  # 2022-07-31 22:00 UTC


def test_otto_sessions_become_user_item_daily_rows_with_the_default_event_weights(tmp_path: Path) -> None:
    path = otto_file(
        tmp_path / "train.jsonl",
        [
            [
                (1, T0, "clicks"),
                (1, T0 + 1, "clicks"),
                (1, T0 + 2, "carts"),
                (1, T0 + 2, "carts"),
                (2, T0, "orders"),
            ],
            [(1, T0 + 3 * DAY_MS, "clicks")],
        ],
    )
    data = quality.load_otto(path)
    rows = {(r["user_id"], r["item_id"]): (r["weight"], r["events"]) for r in data.rows.iter_rows(named=True)}
    # click 1 + click 1 + add_to_cart 3 (the exact duplicate cart counts once); purchase 5.
    assert rows == {("0", "1"): (5.0, 3), ("0", "2"): (5.0, 1), ("1", "1"): (1.0, 1)}
    assert set(data.typed["event_type"]) == {"click", "add_to_cart", "purchase"}
    assert data.rows["tenant"].unique().to_list() == ["otto"]


def test_a_protocol_without_evaluable_users_is_reported_not_failed(tmp_path: Path) -> None:
    # Two sessions that share no item: nothing a model learns from one can be held out of the other.
    path = otto_file(
        tmp_path / "train.jsonl",
        [
            [(a, T0 + d * DAY_MS, "clicks") for d in range(10) for a in (10 + d, 30 + d)],
            [(a, T0 + d * DAY_MS, "clicks") for d in range(10) for a in (50 + d, 70 + d)],
        ],
    )
    data = quality.load_otto(path)
    outcomes = quality.data_outcomes(data, seed=1, trials=2, scratch=tmp_path / "scratch")
    texts = quality.protocol_texts(data, seed=1)
    for name, outcome in outcomes.items():
        assert outcome.result.users["all"] == 0
        assert outcome.tuning is None
        text = "\n".join(quality.section(name, texts[name], outcome))
        assert "**No evaluable user**" in text and "Tuning: **not run**" in text
