"""Loading, polling and atomic swapping of the published artifacts the server answers from.

For every (tenant, surface) with a current manifest under the artifact root, the artifacts it names are
verified (the publishing protocol's checks: meta.json, file hashes, row counts, version) and loaded once
into an immutable `LoadedTarget`: an integer item vocabulary sorted by item id, popularity as index and
score arrays, co-occurrence and user history as CSR arrays, the precomputed per-user blend (`user_topn`)
as arrays mapped from its files. Requests only index into these arrays; nothing is parsed per request.

`ArtifactStore` holds a snapshot `{(tenant, surface): LoadedTarget}` and replaces it by one reference
assignment, so a request sees either the old or the new version of a target, never a mix. A daemon thread
re-reads every `manifest.json` each poll interval and loads a changed manifest off the request path. A
version that fails to load leaves the previous one serving; the failure is kept (and retried after a
back-off) for /readyz and /metrics.

A manifest may also name a `rules` artifact (merchandising rules, `recsys_core.rules`): it is parsed and
indexed once at load (`recsys_serving.rules.ServedRules`); a manifest without one serves without rules.
A `content` artifact (the tenant's item catalog: availability, categories, content neighbours and vectors)
is indexed likewise (`recsys_serving.catalog.ServedCatalog`); its items join the vocabulary, so that an item
nobody has interacted with yet can be recommended by content. Rules that target catalog attributes are
resolved to the items they match at load.

Reading manifests and resolving URIs goes through `recsys_core.manifest`, which imports no Dagster.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from obstore.exceptions import BaseError as ObjectStoreError

from recsys_core import artifact_sync
from recsys_core.kinds import (
    ARTIFACT_KINDS,
    BLEND_SOURCES,
    CONTENT,
    KINDS,
    REQUIRED_KINDS,
    USER_TOPN,
    ArtifactKind,
)
from recsys_core.manifest import Manifest, list_targets, read_current, read_meta, resolve_uri, verify_artifact
from recsys_core.object_store import remote_tree
from recsys_core.rules import RULES_KIND, RulesDocument, RulesError, read_published_rules
from recsys_core.settings import BlendWeights, GuardrailsConfig
from recsys_serving.catalog import CatalogLoadError, ContentTables, ServedCatalog, read_content
from recsys_serving.rules import ServedRules

log = logging.getLogger(__name__)

# The kinds the server uses are the kinds this version declares (recsys_core.kinds). Other kinds in a
# manifest (published by a newer pipeline) are listed as not served rather than refused, so publishing a
# new kind never breaks serving.
SERVED_KINDS = KINDS
# The segment rule of a rules audience, unless the server is told otherwise (docs/reference/rules.md).
DEFAULT_COLD_START_MAX_INTERACTIONS = GuardrailsConfig().cold_start_max_interactions

_EMPTY_I32 = np.empty(0, dtype=np.int32)
_EMPTY_F64 = np.empty(0, dtype=np.float64)


class LoadError(RuntimeError):
    """A manifest whose artifacts cannot be served; the message says which artifact and why."""


@dataclass(frozen=True, slots=True, eq=False)
class AlsModel:
    """The `als` artifact of a target, its item factors aligned with the target's item vocabulary.

    Items the model never saw have zero factors (`known_items` False). `fold_in` computes the factors of a
    user the model does not know from their items, exactly as implicit's `recalculate_user` does.
    """

    user_index: dict[str, int]
    user_factors: np.ndarray  # float32, one row per user of user_index
    # float64 (scores then do not depend on the BLAS kernel's blocking in their last bits), one row per
    # item of the target's vocabulary.
    item_factors: np.ndarray
    known_items: np.ndarray  # bool, per item of the vocabulary
    gram: np.ndarray  # item_factors.T @ item_factors (float64): YtY of the fold-in
    regularization: float
    alpha: float
    confidence: str

    def user_vector(self, user_id: str) -> np.ndarray | None:
        row = self.user_index.get(user_id)
        return None if row is None else self.user_factors[row].astype(np.float64)

    def fold_in(self, items: list[int], weights: list[float]) -> np.ndarray:
        """Least-squares user factors given the items (vocabulary indexes) and their interaction weights.

        x = (YtY + reg I + Yt (C - I) Y)^-1 Yt C 1, C = alpha * confidence(weight), over the known items.
        """
        known = [
            (item, weight) for item, weight in zip(items, weights, strict=True) if self.known_items[item]
        ]
        factors = self.item_factors.shape[1]
        if not known:
            return np.zeros(factors)
        rows = self.item_factors[[item for item, _ in known]]
        values = np.array([weight for _, weight in known], dtype=np.float64)
        confidence = self.alpha * (np.log1p(values) if self.confidence == "log" else values)
        a = self.gram + self.regularization * np.eye(factors) + (rows.T * (confidence - 1.0)) @ rows
        b = rows.T @ confidence
        return np.linalg.solve(a, b)

    def scores(self, vector: np.ndarray) -> np.ndarray:
        """The model's score of every item of the vocabulary for a user vector (float64)."""
        scores: np.ndarray = self.item_factors @ vector
        return scores


