"""The job tracker: follows every job still running upstream to its end, whether or not anyone polls.

Each round it claims the running jobs due a status call from the store (so
after a restart it resumes every job that was in flight), each with a lease
of one interval: several processes and replicas share the work, none asks
about a job another holds, and the jobs of a process that dies are taken
over when their leases end. It asks upstream about each, at most
``concurrency`` at a time, and applies what it hears through the same
refresher client polls use (whose calls take the same lease): a job is asked
about at most once per interval, however and wherever it is reached.
Rounds are spaced by the interval with jitter; when upstream calls fail
(429, 5xx, timeouts), the spacing backs off exponentially up to
``MAX_BACKOFF_SECONDS`` and returns to normal on the first clean round.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

from ..domain.errors import StoreUnavailable
from ..ops.metrics import Metrics
from ..store import Store
from .refresh import StatusRefresher

logger = logging.getLogger(__name__)

MAX_BACKOFF_SECONDS = 60.0
JITTER = 0.2
#: Jobs one round claims at most (the rest wait for the next round, or for another process).
CLAIM_LIMIT = 10_000


class Tracker:
    def __init__(self, store: Store, refresher: StatusRefresher, interval_seconds: float, concurrency: int = 8,
                 metrics: Metrics | None = None) -> None:
        self.store = store
        self.metrics = metrics
        self.refresher = refresher
        self.interval = interval_seconds
        self.semaphore = asyncio.Semaphore(concurrency)
        self.backoff = 0.0
        self.lag_seconds = 0.0  # how overdue the most overdue job was at the last round

    async def run(self) -> None:
        while True:
            try:
                failures = await self.round()
            except StoreUnavailable as exc:  # the database is away: say so in a line, and back off
                logger.warning("tracker round skipped: %s", exc.message)
                failures = 1
            except Exception:
                logger.exception("tracker round failed")
                failures = 1
            self.backoff = min(MAX_BACKOFF_SECONDS, max(self.interval, self.backoff * 2)) if failures else 0.0
            pause = self.interval * random.uniform(1 - JITTER, 1 + JITTER) + self.backoff
            await asyncio.sleep(pause)

    async def round(self) -> int:
        """Ask upstream about every job due; the number of calls that failed."""
        now = time.time()
        jobs = await self.store.claim_running(now, self.interval, CLAIM_LIMIT)
        due = [(job.job_id, job.upstream_id) for job in jobs]
        self.lag_seconds = max([0.0] + [now - job.checked_at - self.interval for job in jobs])
        if self.metrics is not None:
            self.metrics.tracker_lag.set(self.lag_seconds)

        async def follow(job_id: int, upstream_id: str) -> bool:
            async with self.semaphore:
                return await self.refresher.refresh(job_id, upstream_id, leased=True) is not None

        results = await asyncio.gather(*(follow(job_id, upstream_id) for job_id, upstream_id in due))
        failures = results.count(False)
        if failures:
            logger.warning("tracker: %d of %d status calls failed; backing off", failures, len(due))
        return failures
