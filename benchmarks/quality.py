"""Offline quality on MovieLens latest-small: the served models next to bare baselines; writes docs/quality.md.

`python -m benchmarks.quality [--ratings PATH] [--seed 42] [--no-record]`

Ratings become user_item_daily-shaped rows (one row per rating, weight 1.0 = the `rating` event's default
interest weight, as `recsys import` turns a rating into one `rating` event). Per protocol, the product's
artifacts are built from the training rows only: popularity, user_history and the ALS input through the
product's own SQL models (`transform.sql.run_sql`), co-occurrence through the product's `cooc` SQL over
pair_daily-shaped counts made here (see `pair_counts`), ALS through `transform.als.train_als`; each is
written with `write_artifact_dir`, loaded with `evaluation.offline.load_built` and ranked through
`recsys_serving.recommender.recommend`, and everything is scored by `evaluation.evaluate.evaluate_models`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import functools
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from benchmarks.harness import Benchmark, BenchmarkError, Options, Section
from recsys_core.kinds import ARTIFACT_KINDS
from recsys_core.manifest import target_dir
from recsys_core.settings import AlsConfig, BlendWeights, PipelineConfig
from recsys_dagster.evaluation.evaluate import EvaluationResult, Ranker, evaluate_models
from recsys_dagster.evaluation.holdout import Holdout, item_popularity, random_holdout, temporal_holdout
from recsys_dagster.evaluation.offline import SINGLE_SOURCES, load_built
from recsys_dagster.transform.als import train_als
from recsys_dagster.transform.artifact_dir import write_artifact_dir
from recsys_dagster.transform.artifacts import polars_schema
from recsys_dagster.transform.sql import run_sql
from recsys_serving import recommender
from recsys_serving.store import LoadedTarget

REPO_ROOT = Path(__file__).resolve().parent.parent
DOC_PATH = REPO_ROOT / "docs" / "quality.md"
TENANT, SURFACE = "movielens", "ratings"
K = 10
TEMPORAL_HOLDOUT_DAYS = 365
TEST_FRACTION = 0.25
MAX_SESSION_ITEMS = PipelineConfig().artifacts.cooc.max_session_items
# The ALS settings tried on the validation split (iterations and random_state as the defaults).
GRID_FACTORS = (16, 32, 64)
GRID_REGULARIZATION = (0.05, 5.0, 50.0)
GRID_ALPHA = (1.0, 10.0)
METRIC_COLUMNS = ("precision", "recall", "ndcg", "map", "hit_rate", "coverage", "long_tail_share")
METRIC_TITLES = ("P@10", "R@10", "nDCG@10", "MAP@10", "HR@10", "coverage", "long-tail share")


def load_ratings(path: Path) -> pl.DataFrame:
    """ratings.csv -> user_item_daily-shaped rows, one per rating (weight 1.0, events 1)."""
    ratings = pl.read_csv(path)
    return ratings.select(
        pl.from_epoch("timestamp", time_unit="s").dt.date().alias("day"),
        pl.lit(TENANT).alias("tenant"),
        pl.lit(SURFACE).alias("surface"),
        pl.col("userId").cast(pl.String).alias("user_id"),
        pl.col("movieId").cast(pl.String).alias("item_id"),
        pl.lit(1.0).alias("weight"),
        pl.lit(1, dtype=pl.Int64).alias("events"),
        pl.from_epoch("timestamp", time_unit="s").dt.replace_time_zone("UTC").alias("last_ts"),
    ).sort("day", "user_id", "item_id")


def pair_counts(training: pl.DataFrame) -> pl.DataFrame:
    """pair_daily-shaped rows summed over the training days: a session is a user's day (as `recsys import`
    names MovieLens sessions), capped to its first `max_session_items` items by (time, item id)."""
    items = (
        training.with_columns(pl.concat_str("user_id", pl.col("day").cast(pl.String)).alias("session"))
        .group_by("session", "item_id")
        .agg(pl.col("last_ts").min().alias("first_ts"))
        .sort("session", "first_ts", "item_id")
        .filter(pl.int_range(pl.len()).over("session") < MAX_SESSION_ITEMS)
        .select("session", "item_id")
    )
    pairs = (
        items.join(items, on="session", suffix="_b")
        .filter(pl.col("item_id") < pl.col("item_id_b"))
        .group_by(pl.col("item_id").alias("item_a"), pl.col("item_id_b").alias("item_b"))
        .agg(pl.len().alias("sessions"))
    )
    singles = items.group_by("item_id").agg(pl.len().alias("sessions"))
    singles = singles.select(pl.col("item_id").alias("item_a"), pl.col("item_id").alias("item_b"), "sessions")
    total = pl.DataFrame(
        {"item_a": [None], "item_b": [None], "sessions": [items["session"].n_unique()]},
        schema={"item_a": pl.String, "item_b": pl.String, "sessions": pl.UInt32},
    )
    return pl.concat([pairs, singles, total]).select(
        pl.lit(training["day"].max()).alias("day"),
        pl.lit(TENANT).alias("tenant"),
        pl.lit(SURFACE).alias("surface"),
        "item_a",
        "item_b",
        pl.col("sessions").cast(pl.Int64),
    )


def build_targets(
    training: pl.DataFrame, root: Path, als_configs: dict[str, AlsConfig]
) -> dict[str, LoadedTarget]:
    """One served target per ALS setting, sharing the popularity, cooc and user_history artifacts."""
    config = PipelineConfig()
    as_of = training["day"].max()
    inputs = root / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    user_item = inputs / "user_item_daily.parquet"
    training.select(
        "day", "tenant", "surface", "user_id", "item_id", "weight", "events", "last_ts"
    ).write_parquet(user_item)
    item_daily = inputs / "item_daily.parquet"
    training.group_by("day", "tenant", "surface", "item_id").agg(
        pl.len().cast(pl.Int64).alias("events")
    ).select(
        "day", "tenant", "surface", "item_id", pl.lit("rating").alias("event_type"), "events"
    ).write_parquet(item_daily)
    pair_daily = inputs / "pair_daily.parquet"
    pair_counts(training).write_parquet(pair_daily)
    sources = {"popularity": item_daily, "cooc": pair_daily, "user_history": user_item}
    folder = target_dir(root / "artifacts", TENANT, SURFACE)
    paths: dict[str, Path] = {}
    for name, source in sources.items():
        kind = ARTIFACT_KINDS[name]
        rows = run_sql(kind.sql_model, {"paths": [str(source)]} | kind.sql_params(config, as_of))
        table = rows.select([pl.col(c).cast(t) for c, t in polars_schema(kind).items()])
        meta = {"kind": name, "tenant": TENANT, "surface": SURFACE, "as_of": as_of.isoformat()}
        paths[name] = write_artifact_dir(
            folder, name, meta | {"params": kind.params(config)}, {kind.table: table}
        )[1]
    als_rows = run_sql(
        "als_interactions", {"paths": [str(user_item)]} | ARTIFACT_KINDS["als"].sql_params(config, as_of)
    )
    targets = {}
    for label, als in als_configs.items():
        meta = {"kind": "als", "tenant": TENANT, "surface": SURFACE, "as_of": as_of.isoformat()}
        meta["params"] = dataclasses.asdict(als)
        als_path = write_artifact_dir(folder, "als", meta, train_als(als_rows, als))[1]
        targets[label] = load_built(root / "artifacts", TENANT, SURFACE, as_of, paths | {"als": als_path})
    return targets


def served(target: LoadedTarget, weights: BlendWeights, user: str, k: int) -> Sequence[str]:
    return recommender.recommend(target, user_id=user, k=k, exclude_seen=True, weights=weights).item_ids


class UserItems:
    """The training user x item matrix (1 per distinct pair), users and items sorted by id."""

    def __init__(self, training: pl.DataFrame) -> None:
        pairs = training.select("user_id", "item_id").unique()
        self.users = sorted(pairs["user_id"].unique().to_list())
        self.items = sorted(pairs["item_id"].unique().to_list())
        self.user_index = {u: i for i, u in enumerate(self.users)}
        rows = pairs["user_id"].cast(pl.Enum(self.users)).to_physical().to_numpy()
        cols = pairs["item_id"].cast(pl.Enum(self.items)).to_physical().to_numpy()
        data = np.ones(len(rows), dtype=np.float32)
        self.matrix = sp.csr_matrix((data, (rows, cols)), shape=(len(self.users), len(self.items)))
        self.matrix.sort_indices()


class BareAls:
    """implicit's CPU ALS on the same matrix and parameters, ranked by its own recommend()."""

    def __init__(self, data: UserItems, config: AlsConfig) -> None:
        from implicit.cpu.als import AlternatingLeastSquares

        self.data = data
        with threadpool_limits(1, "blas"):
            self.model = AlternatingLeastSquares(
                factors=config.factors,
                regularization=config.regularization,
                alpha=config.alpha,
                iterations=config.iterations,
                random_state=config.random_state,
                calculate_training_loss=False,
            )
            self.model.fit(data.matrix, show_progress=False)

    def __call__(self, user: str, k: int) -> Sequence[str]:
        row = self.data.user_index[user]
        ids, _ = self.model.recommend(row, self.data.matrix[row], N=k, filter_already_liked_items=True)
        return [self.data.items[i] for i in ids]


