"""Offline quality on MovieLens latest-small and the OTTO sample: the served models next to bare baselines;
writes docs/quality.md.

`python -m benchmarks.quality [--ratings PATH] [--otto PATH] [--seed 42] [--trials 30] [--no-record]`

Both data sets become user_item_daily-shaped rows (`interaction_rows`: per day, user and item, the events'
`PipelineConfig.event_weights` summed, as `user_item_daily.sql` computes them from the events `recsys import`
writes). Per data set and protocol, the product's artifacts are built from the training rows only:
popularity, user_history and the ALS input through the product's own SQL models (`transform.sql.run_sql`),
co-occurrence through the product's `cooc` SQL over pair_daily-shaped counts made here (see `pair_counts`),
ALS through `transform.als.train_als`; each is written with `write_artifact_dir`, loaded with
`evaluation.offline.load_built` and ranked through the server's `recommender.recommend`
(`evaluation.offline.ranker`), and everything is scored by `evaluation.evaluate.evaluate_models`. The tuned
ALS parameters and blend weights are the choice of the product's tuner (`evaluation.tuning.search`), run on
a validation split carved from the training rows.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import polars as pl
import scipy.sparse as sp

from benchmarks.harness import Benchmark, BenchmarkError, Options, Section, fit_bare_als
from recsys_core.kinds import ARTIFACT_KINDS
from recsys_core.manifest import target_dir
from recsys_core.settings import AlsConfig, BlendWeights, PipelineConfig
from recsys_dagster.evaluation.evaluate import EvaluationResult, Ranker, evaluate_models
from recsys_dagster.evaluation.holdout import Holdout, item_popularity, random_holdout, temporal_holdout
from recsys_dagster.evaluation.offline import SINGLE_SOURCES, load_built, ranker
from recsys_dagster.evaluation.tuning import Candidate, Score, Trial, TuningResult, search
from recsys_dagster.ingest.importers import OTTO_EVENT_TYPES
from recsys_dagster.transform.als import train_als
from recsys_dagster.transform.artifact_dir import write_artifact_dir
from recsys_dagster.transform.artifacts import polars_schema
from recsys_dagster.transform.sql import run_sql
from recsys_serving.store import LoadedTarget

REPO_ROOT = Path(__file__).resolve().parent.parent
DOC_PATH = REPO_ROOT / "docs" / "quality.md"
CONFIG = PipelineConfig()
K = 10
METRIC = "ndcg"  # the tuning objective (guardrails.metric's default), at K
TEST_FRACTION = 0.25
MAX_SESSION_ITEMS = CONFIG.artifacts.cooc.max_session_items
TUNING_TABLE_ROWS = 10
METRIC_COLUMNS = ("precision", "recall", "ndcg", "map", "hit_rate", "coverage", "long_tail_share")
METRIC_TITLES = ("P@10", "R@10", "nDCG@10", "MAP@10", "HR@10", "coverage", "long-tail share")
USER_ITEM_COLUMNS = ("day", "tenant", "surface", "user_id", "item_id", "weight", "events", "last_ts")


@dataclass(frozen=True)
class DataSet:
    """One data set's interactions: user_item_daily-shaped `rows` (plus `first_ts`, the day's first event of
    the pair, which orders a session's items for co-occurrence) and, per row, its events by type (`typed`:
    day, user_id, item_id, event_type, events; the item_daily counts popularity is computed from)."""

    name: str
    tenant: str
    surface: str
    rows: pl.DataFrame
    typed: pl.DataFrame
    # The temporal protocol's test period (and, inside the training data, its validation period).
    holdout_days: int
    # Whether the targets are checked on it (they are stated for MovieLens).
    targets: bool
    sizes: str


def interaction_rows(events: pl.DataFrame, tenant: str, surface: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Events (ts: UTC datetime, user_id, item_id, event_type, value) -> (user_item_daily rows, typed rows).

    As `user_item_daily.sql`: per day (UTC), user and item, weight = sum of each event's type weight
    (`PipelineConfig.event_weights`; types of weight 0 do not count) x clamp(value / scale, 0, 1) for the types
    of `event_value_scales` (1 without a value), events = their number, last_ts = the latest; exact duplicate
    events count once, as canonicalization drops them."""
    weights = CONFIG.interest_weights()
    scale = pl.col("event_type").replace_strict(CONFIG.value_scales(), default=None)
    share = (
        pl.when(scale.is_null() | pl.col("value").is_null())
        .then(1.0)
        .otherwise((pl.col("value") / scale).clip(0.0, 1.0))
    )
    typed = (
        events.unique()
        .filter(pl.col("event_type").is_in(list(weights)))
        .with_columns(pl.col("ts").dt.date().alias("day"), share.alias("share"))
        .group_by("day", "user_id", "item_id", "event_type")
        .agg(
            pl.len().cast(pl.Int64).alias("events"),
            pl.col("share").sum().alias("scaled_events"),
            pl.col("ts").min().alias("first_ts"),
            pl.col("ts").max().alias("last_ts"),
        )
        .with_columns(
            (pl.col("scaled_events") * pl.col("event_type").replace_strict(weights)).alias("weight")
        )
        .sort("day", "user_id", "item_id", "event_type")
    )
    rows = (
        typed.group_by("day", "user_id", "item_id", maintain_order=True)
        .agg(
            pl.col("weight").sum().cast(pl.Float64),
            pl.col("events").sum().cast(pl.Int64),
            pl.col("last_ts").max(),
            pl.col("first_ts").min(),
        )
        .select(
            "day",
            pl.lit(tenant).alias("tenant"),
            pl.lit(surface).alias("surface"),
            "user_id",
            "item_id",
            "weight",
            "events",
            "last_ts",
            "first_ts",
        )
    )
    return rows, typed.select("day", "user_id", "item_id", "event_type", "events", "scaled_events")


