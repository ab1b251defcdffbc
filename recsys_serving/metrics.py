"""Prometheus metrics of one app: request counts and latencies, recommendation fallbacks, and the state
of the served manifests and of the exposure log (read from their owners at scrape time)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from recsys_serving.exposures import ExposureWriter
from recsys_serving.store import ArtifactStore

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class ServingMetrics:
    """Prometheus metrics of one app (its own registry, so several apps can live in one process)."""

    def __init__(self, store: ArtifactStore, exposures: ExposureWriter | None) -> None:
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
        self.registry.register(_StateCollector(store, exposures))
        self._request_children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self._fallback_children: dict[tuple[str, str, str], Any] = {}

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

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StateCollector:
    """Served manifests, load failures and the exposure log, read from their owners at scrape time."""

    def __init__(self, store: ArtifactStore, exposures: ExposureWriter | None) -> None:
        self.store = store
        self.exposures = exposures

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        now = time.time()
        labels = ["tenant", "surface"]
        info = GaugeMetricFamily(
            "recsys_manifest_info",
            "The manifest served per tenant and surface (value 1)",
            labels=[*labels, "manifest_version", "as_of"],
        )
        age = GaugeMetricFamily(
            "recsys_manifest_age_seconds", "Seconds since the served manifest was published", labels=labels
        )
        loaded = GaugeMetricFamily(
            "recsys_manifest_loaded_timestamp_seconds",
            "Unix time the served manifest was loaded",
            labels=labels,
        )
        items = GaugeMetricFamily("recsys_manifest_items", "Items in the served vocabulary", labels=labels)
        users = GaugeMetricFamily("recsys_manifest_users", "Users with a served history", labels=labels)
        for (tenant, surface), target in sorted(self.store.snapshot.targets.items()):
            info.add_metric([tenant, surface, target.manifest_version, target.as_of], 1)
            age.add_metric([tenant, surface], max(0.0, now - target.updated_at_epoch))
            loaded.add_metric([tenant, surface], target.loaded_at)
            items.add_metric([tenant, surface], target.n_items)
            users.add_metric([tenant, surface], target.n_users)
        loads = CounterMetricFamily("recsys_manifest_loads", "Manifest versions loaded", labels=labels)
        failures = CounterMetricFamily(
            "recsys_manifest_load_failures", "Failed attempts to load a manifest", labels=labels
        )
        failing = GaugeMetricFamily(
            "recsys_manifest_load_failing",
            "1 while the current manifest cannot be loaded (the last good version keeps serving)",
            labels=labels,
        )
        for status in self.store.statuses():
            key = [status.tenant, status.surface]
            loads.add_metric(key, status.loads)
            failures.add_metric(key, status.failures)
            failing.add_metric(key, 1 if status.failing else 0)
        polls = CounterMetricFamily("recsys_manifest_poll_errors", "Manifest poll passes that failed")
        polls.add_metric([], self.store.poll_errors)
        yield from (info, age, loaded, items, users, loads, failures, failing, polls)
        if self.exposures is not None:
            ex = self.exposures
            for name, help_text, value in (
                (
                    "recsys_exposure_events_written",
                    "Exposure events written to raw landing",
                    ex.events_written,
                ),
                (
                    "recsys_exposure_responses_dropped",
                    "Responses not logged: queue full",
                    ex.responses_dropped,
                ),
                (
                    "recsys_exposure_events_over_cap",
                    "Exposure events not written: the day's log reached RECSYS_EXPOSURE_MAX_BYTES_PER_DAY",
                    ex.events_over_cap,
                ),
                ("recsys_exposure_write_errors", "Failed exposure log writes", ex.write_errors),
                ("recsys_exposure_files_published", "Exposure files made visible", ex.files_published),
            ):
                family = CounterMetricFamily(name, help_text)
                family.add_metric([], value)
                yield family
            pending = GaugeMetricFamily("recsys_exposure_pending_responses", "Responses queued for the log")
            pending.add_metric([], ex.pending)
            yield pending
