"""Second: the body becomes normalized params (checked against the catalog), or the request is refused 400/413."""

from __future__ import annotations

from ..domain.validate import normalize
from ..http.bodies import read_json_body
from . import Policy, SubmitContext


class Validate(Policy):
    name = "validate"

    def __init__(self, max_body_bytes: int) -> None:
        self.max_body_bytes = max_body_bytes

    async def on_request(self, ctx: SubmitContext) -> None:
        body = await read_json_body(ctx.request, self.max_body_bytes)
        ctx.params = normalize(ctx.model, body)
