"""Third: per-team submits per minute (``max_submits_per_minute``), answered 429 with ``Retry-After``.

It runs right after validation, before anything that costs the gateway work
or space: the webhook target's DNS lookup, idempotency and cache look-ups,
the edit-video probe. So every submit counts, cache hits and coalesced answers
included (each creates a handle and ledger rows, and a team must not be able
to grow the store without bound for free). Dry runs count in a window of
their own, :data:`DRY_RUN_FACTOR` times the team's limit, so quoting cannot
starve submitting, nor be used to make the gateway fetch without limit.

The window is kept in the store (a sliding minute of submit times per team,
counted and added in one transaction that reads the limit too), so the limit
holds across every gateway process and replica. A team without a limit costs
no write.
"""

from __future__ import annotations

import math
import time

from ..domain.errors import TooManyRequests
from ..store import Store
from . import Policy, SubmitContext

WINDOW_SECONDS = 60.0
#: Dry runs a team may make per minute, as a multiple of its submits per minute.
DRY_RUN_FACTOR = 10


class RateLimit(Policy):
    name = "ratelimit"

    def __init__(self, store: Store) -> None:
        self.store = store

    async def on_request(self, ctx: SubmitContext) -> None:
        team = ctx.caller.team
        if team.max_submits_per_minute is None:  # the row is at most a second old (TEAM_ROW_SECONDS)
            return
        window = await self.store.count_submit(team.name, ctx.dry_run, time.time(), WINDOW_SECONDS, DRY_RUN_FACTOR)
        if window.retry_after is None:
            return
        retry_after = max(1, math.ceil(window.retry_after))
        what = "dry runs" if ctx.dry_run else "requests"
        raise TooManyRequests(
            f"Team '{team.name}' may submit {window.limit} {what} per minute; retry in {retry_after} s",
            headers={"Retry-After": str(retry_after)},
        )