class ItemCosine:
    """Item-based CF: cosine item-item similarity over the training matrix; a user's score of an item is the
    sum of its similarities to the user's training items; seen items excluded, ties by item id."""

    def __init__(self, data: UserItems) -> None:
        self.data = data
        x = data.matrix
        norms = np.sqrt(np.asarray(x.sum(axis=0)).ravel())
        normalized = x @ sp.diags(1.0 / np.maximum(norms, 1e-12))
        # sum_j x_uj cos(j, i) = (X S)_ui with S = Xn^T Xn (Xn: columns scaled to unit norm): users x items.
        self.scores = np.asarray((x @ normalized.T @ normalized).todense())

    def __call__(self, user: str, k: int) -> Sequence[str]:
        row = self.data.user_index[user]
        scores = self.scores[row].copy()
        seen = self.data.matrix[row].indices
        scores[seen] = -np.inf
        order = np.lexsort((np.arange(len(scores)), -scores))[:k]
        return [self.data.items[i] for i in order if scores[i] > 0]


def tune(validation: Holdout, seed_config: AlsConfig) -> tuple[AlsConfig, list[tuple[AlsConfig, float]]]:
    """The grid's best ALS setting by nDCG@10 on `validation` (bare implicit ALS; ties: first tried)."""
    data = UserItems(validation.training)
    popularity = item_popularity(validation.training)
    tried = []
    for factors in GRID_FACTORS:
        for regularization in GRID_REGULARIZATION:
            for alpha in GRID_ALPHA:
                config = dataclasses.replace(
                    seed_config, factors=factors, regularization=regularization, alpha=alpha
                )
                result = evaluate_models(
                    {"als": BareAls(data, config)}, validation, K, len(data.items), popularity
                )
                tried.append((config, result.value("als", "all", "ndcg") or 0.0))
    best = max(tried, key=lambda pair: pair[1])[0]
    return best, tried


