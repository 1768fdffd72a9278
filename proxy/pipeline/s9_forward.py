"""Last, two policies: record the intent (or queue it), then forward to the upstream.

:class:`Record` writes the handle and its job as SUBMITTING *before* the
upstream is called, so a crash mid-call leaves a trace rather than a paid job
nobody knows about; it marks the job submitted, or rejected, once the outcome
is known. In the same transaction the store decides whether the job may go
now or must wait in the local queue (:mod:`proxy.queueing`): then Record
answers 202 QUEUED itself and nothing is sent. :class:`Forward` makes the one
upstream call and answers 202 in the upstream's shape, with the gateway's
handle and polling URL; an upstream 429 puts the job in the queue instead of
failing the client.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from ..domain.budget import budget_headers
from ..domain.clock import new_request_id
from ..domain.errors import BadRequest, Conflict, StoreUnavailable, UpstreamRefused, UpstreamUnavailable
from ..domain.money import micros_to_usd
from ..domain.queueing import PRIORITY_HEADER, QUEUE_POSITION_HEADER, QueueRules, pause_from, priority_problem
from ..jobs.alerts import Alerts
from ..jobs.upstream import Upstream, initial_status
from ..ops.metrics import Metrics
from ..store import Admission, Dispatch, FingerprintTaken, QueuePlace, Store
from . import Policy, StageNotRun, SubmitContext, accepted

logger = logging.getLogger(__name__)

#: How Record joins the job of an identical request that won the race to submit (the dedup policy's ``join``).
Join = Callable[[SubmitContext, int], Awaitable[bool]]
JOIN_ATTEMPTS = 3

class Record(Policy):
    name = "record"

    def __init__(self, store: Store, alerts: Alerts, metrics: Metrics, join: Join, rules: QueueRules,
                 public_url: str, queued: Callable[[], None]) -> None:
        self.store = store
        self.alerts = alerts
        self.metrics = metrics
        self.join = join
        self.rules = rules
        self.public_url = public_url.rstrip("/")
        self.queued = queued  # tells the dispatcher a job waits

    async def on_headers(self, ctx: SubmitContext) -> None:
        value = ctx.request.headers.get(PRIORITY_HEADER)
        if value is not None:
            priority, problem = priority_problem(value)
            if problem is not None:
                raise BadRequest(problem)
            assert priority is not None
            ctx.priority = priority

    async def on_request(self, ctx: SubmitContext) -> None:
        ctx.handle = ctx.handle or new_request_id(ctx.model.id)
        for _ in range(JOIN_ATTEMPTS):
            try:
                admission = Admission(self.rules, ctx.priority, time.time())
                receipt = await self.store.begin_submission(ctx.submission(ctx.handle, cache=ctx.cache), ctx.hold,
                                                            admission)
                break
            except FingerprintTaken as taken:  # an identical request won the race on another process
                if await self.join(ctx, taken.job_id):
                    return  # joined its job: nothing reserved, nothing sent
        else:
            raise Conflict("Identical requests keep racing this one; retry shortly")
        ctx.job_id = receipt.job_id
        if receipt.budget is not None:
            ctx.response_headers.update(budget_headers(ctx.estimate, receipt.budget))
        if receipt.alert is not None:
            self.alerts.soft_limit(receipt.alert)
        if receipt.queued is not None:  # no room upstream, or the team is at its own limit: it waits, not sent
            answer_queued(ctx, self.public_url, receipt.queued, self.metrics, self.queued)

    async def on_response(self, ctx: SubmitContext) -> None:
        if ctx.job_id is None or ctx.queued is not None:  # joined another's job, or waiting: nothing to mark yet
            return
        await self.store.mark_submitted(ctx.job_id, ctx.upstream["request_id"], initial_status(ctx.upstream))
        if logger.isEnabledFor(logging.DEBUG):  # the access line says this at INFO; skip building it otherwise
            principal = ctx.caller.principal
            logger.debug("accepted %s", ctx.handle, extra={
                "event": "submit.accepted", "handle": ctx.handle, "team": principal.team,
                "user": principal.user, "model": ctx.model.id, "cache": ctx.cache})

    async def on_failure(self, ctx: SubmitContext, error: BaseException) -> None:
        if ctx.job_id is None or ctx.queued is not None:
            return
        reason = f"{type(error).__name__}: {error}"[:500]
        arrived = _may_have_arrived(ctx, error)
        try:
            if arrived:
                await self.store.mark_indeterminate(ctx.job_id, reason)
            else:
                await self.store.mark_rejected(ctx.job_id, reason)
        except StoreUnavailable as lost:  # the store went away mid-submit: the job stays SUBMITTING, reserved
            logger.warning("submit of %s failed (%s) and its outcome could not be recorded (%s): it stays reserved "
                           "until the sweeper resolves it as a submit whose answer was lost", ctx.handle, reason,
                           lost.message, extra={"event": "submit.unrecorded", "handle": ctx.handle,
                                                "model": ctx.model.id, "team": ctx.caller.team.name})
            return
        if not arrived:
            return
        self.metrics.child(self.metrics.indeterminate_submits, ctx.model.id).inc()
        held = ctx.estimate.amount_micros
        logger.warning("submit of %s may have reached the upstream, its answer was lost (%s): $%s stays reserved "
                       "until the sweeper resolves it", ctx.handle, reason, micros_to_usd(held),
                       extra={"event": "submit.indeterminate", "handle": ctx.handle, "model": ctx.model.id,
                              "team": ctx.caller.team.name, "reserved_micros": held})
        if isinstance(error, UpstreamUnavailable):
            error.message += (". The request may have reached the upstream, so its cost stays reserved until the "
                              "gateway resolves it; retry with the same Idempotency-Key to learn the outcome.")


def answer_queued(ctx: SubmitContext, public_url: str, place: QueuePlace, metrics: Metrics,
                  poke: Callable[[], None]) -> None:
    """Answer 202 QUEUED for a job that waits in the local queue, with its place in its team's queue; count it
    and tell the dispatcher."""
    assert ctx.handle is not None
    ctx.queued = place
    ctx.response_headers[QUEUE_POSITION_HEADER] = str(place.position)
    ctx.response = accepted(public_url, ctx.handle, "QUEUED")
    metrics.child(metrics.queue_admitted, ctx.caller.team.name).inc()
    poke()


class Forward(Policy):
    name = "forward"

    def __init__(self, upstream: Upstream, public_url: str, store: Store, rules: QueueRules, metrics: Metrics,
                 queued: Callable[[], None]) -> None:
        self.upstream = upstream
        self.public_url = public_url.rstrip("/")
        self.store = store
        self.rules = rules
        self.metrics = metrics
        self.queued = queued

    async def on_request(self, ctx: SubmitContext) -> None:
        if ctx.handle is None or ctx.job_id is None:
            raise StageNotRun("the forward policy runs after the record policy, which names the handle and its job")
        ctx.upstream_attempted = True
        try:
            ctx.upstream = await self.upstream.submit(ctx.model.path, ctx.params)
        except UpstreamRefused as refused:
            if refused.status != 429 or not await self._wait(ctx, refused):
                raise
            return
        ctx.response = accepted(self.public_url, ctx.handle, initial_status(ctx.upstream))

    async def _wait(self, ctx: SubmitContext, refused: UpstreamRefused) -> bool:
        """The upstream said 429 (the job was not accepted): the job waits at the head of its team's queue and
        submits pause for the Retry-After; the client gets 202 QUEUED instead of the 429."""
        assert ctx.handle is not None and ctx.job_id is not None
        now = time.time()
        principal = ctx.caller.principal
        job = Dispatch(ctx.job_id, ctx.handle, principal.team, principal.user, ctx.model.id, ctx.params, now,
                       now + self.rules.max_wait_seconds, ctx.priority, 0)
        until = pause_from(refused.headers.get("Retry-After"), self.rules.throttle_seconds, now)
        place = await self.store.requeue(job, until)
        if place is None:
            return False
        answer_queued(ctx, self.public_url, place, self.metrics, self.queued)
        self.metrics.upstream_throttled.inc()
        return True


def _may_have_arrived(ctx: SubmitContext, error: BaseException) -> bool:
    """Whether a failed submit may have been accepted upstream: sent, and not provably refused or unsent."""
    if not ctx.upstream_attempted or isinstance(error, UpstreamRefused):
        return False
    if isinstance(error, UpstreamUnavailable):
        return error.indeterminate
    return True  # cancelled or failed while the call was in flight, or after its answer came back
