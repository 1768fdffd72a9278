"""First: no valid token of a known team, no further work (401/403 before anything else is read)."""

from __future__ import annotations

from ..auth.tokens import Authenticator
from ..http.observe import TEAM, USER
from . import Policy, SubmitContext


class Authenticate(Policy):
    name = "auth"

    def __init__(self, authenticator: Authenticator) -> None:
        self.authenticator = authenticator

    async def on_headers(self, ctx: SubmitContext) -> None:
        ctx.caller = await self.authenticator.identify(ctx.request.headers)
        ctx.request[TEAM] = ctx.caller.team.name
        ctx.request[USER] = ctx.caller.principal.user
