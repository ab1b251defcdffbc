"""The SQL files of dbt_like_sql/ run unchanged when pasted into DuckDB after `SET VARIABLE` statements.

"Pasted" means the text `paste_script` (or `recsys sql`) prints, run as one script on a fresh in-memory
connection: the DuckDB engine runs its statements one after the other, as the DuckDB CLI does with pasted
text, and `SET VARIABLE` values only reach the query through the text, never through Python. The CLI binary
itself is not a dependency of the project, so it is not driven here.

The data: a few days of generated events, canonicalized and aggregated by the pipeline's own functions
under a configuration that departs from the defaults (so that a printed block that used a default gives
other rows), plus canonical rows that break the checks, so that no comparison is of empty results.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from recsys_cli import cli
from recsys_core.kinds import ARTIFACT_KINDS, WINDOW_KINDS
from recsys_core.lake import AGGREGATE_FILE, parquet_files, partition_dir
from recsys_core.settings import Settings, load_settings
from recsys_dagster.ingest.canonicalize import canonicalize_partition
from recsys_dagster.ingest.gates import run_gates
from recsys_dagster.ingest.generate import generate_events
from recsys_dagster.transform.aggregates import DAILY_MODELS, build_daily_aggregates, daily_aggregate_params
from recsys_dagster.transform.als import train_als
from recsys_dagster.transform.artifacts import build_window_artifacts, compute_window
from recsys_dagster.transform.sql import SQL_ROOT, paste_script, run_sql, sql_literal, sql_text

# The SQL model of each artifact kind (a trained kind's model computes the trainer's input).
KIND_OF_MODEL = {kind.sql_model: kind for kind in ARTIFACT_KINDS.values()}

DAY = dt.date(2025, 4, 10)
DAYS = [DAY - dt.timedelta(days=n) for n in range(3, -1, -1)]
MISSING = DAY - dt.timedelta(days=1)  # its pair_daily partition is deleted: cooc's window skips it
# The day given rows that break the checks: after its aggregates were built (which then still match the
# partitions written), and outside the artifacts' window of 3 days.
CHECKED = DAYS[0]
CONFIG = """
ingest:
  max_lateness_days: 2
  max_clock_skew_hours: 3
checks:
  max_items_per_session: 4
  max_sessions: 50
event_weights:
  add_to_cart: 2.5
  click: 0.7
  purchase: 4.0
  rating: 0.0
artifacts:
  popularity: {window_days: 3, top_n: 40, half_life_days: 1.5}
  cooc: {window_days: 3, top_k: 6, min_support: 2, metric: jaccard, max_session_items: 2, max_items: 150}
  user_history: {window_days: 3, max_items: 4}
