"""Window artifacts: the daily aggregates of the trailing window ending at the as-of day -> one versioned
artifact directory per tenant and surface.

What each kind reads, computes and holds is declared once, in `recsys_core.kinds`. Each kind's SQL model
runs once over the window for every tenant and surface; the result is split per (tenant, surface) and
written through `artifact_dir.write_artifact_dir`, which names the directory by the content version
(docs/reference/artifacts.md). A window day whose aggregate partition is missing is skipped and listed in
`meta.inputs.missing_days`; a window with no aggregate at all is an error. Nothing here imports Dagster.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from recsys_core.kinds import ARTIFACT_KINDS, WINDOW_KINDS, ArtifactKind, artifact_kind
from recsys_core.lake import AGGREGATE_FILE, partition_dir
from recsys_core.manifest import FORMAT_VERSION, Manifest, manifest_version, target_dir, utc_timestamp
from recsys_core.settings import PipelineConfig
from recsys_dagster.transform.als import train_als
from recsys_dagster.transform.artifact_dir import write_artifact_dir
from recsys_dagster.transform.lineage import read_aggregate_lineage, require_aggregates
from recsys_dagster.transform.sql import run_sql
from recsys_serving.store import LoadedTarget, load_target

FORMAT = 1
# The trainers of trained kinds (`ArtifactKind.trained`): SQL rows of one tenant and surface + the kind's
# config section -> the artifact's files.
TRAINERS: dict[str, Callable[[pl.DataFrame, Any], dict[str, pl.DataFrame | np.ndarray]]] = {"als": train_als}
TOP_ROWS = 10


@dataclass(frozen=True)
class ArtifactBuild:
    """One artifact directory written (or found already written: same content, same version)."""

    tenant: str
    surface: str
    kind: str
    version: str
    path: Path
    rows: int
    window_start: dt.date
    window_end: dt.date
    missing_days: tuple[str, ...] = ()
    # The first rows of the artifact's file, for run logs and asset metadata.
    top: tuple[dict[str, Any], ...] = field(default=(), compare=False)


def window_days(as_of: dt.date, days: int) -> list[dt.date]:
    """The `days` days of the trailing window ending at (and including) `as_of`, oldest first."""
    if days < 1:
        raise ValueError(f"a window has at least one day, got {days}")
    return [as_of - dt.timedelta(days=offset) for offset in range(days - 1, -1, -1)]


def require_retraining_inputs(
    lake_root: Path, as_of: dt.date, config: PipelineConfig, start_date: dt.date
) -> None:
    """Verify every daily aggregate of the widest window ending at `as_of` (what the evaluation and tuning
    retrain every kind from) with `lineage.require_aggregates`."""
    kinds = [ARTIFACT_KINDS[name] for name in WINDOW_KINDS]
    widest = max(kind.window_days(config) for kind in kinds)
    aggregates = sorted({str(kind.aggregate) for kind in kinds} | {"item_daily"})
    require_aggregates(lake_root, aggregates, window_days(as_of, widest), start_date)


def polars_schema(kind: ArtifactKind) -> dict[str, pl.DataType]:
    """The kind's columns as polars types, in order."""
    return dict(pl.DataFrame(kind.schema.empty_table()).schema)


def window_inputs(
    name: str, lake_root: Path, as_of: dt.date, config: PipelineConfig
) -> tuple[dict[str, Any], list[dt.date], list[dt.date]]:
    """The kind's SQL parameters over the window (`paths`: the aggregate partitions that exist), the days
    used and the days missing; FileNotFoundError when no partition of the window exists."""
    kind = artifact_kind(name)
    days = window_days(as_of, kind.window_days(config))
    aggregate, _, sql_params = kind.window_model()
    used = [d for d in days if (partition_dir(lake_root, aggregate, d) / AGGREGATE_FILE).is_file()]
    missing = [d for d in days if d not in used]
    if not used:
        raise FileNotFoundError(
            f"{name} as of {as_of}: no {aggregate} partition in the window {days[0]}..{days[-1]} "
            f"under {lake_root / aggregate}; materialize {aggregate} for these days first"
        )
    paths = [str(partition_dir(lake_root, aggregate, d) / AGGREGATE_FILE) for d in used]
    return {"paths": paths} | sql_params(config, as_of), used, missing


def compute_window(
    name: str, lake_root: Path, as_of: dt.date, config: PipelineConfig
) -> tuple[pl.DataFrame, list[dt.date], list[dt.date]]:
    """Run the kind's SQL over the window: (rows for every tenant and surface, days used, days missing)."""
    params, used, missing = window_inputs(name, lake_root, as_of, config)
    return run_sql(artifact_kind(name).window_model()[1], params), used, missing