@dataclass(frozen=True, slots=True, eq=False)
class UserTopN:
    """The `user_topn` artifact of a target: each listed user's best candidates of the blend, precomputed.

    User `u` (of `user_index`) owns rows `offsets[u]:offsets[u + 1]`, best first: `items` (indexes into
    the artifact's own item ids, `vocabulary` maps them to the target's) and `contributions` (one column
    per source of `BLEND_SOURCES`, 0 where the source did not score the item). The two large arrays are
    memory-mapped from the (immutable, content-addressed) artifact files, so loading reads only the
    offsets and ids, and processes serving the same version share the pages.
    """

    weights: BlendWeights  # the blend weights the lists were computed with
    depth: int  # top_n: the longest list
    user_index: dict[str, int]
    offsets: np.ndarray  # int64, one more than users
    items: np.ndarray  # int32
    vocabulary: np.ndarray  # int32: the target's vocabulary index of each of the artifact's items
    contributions: np.ndarray  # float64, (rows, len(BLEND_SOURCES))
    sources: list[frozenset[str]]  # per user, the sources that scored their blend


@dataclass(frozen=True, slots=True, eq=False)
class LoadedTarget:
    """Everything one published manifest of one tenant and surface serves, immutable once built.

    Items are integer indexes into `item_ids`, which is sorted by item id, so ordering by index breaks
    ties by item id. Co-occurrence neighbours of item `i` are `cooc_neighbors[cooc_indptr[i]:
    cooc_indptr[i + 1]]` in published rank order; a user's history is the slice of `history_items` given
    by `user_index` and `history_indptr`, most recent first.
    """

    tenant: str
    surface: str
    manifest: Manifest
    manifest_version: str
    as_of: str
    updated_at: str
    updated_at_epoch: float
    loaded_at: float
    load_seconds: float
    kinds: tuple[str, ...]
    ignored_kinds: tuple[str, ...]
    # The blend weights the manifest was evaluated and published with; None: the server's configured ones.
    blend: BlendWeights | None
    item_ids: list[str]
    item_index: dict[str, int]
    popular_items: np.ndarray
    popular_scores: np.ndarray
    # Every vocabulary item's popularity score divided by the largest (0 outside the published top N): the
    # blend's popularity source, scaled once at load rather than on every request.
    popularity_prior: np.ndarray
    cooc_indptr: np.ndarray
    cooc_neighbors: np.ndarray
    cooc_scores: np.ndarray
    # cooc_neighbors as int64 shifted left by 32 bits: the sort keys of the vectorized ranking.
    cooc_keys: np.ndarray
    user_index: dict[str, int]
    history_indptr: np.ndarray
    history_items: np.ndarray
    # The weight (summed event weights in the window) of each history item, aligned with history_items.
    history_weights: np.ndarray
    als: AlsModel | None
    # The precomputed per-user blend; None when the manifest has none or it does not fit this manifest
    # (`user_topn_note` says why).
    user_topn: UserTopN | None
    user_topn_note: str | None
    # Python-list copies of what the plain-Python ranking reads element by element (about 40 bytes per
    # co-occurrence row: a pointer to a shared int object, a pointer to a float object and the float).
    cooc_ptr: list[int]
    cooc_neighbor_list: list[int]
    cooc_score_list: list[float]
    popular_list: list[int]
    popular_score_list: list[float]
    # The version of every artifact served, by kind (what a decision trace records).
    artifact_versions: dict[str, str] = field(default_factory=dict)
    # The manifest's merchandising rules, indexed; None when it has no `rules` artifact.
    rules: ServedRules | None = None
    # The tenant's item catalog; None when the manifest has no `content` artifact.
    catalog: ServedCatalog | None = None

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def n_users(self) -> int:
        return len(self.user_index)

    def history(self, user_id: str) -> list[int] | None:
        """The user's items (indexes), most recent first; None for a user not in the history artifact."""
        row = self.user_index.get(user_id)
        if row is None:
            return None
        span = slice(self.history_indptr[row], self.history_indptr[row + 1])
        items: list[int] = self.history_items[span].tolist()
        return items

    def history_with_weights(self, user_id: str) -> tuple[list[int], list[float]] | None:
        """The user's items (most recent first) and their interaction weights; None for an unknown user."""
        row = self.user_index.get(user_id)
        if row is None:
            return None
        span = slice(self.history_indptr[row], self.history_indptr[row + 1])
        return self.history_items[span].tolist(), self.history_weights[span].tolist()

    def neighbors(self, item: int) -> tuple[np.ndarray, np.ndarray]:
        """Co-occurrence neighbours (indexes) and scores of one item, best first."""
        start, end = self.cooc_indptr[item], self.cooc_indptr[item + 1]
        return self.cooc_neighbors[start:end], self.cooc_scores[start:end]

    def describe(self, now: float | None = None) -> dict[str, Any]:
        """What is served and since when: the body of /v1/manifest and one entry of /readyz."""
        now = time.time() if now is None else now
        artifacts = self.manifest.get("artifacts", {})
        return {
            "tenant": self.tenant,
            "surface": self.surface,
            "manifest_version": self.manifest_version,
            "as_of": self.as_of,
            "updated_at": self.updated_at,
            "loaded_at": _iso(self.loaded_at),
            "age_seconds": round(max(0.0, now - self.updated_at_epoch), 3),
            "load_seconds": round(self.load_seconds, 4),
            "artifacts": {
                kind: {
                    "version": entry.get("version"),
                    "rows": entry.get("rows"),
                    "window": entry.get("window"),
                    "served": kind in self.kinds,
                }
                for kind, entry in sorted(artifacts.items())
            },
            "items": self.n_items,
            "users": self.n_users,
            "run_id": self.manifest.get("run_id"),
            "blend": self.manifest.get("blend"),
            "user_topn": _describe_topn(self.user_topn, self.user_topn_note),
        }


