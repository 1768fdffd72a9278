"""Fourth: ``X-Webhook-URL`` / ``X-Webhook-Mode``, read at once and the target's addresses checked.

The address check may resolve a name, so it runs after the rate limit; the
headers' form is checked with every other header, before anything answers.
"""

from __future__ import annotations

from ..domain.errors import BadRequest
from ..jobs.webhooks import MODE_HEADER, URL_HEADER, check_target, check_target_form
from . import Policy, SubmitContext


class Webhook(Policy):
    name = "webhook"

    def __init__(self, allow_private: bool) -> None:
        self.allow_private = allow_private

    async def on_headers(self, ctx: SubmitContext) -> None:
        mode = ctx.request.headers.get(MODE_HEADER, "terminal").strip().lower()
        if mode not in ("terminal", "sync"):
            raise BadRequest(f"{MODE_HEADER} must be terminal or sync")
        url = ctx.request.headers.get(URL_HEADER)
        if url is None:
            return
        url = url.strip()
        check_target_form(url, allow_private=self.allow_private)
        ctx.webhook_url, ctx.webhook_mode = url, mode

    async def on_request(self, ctx: SubmitContext) -> None:
        if ctx.webhook_url is not None:
            await check_target(ctx.webhook_url, allow_private=self.allow_private)
