"""The dispatcher: sends locally queued jobs upstream as room frees, teams in weighted fair order.

One process dispatches at a time: it holds the store's ``dispatcher`` lease and renews it every third of
:data:`LEASE_SECONDS`; if it dies, another process takes over once the lease runs out. Taking a job is one
transaction (:func:`proxy.store.queue.take_next`): the job leaves the queue, becomes SUBMITTING and holds its
upstream slot, so even two dispatchers (a lease that ran out under a paused process) never send one job twice,
nor more jobs than the account's limit. A SIGKILL between that transaction and the upstream's answer leaves the
job SUBMITTING: the sweeper resolves it as a submit whose answer was lost, as for any submit; it is not sent again.

What the upstream answers:

* 202: the job is SUBMITTED (its handles already heard QUEUED; sync webhooks hear PROCESSING later);
* 429, or a 5xx (not accepted either, and may pass): the job goes back to the head of its team's queue, and no
  submit goes upstream before ``Retry-After`` (or ``throttle_seconds``): no client sees it; a job that keeps
  meeting them ends at ``max_wait_seconds`` like any waiting job;
* another refusal (a 4xx: the request itself is refused): the job ends as ERROR with the upstream's reason,
  released, never charged;
* no connection (provably not sent): back to the queue, retried after a second; an answer lost: INDETERMINATE,
  resolved by the sweeper.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from ..domain.catalog import Catalog
from ..domain.clock import iso_utc
from ..domain.errors import StoreUnavailable, UpstreamRefused, UpstreamUnavailable
from ..domain.queueing import QueueRules, pause_from
from ..ops.metrics import Metrics
from ..ops.stopping import StopBudget, stop_tasks, wait_event
from ..store import Decision, Dispatch, JobUpdate, Store
from ..store.queue import REFUSED
from .upstream import Upstream, initial_status

logger = logging.getLogger(__name__)

DISPATCHER_LEASE = "dispatcher"
LEASE_SECONDS = 3.0
EXPIRY_EVERY_SECONDS = 1.0
UNSENT_RETRY_SECONDS = 1.0
#: How long a send cancelled at shutdown may take to unwind.
SEND_CANCEL_SECONDS = 0.5


class Dispatcher:
    def __init__(self, store: Store, upstream: Upstream, catalog: Catalog, rules: QueueRules, metrics: Metrics,
                 stop_budget: StopBudget) -> None:
        self.store = store
        self.stop_budget = stop_budget
        self.upstream = upstream
        self.catalog = catalog
        self.rules = rules
        self.metrics = metrics
        self._wake = asyncio.Event()
        self._sending: set[asyncio.Task[None]] = set()

    def poke(self) -> None:
        """Something changed in this process (a job queued): look now rather than at the next poll."""
        self._wake.set()

    async def run(self) -> None:
        holder = uuid.uuid4().hex
        leading = False
        renew_at = expire_at = 0.0
        try:
            while True:
                wait: float | None = None
                try:
                    now = time.time()
                    if now >= renew_at:
                        was = leading
                        leading = await self.store.take_lease(DISPATCHER_LEASE, holder, now, LEASE_SECONDS)
                        renew_at = now + LEASE_SECONDS / 3
                        if leading and not was:
                            held, waiting = await self.store.reconcile_gate()
                            logger.info("dispatching the local queue (%d waiting, %d upstream slots held)",
                                        waiting, held, extra={"event": "queue.leading"})
                    if leading:
                        if now >= expire_at:
                            await self._expire(now)
                            expire_at = now + EXPIRY_EVERY_SECONDS
                        wait = await self._dispatch_all()
                except StoreUnavailable as exc:
                    logger.warning("queue dispatch skipped: %s", exc.message)
                except Exception:
                    logger.exception("queue dispatch failed; retrying")
                timeout = self.rules.poll_seconds if wait is None else max(0.001, min(wait, self.rules.poll_seconds))
                await wait_event(self._wake, timeout)  # not asyncio.wait_for: on 3.11 it could swallow the cancel
                self._wake.clear()
        finally:
            await self._drain()

    async def _drain(self) -> None:
        """On stopping: let sends in flight record their answer while the stop budget allows, then cancel the rest.

        A send cancelled before its answer leaves its job SUBMITTING and reserved, never half-written: the sweeper
        resolves it as a submit whose answer was lost, as after a crash.
        """
        if not self._sending:
            return
        _, late = await asyncio.wait(set(self._sending), timeout=self.stop_budget.left(reserve=SEND_CANCEL_SECONDS + 1))
        if late:
            logger.warning("%d queued job(s) were being sent as the gateway stopped; their answer is left to the "
                           "sweeper", len(late), extra={"event": "queue.send_cancelled"})
            await stop_tasks(late, SEND_CANCEL_SECONDS, "queued send")

    async def _dispatch_all(self) -> float | None:
        while True:
            taken = await self.store.take_next(self.rules, time.time())
            if not isinstance(taken, Dispatch):
                return taken
            task = asyncio.create_task(self._send(taken), name=f"dispatch {taken.handle}")
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _expire(self, now: float) -> None:
        for job_id in await self.store.expire_waiting(now):
            logger.warning("queued job %d waited past max_wait_seconds: ended, not charged", job_id,
                           extra={"event": "queue.expired", "job_id": job_id})

    async def _send(self, job: Dispatch) -> None:
        try:
            await self._submit(job)
        except StoreUnavailable as exc:  # the job stays SUBMITTING, reserved: the sweeper resolves it
            logger.warning("dispatch of %s could not be recorded: %s", job.handle, exc.message,
                           extra={"event": "queue.unrecorded", "handle": job.handle, "team": job.team})
        except Exception:
            logger.exception("dispatch of %s failed", job.handle)

    async def _submit(self, job: Dispatch) -> None:
        model = self.catalog.models.get(job.model)
        if model is None:  # the catalog changed while it waited: provably never sent, so never charged
            reason = f"the model {job.model} is no longer in the gateway's catalog"
            await self._end_unsent(job, f"This queued request was never sent: {reason}; it is not charged", reason)
            return
        started = time.time()
        try:
            body = await self.upstream.submit(model.path, job.params)
        except UpstreamRefused as refused:
            if refused.status == 429 or refused.status >= 500:  # not accepted, and worth trying again later
                until = pause_from(refused.headers.get("Retry-After"), self.rules.throttle_seconds, time.time())
                await self.store.requeue(job, until)
                if refused.status == 429:
                    self.metrics.upstream_throttled.inc()
                logger.info("upstream said %d to queued %s: back to the head of its queue, submits paused %.1f s",
                            refused.status, job.handle, until - time.time(),
                            extra={"event": "queue.throttled", "handle": job.handle, "team": job.team})
                return
            reason = f"HTTP {refused.status}: {refused.message}"
            await self._end_unsent(job, REFUSED.format(reason=reason),
                                   f"refused upstream when sent from the queue ({reason})")
            return
        except UpstreamUnavailable as lost:
            if not lost.indeterminate:
                await self.store.requeue(job, time.time() + UNSENT_RETRY_SECONDS)
                return
            await self.store.mark_indeterminate(job.job_id, f"{type(lost).__name__}: {lost.message}"[:500])
            self.metrics.child(self.metrics.indeterminate_submits, job.model).inc()
            logger.warning("queued %s was sent and its answer lost (%s): it stays reserved until the sweeper "
                           "resolves it", job.handle, lost.message, extra={"event": "submit.indeterminate",
                                                                           "handle": job.handle, "team": job.team})
            return
        status = initial_status(body)
        await self.store.mark_submitted(job.job_id, body["request_id"], status, quiet=status == "QUEUED")
        self.metrics.child(self.metrics.queue_dispatches, job.team).inc()
        self.metrics.child(self.metrics.queue_wait, job.team).observe(max(0.0, started - job.enqueued_at))

    async def _end_unsent(self, job: Dispatch, message: str, note: str) -> None:
        """End a job that did not run upstream as ERROR with ``message``, its money released (``note``)."""
        stamp = iso_utc()
        await self.store.update_job(job.job_id, JobUpdate("ERROR", None, message, stamp, stamp, time.time()),
                                    Decision.release(note[:200]))
        self.metrics.child(self.metrics.queue_ended, job.team, "refused").inc()
