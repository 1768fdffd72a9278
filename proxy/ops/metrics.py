"""Prometheus metrics: one registry per gateway, exported at ``GET /metrics``.

Names start with ``pixazo_proxy_``; units are in the names (``_seconds``,
``_usd``), counters end in ``_total``; labels stay bounded (route, model,
team, resolution, outcome or status class), never user or request ids.

Two kinds of metric live here. Events the process sees (requests, upstream
calls, cache answers, webhook attempts, alerts) are counters and histograms
updated as they happen. Figures the store holds (spend, reservations,
budgets, savings, jobs in flight and finished, outbox depth) are read from
the store at scrape time by :class:`StoreCollector`, so they never drift
from the ledger, across restarts included.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Awaitable, Callable, Iterator
from contextvars import ContextVar
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .. import __version__

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
JOB_BUCKETS = (5, 15, 30, 60, 120, 300, 600, 1200, 3600, 7200)

#: Seconds spent waiting on the upstream during the current request (see ``proxy.observe``).
upstream_seconds: ContextVar[list[float] | None] = ContextVar("upstream_seconds", default=None)


def status_class(status: int) -> str:
    return f"{status // 100}xx"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.build_info = Gauge("pixazo_proxy_build_info", "Version of the running gateway (always 1).",
                                ["version", "python"], registry=registry)
        self.build_info.labels(version=__version__, python=platform.python_version()).set(1)
        self.policy_loaded = Gauge("pixazo_proxy_policy_load_timestamp_seconds",
                                   "When the policy files were loaded and checked.", registry=registry)
        self.policy_models = Gauge("pixazo_proxy_policy_models", "Models in the loaded catalog.", registry=registry)
        self.requests = Counter("pixazo_proxy_requests_total", "HTTP requests answered, by route, model, team and status class.",
                                ["route", "model", "team", "status_class"], registry=registry)
        self.request_duration = Histogram("pixazo_proxy_request_duration_seconds",
                                          "Time to answer a request, upstream time included.", ["route"],
                                          buckets=LATENCY_BUCKETS, registry=registry)
        self.overhead = Histogram("pixazo_proxy_gateway_overhead_seconds",
                                  "Time the gateway itself added to a request (total minus upstream time).", ["route"],
                                  buckets=LATENCY_BUCKETS, registry=registry)
        self.upstream_requests = Counter("pixazo_proxy_upstream_requests_total",
                                         "Calls to the upstream by operation and status class (error when no status).",
                                         ["operation", "status_class"], registry=registry)
        self.upstream_duration = Histogram("pixazo_proxy_upstream_request_duration_seconds",
                                           "Upstream call latency by operation.", ["operation"],
                                           buckets=LATENCY_BUCKETS, registry=registry)
        self.upstream_errors = Counter("pixazo_proxy_upstream_errors_total",
                                       "Failed upstream calls by kind (timeout, connect, malformed, 429, 4xx, 5xx).",
                                       ["operation", "kind"], registry=registry)
        self.budget_rejections = Counter("pixazo_proxy_budget_rejections_total",
                                         "Submits refused with 402 because a budget or cost cap would be passed.",
                                         ["team"], registry=registry)
        self.soft_limit_alerts = Counter("pixazo_proxy_budget_soft_limit_alerts_total",
                                         "Times a team's usage reached its soft threshold (once per team and period).",
                                         ["team"], registry=registry)
        self.budget_overruns = Counter("pixazo_proxy_budget_overruns_total",
                                       "Jobs whose actual cost exceeded what was reserved for them (charged in full).",
                                       ["team"], registry=registry)
        self.budget_overrun_usd = Counter("pixazo_proxy_budget_overrun_usd_total",
                                          "USD charged beyond the reservations of overrun jobs.", ["team"],
                                          registry=registry)
        self.indeterminate_submits = Counter(
            "pixazo_proxy_indeterminate_submits_total",
            "Submits sent upstream whose answer was lost (timeout, reset, crash): held, then resolved by policy.",
            ["model"], registry=registry)
        self.indeterminate_resolved = Counter(
            "pixazo_proxy_indeterminate_resolved_total",
            "Indeterminate submits the sweeper resolved, by action (charge or release).", ["action"], registry=registry)
        self.cache_events = Counter("pixazo_proxy_cache_events_total",
                                    "Submits by how the dedup cache answered them (hit, miss, coalesced, bypass).",
                                    ["result"], registry=registry)
        self.job_duration = Histogram("pixazo_proxy_job_duration_seconds",
                                      "From submit to a terminal status, by model.", ["model"],
                                      buckets=JOB_BUCKETS, registry=registry)
        self.webhook_deliveries = Counter("pixazo_proxy_webhook_deliveries_total",
                                          "Webhook delivery attempts by outcome (delivered, retried, failed).",
                                          ["outcome"], registry=registry)
        self.tracker_lag = Gauge("pixazo_proxy_tracker_lag_seconds",
                                 "How far past its poll interval the most overdue running job was at the last round.",
                                 registry=registry)
        self.queue_admitted = Counter("pixazo_proxy_queue_admitted_total",
                                      "Submits that waited in the local queue instead of going upstream at once.",
                                      ["team"], registry=registry)
        self.queue_dispatches = Counter("pixazo_proxy_queue_dispatches_total",
                                        "Waiting jobs the dispatcher sent upstream, by team.", ["team"], registry=registry)
        self.queue_wait = Histogram("pixazo_proxy_queue_wait_seconds", "Time a job waited in the local queue, by team.",
                                    ["team"], registry=registry,
                                    buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600))
        self.queue_ended = Counter("pixazo_proxy_queue_ended_total",
                                   "Waiting jobs that ended without being sent (cancelled, expired, refused), by team "
                                   "and reason.", ["team", "reason"], registry=registry)
        self.upstream_throttled = Counter("pixazo_proxy_upstream_throttled_total",
                                          "Upstream 429s at submit the gateway absorbed (the job waited and was sent "
                                          "again; no client saw the 429).", registry=registry)
        self.store_collector: StoreCollector | None = None
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}

    def child(self, metric: Any, *values: str) -> Any:
        """``metric.labels(*values)``, remembered (labels() checks and locks on every call; a hot path pays for it).

        Label values are bounded (see the module docstring), so this map is too.
        """
        key = (metric, values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found

    def request_answered(self, route: str, model: str, team: str, status: int, seconds: float,
                         upstream_seconds: float) -> None:
        """One HTTP request answered: its count, its duration, and the part of it the gateway added."""
        self.child(self.requests, route, model, team, status_class(status)).inc()
        self.child(self.request_duration, route).observe(seconds)
        self.child(self.overhead, route).observe(max(0.0, seconds - upstream_seconds))
        if status == 402 and team:
            self.child(self.budget_rejections, team).inc()

    def watch_store(self, refresh: Callable[[], Awaitable[dict[str, list[tuple[dict[str, str], float]]]]]) -> None:
        """Export figures that ``refresh`` reads from the store at each scrape."""
        self.store_collector = StoreCollector(refresh)
        self.registry.register(self.store_collector)

    async def render(self) -> bytes:
        if self.store_collector is not None:
            await self.store_collector.refresh()
        directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if directory:  # serve --workers N: every worker's counters, added up, and the store's figures once
            combined = CollectorRegistry()
            multiprocess.MultiProcessCollector(combined, path=directory)
            if self.store_collector is not None:
                combined.register(self.store_collector)
            return generate_latest(combined)
        return generate_latest(self.registry)


# name -> (kind, help); the store reports values under these names
STORE_METRICS: dict[str, tuple[str, str]] = {
    "pixazo_proxy_spent_usd": ("counter", "Settled spend by team and model (the ledger's settle rows)."),
    "pixazo_proxy_reserved_usd": ("gauge", "Money reserved for running jobs, by team and model."),
    "pixazo_proxy_budget_limit_usd": ("gauge", "A team's allowance this period: limit plus top-ups."),
    "pixazo_proxy_budget_used_usd": ("gauge", "A team's spent plus reserved this period."),
    "pixazo_proxy_budget_remaining_usd": ("gauge", "What a team may still reserve this period."),
    "pixazo_proxy_cache_saved_usd": ("counter", "Money not spent thanks to cache hits and coalescing, by team."),
    "pixazo_proxy_jobs_in_flight": ("gauge", "Jobs not yet terminal, by model and status."),
    "pixazo_proxy_jobs_finished": ("counter", "Jobs that reached a terminal status, by model and status."),
    "pixazo_proxy_webhook_outbox_depth": ("gauge", "Webhook deliveries waiting in the outbox."),
    "pixazo_proxy_queue_depth": ("gauge", "Jobs waiting in the gateway's local queue, by team."),
    "pixazo_proxy_queue_oldest_wait_seconds": ("gauge", "How long the oldest waiting job of each team has waited."),
    "pixazo_proxy_upstream_slots_in_use": ("gauge", "Upstream slots held: jobs sent and not ended, all processes."),
}


class StoreCollector(Collector):
    """Figures read from the store at scrape time, cached between the async read and the sync collect."""

    def __init__(self, refresh: Callable[[], Awaitable[dict[str, list[tuple[dict[str, str], float]]]]]) -> None:
        self._refresh = refresh
        self._values: dict[str, list[tuple[dict[str, str], float]]] = {}

    async def refresh(self) -> None:
        self._values = await self._refresh()

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        for name, (kind, documentation) in STORE_METRICS.items():
            samples = self._values.get(name, [])
            labels = sorted(samples[0][0]) if samples else []
            family: Any = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(name, documentation, labels=labels)
            for sample_labels, value in samples:
                family.add_metric([sample_labels[label] for label in labels], value)
            yield family


def metrics_handler(metrics: Metrics) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handle(request: web.Request) -> web.Response:
        response = web.Response(body=await metrics.render())
        response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        return response

    return handle


def observe_upstream(metrics: Metrics | None, operation: str, started: float, status: int | None,
                     error_kind: str | None) -> None:
    """Record one upstream call (also adding its time to the current request's upstream total)."""
    elapsed = time.perf_counter() - started
    spent = upstream_seconds.get()
    if spent is not None:
        spent.append(elapsed)
    if metrics is None:
        return
    metrics.child(metrics.upstream_requests, operation, status_class(status) if status else "error").inc()
    metrics.child(metrics.upstream_duration, operation).observe(elapsed)
    if error_kind is not None:
        metrics.child(metrics.upstream_errors, operation, error_kind).inc()
