"""The request path of a generate call: an ordered chain of small policies.

The modules of this package are the policies, named in the order they run
(``s1_authenticate`` ... ``s9_forward``); the chain itself is composed once,
in ``proxy/app.py``. Each policy is an object with the same four hooks, called
by :class:`Pipeline`::

    on_headers   every policy, in order, before any on_request: parse the headers it owns
                 (so a typo in any of the gateway's headers is refused before anything can answer);
                 must take nothing that would need giving back
    on_request   in order; may raise a ProxyError, or set ctx.response to answer early
    on_response  in reverse, for every policy whose on_request ran, once a response exists
    on_failure   in reverse, for every policy whose on_request ran, if anything raised

So a policy that takes something in ``on_request`` (a reservation, a
recorded intent) gives it back in ``on_failure``, like a context manager.
Only the hooks a policy defines are awaited.

What one policy finds out and later ones use is a typed *stage result* on the
:class:`SubmitContext` (``caller``, ``params``, ``estimate``, ``hold``,
``upstream``): reading one before the policy that sets it has run raises
:class:`StageNotRun`, naming that policy, instead of passing ``None`` along.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Generic, TypeVar, overload

from aiohttp import web

from ..auth.tokens import Caller
from ..domain.queueing import client_status
from ..domain.validate import canonical_json
from ..domain.values import Estimate, Hold, ModelSpec
from ..http.observe import CACHE, HANDLE, MODEL, Handler
from ..store import IdempotencyRecord, QueuePlace, Submission

logger = logging.getLogger(__name__)

STATUS_PATH = "/v2/requests/status/"

T = TypeVar("T")


class StageNotRun(RuntimeError):
    """A policy read a stage result before the policy that sets it ran: the chain's order is wrong."""


class Stage(Generic[T]):
    """A result one policy sets on the context and later policies read, typed and never None once read."""

    def __init__(self, set_by: str) -> None:
        self.set_by = set_by
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, ctx: None, owner: type) -> Stage[T]: ...
    @overload
    def __get__(self, ctx: SubmitContext, owner: type) -> T: ...

    def __get__(self, ctx: SubmitContext | None, owner: type) -> T | Stage[T]:
        if ctx is None:
            return self
        try:
            return ctx.__dict__[self.name]
        except KeyError:
            raise StageNotRun(f"ctx.{self.name} is set by the {self.set_by} policy, which has not run") from None

    def __set__(self, ctx: SubmitContext, value: T) -> None:
        ctx.__dict__[self.name] = value

    def is_set(self, ctx: SubmitContext) -> bool:
        return self.name in ctx.__dict__


class SubmitContext:
    """One generate request as it goes through the chain: its stage results, then its answer."""

    caller = Stage[Caller]("auth")
    params = Stage[dict[str, Any]]("validate")  # the normalized request: what is priced, fingerprinted, forwarded
    estimate = Stage[Estimate]("price")
    hold = Stage[Hold]("budget")
    upstream = Stage[dict[str, Any]]("forward")  # the upstream's answer to the submit

    def __init__(self, request: web.Request, model: ModelSpec) -> None:
        self.request = request
        self.model = model
        # Read from headers (on_headers) by the policies that own them.
        self.dry_run = False  # X-Proxy-Dry-Run (budget)
        self.cost_cap: int | None = None  # X-Max-Cost-USD in micro-dollars (budget)
        self.cache_bypass = False  # X-Proxy-Cache: bypass (dedup)
        self.idempotency_key: str | None = None  # Idempotency-Key (idempotency)
        self.webhook_url: str | None = None  # X-Webhook-URL (webhook)
        self.webhook_mode = "terminal"  # X-Webhook-Mode (webhook)
        # Set along the way; None where a request legitimately has none.
        self.fingerprint: str | None = None  # set by dedup unless this is a dry run
        self.cache = "MISS"
        self.cache_claim: asyncio.Future[int] | None = None  # this request is the one submitting its fingerprint
        self.idempotency_scope: tuple[str, str, str] | None = None  # (team, user, key) this request holds in flight
        self.idempotency: IdempotencyRecord | None = None  # the key to remember with the new handle
        self.handle: str | None = None  # the gateway's handle, once one is made
        self.job_id: int | None = None  # the job recorded for this request, once recorded
        self.upstream_attempted = False  # the submit was handed to the upstream client: it may have arrived
        self.priority = 0  # X-Proxy-Priority (record): its place among its team's waiting jobs
        self.queued: QueuePlace | None = None  # it waits in the local queue, not sent (record, forward)
        self.response: web.StreamResponse | None = None
        self.response_headers: dict[str, str] = {}

    def submission(self, handle: str, cache: str) -> Submission:
        """The store's record of a new handle for this request."""
        principal = self.caller.principal
        return Submission(
            handle=handle,
            team=principal.team,
            user=principal.user,
            model=self.model.id,
            params_json=canonical_json(self.params),
            fingerprint=self.fingerprint,
            cache=cache,
            webhook_url=self.webhook_url,
            webhook_mode=self.webhook_mode if self.webhook_url is not None else None,
            idempotency=self.idempotency,
        )


def accepted(public_url: str, handle: str, status: str, headers: dict[str, str] | None = None) -> web.Response:
    """The upstream's 202 for a submit, naming the gateway's handle and its polling URL (``public_url``: no '/').

    A job waiting in the local queue is QUEUED to the client, the upstream's own word."""
    status = client_status(status)
    return web.json_response({"request_id": handle, "status": status, "polling_url": f"{public_url}{STATUS_PATH}{handle}"},
                             status=202, headers=headers)


class Policy:
    """Base of the pipeline's policies. Override the hooks you need."""

    name = "policy"

    async def on_headers(self, ctx: SubmitContext) -> None:
        """Parse the headers this policy owns; raise on a bad one."""

    async def on_request(self, ctx: SubmitContext) -> None:
        """Inspect or enrich the request; raise to refuse it."""

    async def on_response(self, ctx: SubmitContext) -> None:
        """Act on the outcome once a response is set."""

    async def on_failure(self, ctx: SubmitContext, error: BaseException) -> None:
        """Undo what ``on_request`` took; must not raise."""


def _defines(policy: Policy, hook: str) -> bool:
    return getattr(type(policy), hook) is not getattr(Policy, hook)


class Pipeline:
    def __init__(self, policies: list[Policy]) -> None:
        self.policies = list(policies)
        # Only the hooks a policy defines are awaited: most policies define one or two.
        self._readers = [p for p in policies if _defines(p, "on_headers")]
        self._doers = {id(p) for p in policies if _defines(p, "on_request")}
        self._answers = {id(p) for p in policies if _defines(p, "on_response")}
        self._undoes = {id(p) for p in policies if _defines(p, "on_failure")}

    def handler(self, model: ModelSpec) -> Handler:
        """The route handler for ``model``'s submit path: each request runs the chain."""

        async def submit(request: web.Request) -> web.StreamResponse:
            request[MODEL] = model.id
            return await self.run(SubmitContext(request=request, model=model))

        return submit

    async def run(self, ctx: SubmitContext) -> web.StreamResponse:
        for reader in self._readers:
            await reader.on_headers(ctx)
        entered: list[Policy] = []
        try:
            for policy in self.policies:
                entered.append(policy)
                if id(policy) in self._doers:
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


#: The chain the app runs (tests read which policies it holds).
PIPELINE = web.AppKey("pipeline", Pipeline)