def load_ratings(path: Path) -> DataSet:
    """MovieLens ratings.csv: one `rating` event per rating (as `recsys import` writes them)."""
    ratings = pl.read_csv(path)
    events = ratings.select(
        pl.from_epoch("timestamp", time_unit="s").dt.replace_time_zone("UTC").alias("ts"),
        pl.col("userId").cast(pl.String).alias("user_id"),
        pl.col("movieId").cast(pl.String).alias("item_id"),
        pl.lit("rating").alias("event_type"),
        pl.col("rating").cast(pl.Float64).alias("value"),
    )
    rows, typed = interaction_rows(events, "movielens", "ratings")
    sizes = (
        f"{ratings.height:,} ratings, {ratings['userId'].n_unique():,} users, "
        f"{ratings['movieId'].n_unique():,} rated movies, {rows['day'].min()}..{rows['day'].max()}"
    )
    return DataSet("MovieLens latest-small", "movielens", "ratings", rows, typed, 365, True, sizes)


def load_otto(path: Path) -> DataSet:
    """OTTO session JSONL: session = user, item = aid, clicks/carts/orders as the importer maps them."""
    records = []
    for line in path.read_bytes().splitlines():
        if line.strip():
            session = orjson.loads(line)
            records += [(session["session"], e["aid"], e["ts"], e["type"]) for e in session["events"]]
    raw = pl.DataFrame(records, schema=["session", "aid", "ts", "type"], orient="row")
    events = raw.select(
        pl.from_epoch("ts", time_unit="ms").dt.replace_time_zone("UTC").alias("ts"),
        pl.col("session").cast(pl.String).alias("user_id"),
        pl.col("aid").cast(pl.String).alias("item_id"),
        pl.col("type").replace_strict(OTTO_EVENT_TYPES).alias("event_type"),
        pl.lit(None, pl.Float64).alias("value"),
    )
    rows, typed = interaction_rows(events, "otto", "sessions")
    counts = ", ".join(f"{n} {kind}" for kind, n in raw["type"].value_counts(sort=True).rows())
    sizes = (
        f"{raw['session'].n_unique()} sessions, {raw.height} events ({counts}), {raw['aid'].n_unique()} items, "
        f"{rows['day'].min()}..{rows['day'].max()}"
    )
    return DataSet("OTTO sample", "otto", "sessions", rows, typed, 7, False, sizes)


def pair_counts(training: pl.DataFrame, tenant: str, surface: str) -> pl.DataFrame:
    """pair_daily-shaped rows summed over the training days. pair_daily counts the sessions of a day: a
    session here is a user's day (MovieLens: as the importer names its sessions; OTTO: the importer's session
    is the user, and a session spanning days counts once a day), capped to its first `max_session_items`
    items by (first event time, item id)."""
    items = (
        training.with_columns(pl.concat_str("user_id", pl.col("day").cast(pl.String)).alias("session"))
        .group_by("session", "item_id")
        .agg(pl.col("first_ts").min())
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
        pl.lit(tenant).alias("tenant"),
        pl.lit(surface).alias("surface"),
        "item_a",
        "item_b",
        pl.col("sessions").cast(pl.Int64),
    )