def _describe_topn(topn: UserTopN | None, note: str | None) -> dict[str, Any]:
    """Whether known users are answered from the precomputed blend, or why they get the live one."""
    if topn is None:
        return {"served": False, "reason": note}
    return {
        "served": True,
        "users": len(topn.user_index),
        "top_n": topn.depth,
        "blend": dataclasses.asdict(topn.weights),
        "reason": "requests ranked with other blend weights, with context items, without exclude_seen or "
        f"for more than {topn.depth} items use the live blend",
    }


@dataclass
class TargetStatus:
    """Load bookkeeping of one tenant and surface (mutated only by the refreshing thread)."""

    tenant: str
    surface: str
    loads: int = 0
    failures: int = 0
    last_error: str | None = None
    last_error_at: float | None = None
    # The manifest version that failed to load (None when manifest.json itself was unreadable).
    failing_version: str | None = None
    failing: bool = False
    retry_at: float = 0.0

    def describe(self) -> dict[str, Any]:
        return {
            "tenant": self.tenant,
            "surface": self.surface,
            "manifest_version": self.failing_version,
            "error": self.last_error,
            "at": _iso(self.last_error_at) if self.last_error_at is not None else None,
            "failures": self.failures,
        }


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The served state, swapped as one reference: targets plus the set of tenants they cover."""

    targets: Mapping[tuple[str, str], LoadedTarget] = field(default_factory=dict)
    tenants: frozenset[str] = frozenset()


class ArtifactStore:
    """The loaded targets of an artifact root, kept current by a background poller."""

    def __init__(
        self,
        artifact_root: Path,
        poll_seconds: float = 2.0,
        *,
        retry_seconds: float | None = None,
        weights: BlendWeights | None = None,
        cold_start_max_interactions: int = DEFAULT_COLD_START_MAX_INTERACTIONS,
    ) -> None:
        if not poll_seconds > 0:
            raise ValueError(f"poll_seconds must be > 0, got {poll_seconds!r}")
        self.artifact_root = Path(artifact_root)
        self.poll_seconds = float(poll_seconds)
        self.cold_start_max_interactions = cold_start_max_interactions
        # A version that failed is retried after this long (a rebuilt artifact directory may fix it).
        self.retry_seconds = (
            float(retry_seconds) if retry_seconds is not None else max(30.0, 5 * poll_seconds)
        )
        # The server's configured blend weights (a manifest's own `blend` takes precedence), against which
        # a precomputed `user_topn` is checked at load.
        self.weights = weights
        self._snapshot = Snapshot()
        self._status: dict[tuple[str, str], TargetStatus] = {}
        self._refresh_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_poll_at: float | None = None
        self.poll_errors = 0
        self.last_poll_error: str | None = None
        # With RECSYS_STORAGE_URL set, the bucket's manifests are followed into the local tree (by ETag).
        self._remote = remote_tree(self.artifact_root)
        self._remote_etags: dict[tuple[str, str], str] = {}

    # -------------------------------------------------------------------------------- read side

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    def get(self, tenant: str, surface: str) -> LoadedTarget | None:
        return self._snapshot.targets.get((tenant, surface))

    def statuses(self) -> list[TargetStatus]:
        """Bookkeeping of every target seen, sorted (a copy: safe to read from any thread)."""
        return [dataclasses.replace(status) for _, status in sorted(self._status.items())]

    # ------------------------------------------------------------------------------- write side

    def refresh(self) -> bool:
        """One poll pass over every target; returns True if any target was (re)loaded.

        Safe to call from any thread; passes are serialised. Never raises for a bad manifest or
        artifact: the failure is recorded on the target's status and the old version keeps serving.
        """
        with self._refresh_lock:
            return self._refresh()

    def _refresh(self) -> bool:
        now = time.time()
        self.last_poll_at = now
        try:
            if self._remote is not None:
                artifact_sync.follow(self._remote, self._remote_etags)
            found = list_targets(self.artifact_root)
        except (OSError, ObjectStoreError) as exc:
            self.poll_errors += 1
            self.last_poll_error = f"cannot list {self.artifact_root}: {exc}"
            log.warning("manifest poll failed: %s", self.last_poll_error)
            return False
        served = self._snapshot.targets
        updated = dict(served)
        changed = False
        for tenant, surface in found:
            key = (tenant, surface)
            status = self._status.get(key)
            if status is None:
                status = self._status[key] = TargetStatus(tenant, surface)
            try:
                manifest = read_current(self.artifact_root, tenant, surface)
            except Exception as exc:  # ManifestError, UnsafePathError, OSError: keep what is served
                self._record_failure(status, None, f"manifest.json unusable: {exc}", now)
                continue
            if manifest is None:
                continue
            version = manifest["manifest_version"]
            loaded = served.get(key)
            if loaded is not None and loaded.manifest_version == version:
                if status.failing:
                    # Current was re-pointed (e.g. rolled back) to the version being served.
                    status.failing = False
                continue
            if status.failing and status.failing_version == version and now < status.retry_at:
                continue
            try:
                target = load_target(
                    self.artifact_root,
                    tenant,
                    surface,
                    manifest,
                    weights=self.weights,
                    cold_start_max_interactions=self.cold_start_max_interactions,
                )
            except Exception as exc:  # any failure to load keeps the last good version serving
                self._record_failure(status, version, str(exc), now)
                continue
            updated[key] = target
            changed = True
            status.loads += 1
            status.failing = False
            log.info(
                "serving %s/%s manifest %s as of %s (%d items, %d users, loaded in %.2f s)",
                tenant,
                surface,
                version[:12],
                target.as_of,
                target.n_items,
                target.n_users,
                target.load_seconds,
            )
        if changed:
            self._snapshot = Snapshot(updated, frozenset(t for t, _ in updated))
        return changed

    def _record_failure(self, status: TargetStatus, version: str | None, error: str, now: float) -> None:
        repeated = status.failing and status.failing_version == version and status.last_error == error
        status.failures += 1
        status.failing = True
        status.failing_version = version
        status.last_error = error
        status.last_error_at = now
        status.retry_at = now + self.retry_seconds
        served = self.get(status.tenant, status.surface)
        if not repeated:
            log.error(
                "cannot load %s/%s manifest %s (still serving %s): %s",
                status.tenant,
                status.surface,
                version[:12] if version else "<unreadable>",
                served.manifest_version[:12] if served else "nothing",
                error,
            )

    # ------------------------------------------------------------------------------------ poller

    def start(self) -> None:
        """Start the daemon poller (idempotent)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="recsys-manifest-poller", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.refresh()
            except Exception:  # never let the poller die: the next pass tries again
                self.poll_errors += 1
                log.exception("manifest poll pass failed")


