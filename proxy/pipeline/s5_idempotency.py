"""Fifth: ``Idempotency-Key`` on a submit, after the IETF httpapi idempotency-key draft.

* The key (a string of 1-255 printable ASCII characters, quoted as a
  structured-field string or bare) is scoped to the caller: team and user.
* A retry with the same key and an equivalent body (same normalized params)
  gets the same handle back (202, ``Idempotent-Replayed: true``): no new job,
  no new charge.
* The same key with a different body is 422; the same key while the first
  request is still being processed is 409.
* Keys are remembered for the policy's ``ttl_seconds`` (default 24 h), written
  in the same transaction as the handle they name, so a crash cannot lose one.
  A key whose submit the upstream refused (or provably never got) is free to
  be used again; a key whose submit's outcome is unknown (sent, answer lost,
  or the gateway stopped mid-call) answers 409 until the sweeper resolves it,
  then replays that handle: it never starts a second upstream job.
"""

from __future__ import annotations

import hashlib
import re
from datetime import timedelta

from ..domain.clock import Clock, iso_utc
from ..domain.errors import BadRequest, Conflict, UnprocessableContent
from ..domain.validate import canonical_json
from ..store import UNKNOWN_OUTCOME, IdempotencyRecord, Store
from . import Policy, SubmitContext, accepted

HEADER = "Idempotency-Key"
KEY_PATTERN = re.compile(r"^[\x20-\x7e]{1,255}$")


def parse_key(raw: str) -> str:
    key = raw.strip()
    if len(key) >= 2 and key[0] == key[-1] == '"':
        key = key[1:-1]
    if not KEY_PATTERN.match(key) or not key.strip():
        raise BadRequest(f"{HEADER} must be 1 to 255 printable ASCII characters")
    return key


class Idempotency(Policy):
    name = "idempotency"

    def __init__(self, store: Store, ttl_seconds: float, clock: Clock, public_url: str) -> None:
        self.store = store
        self.ttl = timedelta(seconds=ttl_seconds)
        self.clock = clock
        self.public_url = public_url.rstrip("/")
        self.in_flight: set[tuple[str, str, str]] = set()

    async def on_headers(self, ctx: SubmitContext) -> None:
        raw = ctx.request.headers.get(HEADER)
        if raw is not None:
            ctx.idempotency_key = parse_key(raw)

    async def on_request(self, ctx: SubmitContext) -> None:
        key = ctx.idempotency_key
        if key is None or ctx.dry_run:
            return
        principal = ctx.caller.principal
        scope = (principal.team, principal.user, key)
        request_hash = hashlib.sha256(f"{ctx.model.id}\n{canonical_json(ctx.params)}".encode()).hexdigest()
        if scope in self.in_flight:
            raise Conflict(f"A request with this {HEADER} is still being processed; retry shortly")
        self.in_flight.add(scope)  # claimed before the first await, so concurrent twins see it
        ctx.idempotency_scope = scope
        now = self.clock.now()
        existing = await self.store.idempotent_handle(*scope, iso_utc(now))
        if existing is not None:
            handle, status = existing.handle, existing.status
            if existing.request_hash != request_hash:
                raise UnprocessableContent(f"This {HEADER} was already used with a different request")
            if status in UNKNOWN_OUTCOME:
                raise Conflict(f"The request with this {HEADER} was sent to the upstream and its answer is not "
                               "known yet (it may still be in flight, or the answer was lost); it is not sent again. "
                               "Retry later: once the gateway resolves it, this key answers with its handle.")
            ctx.response = accepted(self.public_url, handle, status, {"Idempotent-Replayed": "true"})
            return
        ctx.idempotency = IdempotencyRecord(key, request_hash, iso_utc(now + self.ttl))

    async def on_response(self, ctx: SubmitContext) -> None:
        self._release(ctx)

    async def on_failure(self, ctx: SubmitContext, error: BaseException) -> None:
        self._release(ctx)

    def _release(self, ctx: SubmitContext) -> None:
        if ctx.idempotency_scope is not None:
            self.in_flight.discard(ctx.idempotency_scope)
            ctx.idempotency_scope = None
