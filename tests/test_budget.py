"""Reservation and settlement: every cent accounted for, for every way a job can end."""

from __future__ import annotations

import asyncio
import re
from decimal import Decimal

import pytest

from proxy.simulator.server import Fault, Simulator
from tests.conftest import EDIT_PATH, TEXT_PATH, Gateway, auth, free_port, policies_with, wait_for_status

TERMINAL = {"COMPLETED", "FAILED", "ERROR"}
LEDGER = ("kind", "reserved_delta", "spent_delta", "seconds", "resolution", "basis")


async def finish(gateway: Gateway, handle: str) -> dict:
    return await wait_for_status(gateway, handle, TERMINAL)


async def test_completed_settles_the_exact_price(gateway: Gateway) -> None:
    code, body, headers = await gateway.submit()
    assert code == 202
    assert (headers["X-Proxy-Estimate-USD"], headers["X-Proxy-Budget-Remaining-USD"]) == ("0.42", "49.58")
    assert headers["X-Proxy-Budget-Period"] == gateway.totals()[0][0]

    assert (await finish(gateway, body["request_id"]))["status"] == "COMPLETED"

    assert gateway.ledger_rows(*LEDGER) == [
        ("reserve", 420_000, 0, 6, "720p", "params"),
        ("settle", -420_000, 420_000, 6, "720p", "params"),
    ]
    assert [row[1:] for row in gateway.totals()] == [(420_000, 0, 0)]
    assert await gateway.services.store.ledger_mismatches() == []


async def test_error_is_released_and_failed_is_charged_by_default(gateway: Gateway, simulator: Simulator) -> None:
    simulator.queue_outcomes("ERROR", "FAILED")
    _, errored, _ = await gateway.submit()
    _, failed, _ = await gateway.submit()

    assert (await finish(gateway, errored["request_id"]))["status"] == "ERROR"
    assert (await finish(gateway, failed["request_id"]))["status"] == "FAILED"

    settled = [row for row in gateway.ledger_rows("kind", "reserved_delta", "spent_delta", "note") if row[0] != "reserve"]
    assert sorted(settled) == [
        ("release", -420_000, 0, "ERROR: not charged, as the upstream documents"),
        ("settle", -420_000, 420_000, "FAILED: charged by policy"),
    ]
    assert [row[1:] for row in gateway.totals()] == [(420_000, 0, 0)]


async def test_failed_can_be_released_by_policy(start_gateway, simulator: Simulator, tmp_path) -> None:
    gateway = await start_gateway(policies_dir=policies_with(tmp_path, 'settlement: failed = "release"'))
    simulator.queue_outcomes("FAILED")
    _, body, _ = await gateway.submit()

    assert (await finish(gateway, body["request_id"]))["status"] == "FAILED"
    assert [row[1:] for row in gateway.totals()] == [(0, 0, 0)]
    assert gateway.ledger_rows("kind", "note")[-1] == ("release", "FAILED: released by policy")


@pytest.mark.parametrize("fault", [Fault(op="submit", status=500), Fault(op="submit", status=400)])
async def test_a_refused_submit_releases_at_once(gateway: Gateway, simulator: Simulator, fault: Fault) -> None:
    """(A 429 is not a refusal: the job waits in the local queue instead, see test_queue.py.)"""
    simulator.add_fault(fault)

    code, _, _ = await gateway.submit()

    assert code == fault.status
    assert [row[:3] for row in gateway.ledger_rows(*LEDGER)] == [("reserve", 420_000, 0), ("release", -420_000, 0)]
    assert [row[1:] for row in gateway.totals()] == [(0, 0, 0)]


async def test_a_submit_that_never_reached_the_upstream_releases_at_once(start_gateway) -> None:
    gateway = await start_gateway(upstream_url=f"http://127.0.0.1:{free_port()}")  # nothing listens: refused

    code, body, _ = await gateway.submit()

    assert (code, body["message"]) == (502, "The upstream could not be reached")
    assert [row[:3] for row in gateway.ledger_rows(*LEDGER)] == [("reserve", 420_000, 0), ("release", -420_000, 0)]
    assert [row[1:] for row in gateway.totals()] == [(0, 0, 0)]


@pytest.mark.parametrize("fault", [Fault(op="submit", kind="delay", delay=1.0), Fault(op="submit", kind="reset"),
                                   Fault(op="submit", kind="malformed")], ids=["timeout", "reset", "malformed"])
async def test_a_submit_whose_answer_was_lost_stays_reserved_as_indeterminate(start_gateway, simulator: Simulator,
                                                                             fault: Fault) -> None:
    gateway = await start_gateway(upstream_timeout=0.3)
    simulator.add_fault(fault)

    code, body, _ = await gateway.submit()

    assert code in (502, 504)
    assert "may have reached the upstream, so its cost stays reserved" in body["message"]
    assert [row[:3] for row in gateway.ledger_rows(*LEDGER)] == [("reserve", 420_000, 0)]
    assert [row[1:] for row in gateway.totals()] == [(0, 420_000, 0)]
    assert gateway.sql("SELECT status FROM jobs") == [("INDETERMINATE",)]