def evaluate_protocol(holdout: Holdout, validation: Holdout, workdir: Path) -> dict:
    default = AlsConfig()
    started = time.perf_counter()
    tuned, tried = tune(validation, default)
    tuning_seconds = time.perf_counter() - started
    targets = build_targets(holdout.training, workdir, {"default": default, "tuned": tuned})
    data = UserItems(holdout.training)
    blend = BlendWeights()
    models: dict[str, Ranker] = {
        "served popularity": functools.partial(served, targets["default"], SINGLE_SOURCES["popularity"]),
        "served cooc": functools.partial(served, targets["default"], SINGLE_SOURCES["cooc"]),
        "served ALS (default)": functools.partial(served, targets["default"], SINGLE_SOURCES["als"]),
        "served ALS (tuned)": functools.partial(served, targets["tuned"], SINGLE_SOURCES["als"]),
        "served blend (default ALS)": functools.partial(served, targets["default"], blend),
        "served blend (tuned ALS)": functools.partial(served, targets["tuned"], blend),
        "bare implicit ALS (default)": BareAls(data, default),
        "bare implicit ALS (tuned)": BareAls(data, tuned),
        "item-item cosine CF": ItemCosine(data),
    }
    result = evaluate_models(
        models, holdout, K, targets["default"].n_items, item_popularity(holdout.training)
    )
    return {
        "result": result,
        "tuned": tuned,
        "tried": tried,
        "tuning_seconds": tuning_seconds,
        "validation_users": len(validation.held_out),
        "holdout": holdout,
    }


