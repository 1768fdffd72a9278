"""Eighth: the per-request cost cap, dry-run quotes, and the hold the store will reserve (rules: :mod:`proxy.budget`)."""

from __future__ import annotations

from aiohttp import web

from ..budget import BudgetRules, budget_headers, period_key
from ..clock import Clock
from ..errors import BudgetExceeded
from ..headers import MAX_COST_HEADER, cost_cap, is_dry_run
from ..money import micros_to_usd
from ..store import Store
from ..values import Hold
from . import Policy, SubmitContext


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
