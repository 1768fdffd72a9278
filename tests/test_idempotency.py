"""Idempotency-Key: a retry gets the same handle; a different body is 422; in flight is 409."""

from __future__ import annotations

import asyncio

import pytest

from proxy.simulator.server import Fault, Simulator
from tests.conftest import TEXT_PATH, Gateway, auth, policies_with


def keyed(key: str, **kw: str) -> dict[str, str]:
    return auth(**kw) | {"Idempotency-Key": key}


async def test_a_retry_with_the_same_key_and_body_gets_the_same_handle(gateway: Gateway, simulator: Simulator) -> None:
    body = {"prompt": "a heron", "duration": 6}
    code, first, _ = await gateway.submit(TEXT_PATH, body, headers=keyed("order-1"))
    replay = await gateway.submit(TEXT_PATH, body, headers=keyed('"order-1"'))
    spelled_out = await gateway.submit(TEXT_PATH, body | {"resolution": "720p", "aspect_ratio": "16:9"},
                                       headers=keyed("order-1"))

    assert code == 202
    for again in (replay, spelled_out):
        assert (again[0], again[1]["request_id"], again[2]["Idempotent-Replayed"]) == (202, first["request_id"], "true")
    assert len(simulator.calls_of("submit")) == 1
    assert [row[0] for row in gateway.ledger_rows("kind")] == ["reserve"]


async def test_the_same_key_with_another_body_is_422(gateway: Gateway, simulator: Simulator) -> None:
    await gateway.submit(TEXT_PATH, {"prompt": "a heron"}, headers=keyed("order-2"))

    code, body, _ = await gateway.submit(TEXT_PATH, {"prompt": "a stork"}, headers=keyed("order-2"))

    assert (code, body) == (422, {"error": "Unprocessable Content",
                                  "message": "This Idempotency-Key was already used with a different request"})
    assert len(simulator.calls_of("submit")) == 1


async def test_the_same_key_while_the_first_is_in_flight_is_409(gateway: Gateway, simulator: Simulator) -> None:
    simulator.add_fault(Fault(op="submit", kind="delay", delay=0.3))
    body = {"prompt": "a heron"}

    results = await asyncio.gather(*(gateway.submit(TEXT_PATH, body, headers=keyed("order-3")) for _ in range(4)))

    assert sorted(code for code, _, _ in results) == [202, 409, 409, 409]
    conflict = next(answer for code, answer, _ in results if code == 409)
    assert conflict == {"error": "Conflict", "message": "A request with this Idempotency-Key is still being processed; retry shortly"}
    assert len(simulator.calls_of("submit")) == 1


async def test_keys_belong_to_one_caller(gateway: Gateway, simulator: Simulator) -> None:
    alice = await gateway.submit(TEXT_PATH, {"prompt": "a heron"}, headers=keyed("k", user="alice"))
    bob = await gateway.submit(TEXT_PATH, {"prompt": "a stork"}, headers=keyed("k", user="bob"))

    assert (alice[0], bob[0]) == (202, 202)
    assert alice[1]["request_id"] != bob[1]["request_id"]


async def test_a_key_whose_submit_the_upstream_refused_can_be_used_again(gateway: Gateway, simulator: Simulator) -> None:
    simulator.add_fault(Fault(op="submit", status=500))
    assert (await gateway.submit(TEXT_PATH, {"prompt": "a heron"}, headers=keyed("order-4")))[0] == 500

    code, body, headers = await gateway.submit(TEXT_PATH, {"prompt": "a heron"}, headers=keyed("order-4"))

    assert (code, "Idempotent-Replayed" in headers) == (202, False)
    assert len(simulator.calls_of("submit")) == 2


async def test_keys_expire_after_the_policy_period(start_gateway, tmp_path) -> None:
    gateway = await start_gateway(policies_dir=policies_with(tmp_path, cache="idempotency: ttl_seconds = 0.3"))
    await gateway.submit(TEXT_PATH, {"prompt": "a heron"}, headers=keyed("order-5"))
    await asyncio.sleep(0.4)

    assert (await gateway.submit(TEXT_PATH, {"prompt": "a stork"}, headers=keyed("order-5")))[0] == 202


async def test_keys_survive_a_restart(start_gateway) -> None:
    first = await start_gateway()
    _, body, _ = await first.submit(TEXT_PATH, {"prompt": "a heron"}, headers=keyed("order-6"))
    await first.server.close()
    second = await start_gateway()

    code, again, headers = await second.submit(TEXT_PATH, {"prompt": "a heron"}, headers=keyed("order-6"))

    assert (code, again["request_id"], headers["Idempotent-Replayed"]) == (202, body["request_id"], "true")


@pytest.mark.parametrize("key", ["", "   ", "x" * 256, "clé-unique", '""'])
async def test_malformed_keys_are_400(gateway: Gateway, simulator: Simulator, key: str) -> None:
    code, body, _ = await gateway.submit(TEXT_PATH, {"prompt": "a heron"}, headers=keyed(key))

    assert (code, body) == (400, {"error": "Bad Request", "message": "Idempotency-Key must be 1 to 255 printable ASCII characters"})
    assert simulator.calls == []
