"""Third: per-team submits per minute (``max_submits_per_minute``), answered 429 with ``Retry-After``.

It runs right after validation, before anything that costs the gateway work
or space: the webhook target's DNS lookup, idempotency and cache look-ups,
the edit-video probe. So every submit counts, cache hits and coalesced answers
included (each creates a handle and ledger rows, and a team must not be able
to grow the store without bound for free). Dry runs count in a window of
their own, :data:`DRY_RUN_FACTOR` times the team's limit, so quoting cannot
starve submitting, nor be used to make the gateway fetch without limit.

A sliding window of request times per team, kept in this process: with one
replica (the SQLite deployment) that is the whole truth.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable

from ..errors import TooManyRequests
from . import Policy, SubmitContext

WINDOW_SECONDS = 60.0
#: Dry runs a team may make per minute, as a multiple of its submits per minute.
DRY_RUN_FACTOR = 10


class RateLimit(Policy):
    name = "ratelimit"

    def __init__(self, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.monotonic = monotonic
        self.windows: dict[tuple[str, bool], deque[float]] = {}

    async def on_request(self, ctx: SubmitContext) -> None:
        team = ctx.caller.team
        limit = team.max_submits_per_minute
        if limit is None:
            return
        if ctx.dry_run:
            limit *= DRY_RUN_FACTOR
        now = self.monotonic()
        window = self.windows.setdefault((team.name, ctx.dry_run), deque())
        while window and window[0] <= now - WINDOW_SECONDS:
            window.popleft()
        if len(window) >= limit:
            retry_after = max(1, math.ceil(window[0] + WINDOW_SECONDS - now))
            what = "dry runs" if ctx.dry_run else "requests"
            raise TooManyRequests(
                f"Team '{team.name}' may submit {limit} {what} per minute; retry in {retry_after} s",
                headers={"Retry-After": str(retry_after)},
            )
        window.append(now)