@dataclass(frozen=True)
class Built:
    """The artifacts of one training frame that no tuned parameter changes, and the ALS input's file."""

    data: DataSet
    root: Path
    as_of: dt.date
    paths: dict[str, Path]
    user_item: Path

    def target(self, als: AlsConfig) -> LoadedTarget:
        """The served target with an `als` artifact trained with `als`, as the pipeline builds it."""
        config = with_als(als)
        kind = ARTIFACT_KINDS["als"]
        rows = run_sql(kind.sql_model, {"paths": [str(self.user_item)]} | kind.sql_params(config, self.as_of))
        path = write_artifact_dir(self.folder, "als", self.meta("als", config), train_als(rows, als))[1]
        return load_built(
            self.artifacts, self.data.tenant, self.data.surface, self.as_of, self.paths | {"als": path}
        )

    def meta(self, kind: str, config: PipelineConfig) -> dict[str, Any]:
        data = self.data
        return {
            "kind": kind,
            "tenant": data.tenant,
            "surface": data.surface,
            "as_of": self.as_of.isoformat(),
            "params": ARTIFACT_KINDS[kind].params(config),
        }

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    @property
    def folder(self) -> Path:
        return target_dir(self.artifacts, self.data.tenant, self.data.surface)


def with_als(als: AlsConfig) -> PipelineConfig:
    return dataclasses.replace(CONFIG, artifacts=dataclasses.replace(CONFIG.artifacts, als=als))


def build_fixed(data: DataSet, training: pl.DataFrame, root: Path) -> Built:
    """popularity, cooc and user_history from `training` (the window = the whole training period)."""
    as_of = training["day"].max()
    inputs = root / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    user_item = inputs / "user_item_daily.parquet"
    training.select(USER_ITEM_COLUMNS).write_parquet(user_item)
    item_daily = inputs / "item_daily.parquet"
    (
        data.typed.join(
            training.select("day", "user_id", "item_id"), on=["day", "user_id", "item_id"], how="semi"
        )
        .group_by("day", "item_id", "event_type")
        .agg(pl.col("events").sum().cast(pl.Int64), pl.col("scaled_events").sum())
        .select(
            "day",
            pl.lit(data.tenant).alias("tenant"),
            pl.lit(data.surface).alias("surface"),
            "item_id",
            "event_type",
            "events",
            "scaled_events",
        )
        .write_parquet(item_daily)
    )
    pair_daily = inputs / "pair_daily.parquet"
    pair_counts(training, data.tenant, data.surface).write_parquet(pair_daily)
    built = Built(data, root, as_of, {}, user_item)
    sources = {"popularity": item_daily, "cooc": pair_daily, "user_history": user_item}
    for name, source in sources.items():
        kind = ARTIFACT_KINDS[name]
        rows = run_sql(kind.sql_model, {"paths": [str(source)]} | kind.sql_params(CONFIG, as_of))
        table = rows.select([pl.col(c).cast(t) for c, t in polars_schema(kind).items()])
        built.paths[name] = write_artifact_dir(
            built.folder, name, built.meta(name, CONFIG), {kind.table: table}
        )[1]
    return built


def validation_score(built: Built, validation: Holdout, candidate: Candidate) -> Score:
    """The tuning objective: the candidate's served blend and ALS alone, nDCG@10 on the validation split."""
    target = built.target(candidate.als)
    models = {"blend": ranker(target, candidate.blend), "als": ranker(target, SINGLE_SOURCES["als"])}
    result = evaluate_models(models, validation, K, target.n_items, item_popularity(validation.training))
    return Score(
        blend=result.value("blend", "all", METRIC) or 0.0,
        als=result.value("als", "all", METRIC) or 0.0,
        users=len(validation.held_out),
    )


class UserItems:
    """A training user x item matrix, users and items sorted by id: 1 per distinct pair, or with `als` the
    ALS input's values computed here (each row's weight decayed by `als.half_life_days` before the last
    training day, summed per pair, log(1 + x) for `confidence: log`)."""

    def __init__(self, training: pl.DataFrame, als: AlsConfig | None = None) -> None:
        if als is None:
            pairs = training.select("user_id", "item_id").unique().with_columns(pl.lit(1.0).alias("value"))
        else:
            age = (training["day"].max() - pl.col("day")).dt.total_days().cast(pl.Float64)
            decay = pl.lit(0.5).pow(age / als.half_life_days) if als.half_life_days > 0 else pl.lit(1.0)
            pairs = training.group_by("user_id", "item_id").agg(
                (pl.col("weight") * decay).sum().alias("value")
            )
            if als.confidence == "log":
                pairs = pairs.with_columns(pl.col("value").log1p())
        self.users = sorted(pairs["user_id"].unique().to_list())
        self.items = sorted(pairs["item_id"].unique().to_list())
        self.user_index = {u: i for i, u in enumerate(self.users)}
        rows = pairs["user_id"].cast(pl.Enum(self.users)).to_physical().to_numpy()
        cols = pairs["item_id"].cast(pl.Enum(self.items)).to_physical().to_numpy()
        data = pairs["value"].to_numpy().astype(np.float32)
        self.matrix = sp.csr_matrix((data, (rows, cols)), shape=(len(self.users), len(self.items)))
        self.matrix.sort_indices()


