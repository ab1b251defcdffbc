"""release: the artifact row checks that publishing runs before it moves a manifest."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from recsys_core.kinds import ARTIFACT_KINDS
from recsys_dagster.publishing.release import artifact_row_problems
from recsys_dagster.transform.artifact_dir import write_artifact_dir
from recsys_dagster.transform.artifacts import polars_schema


def cooc_artifact(root: Path, rows: list[tuple]) -> Path:
    frame = pl.DataFrame(rows, schema=polars_schema(ARTIFACT_KINDS["cooc"]), orient="row")
    meta = {"tenant": "t", "surface": "s", "as_of": "2025-01-02", "window": {}, "params": {}, "inputs": {}}
    return write_artifact_dir(root, "cooc", meta, {"neighbors.parquet": frame})[1]


def test_a_valid_cooc_artifact_has_no_row_problems(tmp_path: Path) -> None:
    path = cooc_artifact(tmp_path, [("a", 1, "b", 0.5, 3), ("b", 1, "a", 0.5, 3)])
    assert artifact_row_problems({"cooc": path}, min_support=2) == []


def test_row_problems_name_the_kind_and_each_problem(tmp_path: Path) -> None:
    path = cooc_artifact(tmp_path, [("a", 1, "a", 0.5, 3), ("b", 1, "a", 0.5, 1), ("b", 3, "c", 0.4, 5)])
    problems = artifact_row_problems({"cooc": path}, min_support=2)
    assert len(problems) == 1
    assert problems[0].startswith("artifact cooc breaks its contract:")
    for problem in ("self_neighbor", "below_min_support", "rank_not_sequential"):
        assert problem in problems[0]
