"""Top-ups and adjustments: each lands in the periods it names, and a refund never exceeds what was spent."""

from __future__ import annotations

from typing import Any

from proxy.domain.budget import period_key
from proxy.simulator.server import Simulator
from tests.conftest import Gateway, auth, policies_with, until, wait_for_status


async def call(gateway: Gateway, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    async with gateway.http.post(gateway.url + path, json=body, headers=auth(user="root", role="admin")) as response:
        return response.status, await response.json()


async def spend_once(gateway: Gateway) -> None:
    """One default job (6 s at 720p = $0.42), followed to its end."""
    _, body, _ = await gateway.submit()
    await wait_for_status(gateway, body["request_id"], {"COMPLETED"})
    await until(lambda: any(kind == "settle" for (kind,) in gateway.ledger_rows("kind")))


async def test_an_adjustment_to_a_past_period_moves_that_periods_global_total_only(gateway: Gateway) -> None:
    now = period_key("month", gateway.services.clock.now())
    await spend_once(gateway)
    before_now = gateway.totals("global")

    assert (await call(gateway, "/admin/teams/design/adjustments",
                       {"amount_usd": "1.00", "reason": "late invoice", "period": "2020-01"}))[0] == 201
    assert (await call(gateway, "/admin/teams/design/adjustments",
                       {"amount_usd": "-0.40", "reason": "partial refund", "period": "2020-01"}))[0] == 201

    assert gateway.totals("team:design") == [("2020-01", 600_000, 0, 0), (now, 420_000, 0, 0)]
    assert gateway.totals("global") == [("2020-01", 600_000, 0, 0)] + before_now
    assert before_now == [(now, 420_000, 0, 0)]
    assert await gateway.services.store.ledger_mismatches() == []


async def test_adjustments_leave_per_user_totals_alone(gateway: Gateway) -> None:
    await spend_once(gateway)
    user_before = gateway.totals("user:design/alice")

    assert (await call(gateway, "/admin/teams/design/adjustments", {"amount_usd": "-0.42", "reason": "refund"}))[0] == 201

    assert gateway.totals("user:design/alice") == user_before == [(user_before[0][0], 420_000, 0, 0)]
    assert gateway.totals("team:design")[0][1] == 0
    assert await gateway.services.store.ledger_mismatches() == []


async def test_a_refund_larger_than_the_periods_spend_is_refused(gateway: Gateway) -> None:
    await spend_once(gateway)

    code, body = await call(gateway, "/admin/teams/design/adjustments", {"amount_usd": "-50", "reason": "x"})
    old = await call(gateway, "/admin/teams/design/adjustments",
                     {"amount_usd": "-0.01", "reason": "x", "period": "2020-01"})

    assert (code, body["error"]) == (400, "Bad Request")
    assert "below zero" in body["message"] and "$0.42 was spent" in body["message"]
    assert old[0] == 400 and "2020-01 below zero" in old[1]["message"]
    assert [kind for (kind,) in gateway.ledger_rows("kind")] == ["reserve", "settle"]
    assert gateway.totals("team:design")[0][1:] == (420_000, 0, 0)


async def test_a_refund_cannot_lift_the_global_cap(start_gateway, simulator: Simulator, tmp_path) -> None:
    """With a $1 global cap, the repro of the attack: a refund of more than was spent must not admit more jobs."""
    gateway: Gateway = await start_gateway(policies_dir=policies_with(tmp_path, budgets='global: limit_usd = "1"'))
    await spend_once(gateway)
    await spend_once(gateway)

    refused = await call(gateway, "/admin/teams/design/adjustments", {"amount_usd": "-50", "reason": "refund"})
    code, _, _ = await gateway.submit()

    assert refused[0] == 400
    assert code == 402  # 0.84 spent of a 1.00 cap: a 0.42 job does not fit, and no refund made room
    assert gateway.totals("global")[0][1:3] == (840_000, 0)
    assert (await call(gateway, "/admin/teams/design/adjustments", {"amount_usd": "-0.84", "reason": "refund"}))[0] == 201
    assert gateway.totals("global")[0][1] == 0


async def test_a_period_of_another_kind_or_that_does_not_exist_is_refused(gateway: Gateway) -> None:
    for period in ("2026-11-24", "2026-W48", "total", "2026-13", "2026-11\n", "design"):
        code, body = await call(gateway, "/admin/teams/design/topups", {"amount_usd": "1", "reason": "x", "period": period})
        assert code == 400 and "month" in body["message"], (period, body)
    assert gateway.ledger_rows("kind") == []


async def test_a_top_up_raises_the_team_allowance_and_not_the_global_cap(gateway: Gateway) -> None:
    assert (await call(gateway, "/admin/teams/design/topups", {"amount_usd": "5", "reason": "launch"}))[0] == 201

    assert [row[1:] for row in gateway.totals("team:design")] == [(0, 0, 5_000_000)]
    assert gateway.totals("global") == []
