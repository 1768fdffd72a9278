"""Seventh: what the job will cost, put on the context for the budget to reserve (rules: :mod:`proxy.pricing`)."""

from __future__ import annotations

from ..domain.pricing import Pricer
from . import Policy, SubmitContext


class Price(Policy):
    name = "price"

    def __init__(self, pricer: Pricer) -> None:
        self.pricer = pricer

    async def on_request(self, ctx: SubmitContext) -> None:
        ctx.estimate = await self.pricer.estimate(ctx.model, ctx.params)
