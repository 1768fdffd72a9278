"""Ending a job's reservation: what each terminal status costs.

COMPLETED settles to the actual cost (the estimate when it was exact, else the
output probed), even where that is more than was reserved: the team is charged
the truth, the overrun is written in the ledger note, counted and alerted, and
the team's remaining budget goes negative (its next submits are refused until
it is back within budget); ERROR is released (the upstream says it is not charged);
FAILED is charged the reserved figure unless the budget policy says release.
The decision is applied in the same transaction that records the terminal
status, and only to a reservation still open, so it happens exactly once.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from ..domain.budget import BudgetRules
from ..domain.catalog import Catalog
from ..domain.money import micros_to_usd
from ..domain.pricing import FROM_PARAMS, FROM_RESERVATION, Pricer
from ..domain.values import Estimate
from ..domain.views import TERMINAL_STATUSES
from ..ops.metrics import Metrics
from ..store import Decision, JobUpdate, Reservation, Store
from .alerts import Alerts
from .media import MediaStore

logger = logging.getLogger(__name__)


class Settler:
    def __init__(self, store: Store, catalog: Catalog, pricer: Pricer, rules: BudgetRules,
                 media: MediaStore | None = None, metrics: Metrics | None = None,
                 alerts: Alerts | None = None) -> None:
        self.metrics = metrics
        self.alerts = alerts
        self.store = store
        self.catalog = catalog
        self.pricer = pricer
        self.rules = rules
        self.media = media

    async def apply(self, job_id: int, update: JobUpdate) -> bool:
        """Record ``update``; a terminal one settles or releases the job's money with it."""
        decision = None
        output_file = None
        if update.status == "COMPLETED" and self.media is not None:
            output, output_file = await self.media.keep(update.output)
            update = replace(update, output=output)
        reservation = None
        if update.status in TERMINAL_STATUSES:
            reservation = await self.store.reservation(job_id)
            if reservation is not None and reservation.state == "open":
                decision = await self.decide(reservation, update, output_file)
        applied = await self.store.update_job(job_id, update, decision)
        if applied and reservation is not None and decision is not None:
            overrun = decision.charge_micros - reservation.amount_micros
            if decision.kind == "settle" and overrun > 0:
                self._overrun(reservation, decision, overrun)
        if applied and reservation is not None and self.metrics is not None:
            started = datetime.strptime(reservation.created_at, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
            seconds = (datetime.now(UTC) - started).total_seconds()
            self.metrics.child(self.metrics.job_duration, reservation.model).observe(max(0.0, seconds))
            logger.info("job of %s ended %s", reservation.handle, update.status,
                        extra={"event": "job.finished", "handle": reservation.handle, "team": reservation.team,
                               "model": reservation.model, "status": update.status,
                               "duration_ms": round(seconds * 1000)})
        return applied

    async def decide(self, reservation: Reservation, update: JobUpdate, output_file: Path | None = None) -> Decision:
        if update.status == "ERROR":
            return Decision.release("ERROR: not charged, as the upstream documents", reservation.seconds,
                                    reservation.resolution)
        if update.status == "FAILED":
            if not self.rules.failed_is_charged:
                return Decision.release("FAILED: released by policy", reservation.seconds, reservation.resolution)
            return Decision("settle", reservation.amount_micros, reservation.seconds, reservation.resolution,
                            FROM_RESERVATION, "FAILED: charged by policy")
        model = self.catalog.models.get(reservation.model)
        reserved = Estimate(reservation.amount_micros, reservation.seconds, reservation.resolution,
                            reservation.basis, reservation.basis == FROM_PARAMS)
        actual = await self.pricer.actual(model, reserved, update.output, output_file) if model else reserved
        note = "COMPLETED"
        if actual.amount_micros > reservation.amount_micros:
            note = (f"COMPLETED; overrun: cost ${micros_to_usd(actual.amount_micros)}, "
                    f"${micros_to_usd(actual.amount_micros - reservation.amount_micros)} more than the "
                    f"${micros_to_usd(reservation.amount_micros)} reserved")
        return Decision("settle", actual.amount_micros, actual.seconds, actual.resolution, actual.basis, note)

    def _overrun(self, reservation: Reservation, decision: Decision, overrun: int) -> None:
        logger.warning("job of %s cost more than was reserved: %s", reservation.handle, decision.note,
                       extra={"event": "budget.overrun", "handle": reservation.handle, "team": reservation.team,
                              "model": reservation.model, "overrun_micros": overrun})
        if self.metrics is not None:
            self.metrics.child(self.metrics.budget_overruns, reservation.team).inc()
            self.metrics.child(self.metrics.budget_overrun_usd, reservation.team).inc(overrun / 1_000_000)
        if self.alerts is not None:
            self.alerts.overrun(reservation.team, reservation.period_key, reservation.handle,
                                reservation.amount_micros, decision.charge_micros)
