"""Periods: a job is charged to the period it was reserved in; the soft alert fires once per period."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import pytest

from proxy.domain.budget import period_key
from proxy.simulator.server import Simulator
from tests.conftest import ManualClock, Receiver, auth, wait_for_status


@pytest.mark.parametrize(("period", "moment", "key"), [
    ("month", datetime(2026, 11, 30, 23, 59, tzinfo=UTC), "2026-11"),
    ("month", datetime(2027, 1, 1, 0, 0, tzinfo=UTC), "2027-01"),
    ("week", datetime(2026, 11, 29, 23, 59, tzinfo=UTC), "2026-W48"),
    ("week", datetime(2026, 11, 30, 0, 0, tzinfo=UTC), "2026-W49"),
    ("week", datetime(2027, 1, 1, tzinfo=UTC), "2026-W53"),
    ("day", datetime(2026, 11, 24, 13, 0, tzinfo=UTC), "2026-11-24"),
    ("total", datetime(2026, 11, 24, tzinfo=UTC), "total"),
])
def test_period_keys_are_calendar_utc(period: str, moment: datetime, key: str) -> None:
    assert period_key(period, moment) == key


async def test_a_job_in_flight_at_rollover_is_charged_to_the_period_it_was_reserved_in(
    start_gateway, simulator: Simulator
) -> None:
    clock = ManualClock(datetime(2026, 11, 30, 23, 59, 30, tzinfo=UTC))
    gateway = await start_gateway(clock=clock)
    simulator.queue_outcomes("STUCK")
    _, november, headers = await gateway.submit()
    assert headers["X-Proxy-Budget-Period"] == "2026-11"

    clock.moment = datetime(2026, 12, 1, 0, 0, 30, tzinfo=UTC)
    _, december, headers = await gateway.submit()
    assert headers["X-Proxy-Budget-Period"] == "2026-12"
    simulator.finish(next(iter(simulator.jobs)), "COMPLETED")
    await wait_for_status(gateway, november["request_id"], {"COMPLETED"})
    await wait_for_status(gateway, december["request_id"], {"COMPLETED"})

    assert gateway.ledger_rows("kind", "period_key") == [
        ("reserve", "2026-11"), ("reserve", "2026-12"), ("settle", "2026-11"), ("settle", "2026-12"),
    ]
    assert gateway.totals() == [("2026-11", 420_000, 0, 0), ("2026-12", 420_000, 0, 0)]


async def test_the_soft_alert_fires_once_per_period_as_log_metric_and_webhook(
    start_gateway, simulator: Simulator, caplog: pytest.LogCaptureFixture
) -> None:
    clock = ManualClock(datetime(2026, 11, 10, tzinfo=UTC))
    async with Receiver() as receiver:
        gateway = await start_gateway(
            teams={"design": {"budget_limit_micros": 1_000_000, "soft_threshold_percent": 50}},
            clock=clock, alert_webhook_url=receiver.url(),
        )
        assert (await gateway.submit())[0] == 202  # 42 %
        assert receiver.calls == []
        assert (await gateway.submit(headers=auth() | {"X-Proxy-Dry-Run": "1"}))[0] == 200
        assert (await gateway.submit())[0] == 202  # 84 %: crosses 50 %
        assert (await gateway.submit())[0] == 402
        clock.moment = datetime(2026, 12, 2, tzinfo=UTC)
        assert (await gateway.submit())[0] == 202  # December: 42 %
        assert (await gateway.submit())[0] == 202  # December: 84 %, fires again for the new period
        await gateway.services.alerts.close()  # waits for deliveries in flight

    assert receiver.delivered() == [
        {"alert": "budget_soft_limit", "team": "design", "period": "2026-11", "threshold_percent": 50,
         "used_usd": "0.84", "limit_usd": "1.00"},
        {"alert": "budget_soft_limit", "team": "design", "period": "2026-12", "threshold_percent": 50,
         "used_usd": "0.84", "limit_usd": "1.00"},
    ]
    async with gateway.http.get(gateway.url + "/metrics") as response:
        text = await response.text()
    assert 'pixazo_proxy_budget_soft_limit_alerts_total{team="design"} 2.0' in text
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "of its budget" in r.getMessage()]
    assert warnings == ["team design reached 50% of its budget for 2026-11: $0.84 of $1.00",
                        "team design reached 50% of its budget for 2026-12: $0.84 of $1.00"]
