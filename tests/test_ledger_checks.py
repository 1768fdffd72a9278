"""The ledger check that so many tests assert empty: it must report a total that drifted from its ledger."""

from __future__ import annotations

import pytest

from tests.conftest import Gateway, ledger_mismatches, until


@pytest.mark.parametrize(("column", "scope"), [
    ("spent_micros", "team:design"), ("reserved_micros", "team:design"), ("credit_micros", "team:design"),
    ("spent_micros", "user:design/alice"), ("spent_micros", "global"), ("reserved_micros", "global"),
])
async def test_a_tampered_total_is_reported(gateway: Gateway, column: str, scope: str) -> None:
    assert (await gateway.submit())[0] == 202
    await until(lambda: [k for (k,) in gateway.ledger_rows("kind")] == ["reserve", "settle"])
    db = gateway.db_path
    assert await ledger_mismatches(db) == []

    gateway.execute(f"UPDATE budget_totals SET {column} = {column} + 1 WHERE scope = ?", scope)
    found = await ledger_mismatches(db)

    assert len(found) >= 1 and all(line.startswith(scope) for line in found), found


async def test_an_open_reservation_without_its_total_is_reported(gateway: Gateway, simulator) -> None:
    simulator.queue_outcomes("STUCK")
    assert (await gateway.submit())[0] == 202
    db = gateway.db_path  # the total forgets the job, the reservation and ledger do not
    gateway.execute("UPDATE budget_totals SET reserved_micros = 0 WHERE scope = 'team:design'")

    assert any(line.startswith("team:design") for line in await ledger_mismatches(db))


@pytest.mark.parametrize(("statement", "reported"), [
    ("UPDATE spend_rollup SET spent_micros = spent_micros + 1", "metrics rollup design/"),
    ("UPDATE spend_rollup SET saved_micros = saved_micros + 1", "metrics rollup design/"),
    ("DELETE FROM spend_rollup", "metrics rollup design/"),
    ("UPDATE job_counts SET jobs = jobs + 1 WHERE status = 'COMPLETED'", "job count "),
    ("DELETE FROM job_counts", "job count "),
    ("UPDATE day_rollup SET saved_micros = saved_micros + 1", "day rollup design "),
    ("UPDATE day_rollup SET jobs = jobs + 1", "day rollup design "),
    ("DELETE FROM day_rollup WHERE hits = 0", "day rollup design "),
])
async def test_a_drifted_metrics_rollup_is_reported(gateway: Gateway, statement: str, reported: str) -> None:
    same = {"prompt": "a lighthouse"}
    assert (await gateway.submit(body=same))[0] == 202
    assert (await gateway.submit(body=same))[0] == 202  # a cache answer for the same request: a saving row
    await until(lambda: sorted(k for (k,) in gateway.ledger_rows("kind")) == ["reserve", "saving", "settle"])
    db = gateway.db_path
    assert await ledger_mismatches(db) == []

    gateway.execute(statement)
    found = await ledger_mismatches(db)

    assert len(found) >= 1 and all(line.startswith(reported) for line in found), found


async def test_a_gateway_started_on_drifted_books_says_so(start_gateway, caplog: pytest.LogCaptureFixture) -> None:
    first = await start_gateway()
    assert (await first.submit())[0] == 202
    await until(lambda: [k for (k,) in first.ledger_rows("kind")] == ["reserve", "settle"])
    await first.server.close()
    first.execute("UPDATE budget_totals SET spent_micros = spent_micros + 1 WHERE scope = 'team:design'")

    await start_gateway()  # serves at once; the check runs beside it and logs what it finds

    await until(lambda: any(r.levelname == "ERROR" and r.getMessage().startswith(
        "budget totals differ from the ledger: team:design ") for r in caplog.records), timeout=10)
