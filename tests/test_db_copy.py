"""``pixazo-proxy db copy``: a SQLite gateway's books moved to PostgreSQL, whole, and a gateway carries on there."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from datetime import UTC, datetime

import pytest

from proxy.domain.budget import period_key
from proxy.store.factory import store_at
from tests.conftest import ROOT, TEXT_PATH, auth, wait_for_status


def copy_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PROXY_", "PIXAZO_"))}
    return subprocess.run([sys.executable, "-m", "proxy.cli", "db", "copy", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=60)


async def books(location: str) -> dict[str, object]:
    store = store_at(location)
    await store.open()
    try:
        teams = await store.list_teams()
        now = period_key("month", datetime.now(UTC))
        report = await store.spend_report({team.name: now for team in teams})
        return {
            "teams": [(t.name, t.budget_limit_micros, t.period, t.user_cap_micros) for t in teams],
            "ledger": {t.name: [(e.id, e.kind, e.reserved_delta, e.spent_delta, e.credit_delta, e.saved_micros, e.handle)
                                for e in await store.ledger(t.name, limit=1000)] for t in teams},
            "handles": {t.name: [(h.handle, h.job_id, h.status, h.output) for h in await store.handles_of(t.name)]
                        for t in teams},
            "report": report,
            "mismatches": await store.ledger_mismatches(),
        }
    finally:
        await store.close()


@pytest.mark.sqlite_only  # the source is the SQLite gateway; the target is PostgreSQL
async def test_a_sqlite_gateways_books_move_to_postgresql_and_a_gateway_carries_on_there(
        start_gateway, postgres_server, simulator) -> None:
    server, reason = postgres_server
    if server is None:
        pytest.skip(f"PostgreSQL: {reason}")
    source = await start_gateway()
    same = {"prompt": "a lighthouse"}
    _, first, _ = await source.submit(TEXT_PATH, same, headers=auth() | {"Idempotency-Key": "k-1"})
    await wait_for_status(source, first["request_id"], {"COMPLETED"})
    _, hit, _ = await source.submit(TEXT_PATH, same)  # a cache hit: a saving row
    _, other, _ = await source.submit(TEXT_PATH, {"prompt": "another"}, headers=auth(team="research", user="bob"))
    await wait_for_status(source, other["request_id"], {"COMPLETED"}, headers=auth(team="research", user="bob"))
    now = period_key("month", datetime.now(UTC))
    await source.services.store.add_entry("design", "topup", 1_000_000, now, now, "admin", "launch")
    await source.server.close()
    target = server.create()
    try:
        done = await asyncio.to_thread(copy_cli, "--from", source.db_path, "--to", target)
        again = await asyncio.to_thread(copy_cli, "--from", source.db_path, "--to", target)

        assert done.returncode == 0, done.stderr
        assert "ledger: 6 rows" in done.stdout and "its totals match its ledger" in done.stdout
        assert (again.returncode, again.stderr.strip()) == (2, f"pixazo-proxy: error: {target}: the target database already "
                                                               "holds teams, jobs or ledger rows; give an empty one")
        before, after = await books(source.db_path), await books(target)
        assert after == before and after["mismatches"] == []

        moved = await start_gateway(db_path=target)  # ids continue after the copied ones; keys and cache carry over
        replay = await moved.submit(TEXT_PATH, same, headers=auth() | {"Idempotency-Key": "k-1"})
        new = await moved.submit(TEXT_PATH, {"prompt": "after the move"})
        assert (replay[0], replay[1]["request_id"], replay[2]["Idempotent-Replayed"]) == (202, first["request_id"], "true")
        assert (await moved.submit(TEXT_PATH, same))[2]["X-Proxy-Cache"] == "HIT"
        await wait_for_status(moved, new[1]["request_id"], {"COMPLETED"})
        assert (await moved.status(hit["request_id"]))[1]["status"] == "COMPLETED"
    finally:
        server.drop(target)