def build_window_artifacts(
    name: str,
    lake_root: Path,
    artifact_root: Path,
    as_of: dt.date,
    config: PipelineConfig,
    *,
    run_id: str | None = None,
) -> list[ArtifactBuild]:
    """Build the artifact of kind `name` as of `as_of` for every tenant and surface present in the window.

    Every tenant and surface with any event in the window (per `item_daily`, which keeps exposures and
    anonymous events, plus the kind's own aggregate) gets an artifact of every kind, even when no row
    survives the model (only exposures, only anonymous users): an empty artifact says so explicitly, and
    the publisher decides whether that kind may be empty, rather than the tenant silently keeping an older
    version or missing a kind. Raises FileNotFoundError when no aggregate partition of the window exists.
    A derived kind (`user_topn`) is built from its input kinds' artifacts of the day instead
    (`transform.user_topn`).
    """
    lake_root, artifact_root = Path(lake_root), Path(artifact_root)
    kind = artifact_kind(name)
    if kind.derived_from:
        # Imported here: it loads the artifacts this module builds, through the serving code.
        from recsys_dagster.transform.user_topn import build_user_topn

        return build_user_topn(lake_root, artifact_root, as_of, config, run_id)
    frame, used, missing = compute_window(name, lake_root, as_of, config)
    aggregate = kind.window_model()[0]
    days = window_days(as_of, kind.window_days(config))
    scopes = _scopes(lake_root, aggregate, used)
    schema = polars_schema(kind)
    groups = _split_by_scope(frame)
    inputs: dict[str, Any] = {
        aggregate: [d.isoformat() for d in used],
        "missing_days": [d.isoformat() for d in missing],
    } | _lineage_inputs(lake_root, aggregate, used)
    built_at = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    builds = []
    for tenant, surface in sorted(scopes | set(groups)):
        part = groups.get((tenant, surface))
        if kind.trained:
            rows = frame.clear() if part is None else part
            files = TRAINERS[name](rows, getattr(config.artifacts, name))
        else:
            # Rows stay in the order of the SQL's ORDER BY (tenant, surface, then the kind's keys).
            files = {
                kind.table: pl.DataFrame(schema=schema)
                if part is None
                else part.select([pl.col(column).cast(dtype) for column, dtype in schema.items()])
            }
        data = files[kind.table]
        meta = {
            "format": FORMAT,
            "kind": name,
            "tenant": tenant,
            "surface": surface,
            "as_of": as_of.isoformat(),
            "window": {"days": len(days), "start": days[0].isoformat(), "end": days[-1].isoformat()},
            "params": kind.params(config),
            "inputs": inputs,
            "built_at": built_at,
            "run_id": run_id,
        }
        version, path = write_artifact_dir(target_dir(artifact_root, tenant, surface), name, meta, files)
        if not isinstance(data, pl.DataFrame):  # not reached: write_artifact_dir took it as a .parquet file
            raise TypeError(f"{name}: {kind.table} is an array, not a table")
        builds.append(
            ArtifactBuild(
                tenant=tenant,
                surface=surface,
                kind=name,
                version=version,
                path=Path(path),
                rows=data.height,
                window_start=days[0],
                window_end=days[-1],
                missing_days=tuple(d.isoformat() for d in missing),
                top=tuple(_display(row) for row in data.head(TOP_ROWS).iter_rows(named=True)),
            )
        )
    return builds


def load_built(
    artifact_root: Path, tenant: str, surface: str, as_of: dt.date, paths: dict[str, Path]
) -> LoadedTarget:
    """A target loaded from artifact directories that were built but not published (an in-memory manifest)."""
    versions = {kind: path.name for kind, path in paths.items()}
    manifest: Manifest = {
        "v": FORMAT_VERSION,
        "tenant": tenant,
        "surface": surface,
        "current": {kind: f"{kind}/{version}" for kind, version in versions.items()},
        "updated_at": utc_timestamp(),
        "manifest_version": manifest_version(tenant, surface, as_of, versions),
        "as_of": as_of.isoformat(),
        "artifacts": {
            kind: {"version": version, "uri": f"{kind}/{version}", "rows": 0, "window": None}
            for kind, version in versions.items()
        },
        "checks": {},
        "run_id": None,
        "published_by": "evaluation",
    }
    return load_target(artifact_root, tenant, surface, manifest)


def _split_by_scope(frame: pl.DataFrame) -> dict[tuple[str, str], pl.DataFrame]:
    """Rows per (tenant, surface), order kept; a single scope (the common case) is not copied."""
    if frame.height:
        # The common case, told by comparing with the first row (cheaper than finding the distinct pairs).
        tenant, surface = frame.select("tenant", "surface").row(0)
        same = pl.col("tenant").eq_missing(tenant) & pl.col("surface").eq_missing(surface)
        single = frame.select(same.all()).item()
        if single:
            return {(tenant, surface): frame}
    return dict(frame.partition_by(["tenant", "surface"], maintain_order=True, as_dict=True))


def _scopes(lake_root: Path, aggregate: str, days: list[dt.date]) -> set[tuple[str, str]]:
    """Every (tenant, surface) with an event on the days used.

    Read from item_daily, which keeps every event (pair_daily and user_item_daily drop exposures and
    anonymous events) and is small (one row per item and event type), so that the cost does not grow with
    the size of the kind's own aggregate; from that aggregate only for days whose item_daily is missing.
    """
    paths = []
    for day in days:
        item_daily = partition_dir(lake_root, "item_daily", day) / AGGREGATE_FILE
        paths.append(
            item_daily if item_daily.is_file() else partition_dir(lake_root, aggregate, day) / AGGREGATE_FILE
        )
    scans = [pl.scan_parquet(p).select("tenant", "surface") for p in paths if p.is_file()]
    found = pl.concat(scans).unique().collect()
    return set(found.iter_rows())


def _lineage_inputs(lake_root: Path, aggregate: str, days: list[dt.date]) -> dict[str, dict[str, str | None]]:
    """What each used aggregate partition recorded: the canonical content it was built from and its own
    file's hash, by day (None without a record, which publishing refuses)."""
    canonical: dict[str, str | None] = {}
    files: dict[str, str | None] = {}
    for day in days:
        lineage = read_aggregate_lineage(lake_root, aggregate, day)
        canonical[day.isoformat()] = lineage["canonical_events"] if lineage else None
        files[day.isoformat()] = lineage["sha256"] if lineage else None
    return {"canonical_events": canonical, "aggregate_sha256": files}


def _display(row: dict[str, Any]) -> dict[str, Any]:
    return {key: value.isoformat() if isinstance(value, dt.datetime) else value for key, value in row.items()}