class BareAls:
    """implicit's CPU ALS with the same parameters on the same values, ranked by its own recommend()."""

    def __init__(self, training: pl.DataFrame, config: AlsConfig) -> None:
        self.data = UserItems(training, config)
        self.model = fit_bare_als(self.data.matrix, config)

    def __call__(self, user: str, k: int) -> Sequence[str]:
        row = self.data.user_index[user]
        ids, _ = self.model.recommend(row, self.data.matrix[row], N=k, filter_already_liked_items=True)
        return [self.data.items[i] for i in ids]


class ItemCosine:
    """Item-based CF: cosine item-item similarity over the binary training matrix; a user's score of an item
    is the sum of its similarities to the user's training items; seen items excluded, ties by item id."""

    def __init__(self, training: pl.DataFrame) -> None:
        self.data = UserItems(training)
        x = self.data.matrix
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


@dataclass(frozen=True)
class Outcome:
    data: DataSet
    holdout: Holdout
    validation: Holdout
    # None when the validation split has no user to score a trial on (the defaults are then "tuned").
    tuning: TuningResult | None
    tuning_seconds: float
    result: EvaluationResult


def default_candidate() -> Candidate:
    return Candidate(CONFIG.artifacts.als, CONFIG.blend)


def evaluate_protocol(
    data: DataSet, holdout: Holdout, validation: Holdout, workdir: Path, trials: int, label: str
) -> Outcome:
    started = time.perf_counter()
    default = default_candidate()
    tuning = None
    if validation.held_out:
        built = build_fixed(data, validation.training, workdir / "validation")
        objective = functools.partial(validation_score, built, validation)
        tuning = search(objective, default, trials, CONFIG.tuning.seed, functools.partial(progress, label))
    tuned = tuning.best.candidate if tuning else default
    tuning_seconds = time.perf_counter() - started
    built = build_fixed(data, holdout.training, workdir / "test")
    targets = {"default": built.target(default.als), "tuned": built.target(tuned.als)}
    training = holdout.training
    models: dict[str, Ranker] = {
        "served popularity": ranker(targets["default"], SINGLE_SOURCES["popularity"]),
        "served cooc": ranker(targets["default"], SINGLE_SOURCES["cooc"]),
        "served ALS (default)": ranker(targets["default"], SINGLE_SOURCES["als"]),
        "served ALS (tuned)": ranker(targets["tuned"], SINGLE_SOURCES["als"]),
        "served blend (default)": ranker(targets["default"], default.blend),
        "served blend (tuned)": ranker(targets["tuned"], tuned.blend),
        "served blend (tuned ALS, default weights)": ranker(targets["tuned"], default.blend),
        "bare implicit ALS (default)": BareAls(training, default.als),
        "bare implicit ALS (tuned)": BareAls(training, tuned.als),
        "item-item cosine CF": ItemCosine(training),
    }
    result = evaluate_models(models, holdout, K, targets["default"].n_items, item_popularity(training))
    return Outcome(data, holdout, validation, tuning, tuning_seconds, result)


def progress(label: str, trial: Trial, best: Trial) -> None:
    print(
        f"{label} trial {trial.number}: blend {METRIC}@{K} {trial.score.blend:.4f} (ALS {trial.score.als:.4f}, "
        f"{trial.seconds:.1f} s); best so far trial {best.number} ({best.score.blend:.4f})",
        file=sys.stderr,
    )


# ------------------------------------------------------------------------------------------ the report


def fmt(value: float | None) -> str:
    return f"{value:.4f}" if value is not None else "n/a"


def metrics_table(result: EvaluationResult) -> list[str]:
    lines = [
        "| model | " + " | ".join(METRIC_TITLES) + " |",
        "|---|" + "---:|" * len(METRIC_TITLES),
    ]
    for model in result.models:
        values = [result.value(model, "all", metric) for metric in METRIC_COLUMNS]
        lines.append(f"| {model} | " + " | ".join(fmt(v) for v in values) + " |")
    return lines