# ------------------------------------------------------------------------------------------ loading


def load_target(
    artifact_root: Path,
    tenant: str,
    surface: str,
    manifest: Manifest,
    *,
    weights: BlendWeights | None = None,
    cold_start_max_interactions: int = DEFAULT_COLD_START_MAX_INTERACTIONS,
) -> LoadedTarget:
    """Verify and load the artifacts `manifest` names into a `LoadedTarget`; `LoadError` if unusable.

    `weights`: the blend weights requests will be ranked with when the manifest records none; a
    `user_topn` computed with other weights than those in force is not loaded (the live blend serves).
    `cold_start_max_interactions` puts users in the segments that rules audiences name.
    """
    started = time.perf_counter()
    current: Mapping[str, str] = manifest["current"]
    missing = sorted(set(REQUIRED_KINDS) - set(current))
    if missing:
        raise LoadError(f"manifest {manifest['manifest_version'][:12]} has no {', '.join(missing)} artifact")
    tables: dict[str, pa.Table] = {}
    for kind in SERVED_KINDS:
        if kind in current:
            tables[kind] = _read_artifact(artifact_root, tenant, surface, manifest, kind)

    popularity = tables["popularity"]
    cooc = tables.get("cooc")
    history = tables.get("user_history")
    als = tables.get("als")
    id_columns = [popularity["item_id"]]
    if cooc is not None:
        id_columns += [cooc["item_id"], cooc["neighbor_id"]]
    if history is not None:
        id_columns.append(history["item_id"])
    if als is not None:
        id_columns.append(als["item_id"])
    content: ContentTables | None = None
    if CONTENT.name in current:
        try:
            content = read_content(artifact_root, tenant, surface, manifest)
        except CatalogLoadError as exc:
            raise LoadError(str(exc)) from exc
        if content is not None:
            id_columns += content.item_ids()
    vocab = pc.unique(
        pa.chunked_array([chunk for col in id_columns for chunk in col.chunks], pa.large_string())
    )
    vocab = vocab.take(pc.array_sort_indices(vocab))
    item_ids: list[str] = vocab.to_pylist()
    item_index = {item: i for i, item in enumerate(item_ids)}
    n_items = len(item_ids)

    def codes(column: pa.ChunkedArray) -> np.ndarray:
        # Every id is in the vocabulary and none is null (checked on read), so no code is missing.
        found: np.ndarray = pc.index_in(column, value_set=vocab).to_numpy(zero_copy_only=False)
        return found.astype(np.int32)

    # Popularity: published rank order; an item listed twice keeps its best rank.
    order = np.argsort(_ints(popularity["rank"]), kind="stable")
    pop_items = codes(popularity["item_id"])[order]
    pop_scores = _floats(popularity["score"])[order]
    usable = np.isfinite(pop_scores)
    pop_items, pop_scores = pop_items[usable], pop_scores[usable]
    _, first = np.unique(pop_items, return_index=True)
    first.sort()
    pop_items, pop_scores = pop_items[first], pop_scores[first]
    prior = np.zeros(n_items, dtype=np.float64)
    prior[pop_items] = np.maximum(pop_scores, 0.0)
    if n_items and prior.max() > 0:
        prior /= prior.max()

    if cooc is not None and cooc.num_rows:
        src = codes(cooc["item_id"])
        dst = codes(cooc["neighbor_id"])
        ranks = _ints(cooc["rank"])
        scores = _floats(cooc["score"])
        usable = (src != dst) & np.isfinite(scores)
        src, dst, ranks, scores = src[usable], dst[usable], ranks[usable], scores[usable]
        order = np.lexsort((ranks, src))
        src, dst, scores = src[order].astype(np.int64), dst[order].astype(np.int32), scores[order]
        # A neighbour listed twice for one item keeps its best rank (the rows are distinct pairs by
        # contract; the ranking relies on it).
        _, first = np.unique(src * n_items + dst, return_index=True)
        if len(first) < len(src):
            first.sort()
            src, dst, scores = src[first], dst[first], scores[first]
        cooc_indptr = _indptr(src, n_items)
        cooc_neighbors, cooc_scores = dst, scores.astype(np.float64)
    else:
        cooc_indptr = np.zeros(n_items + 1, dtype=np.int64)
        cooc_neighbors, cooc_scores = _EMPTY_I32, _EMPTY_F64

    if history is not None and history.num_rows:
        # Anonymous activity has no user to personalise for.
        history = history.filter(pc.not_equal(history["user_id"], ""))
        encoded = history["user_id"].combine_chunks().dictionary_encode()
        user_codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        user_ids: list[str] = encoded.dictionary.to_pylist()
        order = np.lexsort((_ints(history["rank"]), user_codes))
        history_items = codes(history["item_id"])[order].astype(np.int32)
        history_weights = _floats(history["weight"])[order]
        history_indptr = _indptr(user_codes[order], len(user_ids))
        user_index = {user: i for i, user in enumerate(user_ids)}
    else:
        history_items, history_indptr, user_index = _EMPTY_I32, np.zeros(1, dtype=np.int64), {}
        history_weights = _EMPTY_F64

    als_model = (
        _als_model(artifact_root, tenant, surface, manifest, codes(als["item_id"]), n_items)
        if als is not None
        else None
    )

    blend = BlendWeights(**manifest["blend"]) if "blend" in manifest else None
    topn: UserTopN | None = None
    topn_note: str | None = None
    if "user_topn" in tables:
        topn, topn_note = _user_topn(
            artifact_root, tenant, surface, manifest, tables["user_topn"], item_index, blend or weights
        )
    else:
        topn_note = "the manifest has no user_topn artifact"

    catalog = ServedCatalog(content, item_index, n_items) if content is not None else None
    rules = (
        ServedRules(
            manifest["artifacts"][RULES_KIND]["version"],
            _read_rules(artifact_root, tenant, surface, manifest),
            item_index,
            cold_start_max_interactions,
            catalog,
        )
        if RULES_KIND in current
        else None
    )
    kinds = (
        tuple(kind for kind in SERVED_KINDS if kind in current)
        + ((CONTENT.name,) if catalog is not None else ())
        + ((RULES_KIND,) if rules else ())
    )
    updated_at = str(manifest.get("updated_at", ""))
    return LoadedTarget(
        tenant=tenant,
        surface=surface,
        manifest=manifest.copy(),
        manifest_version=manifest["manifest_version"],
        as_of=manifest["as_of"],
        blend=blend,
        updated_at=updated_at,
        updated_at_epoch=_epoch(updated_at),
        loaded_at=time.time(),
        load_seconds=time.perf_counter() - started,
        kinds=kinds,
        ignored_kinds=tuple(sorted(kind for kind in current if kind not in kinds)),
        item_ids=item_ids,
        item_index=item_index,
        popular_items=pop_items,
        popular_scores=pop_scores,
        popularity_prior=prior,
        cooc_indptr=cooc_indptr,
        cooc_neighbors=cooc_neighbors,
        cooc_scores=cooc_scores,
        user_index=user_index,
        history_indptr=history_indptr,
        history_items=history_items,
        history_weights=history_weights,
        als=als_model,
        user_topn=topn,
        user_topn_note=topn_note,
        cooc_keys=cooc_neighbors.astype(np.int64) << 32,
        cooc_ptr=cooc_indptr.tolist(),
        cooc_neighbor_list=_shared_ints(cooc_neighbors, n_items),
        cooc_score_list=cooc_scores.tolist(),
        popular_list=pop_items.tolist(),
        popular_score_list=pop_scores.tolist(),
        artifact_versions={
            kind: str(manifest["artifacts"][kind]["version"])
            for kind in kinds
            if kind in manifest["artifacts"]
        },
        rules=rules,
        catalog=catalog,
    )


