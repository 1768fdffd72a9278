"""Never pay twice: identical requests share one upstream job.

The fingerprint is the model plus the canonical JSON of the normalized
request (defaults applied, keys sorted, every field), plus the team while the
scope is ``team``. A request whose fingerprint matches

* a COMPLETED job within the TTL is a **HIT**: a new handle of the caller's
  own on that job, answered at once, charged nothing, the saving recorded;
* a job still QUEUED or PROCESSING, or one being submitted right now in this
  process, is **COALESCED**: a new handle on the same job, charged nothing;
* a job whose outcome is unknown (sent, answer lost; or the gateway stopped
  mid-submit) is not sent again while it is so: 409, until the sweeper
  resolves it (or the caller asks for a bypass);
* anything else (and FAILED or ERROR jobs, which are never reused) is a
  **MISS** and goes upstream; ``Cache-Control: no-store`` or
  ``X-Proxy-Cache: bypass`` (and ``no-cache`` when the policy says so) is a
  **BYPASS**.

Concurrent identical arrivals: the first claims the fingerprint
synchronously, before its first ``await``, so exactly one of them submits;
the others wait for its outcome and attach to its job.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from .budget import period_key
from .clock import Clock, iso_utc, new_request_id
from .errors import BudgetExceeded, Conflict, TooManyRequests
from .forward import accepted, submission_for
from .headers import CACHE_HEADER
from .metrics import Metrics
from .money import micros_to_usd
from .pipeline import Policy, SubmitContext
from .policyfile import read_toml
from .store import UNKNOWN_OUTCOME, Saving, Store
from .validate import canonical_json

logger = logging.getLogger(__name__)

CACHE_FILE = "cache.toml"
CLAIM_ATTEMPTS = 3


@dataclass(frozen=True)
class CacheRules:
    """``policies/cache.toml``, checked at start-up."""

    scope: str = "team"
    ttl_seconds: float = 86400.0
    honor_no_cache: bool = False
    idempotency_ttl_seconds: float = 86400.0
    keep_media: bool = False
    media_directory: Path = Path("media")
    media_max_bytes: int = 256 * 1024 * 1024
    media_max_files_per_job: int = 4
    media_concurrency: int = 2


def load_cache_rules(policies_dir: Path) -> CacheRules:
    root = read_toml(policies_dir / CACHE_FILE)
    dedup, idempotency, media = root.table("dedup"), root.table("idempotency"), root.table("media")
    directory = Path(media.string("directory", "media"))
    rules = CacheRules(
        scope=dedup.choice("scope", ("team", "global"), "team"),
        ttl_seconds=dedup.number("ttl_seconds", 86400.0),
        honor_no_cache=dedup.boolean("honor_no_cache", False),
        idempotency_ttl_seconds=idempotency.number("ttl_seconds", 86400.0),
        keep_media=media.boolean("keep_copies", False),
        media_directory=directory if directory.is_absolute() else policies_dir.parent / directory,
        media_max_bytes=media.integer("max_bytes", 256 * 1024 * 1024, minimum=1024),
        media_max_files_per_job=media.integer("max_files_per_job", 4, minimum=1),
        media_concurrency=media.integer("concurrency", 2, minimum=1),
    )
    for section in (dedup, idempotency, media, root):
        section.done()
    return rules


def fingerprint(model_id: str, params: dict[str, Any], team: str | None) -> str:
    """Equal for equivalent requests (same normalized params), different for any difference."""
    text = "\n".join((model_id, canonical_json(params), team or ""))
    return hashlib.sha256(text.encode()).hexdigest()


def bypasses(ctx: SubmitContext, honor_no_cache: bool) -> bool:
    """``X-Proxy-Cache: bypass`` (parsed by Validate), ``Cache-Control: no-store``, or ``no-cache`` if honored."""
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

    async def on_request(self, ctx: SubmitContext) -> None:
        assert ctx.params is not None and ctx.principal is not None
        if ctx.dry_run:
            return
        fp = fingerprint(ctx.model.id, ctx.params, ctx.principal.team if self.rules.scope == "team" else None)
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
                if found.status in UNKNOWN_OUTCOME:  # not ours in flight (that would hold the claim): lost in a crash
                    raise Conflict("An identical request was sent to the upstream and its answer was lost, so it may "
                                   "have run; it is not sent again until the gateway resolves it. Send "
                                   f"{CACHE_HEADER}: bypass to submit it anyway.")
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

    def _answered(self, ctx: SubmitContext, result: str) -> None:
        """How the cache answered, counted when decided (a request refused later still was a miss)."""
        ctx.cache = result
        self.metrics.child(self.metrics.cache_events, result.lower()).inc()

    async def _attach(self, ctx: SubmitContext, job_id: int, status: str) -> None:
        assert ctx.team is not None
        self._answered(ctx, "HIT" if status == "COMPLETED" else "COALESCED")
        ctx.handle = new_request_id(ctx.model.id)
        now = self.clock.now()
        saving = Saving(period_key(ctx.team.period, now), period_key(self.global_period, now))
        saved = await self.store.attach_handle(submission_for(ctx, cache=ctx.cache), job_id, saving)
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