def metrics_table(result: EvaluationResult) -> list[str]:
    lines = [
        "| model | " + " | ".join(METRIC_TITLES) + " |",
        "|---|" + "---:|" * len(METRIC_TITLES),
    ]
    for model in result.models:
        values = [result.value(model, "all", metric) for metric in METRIC_COLUMNS]
        lines.append(
            f"| {model} | " + " | ".join(f"{v:.4f}" if v is not None else "n/a" for v in values) + " |"
        )
    return lines


def target_checks(result: EvaluationResult) -> list[str]:
    p = {model: result.value(model, "all", "precision") or 0.0 for model in result.models}
    blend, bare, cooc = p["served blend (tuned ALS)"], p["bare implicit ALS (tuned)"], p["served cooc"]
    gap = (blend - bare) / bare if bare else float("nan")
    lift = (blend - cooc) / cooc if cooc else float("inf")
    slots = result.users["all"] * result.k
    lines = [
        "- served blend (tuned ALS) within 2% P@10 of bare tuned ALS (at most 2% below; above counts as met): "
        f"**{'met' if gap >= -0.02 else 'NOT MET'}** (blend {blend:.4f} vs bare {bare:.4f}: {gap:+.1%})",
        "- served blend (tuned ALS) >= 15% P@10 over served cooc-only: "
        f"**{'met' if lift >= 0.15 else 'NOT MET'}** (blend {blend:.4f} vs cooc {cooc:.4f}: {lift:+.1%})",
    ]
    if lift < 0.15:
        als, default_blend = p["served ALS (tuned)"], p["served blend (default ALS)"]
        default_lift = (default_blend - cooc) / cooc if cooc else float("inf")
        lines.append(
            f"  - why (measured): the tuned ALS alone scores P@10 {als:.4f} here, "
            f"{'below' if als < cooc else 'above'} cooc-only ({cooc:.4f}), so the ALS-led blend has little to "
            f"add; the blend with the default ALS scores {default_blend:.4f} ({default_lift:+.1%} over cooc). "
            f"P@10 is counted over {slots} recommended slots here: a difference of 0.01 is "
            f"{slots * 0.01:.1f} hits."
        )
    same = all(
        result.value("served ALS (tuned)", "all", m) == result.value("bare implicit ALS (tuned)", "all", m)
        and result.value("served ALS (default)", "all", m)
        == result.value("bare implicit ALS (default)", "all", m)
        for m in METRIC_COLUMNS
    )
    lines.append(
        "- served ALS only vs bare implicit ALS (same parameters): "
        + ("identical on every metric." if same else "the figures differ (see the table).")
    )
    return lines


def als_label(config: AlsConfig) -> str:
    return f"factors {config.factors}, regularization {config.regularization:g}, alpha {config.alpha:g}"