async def test_edit_video_settles_on_the_output_it_actually_got(start_gateway, simulator: Simulator) -> None:
    gateway = await start_gateway()
    simulator.settings.edit_video_seconds = 5
    _, body, headers = await gateway.submit(EDIT_PATH, {"prompt": "p", "video_url": "https://v.example.com/in.mp4"})
    assert headers["X-Proxy-Estimate-USD"] == "1.20"  # unreachable input: 15 s at the 720p rate

    assert (await finish(gateway, body["request_id"]))["status"] == "COMPLETED"

    assert gateway.ledger_rows(*LEDGER) == [
        ("reserve", 1_200_000, 0, 15, "720p", "policy-max"),
        ("settle", -1_200_000, 400_000, 5, "720p", "output-probe"),
    ]


async def test_an_unreadable_output_charges_the_reserved_figure_and_says_so(start_gateway, simulator: Simulator) -> None:
    gateway = await start_gateway()
    simulator.settings.media_available = False
    _, body, _ = await gateway.submit(EDIT_PATH, {"prompt": "p", "video_url": "https://v.example.com/in.mp4",
                                                  "resolution": "480p"})

    await finish(gateway, body["request_id"])

    assert gateway.ledger_rows(*LEDGER)[-1] == ("settle", -900_000, 900_000, 15, "480p", "reserved-figure")


async def test_402_when_the_team_budget_would_be_passed(start_gateway, simulator: Simulator) -> None:
    gateway = await start_gateway(teams={"design": 1_000_000})
    assert (await gateway.submit())[0] == 202
    assert (await gateway.submit())[0] == 202

    code, body, _ = await gateway.submit()

    period = gateway.totals()[0][0]
    assert (code, body) == (402, {
        "error": "Insufficient Balance",
        "message": f"Team 'design' has $0.16 left of its $1.00 month budget ({period}); this request is estimated at $0.42",
    })
    assert len(simulator.calls_of("submit")) == 2
    # held or, if a job finished meanwhile, charged: the two admitted and nothing more
    assert [(spent + reserved, credit) for _, spent, reserved, credit in gateway.totals()] == [(840_000, 0)]


async def test_the_per_request_cost_cap(gateway: Gateway, simulator: Simulator) -> None:
    over = await gateway.submit(headers=auth() | {"X-Max-Cost-USD": "0.41"})
    exact = await gateway.submit(headers=auth() | {"X-Max-Cost-USD": "0.42"})
    malformed = await gateway.submit(headers=auth() | {"X-Max-Cost-USD": "lots"})

    assert over[:2] == (402, {"error": "Cost Cap Exceeded",
                              "message": "This request is estimated at $0.42, over the X-Max-Cost-USD of $0.41"})
    assert exact[0] == 202
    assert malformed[:2] == (400, {"error": "Bad Request", "message": "X-Max-Cost-USD must be an amount in USD, e.g. 0.50"})
    assert len(simulator.calls_of("submit")) == 1
    assert [row[0] for row in gateway.ledger_rows("kind")] == ["reserve"]


async def test_a_bad_money_header_is_refused_before_a_replay_or_a_shared_job_can_answer(gateway: Gateway,
                                                                                       simulator: Simulator) -> None:
    """Each header is parsed by the policy that owns it, but all of them before any policy may answer."""
    first = await gateway.submit(headers=auth() | {"Idempotency-Key": "k1"})
    replay = await gateway.submit(headers=auth() | {"Idempotency-Key": "k1", "X-Max-Cost-USD": "lots"})
    twin = await gateway.submit(headers=auth() | {"X-Max-Cost-USD": "0,50"})
    quote_with_bad_key = await gateway.submit(headers=auth() | {"X-Proxy-Dry-Run": "1", "Idempotency-Key": "\u00e9"})

    assert first[0] == 202
    assert replay[:2] == twin[:2] == (400, {"error": "Bad Request",
                                            "message": "X-Max-Cost-USD must be an amount in USD, e.g. 0.50"})
    assert quote_with_bad_key[:2] == (400, {"error": "Bad Request",
                                            "message": "Idempotency-Key must be 1 to 255 printable ASCII characters"})
    assert len(simulator.calls_of("submit")) == 1
    assert gateway.ledger_rows("kind") == [("reserve",)]


async def test_a_per_user_cap_within_the_team(start_gateway, simulator: Simulator) -> None:
    gateway = await start_gateway(teams={"design": {"budget_limit_micros": 10_000_000, "user_cap_micros": 840_000}})
    alice = auth(user="alice")

    assert (await gateway.submit(headers=alice))[0] == 202
    assert (await gateway.submit(headers=alice))[0] == 202
    code, body, _ = await gateway.submit(headers=alice)
    other = await gateway.submit(headers=auth(user="bob"))

    period = gateway.totals()[0][0]
    assert (code, body["message"]) == (402, f"User 'alice' of team 'design' has $0.00 left of the $0.84 per-user cap "
                                            f"({period}); this request is estimated at $0.42")
    assert other[0] == 202
    assert len(simulator.calls_of("submit")) == 3