def _read_rules(artifact_root: Path, tenant: str, surface: str, manifest: Manifest) -> RulesDocument:
    """The rules document of a verified `rules` artifact (parsed and validated again: a document that
    reached the artifact root some other way than `recsys rules publish` is refused, not served)."""
    uri = manifest["current"][RULES_KIND]
    folder = resolve_uri(artifact_root, tenant, surface, uri)
    problems = verify_artifact(folder, required_nonempty=False)
    if problems:
        raise LoadError(f"rules artifact {uri} is not valid: {'; '.join(problems)}")
    if read_meta(folder).get("version") != manifest["artifacts"][RULES_KIND]["version"]:
        raise LoadError(f"rules artifact {uri}: meta.json version does not match the manifest's")
    try:
        return read_published_rules(folder)
    except RulesError as exc:
        raise LoadError(f"rules artifact {uri}: {exc}") from exc


def _read_artifact(artifact_root: Path, tenant: str, surface: str, manifest: Manifest, kind: str) -> pa.Table:
    """One verified artifact's data file, with the columns the server reads cast to known types."""
    uri = manifest["current"][kind]
    folder = resolve_uri(artifact_root, tenant, surface, uri)
    problems = verify_artifact(folder, required_nonempty=kind in REQUIRED_KINDS)
    if problems:
        raise LoadError(f"{kind} artifact {uri} is not valid: {'; '.join(problems)}")
    meta = read_meta(folder)
    expected = manifest["artifacts"][kind]["version"]
    if meta.get("version") != expected:
        raise LoadError(f"{kind} artifact {uri}: meta.json version does not match the manifest's {expected}")
    name = ARTIFACT_KINDS[kind].table
    if name not in meta.get("files", {}):
        raise LoadError(f"{kind} artifact {uri}: {name} is not listed in meta.json")
    columns = _served_types(ARTIFACT_KINDS[kind])
    try:
        table = pq.read_table(folder / name, columns=list(columns))
        table = pa.table({col: table[col].cast(dtype) for col, dtype in columns.items()})
    except (pa.ArrowException, KeyError, OSError) as exc:
        raise LoadError(f"{kind} artifact {uri}: {name} unreadable or of the wrong shape ({exc})") from exc
    nulls = [col for col in columns if table[col].null_count]
    if nulls:
        raise LoadError(f"{kind} artifact {uri}: {name} has null values in {', '.join(nulls)}")
    return table


