"""Prometheus metrics of the API: request counts and latencies, recommendation fallbacks, merchandising
rule applications, and the state of the served manifests, of the exposure log and of the decision traces
(read from their owners at scrape time).

A process serving alone keeps everything in memory. The workers of `recsys serve --workers N` share a
directory (`PROMETHEUS_MULTIPROC_DIR`, made by `recsys_serving.server.serve`), so that a scrape, whichever
worker answers it, reports the whole server:

- request counters and latency histograms use prometheus_client's multiprocess mode: each worker's values
  live in memory-mapped files there, summed at scrape time (a worker that died still counts);
- the state read from the store and the log writers is written by each worker to a small JSON file
  there (`worker-<pid>-<token>.json`) every WORKER_STATE_SECONDS, when it answers a scrape, and when it
  stops. Counters are summed over every worker that ever ran; gauges are reported per live worker, with a
  `pid` label. A worker whose file is older than WORKER_LIVE_SECONDS, or that stopped, is not live.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
    values,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from recsys_serving.exposures import ExposureWriter
from recsys_serving.landing import LandingWriter
from recsys_serving.server import MULTIPROCESS_DIR_VARIABLE
from recsys_serving.store import ArtifactStore
from recsys_serving.traces import DecisionWriter

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
# How often a worker writes its state for the others, and how old a state may be for its worker to count
# as live (uvicorn's supervisor replaces a worker that does not answer its health check within 5 s).
WORKER_STATE_SECONDS = 1.0
WORKER_LIVE_SECONDS = 5.0
# The exposure writer's counters: metric name (without `_total`), help, attribute of ExposureWriter.
EXPOSURE_COUNTERS = (
    ("recsys_exposure_events_written", "Exposure events written to raw landing", "events_written"),
    ("recsys_exposure_responses_dropped", "Responses not logged: queue full", "responses_dropped"),
    (
        "recsys_exposure_events_over_cap",
        "Exposure events not written: the day's log reached RECSYS_EXPOSURE_MAX_BYTES_PER_DAY",
        "events_over_cap",
    ),
    ("recsys_exposure_write_errors", "Failed exposure log writes", "write_errors"),
    ("recsys_exposure_files_published", "Exposure files made visible", "files_published"),
)
# The same counters of the decision log's writer (one line per traced response).
DECISION_COUNTERS = (
    ("recsys_decision_traces_written", "Decision traces written to raw landing", "events_written"),
    ("recsys_decision_traces_dropped", "Decision traces not logged: queue full", "responses_dropped"),
    (
        "recsys_decision_traces_over_cap",
        "Decision traces not written: the day's log reached RECSYS_DECISION_MAX_BYTES_PER_DAY",
        "events_over_cap",
    ),
    ("recsys_decision_write_errors", "Failed decision log writes", "write_errors"),
    ("recsys_decision_files_published", "Decision trace files made visible", "files_published"),
)


def shared_metrics_dir() -> Path | None:
    """The directory this process shares its metrics through with the other workers of its server, or
    None when it keeps them in memory (prometheus_client chose its mode when it was first imported)."""
    if not getattr(values.ValueClass, "_multiprocess", False):
        return None
    return Path(os.environ[MULTIPROCESS_DIR_VARIABLE])


class ServingMetrics:
    """Prometheus metrics of one app (its own registry, so several apps can live in one process)."""

    def __init__(
        self,
        store: ArtifactStore,
        exposures: ExposureWriter | None,
        shared_dir: Path | None = None,
        decisions: DecisionWriter | None = None,
    ) -> None:
        # `*_created` series double the size of /metrics and no dashboard here uses them (a process-wide
        # switch of prometheus_client).
        disable_created_metrics()  # type: ignore[no-untyped-call]  # prometheus_client leaves it unannotated
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "recsys_http_requests",
            "HTTP requests by route template, method and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "recsys_http_request_duration_seconds",
            "HTTP request latency in seconds by route template, method and status",
            ["route", "method", "status"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.fallbacks = Counter(
            "recsys_recommendation_fallbacks",
            "Recommendation responses that degraded (fallback or short list), by tenant, surface and code",
            ["tenant", "surface", "reason"],
            registry=self.registry,
        )
        # Labelled by rule id: a published document holds at most recsys_core.rules.MAX_RULES rules, so
        # the series stay bounded by what merchandisers publish, never by what clients send.
        self.rule_applications = Counter(
            "recsys_rule_applications",
            "Recommendation responses in which a merchandising rule changed a returned item",
            ["tenant", "surface", "rule_id"],
            registry=self.registry,
        )
        self._request_children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self._fallback_children: dict[tuple[str, str, str], Any] = {}
        self._rule_children: dict[tuple[str, str, str], Any] = {}

        def sample() -> WorkerState:
            return WorkerState.of(store, exposures, decisions)

        self.workers: SharedWorkerStates | None = None
        if shared_dir is None:
            self.exposition = self.registry
            self.exposition.register(_StateCollector(lambda: [WorkerReport(None, True, sample())]))
        else:
            self.workers = SharedWorkerStates(shared_dir, sample)
            self.exposition = CollectorRegistry(auto_describe=True)
            MultiProcessCollector(self.exposition, path=str(shared_dir))  # type: ignore[no-untyped-call]
            self.exposition.register(_StateCollector(self.workers.reports))

    def start(self) -> None:
        """Start reporting this worker's state to the others (nothing to do for a process alone)."""
        if self.workers is not None:
            self.workers.start()

    def stop(self) -> None:
        """Report this worker's final state (after the exposure log is closed) and stop reporting."""
        if self.workers is not None:
            self.workers.stop()

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        key = (route, method, status)
        children = self._request_children.get(key)
        if children is None:
            labels = (route, method, str(status))
            children = (self.requests.labels(*labels), self.latency.labels(*labels))
            self._request_children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def fallback(self, tenant: str, surface: str, reason: str) -> None:
        # Labels come from served targets and fixed codes only, so cardinality stays bounded.
        key = (tenant, surface, reason)
        child = self._fallback_children.get(key)
        if child is None:
            child = self._fallback_children[key] = self.fallbacks.labels(*key)
        child.inc()

    def rules_applied(self, tenant: str, surface: str, rule_ids: list[list[str]]) -> None:
        """Count each rule that touched one of a response's items once."""
        children = self._rule_children
        for rule_id in {rule_id for ids in rule_ids for rule_id in ids}:
            key = (tenant, surface, rule_id)
            child = children.get(key)
            if child is None:
                child = children[key] = self.rule_applications.labels(*key)
            child.inc()

    def render(self) -> bytes:
        return generate_latest(self.exposition)


