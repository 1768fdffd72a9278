"""Bringing a job's stored status up to date, at most once per interval per upstream job.

However many clients poll one job, on however many processes and replicas,
the upstream sees at most one status call per refresh interval: a call is made
only by the process that takes the job's lease in the store (good for one
interval), callers in this process that arrive while its fetch is under way
wait for that same fetch (single flight), and everyone else gets the stored
state. Terminal jobs are never fetched again. If the upstream cannot
answer, the stored state is served and the failure is logged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from ..domain.clock import iso_utc
from ..domain.errors import ProxyError
from ..domain.views import TERMINAL_STATUSES, HandleView
from ..ops.stopping import stop_tasks
from ..store import JobUpdate, Store
from .settle import Settler
from .upstream import Upstream

logger = logging.getLogger(__name__)


def job_update_from(body: dict[str, Any], checked_at: float) -> JobUpdate:
    """The store's view of one upstream status answer."""
    status = body["status"]
    output = body.get("output")
    error = body.get("error")
    updated_at = body.get("updated_at")
    completed_at = body.get("completed_at")
    return JobUpdate(
        status=status,
        output=output if isinstance(output, dict) else None,
        error=error if isinstance(error, str) else None,
        updated_at=updated_at if isinstance(updated_at, str) and updated_at else iso_utc(),
        completed_at=completed_at if isinstance(completed_at, str) and status in TERMINAL_STATUSES else None,
        checked_at=checked_at,
    )


#: What :meth:`StatusRefresher.refresh` answers for a job fetched within the interval.
SKIPPED = "SKIPPED"


class StatusRefresher:
    def __init__(self, store: Store, upstream: Upstream, settler: Settler, interval_seconds: float) -> None:
        self.store = store
        self.upstream = upstream
        self.settler = settler
        self.interval = interval_seconds
        self._in_flight: dict[int, asyncio.Task[str | None]] = {}

    def _due(self, view: HandleView) -> bool:
        """Worth trying for the lease: running, and not checked within the interval as far as the view says."""
        if view.terminal or view.upstream_id is None:
            return False
        return time.time() - view.checked_at >= self.interval

    async def current(self, view: HandleView) -> HandleView:
        """``view`` as fresh as the interval allows."""
        if view.job_id not in self._in_flight and not self._due(view):
            return view
        assert view.upstream_id is not None
        await self.refresh(view.job_id, view.upstream_id)
        return await self.store.get_handle(view.handle) or view

    async def refresh(self, job_id: int, upstream_id: str, *, leased: bool = False) -> str | None:
        """The job's status from upstream (joining a fetch under way); None if the call failed.

        Unless this process already holds the job's lease (``leased``: the tracker claimed it), it takes it first;
        a job any process asked about less than an interval ago is not asked about again: :data:`SKIPPED`.
        """
        flight = self._in_flight.get(job_id)
        if flight is None and not leased and not await self.store.claim_refresh(job_id, time.time(), self.interval):
            flight = self._in_flight.get(job_id)  # a fetch of this process's may have started meanwhile
            if flight is None:
                return SKIPPED
        if flight is None:
            flight = asyncio.create_task(self._fetch(job_id, upstream_id), name=f"refresh of job {job_id}")
            self._in_flight[job_id] = flight
            flight.add_done_callback(lambda _: self._in_flight.pop(job_id, None))
        return await asyncio.shield(flight)

    async def stop(self, seconds: float) -> None:
        """Cancel the fetches under way and wait up to ``seconds`` for them to end.

        A fetch outlives whoever awaited it (a poll, the tracker, the sweeper: each waits through a shield), so
        stopping them is this object's job. Cancelled before its answer is applied, a fetch writes nothing; the
        job is simply asked about again after the restart.
        """
        await stop_tasks(list(self._in_flight.values()), seconds, "status refresh")

    async def _fetch(self, job_id: int, upstream_id: str) -> str | None:
        now = time.time()
        try:
            body = await self.upstream.status(upstream_id)
        except ProxyError as exc:
            logger.warning("status of upstream job %s could not be refreshed: %s", upstream_id, exc.message)
            return None
        update = job_update_from(body, now)
        if await self.settler.apply(job_id, update):
            logger.info("upstream job %s is %s", upstream_id, update.status)
        return update.status
