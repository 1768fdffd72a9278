"""Per-team submits per minute (``max_submits_per_minute``), answered 429 with ``Retry-After``.

A sliding window of submit times per team, kept in this process: with one
replica (the SQLite deployment) that is the whole truth.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable

from .errors import TooManyRequests
from .pipeline import Policy, SubmitContext

WINDOW_SECONDS = 60.0


class RateLimit(Policy):
    name = "ratelimit"

    def __init__(self, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.monotonic = monotonic
        self.windows: dict[str, deque[float]] = {}

    async def on_request(self, ctx: SubmitContext) -> None:
        assert ctx.team is not None
        limit = ctx.team.max_submits_per_minute
        if limit is None:
            return
        now = self.monotonic()
        window = self.windows.setdefault(ctx.team.name, deque())
        while window and window[0] <= now - WINDOW_SECONDS:
            window.popleft()
        if len(window) >= limit:
            retry_after = max(1, math.ceil(window[0] + WINDOW_SECONDS - now))
            raise TooManyRequests(
                f"Team '{ctx.team.name}' may submit {limit} requests per minute; retry in {retry_after} s",
                headers={"Retry-After": str(retry_after)},
            )
        window.append(now)
