"""The sweeper: no reservation stays open forever.

Every ``interval_seconds`` it looks at reservations that have been open a
while (see ``policies/budgets.toml``):

* a submit whose outcome is unknown (sent and its answer lost, or the gateway
  stopped mid-call) is resolved after ``orphan_submit_seconds`` as
  ``settlement.indeterminate`` says: charged at the reserved figure (the job
  shows FAILED) or released (ERROR), with basis ``indeterminate`` in the
  ledger and a log line to reconcile against the upstream's invoice;
* a job still running is asked about once (so a job nobody polls still
  settles); once it is older than ``stale_job_seconds`` and still not
  terminal, it is resolved as ``stale_job_action`` says and shown as ERROR.

Each resolution says why in the ledger.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from datetime import UTC, datetime, timedelta

from ..domain.budget import BudgetRules
from ..domain.clock import Clock, iso_utc
from ..domain.errors import StoreUnavailable
from ..domain.money import micros_to_usd
from ..domain.queueing import WAITING
from ..domain.views import TERMINAL_STATUSES
from ..ops.metrics import Metrics
from ..store import UNKNOWN_OUTCOME, Decision, JobUpdate, Reservation, Store
from .refresh import StatusRefresher

logger = logging.getLogger(__name__)

SWEEPER_LEASE = "sweeper"

INDETERMINATE = "indeterminate"  # the ledger basis of a resolved indeterminate submit
INDETERMINATE_CHARGED = ("The upstream's answer to this submit was lost (a timeout, a reset or a restart), so it may "
                         "have run; charged at the reserved figure, as the gateway's policy says")
INDETERMINATE_RELEASED = ("The upstream's answer to this submit was lost (a timeout, a reset or a restart); not charged, "
                          "as the gateway's policy says")
STALE_ERROR = "The gateway could not follow this job to its end"


class Sweeper:
    def __init__(self, store: Store, refresher: StatusRefresher, rules: BudgetRules, clock: Clock,
                 metrics: Metrics | None = None) -> None:
        self.store = store
        self.refresher = refresher
        self.rules = rules
        self.clock = clock
        self.metrics = metrics

    async def run(self) -> None:
        """Sweep forever, every ``sweep_interval_seconds``; a failed sweep is logged and retried.

        One process sweeps at a time: each round it takes (or renews) the store's ``sweeper`` lease for two
        intervals; while another process holds it, this one skips its round. If the holder dies, another takes
        over within two intervals.
        """
        holder = uuid.uuid4().hex
        while True:
            try:
                if await self.store.take_lease(SWEEPER_LEASE, holder, time.time(), 2 * self.rules.sweep_interval_seconds):
                    await self.sweep()
            except StoreUnavailable as exc:
                logger.warning("sweep skipped: %s", exc.message)
            except Exception:
                logger.exception("sweep failed; retrying in %gs", self.rules.sweep_interval_seconds)
            await asyncio.sleep(self.rules.sweep_interval_seconds)

    async def sweep(self) -> int:
        """One pass; the number of reservations it resolved."""
        now = self.clock.now()  # the gateway's clock: what key expiries were computed with
        wall = datetime.now(UTC)  # ages: the store stamps jobs and reservations with the wall clock
        cutoff = iso_utc(wall - timedelta(seconds=self.rules.orphan_submit_seconds))
        stale_cutoff = iso_utc(wall - timedelta(seconds=self.rules.stale_job_seconds))
        await self.store.purge_idempotency(iso_utc(now))
        resolved = 0
        for reservation in await self.store.open_reservations(created_before=cutoff):
            if reservation.job_status == WAITING or reservation.since >= cutoff:
                continue  # waiting in the local queue (its own deadline ends it), or sent from it only lately
            if reservation.job_status in UNKNOWN_OUTCOME:
                resolved += await self._resolve_indeterminate(reservation)
                continue
            status = None
            if reservation.upstream_id is not None:
                status = await self.refresher.refresh(reservation.job_id, reservation.upstream_id)
            if status in TERMINAL_STATUSES:
                resolved += 1
            elif reservation.since < stale_cutoff:
                await self._resolve_stale(reservation)
                resolved += 1
        return resolved

    async def _resolve_indeterminate(self, reservation: Reservation) -> int:
        """Charge or release a submit whose outcome stayed unknown; 1 if this sweep resolved it."""
        charged = self.rules.indeterminate_charged
        decision = _by_policy(reservation, charged, "outcome unknown", "(settlement.indeterminate)",
                              INDETERMINATE, INDETERMINATE)
        status, error = ("FAILED", INDETERMINATE_CHARGED) if charged else ("ERROR", INDETERMINATE_RELEASED)
        if not await self._end(reservation, status, error, decision):
            return 0
        action = "charge" if charged else "release"
        if self.metrics is not None:
            self.metrics.child(self.metrics.indeterminate_resolved, action).inc()
        logger.warning("indeterminate submit %s of team %s (%s, submitted %s): %s $%s", reservation.handle,
                       reservation.team, reservation.model, reservation.created_at,
                       "charged" if charged else "released", micros_to_usd(reservation.amount_micros),
                       extra={"event": "submit.indeterminate_resolved", "handle": reservation.handle,
                              "team": reservation.team, "model": reservation.model, "action": action,
                              "amount_micros": reservation.amount_micros, "submitted_at": reservation.created_at})
        return 1

    async def _resolve_stale(self, reservation: Reservation) -> None:
        age = f"not terminal after {self.rules.stale_job_seconds:g} s"
        decision = _by_policy(reservation, self.rules.stale_job_charged, age, "", "reserved-figure", "released")
        if await self._end(reservation, "ERROR", STALE_ERROR, decision):
            logger.warning("resolved stale job of %s: %s", reservation.handle, decision.note)

    async def _end(self, reservation: Reservation, status: str, error: str, decision: Decision) -> bool:
        """Record the job's end as ``status`` with ``error``, settling its money as ``decision`` says."""
        stamp = iso_utc()
        return await self.store.update_job(reservation.job_id, JobUpdate(status, None, error, stamp, stamp, time.time()),
                                           decision)


def _by_policy(reservation: Reservation, charge: bool, why: str, which: str, charged_basis: str,
               released_basis: str) -> Decision:
    """Charge the reserved figure, or release it, as a policy says; the note names why and which policy."""
    note = f"{why}: {'charged' if charge else 'released'} by policy{' ' + which if which else ''}"
    if charge:
        return Decision("settle", reservation.amount_micros, reservation.seconds, reservation.resolution,
                        charged_basis, note)
    return Decision.release(note, reservation.seconds, reservation.resolution, released_basis)
