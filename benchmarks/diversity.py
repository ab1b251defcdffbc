"""Diversity re-ranking on MovieLens: accuracy and diversity of the served lists per `diversity` setting;
writes its section of docs/quality.md.

`python -m benchmarks.diversity [--ratings PATH] [--movies PATH] [--seed 42] [--no-record]`

MovieLens latest-small's ratings become the product's artifacts built from the training rows of the
per-user random split (`benchmarks.quality.build_fixed`, default ALS and blend), and its movies.csv, imported
with `recsys import`'s code, becomes the catalog: the content artifact's files are built by the pipeline's
`transform.content.content_files` and served by the server's `ServedCatalog` (`evaluation.diversity.with_catalog`). Every setting ranks through
`recommender.recommend` and is scored by `evaluation.diversity.diversity_tradeoff`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import polars as pl

from benchmarks.harness import markdown_table, record_section
from benchmarks.quality import CONFIG, RATINGS, TEST_FRACTION, K, build_fixed, find_data, load_ratings
from recsys_core.catalog import CATALOG
from recsys_dagster.evaluation.diversity import DiversityRow, diversity_tradeoff, with_catalog
from recsys_dagster.evaluation.holdout import random_holdout
from recsys_dagster.ingest.importers import import_file

MOVIES = Path("ml-latest-small") / "movies.csv"
DOC_PATH = Path(__file__).resolve().parents[1] / "docs" / "quality.md"
SECTION = "diversity"
COMMAND = "python -m benchmarks.diversity"


def movie_catalog(movies: Path, scratch: Path) -> pl.DataFrame:
    """movies.csv as catalog records, through `recsys import`'s MovieLens conversion."""
    raw = scratch / "raw"
    import_file(movies, raw, tenant="movielens")
    lines = [json.loads(line) for path in sorted((raw / CATALOG).rglob("*.jsonl")) for line in path.open()]
    return pl.DataFrame(
        {
            "item_id": [r["item_id"] for r in lines],
            "title": [r["title"] for r in lines],
            "categories": [r.get("categories", []) for r in lines],
            "tags": [r.get("tags", []) for r in lines],
            "available": [r.get("available", True) for r in lines],
            "attributes": [json.dumps(r.get("attributes", {}), sort_keys=True) for r in lines],
        },
        schema_overrides={"categories": pl.List(pl.String), "tags": pl.List(pl.String)},
    )


def measure(ratings: Path, movies: Path, seed: int) -> list[DiversityRow]:
    data = load_ratings(ratings)
    holdout = random_holdout(data.rows, test_fraction=TEST_FRACTION, seed=seed)
    with tempfile.TemporaryDirectory() as folder:
        scratch = Path(folder)
        target = build_fixed(data, holdout.training, scratch / "built").target(CONFIG.artifacts.als)
        target = with_catalog(target, movie_catalog(movies, scratch), CONFIG.catalog.content_top_k)
        return diversity_tradeoff(target, holdout, K, CONFIG.blend)


def section(rows: list[DiversityRow], seed: int) -> str:
    base = rows[0]
    table = markdown_table(
        (
            "diversity",
            "max_per_category",
            "P@10",
            "R@10",
            "nDCG@10",
            "nDCG change",
            "intra-list diversity",
            "genres per list",
            "genre coverage",
        ),
        [
            (
                f"{row.diversity:.1f}",
                str(row.max_per_category or "-"),
                f"{row.precision:.4f}",
                f"{row.recall:.4f}",
                f"{row.ndcg:.4f}",
                f"{(row.ndcg / base.ndcg - 1) * 100:+.1f}%" if base.ndcg else "-",
                f"{row.intra_list_diversity:.4f}",
                f"{row.categories_per_list:.2f}",
                f"{row.category_coverage:.3f}",
            )
            for row in rows
        ],
    )
    diversified = [row for row in rows[1:] if row.max_per_category is None]
    costly = all(row.ndcg < base.ndcg for row in rows[1:])
    verdict = (
        f"MMR raises intra-list diversity from {base.intra_list_diversity:.4f} (off) to "
        f"{diversified[-1].intra_list_diversity:.4f} (diversity {diversified[-1].diversity:.1f}) at "
        f"{(diversified[-1].ndcg / base.ndcg - 1) * 100:+.1f}% nDCG@10. "
        + (
            "Every setting costs accuracy, so `catalog.diversity` stays 0 by default: diversity is a "
            "per-request or per-deployment choice."
            if costly
            else "Some setting does not cost accuracy here: consider it as the default."
        )
    )
    return "\n".join(
        [
            "## Diversity re-ranking (MovieLens latest-small, movies.csv as the catalog)",
            "",
            f"Produced by `{COMMAND}` (seed {seed}): the per-user stratified random split "
            f"(`random_holdout(rows, test_fraction={TEST_FRACTION}, seed={seed})`), artifacts built from the "
            "training rows with the default configuration (default ALS and blend weights), the catalog "
            "imported from movies.csv (genres as categories), every list ranked by the server's "
            "`recommend` with the `diversity` / `max_per_category` of the row, k = 10. Intra-list diversity: "
            "1 - the mean content cosine of a list's pairs (TF-IDF over genres and title words), averaged "
            "over the users; genres per list: distinct genres of a list, averaged; genre coverage: distinct "
            "genres of all lists over the catalog's genres (`evaluation.diversity`).",
            "",
            table,
            "",
            verdict,
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0])
    parser.add_argument("--ratings", type=Path, help="MovieLens ratings.csv (default: shared data)")
    parser.add_argument("--movies", type=Path, help="MovieLens movies.csv (default: shared data)")
    parser.add_argument(
        "--seed", type=int, default=42, help="seed of the random split (default: %(default)s)"
    )
    parser.add_argument("--no-record", action="store_true", help="print only; do not touch docs/quality.md")
    args = parser.parse_args(argv)
    ratings, movies = args.ratings or find_data(RATINGS), args.movies or find_data(MOVIES)
    if ratings is None or movies is None:
        print("data not found: pass --ratings and --movies (or set RECSYS_SHARED_DATA)", file=sys.stderr)
        return 2
    text = section(measure(ratings, movies, args.seed), args.seed)
    print(text)
    if not args.no_record:
        record_section(SECTION, text, DOC_PATH)
    return 0


if __name__ == "__main__":
    sys.exit(main())
