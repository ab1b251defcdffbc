"""The `user_topn` artifact: the served blend of every user the ALS model knows, precomputed as of a day.

For each tenant and surface, the day's popularity, cooc, user_history and als artifacts (as their build
records list them) are loaded as the API server loads them, and every ALS user's request "this user,
no context items, seen items excluded" is answered by the serving code itself: `recommender.blend_inputs`
chooses the seeds, factors and exclusions, `blend.blend_users` ranks a block of users at once (one matrix
product of their factors with every item's, instead of one product per user). The best `top_n` candidates
of each user are kept with their per-source contributions; users whose blend has no personal source
(only popular items) are left out, and get the live answer with its warning.

Files (docs/reference/artifacts.md): users.parquet (user id and the sources that scored the user's blend,
sorted by user id), item_ids.parquet (the items the lists use, sorted), offsets.npy (user u owns rows
offsets[u]:offsets[u + 1]), items.npy (int32 indexes into item_ids.parquet) and contributions.npy
(float64, one column per source of `BLEND_SOURCES`). Deterministic: the same input artifacts, top_n and
weights give the same files and version. Nothing here imports Dagster.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from recsys_core.kinds import BLEND_SOURCES, USER_TOPN
from recsys_core.lake import read_builds
from recsys_core.manifest import read_meta, target_dir
from recsys_core.settings import BlendWeights, PipelineConfig
from recsys_dagster.transform.artifact_dir import write_artifact_dir
from recsys_dagster.transform.artifacts import FORMAT, TOP_ROWS, ArtifactBuild, load_built
from recsys_serving.blend import SOURCE_POPULARITY, blend_users
from recsys_serving.recommender import blend_inputs
from recsys_serving.store import LoadedTarget

# Users whose blend inputs are held at once (blend_users scores them by smaller blocks).
BLOCK_USERS = 4096


def build_user_topn(
    lake_root: Path, artifact_root: Path, as_of: dt.date, config: PipelineConfig, run_id: str | None
) -> list[ArtifactBuild]:
    """Build `user_topn` as of `as_of` for every tenant and surface its input kinds were built for.

    FileNotFoundError when an input kind has no build record for the day (materialize it first).
    """
    inputs: dict[tuple[str, str], dict[str, Path]] = {}
    for kind in USER_TOPN.derived_from:
        record = read_builds(lake_root, kind, as_of)
        if record is None:
            raise FileNotFoundError(
                f"user_topn as of {as_of}: no {kind} artifact built for that day; materialize {kind} first"
            )
        for entry in record["artifacts"]:
            inputs.setdefault((entry["tenant"], entry["surface"]), {})[kind] = Path(entry["path"])
    built_at = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    builds = []
    for (tenant, surface), paths in sorted(inputs.items()):
        absent = [kind for kind in USER_TOPN.derived_from if kind not in paths]
        if absent:
            raise FileNotFoundError(
                f"user_topn as of {as_of} {tenant}/{surface}: no {', '.join(absent)} artifact built for it"
            )
        target = load_built(artifact_root, tenant, surface, as_of, paths)
        files = user_topn_files(target, config.artifacts.user_topn.top_n, config.blend)
        metas = {kind: read_meta(path) for kind, path in paths.items()}
        windows = [meta["window"] for meta in metas.values() if meta.get("window")]
        start = min((window["start"] for window in windows), default=as_of.isoformat())
        meta = {
            "format": FORMAT,
            "kind": USER_TOPN.name,
            "tenant": tenant,
            "surface": surface,
            "as_of": as_of.isoformat(),
            "window": {
                "days": (as_of - dt.date.fromisoformat(start)).days + 1,
                "start": start,
                "end": as_of.isoformat(),
            },
            "params": USER_TOPN.params(config),
            "inputs": _inputs(metas),
            "built_at": built_at,
            "run_id": run_id,
        }
        version, path = write_artifact_dir(
            target_dir(artifact_root, tenant, surface), USER_TOPN.name, meta, files
        )
        users = files[USER_TOPN.table]
        assert isinstance(users, pl.DataFrame)
        builds.append(
            ArtifactBuild(
                tenant=tenant,
                surface=surface,
                kind=USER_TOPN.name,
                version=version,
                path=Path(path),
                rows=users.height,
                window_start=dt.date.fromisoformat(start),
                window_end=as_of,
                top=tuple(users.head(TOP_ROWS).iter_rows(named=True)),
            )
        )
    return builds


def user_topn_files(
    target: LoadedTarget, top_n: int, weights: BlendWeights
) -> dict[str, pl.DataFrame | np.ndarray]:
    """The artifact's files for one loaded target: every ALS user's best `top_n` blend candidates."""
    users = sorted(target.als.user_index) if target.als is not None else []
    listed: list[str] = []
    sources: list[str] = []
    items: list[np.ndarray] = []
    contributions: list[np.ndarray] = []
    for block in range(0, len(users), BLOCK_USERS):
        ids = users[block : block + BLOCK_USERS]
        requests = [
            blend_inputs(target, user_id=user, context_items=None, exclude_seen=True).request for user in ids
        ]
        for user, result in zip(ids, blend_users(target, requests, k=top_n, weights=weights), strict=True):
            if not result.sources_used - {SOURCE_POPULARITY}:
                continue
            listed.append(user)
            sources.append(",".join(s for s in BLEND_SOURCES if s in result.sources_used))
            items.append(result.items)
            contributions.append(result.contributions)
    lengths = np.array([len(part) for part in items], dtype=np.int64)
    offsets = np.zeros(len(items) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    vocabulary = np.concatenate(items) if items else np.empty(0, dtype=np.int64)
    # The items the lists use, by id (the vocabulary is sorted by id, so their indexes sort the same way).
    used = np.unique(vocabulary)
    codes = np.searchsorted(used, vocabulary).astype(np.int32)
    return {
        USER_TOPN.table: pl.DataFrame(
            {"user_id": pl.Series(listed, dtype=pl.String), "sources": pl.Series(sources, dtype=pl.String)}
        ),
        "item_ids.parquet": pl.DataFrame(
            {"item_id": pl.Series([target.item_ids[i] for i in used.tolist()], dtype=pl.String)}
        ),
        "offsets.npy": offsets,
        "items.npy": codes,
        "contributions.npy": (
            np.concatenate(contributions) if contributions else np.zeros((0, len(BLEND_SOURCES)))
        ),
    }


def _inputs(metas: dict[str, Any]) -> dict[str, Any]:
    """The input artifacts' versions, and the canonical days (and missing days) they were built from, for
    publishing to re-verify as it does for the inputs themselves."""
    canonical: dict[str, str | None] = {}
    missing: set[str] = set()
    for meta in metas.values():
        recorded = meta.get("inputs") or {}
        canonical.update(recorded.get("canonical_events") or {})
        missing.update(recorded.get("missing_days") or [])
    return {
        "artifacts": {kind: meta["version"] for kind, meta in sorted(metas.items())},
        "canonical_events": dict(sorted(canonical.items())),
        "missing_days": sorted(missing - set(canonical)),
    }