def _als_model(
    artifact_root: Path,
    tenant: str,
    surface: str,
    manifest: Manifest,
    item_codes: np.ndarray,
    n_items: int,
) -> AlsModel:
    """The factor arrays of a verified `als` artifact, item factors re-indexed to the vocabulary."""
    folder = resolve_uri(artifact_root, tenant, surface, manifest["current"]["als"])
    params = read_meta(folder).get("params", {})
    try:
        users = pq.read_table(folder / "users.parquet", columns=["user_id"]).column(0).to_pylist()
        user_factors = np.load(folder / "user_factors.npy", allow_pickle=False)
        item_factors = np.load(folder / "item_factors.npy", allow_pickle=False)
        regularization, alpha = float(params["regularization"]), float(params["alpha"])
        confidence = str(params.get("confidence", "linear"))
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException) as exc:
        raise LoadError(f"als artifact {folder.name[:12]}: unreadable ({exc})") from exc
    if (
        user_factors.ndim != 2
        or item_factors.ndim != 2
        or user_factors.shape != (len(users), item_factors.shape[1])
        or item_factors.shape[0] != len(item_codes)
        or not (np.isfinite(user_factors).all() and np.isfinite(item_factors).all())
    ):
        raise LoadError(f"als artifact {folder.name[:12]}: factor arrays do not match their id tables")
    aligned = np.zeros((n_items, item_factors.shape[1]), dtype=np.float64)
    aligned[item_codes] = item_factors
    known = np.zeros(n_items, dtype=bool)
    known[item_codes] = True
    return AlsModel(
        user_index={user: i for i, user in enumerate(users)},
        user_factors=np.ascontiguousarray(user_factors, dtype=np.float32),
        item_factors=aligned,
        known_items=known,
        gram=aligned.T @ aligned,
        regularization=regularization,
        alpha=alpha,
        confidence=confidence,
    )


