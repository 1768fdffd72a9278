"""Sixth: never pay twice. Answer from an identical request's job (HIT, COALESCED) or let this one through (MISS).

How fingerprints are made and what each answer means: :mod:`proxy.cache`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import timedelta

from ..domain.budget import period_key
from ..domain.cache import CacheRules, fingerprint
from ..domain.clock import Clock, iso_utc, new_request_id
from ..domain.errors import BudgetExceeded, Conflict, TooManyRequests
from ..domain.headers import CACHE_HEADER, asks_cache_bypass
from ..domain.money import micros_to_usd
from ..ops.metrics import Metrics
from ..store import UNKNOWN_OUTCOME, Saving, Store
from . import Policy, SubmitContext, accepted

logger = logging.getLogger(__name__)

CLAIM_ATTEMPTS = 3
#: How long a request waits for an identical one another process is submitting (its upstream call's time).
JOIN_WAIT_SECONDS = 35.0
JOIN_POLL_SECONDS = 0.05
LOST = ("An identical request was sent to the upstream and its answer was lost, so it may have run; it is not sent "
        f"again until the gateway resolves it. Send {CACHE_HEADER}: bypass to submit it anyway.")


def bypasses(ctx: SubmitContext, honor_no_cache: bool) -> bool:
    """``X-Proxy-Cache: bypass``, ``Cache-Control: no-store``, or ``no-cache`` if honored."""
    if ctx.cache_bypass:
        return True
    directives = {part.strip().lower() for part in ctx.request.headers.get("Cache-Control", "").split(",")}
    return "no-store" in directives or (honor_no_cache and "no-cache" in directives)


def _retrieve(future: asyncio.Future[int]) -> None:
    """Mark a claim's exception as seen, so nobody waiting is not an error in the log."""
    if not future.cancelled():
        future.exception()


class Dedup(Policy):
    name = "dedup"

    def __init__(self, store: Store, rules: CacheRules, clock: Clock, metrics: Metrics, public_url: str,
                 global_period: str) -> None:
        self.store = store
        self.rules = rules
        self.global_period = global_period
        self.clock = clock
        self.metrics = metrics
        self.public_url = public_url.rstrip("/")
        self.claims: dict[str, asyncio.Future[int]] = {}

    async def on_headers(self, ctx: SubmitContext) -> None:
        ctx.cache_bypass = asks_cache_bypass(ctx.request.headers)

    async def on_request(self, ctx: SubmitContext) -> None:
        if ctx.dry_run:
            return
        team = ctx.caller.team.name
        fp = fingerprint(ctx.model.id, ctx.params, team if self.rules.scope == "team" else None)
        ctx.fingerprint = fp
        if bypasses(ctx, self.rules.honor_no_cache):
            self._answered(ctx, "BYPASS")
            return
        for _ in range(CLAIM_ATTEMPTS):
            waiting = self.claims.get(fp)
            if waiting is None:
                claim = asyncio.get_running_loop().create_future()
                claim.add_done_callback(_retrieve)
                self.claims[fp] = claim  # claimed before the first await: concurrent twins see it
                ctx.cache_claim = claim
                fresh_after = iso_utc(self.clock.now() - timedelta(seconds=self.rules.ttl_seconds))
                found = await self.store.find_reusable(fp, fresh_after)
                if found is None:
                    self._answered(ctx, "MISS")
                    return
                if found.status == "SUBMITTING":  # another process is sending it now (or died doing so)
                    if await self.join(ctx, found.job_id):
                        return
                    self._answered(ctx, "MISS")  # it was refused or vanished: this request sends its own
                    return
                if found.status in UNKNOWN_OUTCOME:  # lost in a crash, or its answer was
                    raise Conflict(LOST)
                self._end_claim(ctx, result=found.job_id)
                await self._attach(ctx, found.job_id, found.status)
                return
            try:
                job_id = await asyncio.shield(waiting)
            except (BudgetExceeded, TooManyRequests):
                continue  # the first caller's own limits; this caller tries on its own
            found = await self.store.find_reusable(fp, "")
            await self._attach(ctx, job_id, found.status if found and found.job_id == job_id else "QUEUED")
            return
        self._answered(ctx, "MISS")

    async def join(self, ctx: SubmitContext, job_id: int) -> bool:
        """Attach this request to job ``job_id``, sent by another process with the same fingerprint; False if that
        job was refused (or ended) before it ran, so this request should send its own.

        While the other process is still submitting, wait (up to :data:`JOIN_WAIT_SECONDS`) for the outcome.
        """
        deadline = time.monotonic() + JOIN_WAIT_SECONDS
        status = await self.store.job_status(job_id) if job_id else None
        while status == "SUBMITTING":
            if time.monotonic() > deadline:
                raise Conflict("An identical request is being sent to the upstream right now; retry shortly to "
                               f"share its job (or send {CACHE_HEADER}: bypass to submit it anyway)")
            await asyncio.sleep(JOIN_POLL_SECONDS)
            status = await self.store.job_status(job_id)
        if status == "INDETERMINATE":
            raise Conflict(LOST)
        if status not in ("QUEUED", "PROCESSING", "COMPLETED", "WAITING"):
            return False
        self._end_claim(ctx, result=job_id)
        await self._attach(ctx, job_id, status)
        return True

    def _answered(self, ctx: SubmitContext, result: str) -> None:
        """How the cache answered, counted when decided (a request refused later still was a miss)."""
        ctx.cache = result
        self.metrics.child(self.metrics.cache_events, result.lower()).inc()

    async def _attach(self, ctx: SubmitContext, job_id: int, status: str) -> None:
        self._answered(ctx, "HIT" if status == "COMPLETED" else "COALESCED")
        ctx.handle = new_request_id(ctx.model.id)
        now = self.clock.now()
        saving = Saving(period_key(ctx.caller.team.period, now), period_key(self.global_period, now))
        saved = await self.store.attach_handle(ctx.submission(ctx.handle, cache=ctx.cache), job_id, saving)
        ctx.response_headers["X-Proxy-Saved-USD"] = micros_to_usd(saved)
        ctx.response = accepted(self.public_url, ctx.handle, status)

    async def on_response(self, ctx: SubmitContext) -> None:
        if ctx.job_id is not None:
            self._end_claim(ctx, result=ctx.job_id)
        if ctx.fingerprint is not None:
            ctx.response_headers[CACHE_HEADER] = ctx.cache

    async def on_failure(self, ctx: SubmitContext, error: BaseException) -> None:
        self._end_claim(ctx, error=error)

    def _end_claim(self, ctx: SubmitContext, *, result: int | None = None, error: BaseException | None = None) -> None:
        claim, ctx.cache_claim = ctx.cache_claim, None
        if claim is None:
            return
        if self.claims.get(ctx.fingerprint or "") is claim:
            del self.claims[ctx.fingerprint or ""]
        if not claim.done():
            if error is not None:
                claim.set_exception(error if isinstance(error, Exception) else RuntimeError("cancelled"))
            else:
                claim.set_result(result)  # type: ignore[arg-type]
