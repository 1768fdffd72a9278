"""The last two policies: record the intent, then forward to the upstream.

:class:`Record` writes the handle and its job as SUBMITTING *before* the
upstream is called, so a crash mid-call leaves a trace rather than a paid job
nobody knows about; it marks the job submitted, or rejected, once the outcome
is known. :class:`Forward` makes the one upstream call and answers 202 in the
upstream's shape, with the gateway's handle and polling URL.
"""

from __future__ import annotations

import logging

from aiohttp import web

from .alerts import Alerts
from .budget import budget_headers
from .clock import new_request_id
from .errors import UpstreamRefused, UpstreamUnavailable
from .metrics import Metrics
from .money import micros_to_usd
from .pipeline import Policy, SubmitContext
from .store import Store, Submission
from .upstream import Upstream
from .validate import canonical_json

logger = logging.getLogger(__name__)

STATUS_PATH = "/v2/requests/status/"


class Record(Policy):
    name = "record"

    def __init__(self, store: Store, alerts: Alerts, metrics: Metrics) -> None:
        self.store = store
        self.alerts = alerts
        self.metrics = metrics

    async def on_request(self, ctx: SubmitContext) -> None:
        assert ctx.principal is not None and ctx.params is not None
        ctx.handle = ctx.handle or new_request_id(ctx.model.id)
        receipt = await self.store.begin_submission(submission_for(ctx, cache=ctx.cache), ctx.hold)
        ctx.job_id = receipt.job_id
        if receipt.budget is not None and ctx.estimate is not None:
            ctx.response_headers.update(budget_headers(ctx.estimate, receipt.budget))
        if receipt.alert is not None:
            self.alerts.soft_limit(receipt.alert)

    async def on_response(self, ctx: SubmitContext) -> None:
        assert ctx.job_id is not None and ctx.upstream is not None
        await self.store.mark_submitted(ctx.job_id, ctx.upstream["request_id"], _initial_status(ctx.upstream))
        if logger.isEnabledFor(logging.DEBUG):  # the access line says this at INFO; skip building it otherwise
            logger.debug("accepted %s", ctx.handle, extra={
                "event": "submit.accepted", "handle": ctx.handle, "team": ctx.principal and ctx.principal.team,
                "user": ctx.principal and ctx.principal.user, "model": ctx.model.id, "cache": ctx.cache})

    async def on_failure(self, ctx: SubmitContext, error: BaseException) -> None:
        if ctx.job_id is None:
            return
        reason = f"{type(error).__name__}: {error}"[:500]
        if not _may_have_arrived(ctx, error):
            await self.store.mark_rejected(ctx.job_id, reason)
            return
        await self.store.mark_indeterminate(ctx.job_id, reason)
        self.metrics.child(self.metrics.indeterminate_submits, ctx.model.id).inc()
        held = ctx.estimate.amount_micros if ctx.estimate is not None else 0
        logger.warning("submit of %s may have reached the upstream, its answer was lost (%s): $%s stays reserved "
                       "until the sweeper resolves it", ctx.handle, reason, micros_to_usd(held),
                       extra={"event": "submit.indeterminate", "handle": ctx.handle, "model": ctx.model.id,
                              "team": ctx.principal and ctx.principal.team, "reserved_micros": held})
        if isinstance(error, UpstreamUnavailable):
            error.message += (". The request may have reached the upstream, so its cost stays reserved until the "
                              "gateway resolves it; retry with the same Idempotency-Key to learn the outcome.")


class Forward(Policy):
    name = "forward"

    def __init__(self, upstream: Upstream, public_url: str) -> None:
        self.upstream = upstream
        self.public_url = public_url.rstrip("/")

    async def on_request(self, ctx: SubmitContext) -> None:
        assert ctx.params is not None and ctx.handle is not None
        ctx.upstream_attempted = True
        ctx.upstream = await self.upstream.submit(ctx.model.path, ctx.params)
        ctx.response = accepted(self.public_url, ctx.handle, _initial_status(ctx.upstream))


def accepted(public_url: str, handle: str, status: str, headers: dict[str, str] | None = None) -> web.Response:
    """The upstream's 202 for a submit, naming the gateway's handle and its polling URL (``public_url``: no '/')."""
    return web.json_response({"request_id": handle, "status": status, "polling_url": f"{public_url}{STATUS_PATH}{handle}"},
                             status=202, headers=headers)


def submission_for(ctx: SubmitContext, cache: str) -> Submission:
    """The store's record of a new handle for ``ctx``'s request."""
    assert ctx.principal is not None and ctx.params is not None and ctx.handle is not None
    return Submission(
        handle=ctx.handle,
        team=ctx.principal.team,
        user=ctx.principal.user,
        model=ctx.model.id,
        params_json=canonical_json(ctx.params),
        fingerprint=ctx.fingerprint,
        cache=cache,
        webhook_url=ctx.webhook_url,
        webhook_mode=ctx.webhook_mode,
        idempotency=ctx.idempotency,
    )


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