def target_checks(result: EvaluationResult) -> list[str]:
    # Rounded: equal precisions summed in a different order must compare equal (no "-0.0%").
    p = {model: round(result.value(model, "all", "precision") or 0.0, 12) for model in result.models}
    blend, bare, cooc = p["served blend (tuned)"], p["bare implicit ALS (tuned)"], p["served cooc"]
    gap = (blend - bare) / bare if bare else float("nan")
    lift = (blend - cooc) / cooc if cooc else float("inf")
    slots = result.users["all"] * result.k
    lines = [
        "- served blend (tuned) within 2% P@10 of bare tuned ALS (at most 2% below; above counts as met): "
        f"**{'met' if gap >= -0.02 else 'NOT MET'}** (blend {blend:.4f} vs bare {bare:.4f}: {gap:+.1%})",
        "- served blend (tuned) >= 15% P@10 over served cooc-only: "
        f"**{'met' if lift >= 0.15 else 'NOT MET'}** (blend {blend:.4f} vs cooc {cooc:.4f}: {lift:+.1%})",
    ]
    if gap < -0.02 or lift < 0.15:
        als, default_blend = p["served ALS (tuned)"], p["served blend (default)"]
        weights_only = p["served blend (tuned ALS, default weights)"]
        lines.append(
            f"  - why (measured): the tuned ALS alone scores P@10 {als:.4f} here ({'below' if als < cooc else 'above'} "
            f"cooc-only's {cooc:.4f}); the tuned ALS with the default blend weights {weights_only:.4f}; the "
            f"default blend {default_blend:.4f}. The tuner picks by validation nDCG@10, not test P@10, and the "
            f"validation and test users differ. P@10 is counted over {slots} recommended slots here: a difference "
            f"of 0.01 is {slots * 0.01:.1f} hits."
        )
    return lines


def identical_check(result: EvaluationResult) -> str:
    same = {
        label: all(
            result.value(f"served ALS ({label})", "all", m)
            == result.value(f"bare implicit ALS ({label})", "all", m)
            for m in METRIC_COLUMNS
        )
        for label in ("default", "tuned")
    }
    verdict = "; ".join(
        f"{label}: {'identical on every metric' if same[label] else 'the figures differ (see the table)'}"
        for label in same
    )
    return f"- served ALS only vs bare implicit ALS (same parameters, same matrix values): {verdict}."


def als_label(als: AlsConfig) -> str:
    return (
        f"factors {als.factors}, regularization {als.regularization:g}, alpha {als.alpha:g}, iterations "
        f"{als.iterations}, confidence {als.confidence}, half-life {als.half_life_days:g} days"
    )


def blend_label(blend: BlendWeights) -> str:
    return f"als {blend.als:g}, cooc {blend.cooc:g}, popularity {blend.popularity:g}"


