"""Operator alerts: a team's usage reached its soft threshold, or a job cost more than was reserved.

Each alert is a warning log line, a metric, and (when ``PROXY_ALERT_WEBHOOK_URL``
is set) a JSON POST to the operator's endpoint, retried a few times in the
background. The store marks an alert as sent in the same transaction that
crossed the threshold, so it fires once per team and period.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any

import aiohttp

from ..domain.money import micros_to_usd
from ..ops.metrics import Metrics
from ..ops.stopping import StopBudget, stop_tasks
from ..store import SoftAlert

logger = logging.getLogger(__name__)

ATTEMPTS = 3
RECENT_ALERTS = 1000


class Alerts:
    def __init__(self, metrics: Metrics, webhook_url: str, *, timeout: float = 5.0,
                 stop_budget: StopBudget | None = None) -> None:
        self.metrics = metrics
        self.stop_budget = stop_budget or StopBudget(timeout)
        self.webhook_url = webhook_url
        self.timeout = timeout
        self.sent: deque[dict[str, Any]] = deque(maxlen=RECENT_ALERTS)  # the latest, for tests and the console
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        if self.webhook_url:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))

    async def close(self) -> None:
        if self._tasks:  # alerts on their way get what the stop allows, then are cancelled (and said so)
            _, late = await asyncio.wait(set(self._tasks), timeout=min(self.timeout, self.stop_budget.left(reserve=1.5)))
            if late:
                logger.warning("%d operator alert(s) not delivered before the gateway stopped", len(late))
            await stop_tasks(late, 0.5, "operator alert")
        if self._session is not None:
            await self._session.close()

    def soft_limit(self, alert: SoftAlert) -> None:
        payload = {
            "alert": "budget_soft_limit",
            "team": alert.team,
            "period": alert.period_key,
            "threshold_percent": alert.threshold_percent,
            "used_usd": micros_to_usd(alert.used_micros),
            "limit_usd": micros_to_usd(alert.limit_micros),
        }
        logger.warning("team %s reached %d%% of its budget for %s: $%s of $%s", alert.team, alert.threshold_percent,
                       alert.period_key, payload["used_usd"], payload["limit_usd"])
        self.metrics.child(self.metrics.soft_limit_alerts, alert.team).inc()
        self._send(payload)

    def overrun(self, team: str, period_key: str, handle: str, reserved_micros: int, charged_micros: int) -> None:
        """A job was charged more than its reservation (the log line and metrics are the settler's)."""
        self._send({
            "alert": "budget_overrun",
            "team": team,
            "period": period_key,
            "request_id": handle,
            "reserved_usd": micros_to_usd(reserved_micros),
            "charged_usd": micros_to_usd(charged_micros),
            "overrun_usd": micros_to_usd(charged_micros - reserved_micros),
        })

    def _send(self, payload: dict[str, Any]) -> None:
        self.sent.append(payload)
        if self._session is not None:
            task = asyncio.ensure_future(self._post(payload))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _post(self, payload: dict[str, Any]) -> None:
        assert self._session is not None
        for attempt in range(ATTEMPTS):
            try:
                async with self._session.post(self.webhook_url, json=payload) as response:
                    if 200 <= response.status < 300:
                        return
                    problem = f"HTTP {response.status}"
            except (TimeoutError, aiohttp.ClientError) as exc:
                problem = type(exc).__name__
            logger.warning("operator alert webhook attempt %d failed: %s", attempt + 1, problem)
            await asyncio.sleep(0.5 * 2**attempt)
        logger.error("operator alert %s for team %s was not delivered after %d attempts", payload["alert"],
                     payload["team"], ATTEMPTS)