"""
SQL_FILES = sorted(path.relative_to(SQL_ROOT).with_suffix("").as_posix() for path in SQL_ROOT.rglob("*.sql"))


@dataclasses.dataclass(frozen=True)
class Lake:
    env: dict[str, str]
    settings: Settings
    artifacts: dict[str, Path]  # kind -> the artifact directory of the first target as of DAY

    @property
    def root(self) -> Path:
        return self.settings.lake_root

    def canonical(self, day: dt.date) -> list[str]:
        return [str(path) for path in parquet_files(partition_dir(self.root, "canonical_events", day))]

    def aggregates(self, model: str) -> list[str]:
        files = [partition_dir(self.root, model, day) / AGGREGATE_FILE for day in DAYS]
        return [str(file) for file in files if file.is_file()]


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory) -> Lake:
    home = tmp_path_factory.mktemp("sql")
    (home / "recsys.yaml").write_text(CONFIG)
    env = {"RECSYS_HOME": str(home), "RECSYS_CONFIG": str(home / "recsys.yaml")}
    settings = load_settings(env)
    config = settings.pipeline
    generate_events(
        settings.raw_root, end_date=DAY, days=len(DAYS), events_per_day=3000, n_users=300, n_items=200
    )
    for day in DAYS:
        canonicalize_partition(settings.raw_root, settings.lake_root, day, config.ingest)
    for model in DAILY_MODELS:
        build_daily_aggregates(model, settings.lake_root, DAYS, daily_aggregate_params(model, config))
    (partition_dir(settings.lake_root, "pair_daily", MISSING) / AGGREGATE_FILE).unlink()
    artifacts = {
        kind: build_window_artifacts(kind, settings.lake_root, settings.artifact_root, DAY, config)[0].path
        for kind in WINDOW_KINDS
    }
    _add_broken_rows(settings.lake_root)
    return Lake(env, settings, artifacts)


def _add_broken_rows(lake_root: Path) -> None:
    """A second file in CHECKED's canonical partition: a duplicate, a null item, an event 3 days late
    (outside the configured arrival window, inside the default one of 7 days) and one 2 hours past the day
    (inside the configured clock skew of 3 hours, outside the default of 1)."""
    folder = partition_dir(lake_root, "canonical_events", CHECKED)
    rows = pl.read_parquet(parquet_files(folder)[0]).head(4)
    midnight = dt.datetime.combine(CHECKED, dt.time(), dt.UTC)
    times = pl.Series([midnight - dt.timedelta(days=3), midnight + dt.timedelta(days=1, hours=2)])
    broken = pl.concat(
        [
            rows.slice(0, 1),
            rows.slice(1, 1).with_columns(event_id=pl.lit("null-item"), item_id=pl.lit(None, pl.String)),
            rows.slice(2, 2).with_columns(
                event_id=pl.Series(["too-late", "skewed"]), ts=times.cast(rows.schema["ts"])
            ),
        ]
    )
    broken.write_parquet(folder / "part-99999.parquet")


def in_content_order(name: str, frame: pl.DataFrame) -> pl.DataFrame:
    """The rows as their order counts: a trained kind's model feeds a trainer that orders users and items
    itself (its SQL has no ORDER BY), so its rows compare as a set, sorted; every other file's order is part
    of its content and is kept."""
    kind = KIND_OF_MODEL.get(name)
    return frame.sort(frame.columns) if kind is not None and kind.trained else frame


def paste(script: str) -> pl.DataFrame:
    """Run pasted text on a fresh connection with DuckDB's default settings, as a new CLI session has."""
    con = duckdb.connect(":memory:")
    try:
        return con.sql(script).pl()
    finally:
        con.close()


# ---------------------------------------------------------------------------- every file, pasted


def file_params(name: str, lake: Lake) -> dict:
    """Parameters for each SQL file under which it returns rows (every file needs an entry)."""
    config = lake.settings.pipeline
    canonical = lake.canonical(CHECKED)
    midnight = dt.datetime.combine(CHECKED, dt.time(), dt.UTC)
    if name in DAILY_MODELS:
        paths = lake.canonical(DAY - dt.timedelta(days=1)) + lake.canonical(DAY)
        return {"paths": paths} | daily_aggregate_params(name, config)
    if name in KIND_OF_MODEL:
        kind = KIND_OF_MODEL[name]
        return {"paths": lake.aggregates(kind.aggregate)} | kind.sql_params(config, DAY)
    return {
        "checks/canonical_null_keys": {"paths": canonical},
        "checks/canonical_duplicate_event_ids": {"paths": canonical},
        "checks/canonical_largest_sessions": {"paths": canonical, "max_rows": 5},
        "checks/canonical_ts_out_of_range": {
            "paths": canonical,
            "window_start": (midnight - dt.timedelta(days=1)).isoformat(),
            "window_end": (midnight + dt.timedelta(days=1)).isoformat(),
        },
        "checks/canonical_profile": {
            "paths": canonical,
            "exposure_files": [],
            "window_start": (midnight - dt.timedelta(days=1)).isoformat(),
            "window_end": (midnight + dt.timedelta(days=1)).isoformat(),
        },
        "checks/popularity_invalid_rows": {"paths": [str(_tampered_popularity(lake))]},
        "checks/cooc_invalid_rows": {
            "paths": [str(lake.artifacts["cooc"] / "neighbors.parquet")],
            "min_support": 3,  # above the support the artifact was built with: some rows fall below it
        },
    }[name]


def _tampered_popularity(lake: Lake) -> Path:
    """The popularity artifact's items with the scores reversed, which breaks the rank order."""
    path = lake.root.parent / "tampered-items.parquet"
    items = pl.read_parquet(lake.artifacts["popularity"] / "items.parquet")
    items.with_columns(pl.col("score").reverse()).write_parquet(path)
    return path


@pytest.mark.parametrize("name", SQL_FILES)
def test_a_file_pasted_after_set_variable_returns_the_rows_of_run_sql(name: str, lake: Lake) -> None:
    params = file_params(name, lake)
    expected = run_sql(name, params)
    assert expected.height > 0, "the case must return rows, or the comparison proves nothing"
    script = paste_script(name, params)
    assert script.endswith(sql_text(name))  # the file itself, unchanged, after the SET statements
    assert_frame_equal(
        in_content_order(name, paste(script)), in_content_order(name, expected), check_exact=True
    )