# ------------------------------------------------------------------------------- worker state


@dataclass(frozen=True)
class ServedTarget:
    tenant: str
    surface: str
    manifest_version: str
    as_of: str
    updated_at_epoch: float
    loaded_at: float
    n_items: int
    n_users: int


@dataclass(frozen=True)
class TargetLoads:
    tenant: str
    surface: str
    loads: int
    failures: int
    failing: bool


@dataclass(frozen=True)
class WorkerState:
    """The served manifests, load bookkeeping and log counts of one worker at one moment."""

    served: tuple[ServedTarget, ...]
    loads: tuple[TargetLoads, ...]
    poll_errors: int
    # Each log writer's counter attribute -> value, and its queue length; None with the log off.
    exposure_counts: dict[str, int] | None
    exposure_pending: int | None
    decision_counts: dict[str, int] | None = None
    decision_pending: int | None = None

    @classmethod
    def of(
        cls, store: ArtifactStore, exposures: ExposureWriter | None, decisions: DecisionWriter | None = None
    ) -> WorkerState:
        return cls(
            served=tuple(
                ServedTarget(
                    tenant,
                    surface,
                    target.manifest_version,
                    target.as_of,
                    target.updated_at_epoch,
                    target.loaded_at,
                    target.n_items,
                    target.n_users,
                )
                for (tenant, surface), target in sorted(store.snapshot.targets.items())
            ),
            loads=tuple(
                TargetLoads(s.tenant, s.surface, s.loads, s.failures, s.failing) for s in store.statuses()
            ),
            poll_errors=store.poll_errors,
            exposure_counts=_counts(exposures, EXPOSURE_COUNTERS),
            exposure_pending=None if exposures is None else exposures.pending,
            decision_counts=_counts(decisions, DECISION_COUNTERS),
            decision_pending=None if decisions is None else decisions.pending,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WorkerState:
        return cls(
            served=tuple(ServedTarget(**row) for row in data["served"]),
            loads=tuple(TargetLoads(**row) for row in data["loads"]),
            poll_errors=data["poll_errors"],
            exposure_counts=data["exposure_counts"],
            exposure_pending=data["exposure_pending"],
            decision_counts=data.get("decision_counts"),
            decision_pending=data.get("decision_pending"),
        )


def _counts(
    writer: LandingWriter[Any] | None, counters: tuple[tuple[str, str, str], ...]
) -> dict[str, int] | None:
    return None if writer is None else {attribute: getattr(writer, attribute) for _, _, attribute in counters}


@dataclass(frozen=True)
class WorkerReport:
    """A worker's state as a scrape sees it: `pid` labels its gauges (None: a process serving alone)."""

    pid: str | None
    live: bool
    state: WorkerState


class SharedWorkerStates:
    """This worker's state file in the shared directory, and every worker's state read back.

    The file is replaced whole (temp file, rename) so a reader never sees half of it; it is scratch
    state of a running server, so it is not fsynced. A scrape writes this worker's state before reading
    all of them: every file only ever moves forward, so the summed counters never go down from one scrape
    to the next, whichever worker answers each.
    """

    def __init__(self, directory: Path, sample: Callable[[], WorkerState]) -> None:
        self.directory = directory
        self.sample = sample
        self.pid = os.getpid()
        # A token as well as the pid: a later worker that gets a dead worker's pid has its own file.
        self.path = directory / f"worker-{self.pid}-{secrets.token_hex(4)}.json"
        self._write_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.write()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="recsys-metrics-state", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.write(stopped=True)

    def write(self, *, stopped: bool = False) -> None:
        with self._write_lock:  # the periodic write and a scrape's write never reorder
            record = {
                "pid": self.pid,
                "written_at": time.time(),
                "stopped": stopped,
                **dataclasses.asdict(self.sample()),
            }
            staged = self.path.with_name(f".{self.path.name}.tmp")
            staged.write_bytes(orjson.dumps(record))
            os.replace(staged, self.path)

    def reports(self) -> list[WorkerReport]:
        """Every worker's state, this one's fresh."""
        self.write()
        now = time.time()
        reports = []
        for path in sorted(self.directory.glob("worker-*.json")):
            record = orjson.loads(path.read_bytes())
            live = not record["stopped"] and now - record["written_at"] <= WORKER_LIVE_SECONDS
            reports.append(WorkerReport(str(record["pid"]), live, WorkerState.from_dict(record)))
        return reports

    def _run(self) -> None:
        while not self._stop.wait(WORKER_STATE_SECONDS):
            self.write()


# ---------------------------------------------------------------------------------- collector


class _StateCollector:
    """Served manifests, load failures and the exposure log of every worker, at scrape time: counters
    summed over all workers, gauges per live worker."""

    def __init__(self, reports: Callable[[], list[WorkerReport]]) -> None:
        self.reports = reports

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        now = time.time()
        reports = self.reports()
        live = [r for r in reports if r.live]
        per_worker = [] if all(r.pid is None for r in reports) else ["pid"]

        def worker_gauge(name: str, help_text: str, labels: list[str]) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, help_text, labels=[*labels, *per_worker])

        def pid(report: WorkerReport) -> list[str]:
            return [] if report.pid is None else [report.pid]

        target = ["tenant", "surface"]
        info = worker_gauge(
            "recsys_manifest_info",
            "The manifest served per tenant and surface (value 1)",
            [*target, "manifest_version", "as_of"],
        )
        age = worker_gauge(
            "recsys_manifest_age_seconds", "Seconds since the served manifest was published", target
        )
        loaded = worker_gauge(
            "recsys_manifest_loaded_timestamp_seconds", "Unix time the served manifest was loaded", target
        )
        items = worker_gauge("recsys_manifest_items", "Items in the served vocabulary", target)
        users = worker_gauge("recsys_manifest_users", "Users with a served history", target)
        failing = worker_gauge(
            "recsys_manifest_load_failing",
            "1 while the current manifest cannot be loaded (the last good version keeps serving)",
            target,
        )
        for report in live:
            for served in report.state.served:
                key = [served.tenant, served.surface]
                info.add_metric([*key, served.manifest_version, served.as_of, *pid(report)], 1)
                age.add_metric([*key, *pid(report)], max(0.0, now - served.updated_at_epoch))
                loaded.add_metric([*key, *pid(report)], served.loaded_at)
                items.add_metric([*key, *pid(report)], served.n_items)
                users.add_metric([*key, *pid(report)], served.n_users)
            for status in report.state.loads:
                failing.add_metric([status.tenant, status.surface, *pid(report)], 1 if status.failing else 0)

        load_counts: defaultdict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
        for report in reports:
            for status in report.state.loads:
                counts = load_counts[(status.tenant, status.surface)]
                counts[0] += status.loads
                counts[1] += status.failures
        loads = CounterMetricFamily("recsys_manifest_loads", "Manifest versions loaded", labels=target)
        failures = CounterMetricFamily(
            "recsys_manifest_load_failures", "Failed attempts to load a manifest", labels=target
        )
        for (tenant, surface), (n_loads, n_failures) in sorted(load_counts.items()):
            loads.add_metric([tenant, surface], n_loads)
            failures.add_metric([tenant, surface], n_failures)
        polls = CounterMetricFamily("recsys_manifest_poll_errors", "Manifest poll passes that failed")
        polls.add_metric([], sum(r.state.poll_errors for r in reports))
        yield from (info, age, loaded, items, users, loads, failures, failing, polls)

        logs = (
            (
                "exposure",
                EXPOSURE_COUNTERS,
                "recsys_exposure_pending_responses",
                "Responses queued for the log",
            ),
            ("decision", DECISION_COUNTERS, "recsys_decision_pending_traces", "Traces queued for the log"),
        )
        for log_name, counters, pending_name, pending_help in logs:
            states = [
                (report, counts, getattr(report.state, f"{log_name}_pending"))
                for report in reports
                if (counts := getattr(report.state, f"{log_name}_counts")) is not None
            ]
            if not states:
                continue
            for name, help_text, attribute in counters:
                family = CounterMetricFamily(name, help_text)
                family.add_metric([], sum(counts[attribute] for _, counts, _ in states))
                yield family
            pending = worker_gauge(pending_name, pending_help, [])
            for report, _, queued in states:
                if report.live:
                    pending.add_metric(pid(report), queued or 0)
            yield pending