def section(title: str, protocol: str, outcome: dict) -> list[str]:
    result: EvaluationResult = outcome["result"]
    holdout: Holdout = outcome["holdout"]
    held = sum(len(items) for items in holdout.held_out.values())
    lines = [
        f"## {title}",
        "",
        protocol,
        "",
        f"Evaluated users: {result.users['all']} (cold start {result.users['cold_start']}, active "
        f"{result.users['active']}); held-out items: {held}; training rows: {holdout.training.height}; "
        f"catalog (coverage denominator): {result.catalog_size} items; popularity head: {result.head_size} items "
        f"({result.head_share:.0%} of training interactions). Metrics over all evaluated users, k = {result.k}.",
        "",
        *metrics_table(result),
        "",
        "Target checks (P@10):",
        "",
        *target_checks(result),
        "",
        f"ALS tuning: {len(outcome['tried'])} settings on the validation split "
        f"({outcome['validation_users']} users, {outcome['tuning_seconds']:.0f} s), "
        f"default = {als_label(AlsConfig())}, tuned = **{als_label(outcome['tuned'])}**.",
        "",
        "| factors | regularization | alpha | validation nDCG@10 |",
        "|---:|---:|---:|---:|",
    ]
    for config, ndcg in outcome["tried"]:
        lines.append(f"| {config.factors} | {config.regularization:g} | {config.alpha:g} | {ndcg:.4f} |")
    return [*lines, ""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--ratings", type=Path, help="MovieLens ratings.csv (default: shared/data beside the repo)"
    )
    parser.add_argument(
        "--seed", type=int, default=42, help="seed of the random split (default: %(default)s)"
    )
    parser.add_argument("--no-record", action="store_true", help="print only; do not rewrite docs/quality.md")
    args = parser.parse_args(argv)
    ratings_path = args.ratings or find_ratings()
    if ratings_path is None:
        print("MovieLens ratings.csv not found: pass --ratings", file=sys.stderr)
        return 2
    text = report(ratings_path, args.seed)
    print(text)
    if not args.no_record:
        DOC_PATH.write_text(text)
        print(f"\nwritten to {DOC_PATH.relative_to(REPO_ROOT)}")
    return 0


