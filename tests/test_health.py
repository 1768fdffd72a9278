"""Liveness and readiness."""

from __future__ import annotations

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