def test_run_sql_refuses_a_missing_parameter_instead_of_reading_null(lake: Lake) -> None:
    # Unset, max_items would read as NULL and `rank <= NULL` would quietly return no row at all.
    with pytest.raises(ValueError, match=r"user_history.*\['max_items'\]"):
        run_sql("user_history", {"paths": lake.aggregates("user_item_daily")})


@pytest.mark.parametrize(
    "value",
    [
        "it's",
        "",
        7,
        -3,
        2**40,
        True,
        0.1,
        0.1 + 0.2,
        1e-300,
        -2.5e17,
        math.inf,
        [],
        ["a", "b'c"],
        [{"event_type": "click", "weight": 0.7}, {"event_type": "purchase", "weight": 4.0}],
    ],
)
def test_a_literal_gives_the_type_and_value_of_a_bound_parameter(value: object) -> None:
    con = duckdb.connect(":memory:")
    con.execute("SET VARIABLE bound = ?", [value])
    con.execute(f"SET VARIABLE pasted = {sql_literal(value)}")
    row = "typeof(getvariable('{0}')), getvariable('{0}')"
    assert (
        con.execute(f"SELECT {row.format('pasted')}").fetchone()
        == con.execute(f"SELECT {row.format('bound')}").fetchone()
    )


# ---------------------------------------------------------------------------- recsys sql


