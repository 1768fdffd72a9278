"""The ordered policy chain a generate request runs through.

Each policy is a small object with the same three hooks, called by
:class:`Pipeline` in an explicit order (the order is set once, in
``proxy/app.py``)::

    on_request   in order; may raise a ProxyError, or set ctx.response to answer early
    on_response  in reverse, for every policy whose on_request ran, once a response exists
    on_failure   in reverse, for every policy whose on_request ran, if anything raised

So a policy that takes something in ``on_request`` (a reservation, a
recorded intent) gives it back in ``on_failure``, like a context manager.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .observe import CACHE, HANDLE

if TYPE_CHECKING:
    from .auth import Principal
    from .budget import Hold
    from .catalog import ModelSpec
    from .pricing import Estimate
    from .store import IdempotencyRecord, Team

logger = logging.getLogger(__name__)


@dataclass
class SubmitContext:
    """What the policies know about one generate request, filled in as it goes."""

    request: web.Request
    model: ModelSpec
    principal: Principal | None = None
    team: Team | None = None
    params: dict[str, Any] | None = None
    estimate: Estimate | None = None
    hold: Hold | None = None
    dry_run: bool = False
    cost_cap: int | None = None
    cache_bypass: bool = False  # X-Proxy-Cache: bypass
    fingerprint: str | None = None
    cache_claim: asyncio.Future[int] | None = None  # this request is the one submitting its fingerprint
    idempotency_scope: tuple[str, str, str] | None = None  # (team, user, key) this request holds in flight
    cache: str = "MISS"
    webhook_url: str | None = None
    webhook_mode: str | None = None
    idempotency: IdempotencyRecord | None = None
    handle: str | None = None
    job_id: int | None = None
    upstream: dict[str, Any] | None = None
    upstream_attempted: bool = False  # the submit was handed to the upstream client: it may have arrived
    response: web.StreamResponse | None = None
    response_headers: dict[str, str] = field(default_factory=dict)


class Policy:
    """Base of the pipeline's policies. Override the hooks you need."""

    name = "policy"

    async def on_request(self, ctx: SubmitContext) -> None:
        """Inspect or enrich the request; raise to refuse it."""

    async def on_response(self, ctx: SubmitContext) -> None:
        """Act on the outcome once a response is set."""

    async def on_failure(self, ctx: SubmitContext, error: BaseException) -> None:
        """Undo what ``on_request`` took; must not raise."""


class Pipeline:
    def __init__(self, policies: list[Policy]) -> None:
        self.policies = list(policies)
        # Only the hooks a policy defines are awaited: most policies define on_request alone.
        self._answers = {id(p) for p in policies if type(p).on_response is not Policy.on_response}
        self._undoes = {id(p) for p in policies if type(p).on_failure is not Policy.on_failure}

    async def run(self, ctx: SubmitContext) -> web.StreamResponse:
        entered: list[Policy] = []
        try:
            for policy in self.policies:
                entered.append(policy)
                await policy.on_request(ctx)
                if ctx.response is not None:
                    break
            if ctx.response is None:
                raise RuntimeError("the pipeline ended without a response; the last policy must set one")
            for policy in reversed(entered):
                if id(policy) in self._answers:
                    await policy.on_response(ctx)
        except BaseException as error:
            for policy in reversed(entered):
                if id(policy) not in self._undoes:
                    continue
                try:
                    await policy.on_failure(ctx, error)
                except Exception:
                    logger.exception("policy %s failed while undoing a refused request", policy.name)
            raise
        for name, value in ctx.response_headers.items():
            ctx.response.headers[name] = value
        if ctx.handle is not None:
            ctx.request[HANDLE] = ctx.handle
        if ctx.fingerprint is not None:
            ctx.request[CACHE] = ctx.cache
        return ctx.response