def _user_topn(
    artifact_root: Path,
    tenant: str,
    surface: str,
    manifest: Manifest,
    users: pa.Table,
    item_index: dict[str, int],
    weights: BlendWeights | None,
) -> tuple[UserTopN | None, str | None]:
    """The verified `user_topn` artifact's arrays, or None and why when it does not fit the manifest.

    It fits when it was computed from the very artifact versions the manifest serves and with the blend
    weights in force (`weights`; None: not known here, checked per request only). A user_topn that does
    not fit is not an error: the live blend serves, as for a manifest without one.
    """
    folder = resolve_uri(artifact_root, tenant, surface, manifest["current"][USER_TOPN.name])
    meta = read_meta(folder)
    inputs: dict[str, Any] = dict(meta.get("inputs") or {})
    built_from: dict[str, str] = inputs.get("artifacts") or {}
    for kind in USER_TOPN.derived_from:
        entry = manifest["artifacts"].get(kind)
        served = entry["version"] if entry else None
        if built_from.get(kind) != served:
            return None, (
                f"user_topn was computed from {kind} {str(built_from.get(kind))[:12]}, the manifest serves "
                f"{str(served)[:12]}: live blend"
            )
    params = meta.get("params", {})
    try:
        recorded = BlendWeights(**params["blend"])
        depth = int(params["top_n"])
        item_ids = pq.read_table(folder / "item_ids.parquet", columns=["item_id"]).column(0)
        offsets = np.load(folder / "offsets.npy", allow_pickle=False)
        items = np.load(folder / "items.npy", mmap_mode="r", allow_pickle=False)
        contributions = np.load(folder / "contributions.npy", mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException) as exc:
        raise LoadError(f"user_topn artifact {folder.name[:12]}: unreadable ({exc})") from exc
    if weights is not None and recorded != weights:
        return None, (
            f"user_topn was computed with blend weights {dataclasses.asdict(recorded)}, requests are ranked "
            f"with {dataclasses.asdict(weights)}: live blend"
        )
    vocabulary = np.array([item_index.get(item, -1) for item in item_ids.to_pylist()], dtype=np.int32)
    rows = len(items)
    if (
        offsets.shape != (users.num_rows + 1,)
        or items.dtype != np.int32
        or contributions.shape != (rows, len(BLEND_SOURCES))
        or contributions.dtype != np.float64
        or (users.num_rows and (offsets[0] != 0 or offsets[-1] != rows or np.any(np.diff(offsets) < 0)))
        or (rows and (int(items.min()) < 0 or int(items.max()) >= len(vocabulary)))
        or np.any(vocabulary < 0)
    ):
        raise LoadError(f"user_topn artifact {folder.name[:12]}: arrays do not match their id tables")
    names = users["sources"].combine_chunks().dictionary_encode()
    kinds_of = [frozenset(filter(None, str(text).split(","))) for text in names.dictionary.to_pylist()]
    sources = [kinds_of[code] for code in names.indices.to_numpy(zero_copy_only=False).tolist()]
    return (
        UserTopN(
            weights=recorded,
            depth=depth,
            user_index={user: i for i, user in enumerate(users["user_id"].to_pylist())},
            offsets=offsets.astype(np.int64, copy=False),
            # Plain arrays over the mapped memory: slicing an np.memmap costs a subclass round trip.
            items=items.view(np.ndarray),
            vocabulary=vocabulary,
            contributions=contributions.view(np.ndarray),
            sources=sources,
        ),
        None,
    )