def use_env(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("RECSYS_LAKE_ROOT", "RECSYS_WINDOW_DAYS"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)


def recsys_sql(lake: Lake, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args) -> str:
    use_env(lake.env, monkeypatch)
    assert cli.main(["sql", *map(str, args)]) == cli.EXIT_OK
    return capsys.readouterr().out


@pytest.mark.parametrize("model", DAILY_MODELS)
def test_recsys_sql_of_a_daily_aggregate_gives_the_partition_the_pipeline_wrote(
    model: str, lake: Lake, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    printed = recsys_sql(lake, monkeypatch, capsys, model, "--day", DAY)
    written = pl.read_parquet(partition_dir(lake.root, model, DAY) / AGGREGATE_FILE)
    assert written.height > 0
    assert_frame_equal(paste(printed), written, check_exact=True)


@pytest.mark.parametrize("kind", WINDOW_KINDS)
def test_recsys_sql_of_a_window_artifact_gives_the_rows_of_compute_window(
    kind: str, lake: Lake, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    model = ARTIFACT_KINDS[kind].sql_model
    printed = recsys_sql(lake, monkeypatch, capsys, model, "--as-of", DAY)
    frame, used, _ = compute_window(kind, lake.root, DAY, lake.settings.pipeline)
    assert frame.height > 0
    assert_frame_equal(
        in_content_order(model, paste(printed)), in_content_order(model, frame), check_exact=True
    )
    aggregate = ARTIFACT_KINDS[kind].aggregate
    assert all(str(partition_dir(lake.root, aggregate, day)) in printed for day in used)
    if kind == "cooc":
        assert MISSING not in used and f"dt={MISSING}" not in printed


def test_the_als_trainer_gives_the_same_files_whatever_the_order_of_its_input_rows(lake: Lake) -> None:
    # Why als_interactions.sql needs no ORDER BY: the trainer sorts users and items itself.
    frame, _, _ = compute_window("als", lake.root, DAY, lake.settings.pipeline)
    config = lake.settings.pipeline.artifacts.als
    expected = train_als(frame, config)
    for seed in (1, 2):
        shuffled = train_als(frame.sample(fraction=1.0, shuffle=True, seed=seed), config)
        assert shuffled.keys() == expected.keys()
        for name, data in expected.items():
            if isinstance(data, pl.DataFrame):
                assert_frame_equal(shuffled[name], data, check_exact=True)
            else:
                assert isinstance(shuffled[name], np.ndarray)
                assert shuffled[name].dtype == data.dtype
                assert shuffled[name].tobytes() == data.tobytes()


def test_recsys_sql_of_the_canonical_checks_finds_what_the_gates_found(
    lake: Lake, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    config = lake.settings.pipeline
    gates = {r.name: r for r in run_gates(lake.root, CHECKED, config.ingest, config.checks)}

    def pasted(name: str) -> pl.DataFrame:
        return paste(recsys_sql(lake, monkeypatch, capsys, f"checks/{name}", "--day", CHECKED))

    # Under the configured window, not the default one: only the event 3 days late is outside it.
    late = pasted("canonical_ts_out_of_range")
    assert late["event_id"].to_list() == [row["event_id"] for row in gates["ts_in_range"].sample]
    assert late["event_id"].to_list() == ["too-late"]
    assert pasted("canonical_null_keys").height == gates["non_null_keys"].metadata["violations"] == 1
    assert (
        pasted("canonical_duplicate_event_ids").height == gates["unique_event_id"].metadata["violations"] == 1
    )
    # The one pass the gates take: each figure is what the gate's own query finds.
    profile = pasted("canonical_profile").row(0, named=True)
    assert (profile["null_key_rows"], profile["duplicate_id_rows"], profile["ts_out_of_range_rows"]) == (
        1,
        1,
        1,
    )
    limits = gates["resource_limits"]
    assert [r["measure"] for r in limits.metadata["exceeded"]] == ["items_per_session", "sessions"]
    assert all(profile[r["measure"]] == r["observed"] for r in limits.metadata["exceeded"])
    assert pasted("canonical_largest_sessions").to_dicts() == limits.sample


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["cooc", "--day", DAY], "give --as-of"),
        (["item_daily", "--as-of", DAY], "give --day"),
        (["checks/cooc_invalid_rows", "--day", DAY], "one artifact file"),
        (["item_daily", "--day", DAY + dt.timedelta(days=1)], "has not been materialized"),
        (["popularity", "--as-of", DAY + dt.timedelta(days=10)], "no item_daily partition in the window"),
        (["no_such_model"], "no SQL model"),
    ],
)
def test_recsys_sql_refuses_what_it_cannot_print(
    args: list, message: str, lake: Lake, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    use_env(lake.env, monkeypatch)
    assert cli.main(["sql", *map(str, args)]) == cli.EXIT_USAGE
    captured = capsys.readouterr()
    assert captured.out == ""
    assert message in captured.err


def test_recsys_sql_reads_the_lake_given_with_lake_root(
    lake: Lake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    use_env(lake.env | {"RECSYS_HOME": str(tmp_path)}, monkeypatch)  # only --lake-root has the data
    assert cli.main(["sql", "item_daily", "--day", str(DAY), "--lake-root", str(lake.root)]) == 0
    printed = capsys.readouterr().out
    assert str(lake.root) in printed
    assert_frame_equal(
        paste(printed), pl.read_parquet(partition_dir(lake.root, "item_daily", DAY) / AGGREGATE_FILE)
    )


# The als input's weight as the model defines it: each day's decayed weight, summed in day order.
ALS_WEIGHT_IN_ORDER = """
SELECT tenant, surface, user_id, item_id, list_sum(list(
    weight * pow(0.5, (getvariable('as_of')::DATE - day)::DOUBLE / getvariable('half_life_days')::DOUBLE)
    ORDER BY day {order}
))::DOUBLE AS weight
FROM read_parquet(getvariable('paths'))
GROUP BY ALL
ORDER BY ALL
"""


def test_the_als_input_weights_do_not_depend_on_the_order_of_the_days(lake: Lake) -> None:
    params = {"paths": lake.aggregates("user_item_daily"), "as_of": DAY, "half_life_days": 0.7}
    got = run_sql("als_interactions", params).sort("tenant", "surface", "user_id", "item_id")
    days_reversed = run_sql("als_interactions", {**params, "paths": params["paths"][::-1]})
    con = duckdb.connect(":memory:")
    try:
        for key, value in params.items():
            con.execute(f"SET VARIABLE {key} = ?", [value])
        in_order, reversed_ = (
            con.sql(ALS_WEIGHT_IN_ORDER.format(order=order)).pl() for order in ("ASC", "DESC")
        )
    finally:
        con.close()
    # The data is such that the order of a floating-point sum shows in the last bits: the comparison can fail.
    assert (in_order.get_column("weight") != reversed_.get_column("weight")).any()
    assert_frame_equal(days_reversed.sort("tenant", "surface", "user_id", "item_id"), got, check_exact=True)
    # The same sums, up to the fixed-point rounding of each day's decayed weight.
    assert_frame_equal(got, in_order, check_exact=False, rel_tol=1e-9)