def report(ratings_path: Path, seed: int) -> str:
    """docs/quality.md's text: every figure measured on `ratings_path` (random split seeded by `seed`)."""
    started = time.perf_counter()
    rows = load_ratings(ratings_path)
    temporal = temporal_holdout(rows, holdout_days=TEMPORAL_HOLDOUT_DAYS)
    temporal_validation = temporal_holdout(temporal.training, holdout_days=TEMPORAL_HOLDOUT_DAYS)
    random = random_holdout(rows, test_fraction=TEST_FRACTION, seed=seed)
    random_validation = random_holdout(random.training, test_fraction=TEST_FRACTION, seed=seed + 1)
    last = rows["day"].max()
    first_test = last - dt.timedelta(days=TEMPORAL_HOLDOUT_DAYS - 1)
    first_validation = first_test - dt.timedelta(days=TEMPORAL_HOLDOUT_DAYS)
    with tempfile.TemporaryDirectory(prefix="recsys-quality-") as scratch:
        outcomes = {
            "temporal": evaluate_protocol(temporal, temporal_validation, Path(scratch) / "temporal"),
            "random": evaluate_protocol(random, random_validation, Path(scratch) / "random"),
        }
    seconds = time.perf_counter() - started
    protocols = {
        "temporal": (
            f"**Temporal holdout** (`holdout.temporal_holdout(rows, holdout_days={TEMPORAL_HOLDOUT_DAYS})`): "
            f"training = ratings of days up to {first_test - dt.timedelta(days=1)}, test = ratings of "
            f"{first_test}..{last} (the last {TEMPORAL_HOLDOUT_DAYS} days of the data set), kept only for users "
            "with training ratings, items not rated by the user in training and in the training catalog. "
            f"ALS validation: the same protocol inside the training data (train up to "
            f"{first_validation - dt.timedelta(days=1)}, validate on {first_validation}.."
            f"{first_test - dt.timedelta(days=1)}).",
        ),
        "random": (
            f"**Per-user stratified random split** (`holdout.random_holdout(rows, test_fraction={TEST_FRACTION}, "
            f"seed={seed})`): per user, floor(25%) of the user's distinct items, drawn at random, are the "
            "test set and the rest is training; training items are excluded from every list (exclude-seen). "
            f"ALS validation: `random_holdout(training, test_fraction={TEST_FRACTION}, seed={seed + 1})` "
            "inside the training data; the test set is never used to choose settings.",
        ),
    }
    text = "\n".join(
        [
            "# Offline quality",
            "",
            "What the served models find on MovieLens latest-small (100,836 ratings, 610 users, 9,742 movies), "
            "next to bare baselines, scored by the product's own offline evaluation. Produced by "
            f"`python -m benchmarks.quality --seed {seed}` on {dt.date.today().isoformat()} "
            f"(run time {seconds:.0f} s on a shared 2-core machine).",
            "",
            "## How the figures are made",
            "",
            "- **Interactions**: one row per rating, weight 1.0 whatever the rating value (the `rating` event's "
            "default interest weight, as `recsys import` turns a rating into one `rating` event); day = the "
            "rating's UTC date, session = the user's day (as the importer names MovieLens sessions).",
            "- **Served models**: the product's artifacts built from the training rows only, the window being "
            "the whole training period (not the 30-day default: MovieLens spans 22 years). popularity, "
            "user_history and the ALS input (`als_interactions`) come from the product's SQL models run over "
            "aggregate-shaped files made from the training rows; `cooc` is the product's SQL (cosine, "
            "min_support 2, top_k 50) over pair_daily-shaped counts computed here in polars the way "
            f"`pair_daily.sql` counts them (sessions capped to their first {MAX_SESSION_ITEMS} items by time, "
            "then item id); ALS is `transform.als.train_als`. Each is written with `write_artifact_dir`, "
            "loaded with `evaluation.offline.load_built` (the server's `load_target`) and ranked through "
            "`recsys_serving.recommender.recommend(exclude_seen=True)` with `BlendWeights`: popularity only, "
            "cooc only and ALS only as `evaluation.offline.SINGLE_SOURCES` (a 1e-6 popularity weight orders "
            "what the source leaves unscored), and the blend with the default weights "
            f"({BlendWeights()}).",
            "- **Baselines**: bare `implicit.cpu.als.AlternatingLeastSquares` with the same parameters on the "
            "same binary user x item matrix, ranked by its own `recommend(filter_already_liked_items=True)`; "
            "item-item cosine CF: cosine similarity of the item columns of that matrix, a user's score of an "
            "item = the sum of its similarities to the user's training items, seen items excluded, ties by "
            "item id.",
            "- **Scoring**: `evaluation.evaluate.evaluate_models` at k = 10; coverage = distinct recommended "
            "items / catalog; long-tail share = share of recommended slots outside the popularity head.",
            "- **Targets** (MovieLens, P@10): the served blend with the tuned ALS within 2% of bare tuned ALS, "
            "and at least 15% above served cooc-only.",
            "",
            *section("Temporal holdout", protocols["temporal"][0], outcomes["temporal"]),
            *section("Random 75/25 split", protocols["random"][0], outcomes["random"]),
        ]
    )
    return text


def run_benchmark(options: Options) -> Section:
    """`python -m benchmarks.run --only quality`: the same report (seeded by --seed) into docs/quality.md."""
    ratings_path = find_ratings()
    if ratings_path is None:
        raise BenchmarkError("MovieLens ratings.csv not found (set RECSYS_SHARED_DATA)")
    text = report(ratings_path, options.seed)
    if options.record:
        DOC_PATH.write_text(text)
    pointer = (
        "Offline quality (precision, recall, nDCG, MAP, hit rate, coverage, long-tail share on MovieLens): "
        "see [quality.md](quality.md)."
    )
    return Section(text=text, markdown=pointer)


BENCHMARK = Benchmark(
    "quality", "offline quality of the served models on MovieLens (docs/quality.md)", run_benchmark
)


def find_ratings() -> Path | None:
    configured = os.environ.get("RECSYS_SHARED_DATA")
    if configured:
        candidate = Path(configured) / "ml-latest-small" / "ratings.csv"
        return candidate if candidate.is_file() else None
    for folder in (REPO_ROOT, *REPO_ROOT.parents):
        candidate = folder / "shared" / "data" / "ml-latest-small" / "ratings.csv"
        if candidate.is_file():
            return candidate
    return None


if __name__ == "__main__":
    sys.exit(main())
