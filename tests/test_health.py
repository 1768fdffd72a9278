"""Liveness and readiness."""

from __future__ import annotations

import shutil
import sqlite3

import pytest

from tests.conftest import Gateway


async def test_healthz_and_readyz(gateway: Gateway) -> None:
    async with gateway.http.get(gateway.url + "/healthz") as response:
        assert (response.status, await response.json()) == (200, {"status": "ok"})
    async with gateway.http.get(gateway.url + "/readyz") as response:
        assert (response.status, await response.json()) == (
            200, {"status": "ready", "checks": {"store": True, "policies": True}}
        )


async def test_readyz_is_503_once_the_store_is_closed(gateway: Gateway) -> None:
    await gateway.services.store.close()

    async with gateway.http.get(gateway.url + "/readyz") as response:
        assert (response.status, await response.json()) == (
            503, {"status": "not ready", "checks": {"store": False, "policies": True}}
        )
    await gateway.services.store.open()


@pytest.mark.sqlite_only  # the disk under SQLite's file; PostgreSQL's outage is tests/test_replicas.py
async def test_a_store_that_cannot_write_makes_readyz_503_and_submits_503_in_shape(start_gateway, tmp_path,
                                                                                   simulator) -> None:
    volume = tmp_path / "volume"
    gateway = await start_gateway(db_path=str(volume / "gateway.db"))
    assert (await gateway.submit())[0] == 202

    def lose_the_volume(db: sqlite3.Connection) -> None:  # the disk under the database goes away
        db.close()
        shutil.rmtree(volume)

    with pytest.raises(sqlite3.Error):
        await gateway.services.store._writer.submit(lose_the_volume)
    async with gateway.http.get(gateway.url + "/readyz") as response:
        ready = (response.status, await response.json())
    code, body, headers = await gateway.submit()

    assert ready == (503, {"status": "not ready", "checks": {"store": False, "policies": True}})
    assert (code, body["error"], headers["Retry-After"]) == (503, "Service Unavailable", "30")
    assert "nothing was recorded or reserved" in body["message"]
    assert len(simulator.calls_of("submit")) == 1  # the refused submit never reached the upstream