def tuning_lines(outcome: Outcome) -> list[str]:
    tuning = outcome.tuning
    if tuning is None:
        return [
            "Tuning: **not run**: the validation split leaves no user with a held-out item in the training "
            'catalog, so there is nothing to score a trial on; "tuned" = the defaults.',
            "",
        ]
    best = tuning.best
    lines = [
        f"Tuning: `evaluation.tuning.search`, {len(tuning.trials)} trials (seed {CONFIG.tuning.seed}), objective = "
        f"served blend {METRIC}@{K} on the validation split ({best.score.users} "
        f"user{'s' if best.score.users != 1 else ''}, "
        f"{outcome.tuning_seconds:.0f} s including the artifacts' builds). Chosen: trial {best.number}: "
        f"**{als_label(best.candidate.als)}; blend {blend_label(best.candidate.blend)}** "
        f"(validation blend {best.score.blend:.4f} against {tuning.baseline.score.blend:.4f} for trial 1, "
        "the defaults).",
        "",
        f"Top {TUNING_TABLE_ROWS} trials by the objective, and trial 1 (the product's defaults):",
        "",
        "| trial | factors | regularization | alpha | iterations | confidence | half-life days | blend cooc "
        f"| blend popularity | blend {METRIC}@{K} | ALS {METRIC}@{K} |",
        "|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    ranked = sorted(tuning.trials, key=lambda t: (-t.score.blend, t.number))[:TUNING_TABLE_ROWS]
    if tuning.baseline not in ranked:
        ranked.append(tuning.baseline)
    for t in ranked:
        als, blend = t.candidate.als, t.candidate.blend
        mark = " (chosen)" if t.number == best.number else ""
        lines.append(
            f"| {t.number}{mark} | {als.factors} | {als.regularization:g} | {als.alpha:g} | {als.iterations} | "
            f"{als.confidence} | {als.half_life_days:g} | {blend.cooc:g} | {blend.popularity:g} | "
            f"{t.score.blend:.4f} | {t.score.als:.4f} |"
        )
    return [*lines, ""]


def section(title: str, protocol: str, outcome: Outcome) -> list[str]:
    result, holdout = outcome.result, outcome.holdout
    held = sum(len(items) for items in holdout.held_out.values())
    lines = [f"## {title}", "", protocol, ""]
    sizes = f"Training rows: {holdout.training.height}; held-out items: {held}; evaluated users: {result.users['all']}"
    if not result.users["all"]:
        return [
            *lines,
            sizes
            + ". **No evaluable user**: no user has a held-out item that is new to them and in the training "
            "catalog, so this protocol gives no figure on this data set.",
            "",
            *tuning_lines(outcome),
        ]
    lines += [
        f"{sizes} (cold start {result.users['cold_start']}, active {result.users['active']}); catalog (coverage "
        f"denominator): {result.catalog_size} items; popularity head: {result.head_size} items "
        f"({result.head_share:.0%} of training interactions). Metrics over all evaluated users, k = {result.k}.",
        "",
        *metrics_table(result),
        "",
    ]
    if outcome.data.targets:
        lines += ["Target checks (P@10):", "", *target_checks(result), identical_check(result), ""]
    else:
        lines += [
            "No target is checked on this data set (the figures are a smoke test).",
            "",
            identical_check(result),
            "",
        ]
    return [*lines, *tuning_lines(outcome)]


def protocol_texts(data: DataSet, seed: int) -> dict[str, str]:
    rows, days = data.rows, data.holdout_days
    last = rows["day"].max()
    first_test = last - dt.timedelta(days=days - 1)
    first_validation = first_test - dt.timedelta(days=days)
    return {
        "temporal": (
            f"**Temporal holdout** (`holdout.temporal_holdout(rows, holdout_days={days})`): training = the "
            f"days up to {first_test - dt.timedelta(days=1)}, test = {first_test}..{last} (the last {days} "
            "days of the data set), kept only for users with training interactions, items new to the user and "
            "in the training catalog. Validation (tuning): the same protocol inside the training data "
            f"(`temporal_holdout(training, holdout_days={days}, as_of={first_test - dt.timedelta(days=1)})`: "
            f"train up to {first_validation - dt.timedelta(days=1)}, validate on {first_validation}.."
            f"{first_test - dt.timedelta(days=1)})."
        ),
        "random": (
            f"**Per-user stratified random split** (`holdout.random_holdout(rows, test_fraction={TEST_FRACTION}, "
            f"seed={seed})`): per user, floor(25%) of the user's distinct items, drawn at random, are the test "
            "set and the rest is training; training items are excluded from every list (exclude-seen). "
            f"Validation (tuning): `random_holdout(training, test_fraction={TEST_FRACTION}, seed={seed + 1})` "
            "inside the training data; the test set never chooses settings."
        ),
    }


def data_outcomes(data: DataSet, seed: int, trials: int, scratch: Path) -> dict[str, Outcome]:
    rows, days = data.rows, data.holdout_days
    temporal = temporal_holdout(rows, holdout_days=days)
    last_training_day = rows["day"].max() - dt.timedelta(days=days)
    temporal_validation = temporal_holdout(temporal.training, holdout_days=days, as_of=last_training_day)
    random = random_holdout(rows, test_fraction=TEST_FRACTION, seed=seed)
    random_validation = random_holdout(random.training, test_fraction=TEST_FRACTION, seed=seed + 1)
    return {
        "temporal": evaluate_protocol(
            data,
            temporal,
            temporal_validation,
            scratch / data.tenant / "temporal",
            trials,
            f"{data.tenant} temporal",
        ),
        "random": evaluate_protocol(
            data, random, random_validation, scratch / data.tenant / "random", trials, f"{data.tenant} random"
        ),
    }


def report(ratings_path: Path, otto_path: Path, seed: int, trials: int) -> str:
    """docs/quality.md's text: every figure measured on the two data sets (random splits seeded by `seed`)."""
    started = time.perf_counter()
    sets = [load_ratings(ratings_path), load_otto(otto_path)]
    with tempfile.TemporaryDirectory(prefix="recsys-quality-") as scratch:
        outcomes = {data.tenant: data_outcomes(data, seed, trials, Path(scratch)) for data in sets}
    seconds = time.perf_counter() - started
    default = default_candidate()
    command = f"python -m benchmarks.quality --seed {seed} --trials {trials}"
    body = []
    for data in sets:
        texts = protocol_texts(data, seed)
        prefix = data.name if data.targets else f"{data.name} (smoke test)"
        body += [
            *section(f"{prefix}: temporal holdout", texts["temporal"], outcomes[data.tenant]["temporal"]),
            *section(f"{prefix}: random 75/25 split", texts["random"], outcomes[data.tenant]["random"]),
        ]
    return "\n".join(
        [
            "# Offline quality",
            "",
            "What the served models find on MovieLens latest-small and on the OTTO sample, next to bare "
            "baselines, scored by the product's own offline evaluation, with ALS parameters and blend weights "
            f"chosen by the product's tuner. Produced by `{command}` on {dt.date.today().isoformat()} (run time "
            f"{seconds:.0f} s on a shared {os.cpu_count()}-core machine).",
            "",
            "## Data",
            "",
            f"- **MovieLens latest-small** ({sets[0].sizes}). F. M. Harper and J. A. Konstan, 2015, *The "
            "MovieLens Datasets: History and Context*, ACM TiiS 5(4); GroupLens terms: research use, no "
            "commercial use.",
            f"- **OTTO sample** ({sets[1].sizes}): the first 20 sessions of the OTTO e-commerce data set "
            "(`otto-de/recsys-dataset`), CC BY 4.0, (c) OTTO (GmbH & Co KG). **Tiny: its figures are a smoke "
            "test that the whole path runs on session data with clicks, carts and orders, not evidence of "
            "quality.** Almost every item occurs in one session only, so little can be learned or held out.",
            "",
            "## How the figures are made",
            "",
            "- **Interactions**: the rows of the product's `user_item_daily` aggregate, computed from the events "
            "`recsys import` writes: per UTC day, user and item, weight = the events' default `event_weights` "
            f"summed ({', '.join(f'{t} {w:g}' for t, w in CONFIG.interest_weights().items())}). MovieLens: one "
            "`rating` event per rating (weight 1 whatever the rating value), day = the rating's date, session = "
            "the user's day (as the importer names MovieLens sessions). OTTO: session = user, item = aid, "
            "clicks / carts / orders -> click / add_to_cart / purchase (as the importer maps them); pair counts "
            "take a user's day as the session, as the daily `pair_daily` aggregate does.",
            "- **Served models**: the product's artifacts built from the training rows only, the window being "
            "the whole training period (not the 30-day default: MovieLens spans 22 years). popularity, "
            "user_history and the ALS input (`als_interactions`, which applies `half_life_days` before the last "
            "training day) come from the product's SQL models run over aggregate-shaped files made from the "
            "training rows; `cooc` is the product's SQL (cosine, min_support 2, top_k 50) over "
            "pair_daily-shaped counts computed here in polars the way `pair_daily.sql` counts them (sessions "
            f"capped to their first {MAX_SESSION_ITEMS} items by time, then item id); ALS is "
            "`transform.als.train_als`. Each is written with `write_artifact_dir`, loaded with "
            "`evaluation.offline.load_built` (the server's `load_target`) and ranked through "
            "`recsys_serving.recommender.recommend(exclude_seen=True)` (`evaluation.offline.ranker`) with "
            "`BlendWeights`: popularity only, cooc only and ALS only as `evaluation.offline.SINGLE_SOURCES` (a "
            "1e-6 popularity weight orders what the source leaves unscored), and the blend.",
            f"- **Tuning**: the product's tuner, `evaluation.tuning.search` (optuna TPE, seed "
            f"{CONFIG.tuning.seed}), {trials} trials per data set and protocol"
            f"{' (the `tuning.trials` default)' if trials == CONFIG.tuning.trials else ''}, "
            "trial 1 = the product's defaults (ALS "
            f"{als_label(default.als)}; blend {blend_label(default.blend)}). It searches the ALS factors, "
            "regularization, alpha, iterations, confidence and half-life, and the blend's cooc and popularity "
            "weights (ALS's at 1). Each trial's objective is computed here as the product's tuning computes it: "
            "popularity, cooc and user_history built once from the validation split's training rows, the "
            "trial's `als` artifact built on them as above, and the served blend's nDCG@10 with the trial's "
            "weights (ALS alone's nDCG@10 recorded beside it) over the validation split's users. The test "
            "split never chooses a setting. Tuned = the best trial: served ALS (tuned) and bare implicit ALS "
            "(tuned) use its ALS parameters, served blend (tuned) its ALS parameters and its blend weights; "
            "served blend (tuned ALS, default weights) separates the two.",
            "- **Baselines**: bare `implicit.cpu.als.AlternatingLeastSquares` with the same factors, "
            "regularization, alpha, iterations and seed on the same user x item values, computed here with "
            "polars (each row's weight decayed by the same half-life before the last training day, summed per "
            "pair, log(1 + x) for `confidence: log`), ranked by its own "
            "`recommend(filter_already_liked_items=True)`; nothing the tuner searches is beyond it. Item-item "
            "cosine CF: cosine similarity of the item columns of the binary user x item matrix, a user's score "
            "of an item = the sum of its similarities to the user's training items, seen items excluded, ties by "
            "item id.",
            "- **Scoring**: `evaluation.evaluate.evaluate_models` at k = 10; coverage = distinct recommended "
            "items / catalog; long-tail share = share of recommended slots outside the popularity head.",
            "- **Targets** (MovieLens, P@10): the served blend (tuned) within 2% of bare tuned ALS, and at least "
            "15% above served cooc-only.",
            "",
            *body,
            "## Commands",
            "",
            f"- `{command}` (both data sets; `--ratings` and `--otto` name the files when they are not under "
            "`shared/data/` beside the repository or `$RECSYS_SHARED_DATA`; `--no-record` prints without "
            "rewriting this page; per-trial progress goes to stderr).",
            "- `python -m benchmarks.run --only quality --seed 42` runs the same report as the `quality` "
            "benchmark.",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--ratings", type=Path, help="MovieLens ratings.csv (default: shared data beside the repo)"
    )
    parser.add_argument(
        "--otto", type=Path, help="OTTO sample train.jsonl (default: shared data beside the repo)"
    )
    parser.add_argument(
        "--seed", type=int, default=42, help="seed of the random split (default: %(default)s)"
    )
    parser.add_argument(
        "--trials",
        type=int,
        default=CONFIG.tuning.trials,
        help="tuning trials per search (default: %(default)s)",
    )
    parser.add_argument("--no-record", action="store_true", help="print only; do not rewrite docs/quality.md")
    args = parser.parse_args(argv)
    ratings_path = args.ratings or find_data(RATINGS)
    otto_path = args.otto or find_data(OTTO)
    if ratings_path is None or otto_path is None:
        print("data not found: pass --ratings and --otto (or set RECSYS_SHARED_DATA)", file=sys.stderr)
        return 2
    text = report(ratings_path, otto_path, args.seed, args.trials)
    print(text)
    if not args.no_record:
        write_doc(text)
        print(f"\nwritten to {DOC_PATH.relative_to(REPO_ROOT)}")
    return 0


def write_doc(text: str) -> None:
    """docs/quality.md = `text`, followed by the sections other benchmarks record in it (diversity)."""
    kept = ""
    if DOC_PATH.exists():
        current = DOC_PATH.read_text()
        if "<!-- bench:" in current:
            kept = "\n\n" + current[current.index("<!-- bench:") :].strip() + "\n"
    DOC_PATH.write_text(text.rstrip("\n") + "\n" + kept)


def run_benchmark(options: Options) -> Section:
    """`python -m benchmarks.run --only quality`: the same report (seeded by --seed) into docs/quality.md."""
    ratings_path, otto_path = find_data(RATINGS), find_data(OTTO)
    if ratings_path is None or otto_path is None:
        raise BenchmarkError("MovieLens ratings.csv or the OTTO sample not found (set RECSYS_SHARED_DATA)")
    text = report(ratings_path, otto_path, options.seed, CONFIG.tuning.trials)
    if options.record:
        write_doc(text)
    pointer = (
        "Offline quality (precision, recall, nDCG, MAP, hit rate, coverage, long-tail share on MovieLens and "
        "the OTTO sample, with tuned ALS and blend): see [quality.md](quality.md)."
    )
    return Section(text=text, markdown=pointer)


BENCHMARK = Benchmark(
    "quality",
    "offline quality of the served models on MovieLens and the OTTO sample (docs/quality.md)",
    run_benchmark,
)

RATINGS = Path("ml-latest-small") / "ratings.csv"
OTTO = Path("otto-sample") / "train.jsonl"


def find_data(relative: Path) -> Path | None:
    """`relative` under $RECSYS_SHARED_DATA, or under shared/data in the repository or a folder above it."""
    configured = os.environ.get("RECSYS_SHARED_DATA")
    if configured:
        candidate = Path(configured) / relative
        return candidate if candidate.is_file() else None
    for folder in (REPO_ROOT, *REPO_ROOT.parents):
        candidate = folder / "shared" / "data" / relative
        if candidate.is_file():
            return candidate
    return None


if __name__ == "__main__":
    sys.exit(main())