async def test_a_global_cap_over_all_teams(start_gateway, simulator: Simulator, tmp_path) -> None:
    gateway = await start_gateway(policies_dir=policies_with(tmp_path, 'global: limit_usd = "0.84"'))

    assert (await gateway.submit(headers=auth(team="design")))[0] == 202
    assert (await gateway.submit(headers=auth(team="research")))[0] == 202
    code, body, _ = await gateway.submit(headers=auth(team="design"))

    assert code == 402
    assert body["message"].startswith("The gateway's global budget has $0.00 left of $0.84 (")
    assert len(simulator.calls_of("submit")) == 2


async def test_concurrent_jobs_limit(start_gateway, simulator: Simulator) -> None:
    """A team that refuses at its limit (on_limit = refuse; the default queues, see test_queue.py)."""
    gateway = await start_gateway(teams={"design": {"budget_limit_micros": 10_000_000, "max_concurrent_jobs": 2,
                                                    "on_limit": "refuse"}})
    simulator.queue_outcomes("STUCK", "STUCK")
    _, first, _ = await gateway.submit()
    assert (await gateway.submit())[0] == 202

    code, body, headers = await gateway.submit()
    assert (code, body["message"], headers["Retry-After"]) == (
        429, "Team 'design' has 2 jobs running, its limit of concurrent jobs", "5")

    simulator.finish(next(iter(simulator.jobs)), "COMPLETED")
    await finish(gateway, first["request_id"])
    assert (await gateway.submit())[0] == 202
    assert len(simulator.calls_of("submit")) == 3


async def test_submits_per_minute_limit(start_gateway, simulator: Simulator) -> None:
    gateway = await start_gateway(teams={"design": {"budget_limit_micros": 10_000_000, "max_submits_per_minute": 3},
                                         "research": 10_000_000})
    for _ in range(3):
        assert (await gateway.submit())[0] == 202
    dry = await gateway.submit(headers=auth() | {"X-Proxy-Dry-Run": "1"})

    code, body, headers = await gateway.submit()

    assert dry[0] == 200
    assert code == 429
    assert body["message"].startswith("Team 'design' may submit 3 requests per minute; retry in ")
    assert 1 <= int(headers["Retry-After"]) <= 60
    assert (await gateway.submit(headers=auth(team="research")))[0] == 202
    assert len(simulator.calls_of("submit")) == 4


async def test_a_limit_change_takes_effect_on_the_next_request(gateway: Gateway) -> None:
    await gateway.services.store.update_team("design", budget_limit_micros=100_000)
    assert (await gateway.submit())[0] == 402
    await gateway.services.store.update_team("design", budget_limit_micros=420_000)
    assert (await gateway.submit())[0] == 202


async def test_money_is_never_float(gateway: Gateway, backend: str) -> None:
    """Stored money is integers (SQLite: a float with a fraction would be stored as 'real'; PostgreSQL: every money
    column is BIGINT), answered as exact decimals."""
    answers = await asyncio.gather(*(gateway.submit(TEXT_PATH, {"prompt": f"p{i}", "duration": 3 + i % 8,
                                                                 "resolution": ("480p", "720p")[i % 2]})
                                     for i in range(30)))
    if backend == "sqlite":
        stored_types = {row[0] for row in gateway.sql(
            "SELECT typeof(reserved_delta) FROM ledger UNION SELECT typeof(spent_delta) FROM ledger "
            "UNION SELECT typeof(credit_delta) FROM ledger UNION SELECT typeof(amount_micros) FROM reservations "
            "UNION SELECT typeof(reserved_micros) FROM budget_totals UNION SELECT typeof(spent_micros) FROM budget_totals")}
    else:
        stored_types = {"integer" if kind == "bigint" else kind for (kind,) in gateway.sql(
            "SELECT DISTINCT data_type FROM information_schema.columns WHERE table_schema = 'public' "
            "AND (column_name LIKE '%micros' OR column_name LIKE '%delta')")}
    assert [(code, body) for code, body, _ in answers if code != 202] == []
    estimates = [headers["X-Proxy-Estimate-USD"] for _, _, headers in answers]
    expected = [(3 + i % 8) * (50_000, 70_000)[i % 2] for i in range(30)]

    assert stored_types == {"integer"}
    assert all(re.fullmatch(r"[0-9]+\.[0-9]{2,6}", text) for text in estimates)
    assert [int(Decimal(text) * 1_000_000) for text in estimates] == expected
    assert sum(delta for kind, delta in gateway.ledger_rows("kind", "reserved_delta") if kind == "reserve") == sum(expected)
