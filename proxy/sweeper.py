"""The sweeper: no reservation stays open forever.

Every ``interval_seconds`` it looks at reservations that have been open a
while (see ``policies/budgets.toml``):

* a submit whose upstream answer was never recorded (the gateway stopped
  mid-call) is released after ``orphan_submit_seconds``, as a refused submit is;
* a job still running is asked about once (so a job nobody polls still
  settles); once it is older than ``stale_job_seconds`` and still not
  terminal, it is resolved as ``stale_job_action`` says and shown as ERROR.

Each resolution says why in the ledger.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import timedelta

from .budget import BudgetRules
from .clock import Clock, iso_utc
from .refresh import StatusRefresher
from .store import TERMINAL_STATUSES, Decision, JobUpdate, Reservation, Store

logger = logging.getLogger(__name__)

ORPHAN_NOTE = "the gateway stopped before the upstream answered the submit; released by the sweeper"
STALE_ERROR = "The gateway could not follow this job to its end"


class Sweeper:
    def __init__(self, store: Store, refresher: StatusRefresher, rules: BudgetRules, clock: Clock) -> None:
        self.store = store
        self.refresher = refresher
        self.rules = rules
        self.clock = clock

    async def run(self) -> None:
        """Sweep forever, every ``sweep_interval_seconds``; a failed sweep is logged and retried."""
        while True:
            try:
                await self.sweep()
            except Exception:
                logger.exception("sweep failed; retrying in %gs", self.rules.sweep_interval_seconds)
            await asyncio.sleep(self.rules.sweep_interval_seconds)

    async def sweep(self) -> int:
        """One pass; the number of reservations it resolved."""
        now = self.clock.now()
        cutoff = iso_utc(now - timedelta(seconds=self.rules.orphan_submit_seconds))
        stale_cutoff = iso_utc(now - timedelta(seconds=self.rules.stale_job_seconds))
        await self.store.purge_idempotency(iso_utc(now))
        resolved = 0
        for reservation in await self.store.open_reservations(created_before=cutoff):
            if reservation.job_status == "SUBMITTING":
                await self.store.mark_rejected(reservation.job_id, ORPHAN_NOTE)
                logger.warning("released %s: %s", reservation.handle, ORPHAN_NOTE)
                resolved += 1
                continue
            status = None
            if reservation.upstream_id is not None:
                status = await self.refresher.refresh(reservation.job_id, reservation.upstream_id)
            if status in TERMINAL_STATUSES:
                resolved += 1
            elif reservation.created_at < stale_cutoff:
                await self._resolve_stale(reservation)
                resolved += 1
        return resolved

    async def _resolve_stale(self, reservation: Reservation) -> None:
        age = f"not terminal after {self.rules.stale_job_seconds:g} s"
        if self.rules.stale_job_charged:
            decision = Decision("settle", reservation.amount_micros, reservation.seconds, reservation.resolution,
                                "reserved-figure", f"{age}: charged by policy")
        else:
            decision = Decision.release(f"{age}: released by policy", reservation.seconds, reservation.resolution)
        stamp = iso_utc()
        update = JobUpdate("ERROR", None, STALE_ERROR, stamp, stamp, time.time())
        if await self.store.update_job(reservation.job_id, update, decision):
            logger.warning("resolved stale job of %s: %s", reservation.handle, decision.note)
