"""Eighth: the per-request cost cap, dry-run quotes, and the hold the store will reserve (rules: :mod:`proxy.budget`)."""

from __future__ import annotations

import logging

from aiohttp import web

from ..domain.budget import BudgetRules, budget_headers, period_key
from ..domain.clock import Clock, iso_utc
from ..domain.errors import BudgetExceeded, StoreUnavailable
from ..domain.headers import MAX_COST_HEADER, cost_cap, is_dry_run
from ..domain.money import micros_to_usd
from ..domain.values import Hold
from ..store import Store
from . import Policy, SubmitContext

logger = logging.getLogger(__name__)


class Budget(Policy):
    name = "budget"

    def __init__(self, store: Store, rules: BudgetRules, clock: Clock) -> None:
        self.store = store
        self.rules = rules
        self.clock = clock

    async def on_headers(self, ctx: SubmitContext) -> None:
        ctx.dry_run = is_dry_run(ctx.request.headers)
        ctx.cost_cap = cost_cap(ctx.request.headers)

    async def on_request(self, ctx: SubmitContext) -> None:
        estimate = ctx.estimate
        if ctx.cost_cap is not None and estimate.amount_micros > ctx.cost_cap:
            raise BudgetExceeded(
                f"This request is estimated at ${micros_to_usd(estimate.amount_micros)}, over the "
                f"{MAX_COST_HEADER} of ${ctx.request.headers[MAX_COST_HEADER].strip()}",
                title="Cost Cap Exceeded",
            )
        now = self.clock.now()
        ctx.hold = Hold(
            estimate=estimate,
            period_key=period_key(ctx.caller.team.period, now),
            global_period_key=period_key(self.rules.global_period, now),
            global_limit_micros=self.rules.global_limit_micros,
        )
        if ctx.dry_run:
            ctx.response = await self.quote(ctx)

    async def on_failure(self, ctx: SubmitContext, error: BaseException) -> None:
        """A budget refusal (the store's, not a client's own cost cap) is remembered for the team's console."""
        if not isinstance(error, BudgetExceeded) or error.title != BudgetExceeded.title:
            return
        principal = ctx.caller.principal
        try:
            await self.store.record_refusal(principal.team, principal.user, ctx.model.id, error.message,
                                            iso_utc(self.clock.now()))
        except StoreUnavailable as exc:  # the refusal stands; only its note for the console is lost
            logger.warning("budget refusal of team %s not recorded: %s", principal.team, exc.message)

    async def quote(self, ctx: SubmitContext) -> web.StreamResponse:
        hold, principal = ctx.hold, ctx.caller.principal
        estimate = hold.estimate
        check = await self.store.check_hold(principal.team, principal.user, hold)
        view, refusal = check.budget, check.refusal
        body = {
            "dry_run": True,
            "model_id": ctx.model.id,
            "estimate_usd": micros_to_usd(estimate.amount_micros),
            "seconds": estimate.seconds,
            "resolution": estimate.resolution,
            "basis": estimate.basis,
            "team": ctx.caller.team.name,
            "period": view.period_key,
            "budget_limit_usd": micros_to_usd(view.limit_micros),
            "budget_spent_usd": micros_to_usd(view.spent_micros),
            "budget_reserved_usd": micros_to_usd(view.reserved_micros),
            "budget_remaining_usd": micros_to_usd(view.remaining_micros),
            "admitted": refusal is None,
            "reason": refusal,
        }
        return web.json_response(body, headers=budget_headers(estimate, view))