def _served_types(kind: ArtifactKind) -> dict[str, pa.DataType]:
    """The served columns of a kind and the types the loader works with (64-bit ints, large strings)."""
    types = {}
    for name in kind.served_columns:
        declared = kind.schema.field(name).type
        if pa.types.is_integer(declared):
            types[name] = pa.int64()
        elif pa.types.is_string(declared):
            types[name] = pa.large_string()
        else:
            types[name] = declared
    return types


def _shared_ints(values: np.ndarray, n: int) -> list[int]:
    """`values.tolist()`, with one int object per distinct value instead of one per element."""
    objects = list(range(n))
    return [objects[v] for v in values.tolist()]


def _ints(column: pa.ChunkedArray) -> np.ndarray:
    values: np.ndarray = column.to_numpy()
    return values.astype(np.int64, copy=False)


def _floats(column: pa.ChunkedArray) -> np.ndarray:
    values: np.ndarray = column.to_numpy(zero_copy_only=False)
    return values.astype(np.float64, copy=False)


def _indptr(sorted_rows: np.ndarray, n_rows: int) -> np.ndarray:
    """CSR row pointers for row ids that are already sorted ascending."""
    indptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(sorted_rows, minlength=n_rows), out=indptr[1:])
    return indptr


def _epoch(text: str) -> float:
    try:
        moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return time.time()
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.timestamp()


def _iso(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
