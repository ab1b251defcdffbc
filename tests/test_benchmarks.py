"""What the benchmarks rely on without running them: their cache keys hash sources that exist (a module
that moves must fail here, in `make test`, rather than hash as nothing and leave cached benchmark data valid
whatever the code does), and docs/benchmarks.md opens with the harness's intro (targets included)."""

from __future__ import annotations

import pytest

from benchmarks import artifacts, ingest, serving
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
