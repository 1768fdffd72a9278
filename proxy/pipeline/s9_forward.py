"""Last, two policies: record the intent, then forward to the upstream.

:class:`Record` writes the handle and its job as SUBMITTING *before* the
upstream is called, so a crash mid-call leaves a trace rather than a paid job
nobody knows about; it marks the job submitted, or rejected, once the outcome
is known. :class:`Forward` makes the one upstream call and answers 202 in the
upstream's shape, with the gateway's handle and polling URL.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from ..alerts import Alerts
from ..budget import budget_headers
from ..clock import new_request_id
from ..errors import Conflict, StoreUnavailable, UpstreamRefused, UpstreamUnavailable
from ..metrics import Metrics
from ..money import micros_to_usd
from ..store import FingerprintTaken, Store
from ..upstream import Upstream
from . import Policy, StageNotRun, SubmitContext, accepted

logger = logging.getLogger(__name__)

#: How Record joins the job of an identical request that won the race to submit (the dedup policy's ``join``).
Join = Callable[[SubmitContext, int], Awaitable[bool]]
JOIN_ATTEMPTS = 3

class Record(Policy):
    name = "record"

    def __init__(self, store: Store, alerts: Alerts, metrics: Metrics, join: Join) -> None:
        self.store = store
        self.alerts = alerts
        self.metrics = metrics
        self.join = join

    async def on_request(self, ctx: SubmitContext) -> None:
        ctx.handle = ctx.handle or new_request_id(ctx.model.id)
        for _ in range(JOIN_ATTEMPTS):
            try:
                receipt = await self.store.begin_submission(ctx.submission(ctx.handle, cache=ctx.cache), ctx.hold)
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

    async def on_response(self, ctx: SubmitContext) -> None:
        if ctx.job_id is None:  # it joined an identical request's job (see on_request): nothing of its own to mark
            return
        await self.store.mark_submitted(ctx.job_id, ctx.upstream["request_id"], _initial_status(ctx.upstream))
        if logger.isEnabledFor(logging.DEBUG):  # the access line says this at INFO; skip building it otherwise
            principal = ctx.caller.principal
            logger.debug("accepted %s", ctx.handle, extra={
                "event": "submit.accepted", "handle": ctx.handle, "team": principal.team,
                "user": principal.user, "model": ctx.model.id, "cache": ctx.cache})

    async def on_failure(self, ctx: SubmitContext, error: BaseException) -> None:
        if ctx.job_id is None:
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


class Forward(Policy):
    name = "forward"

    def __init__(self, upstream: Upstream, public_url: str) -> None:
        self.upstream = upstream
        self.public_url = public_url.rstrip("/")

    async def on_request(self, ctx: SubmitContext) -> None:
        if ctx.handle is None or ctx.job_id is None:
            raise StageNotRun("the forward policy runs after the record policy, which names the handle and its job")
        ctx.upstream_attempted = True
        ctx.upstream = await self.upstream.submit(ctx.model.path, ctx.params)
        ctx.response = accepted(self.public_url, ctx.handle, _initial_status(ctx.upstream))


def _may_have_arrived(ctx: SubmitContext, error: BaseException) -> bool:
    """Whether a failed submit may have been accepted upstream: sent, and not provably refused or unsent."""
    if not ctx.upstream_attempted or isinstance(error, UpstreamRefused):
        return False
    if isinstance(error, UpstreamUnavailable):
        return error.indeterminate
    return True  # cancelled or failed while the call was in flight, or after its answer came back


def _initial_status(upstream_body: dict) -> str:
    status = upstream_body.get("status")
    return status if status in ("QUEUED", "PROCESSING") else "QUEUED"
