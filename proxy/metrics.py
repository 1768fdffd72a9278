"""Prometheus metrics: one registry per gateway, exported at ``GET /metrics``.

Names start with ``pixazo_proxy_``; labels stay bounded (team, model, scope),
never user or request ids.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.soft_limit_alerts = Counter(
            "pixazo_proxy_budget_soft_limit_alerts_total",
            "Times a team's usage reached its soft threshold (once per team and period).",
            ["team"],
            registry=self.registry,
        )

        self.cache_events = Counter(
            "pixazo_proxy_cache_events_total",
            "Submits by how the dedup cache answered them (hit, miss, coalesced, bypass).",
            ["result"],
            registry=self.registry,
        )
        self.cache_saved = Counter(
            "pixazo_proxy_cache_saved_usd_total",
            "Dollars not spent because a request was answered from an existing job (the ledger has the exact figure).",
            ["team"],
            registry=self.registry,
        )

        self.webhook_deliveries = Counter(
            "pixazo_proxy_webhook_deliveries_total",
            "Webhook delivery attempts by outcome (delivered, retried, failed).",
            ["outcome"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


def metrics_handler(metrics: Metrics) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handle(request: web.Request) -> web.Response:
        response = web.Response(body=metrics.render())
        response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        return response

    return handle
