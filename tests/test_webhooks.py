"""Webhooks delivered by the gateway: exactly once at the end, every change in sync mode, retried, signed, guarded."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import pytest
from aiohttp import web

from proxy.net.guard import is_public_address
from proxy.simulator.server import Simulator
from tests.conftest import (
    TEXT_PATH,
    Gateway,
    LoopbackServer,
    Receiver,
    auth,
    free_port,
    make_token,
    policies_with,
    until,
    wait_for_status,
)

FAST = """
delivery: poll_seconds = 0.05
delivery: retry_schedule_seconds = [0.05, 0.1, 0.1]
delivery: timeout_seconds = 2
"""
# made once, at import: valid for the whole run (the suite takes longer than a default token's 10 minutes)
ADMIN = {"Authorization": f"Bearer {make_token(team='research', user='root', role='admin', ttl=86400)}"}


@pytest.fixture
async def hooked(start_gateway, tmp_path) -> Gateway:
    return await start_gateway(webhook_allow_private=True, policies_dir=policies_with(tmp_path, webhooks=FAST))


def outbox(gateway: Gateway) -> list[tuple[str, str, int, str | None]]:
    return gateway.sql("SELECT status, state, attempts, last_error FROM outbox ORDER BY id")



async def test_terminal_mode_delivers_exactly_once_with_the_gateways_handle(hooked: Gateway) -> None:
    async with Receiver() as receiver:
        _, body, _ = await hooked.submit(headers=auth() | {"X-Webhook-URL": receiver.url()})
        final = await wait_for_status(hooked, body["request_id"], {"COMPLETED"})
        await until(lambda: outbox(hooked) == [("COMPLETED", "delivered", 1, None)])  # the one row there is, done

    assert receiver.delivered() == [final]
    assert receiver.delivered()[0]["request_id"] == body["request_id"]
    assert outbox(hooked) == [("COMPLETED", "delivered", 1, None)]


async def test_sync_mode_delivers_every_status_change(hooked: Gateway, simulator: Simulator) -> None:
    simulator.queue_outcomes("STUCK")  # held in PROCESSING until the test ends it: no race with the clock
    async with Receiver() as receiver:
        _, body, _ = await hooked.submit(headers=auth() | {"X-Webhook-URL": receiver.url(), "X-Webhook-Mode": "sync"})
        await wait_for_status(hooked, body["request_id"], {"PROCESSING"})
        simulator.finish(next(iter(simulator.jobs)), "FAILED")
        await wait_for_status(hooked, body["request_id"], {"FAILED"})
        await until(lambda: len(receiver.calls) == 3)

    assert [d["status"] for d in receiver.delivered()] == ["QUEUED", "PROCESSING", "FAILED"]
    assert receiver.delivered()[-1]["error"] == "Generation failed: the model could not produce a video for this request"


async def test_a_handle_hears_in_order_even_across_retries(hooked: Gateway, simulator: Simulator) -> None:
    simulator.queue_outcomes("STUCK")
    async with Receiver(fail=2) as receiver:  # QUEUED fails twice; nothing later may overtake it
        _, body, _ = await hooked.submit(headers=auth() | {"X-Webhook-URL": receiver.url(), "X-Webhook-Mode": "sync"})
        await wait_for_status(hooked, body["request_id"], {"PROCESSING"})
        simulator.finish(next(iter(simulator.jobs)), "FAILED")
        await wait_for_status(hooked, body["request_id"], {"FAILED"})
        await until(lambda: len(receiver.calls) == 5)

    statuses = [json.loads(raw)["status"] for _, raw, _ in receiver.calls]
    assert statuses == ["QUEUED", "QUEUED", "QUEUED", "PROCESSING", "FAILED"]


async def test_a_failing_receiver_is_retried_with_the_same_id_until_it_recovers(hooked: Gateway) -> None:
    async with Receiver(fail=2) as receiver:
        _, body, _ = await hooked.submit(headers=auth() | {"X-Webhook-URL": receiver.url()})
        await until(lambda: len(receiver.calls) == 3)
        await until(lambda: outbox(hooked)[0][1] != "pending")  # the third attempt's outcome is recorded after it

    ids = {headers["webhook-id"] for headers, _, _ in receiver.calls}
    assert len(ids) == 1
    assert outbox(hooked) == [("COMPLETED", "delivered", 3, None)]


async def test_retry_after_is_honoured(hooked: Gateway) -> None:
    async with Receiver(fail=1, status=503, headers={"Retry-After": "1"}) as receiver:
        await hooked.submit(headers=auth() | {"X-Webhook-URL": receiver.url()})
        await until(lambda: len(receiver.calls) == 2, timeout=6)

    assert receiver.calls[1][2] - receiver.calls[0][2] >= 1.0


async def test_a_receiver_that_never_recovers_is_given_up_and_recorded(hooked: Gateway) -> None:
    async with Receiver(fail=100) as receiver:
        await hooked.submit(headers=auth() | {"X-Webhook-URL": receiver.url()})
        await until(lambda: outbox(hooked) and outbox(hooked)[0][1] == "failed")

    assert len(receiver.calls) == 4  # the first attempt and three retries
    assert outbox(hooked) == [("COMPLETED", "failed", 4, "HTTP 500")]


async def test_redirects_are_not_followed(hooked: Gateway) -> None:
    async with Receiver() as receiver:
        await hooked.submit(headers=auth() | {"X-Webhook-URL": receiver.url("/moved")})
        await until(lambda: outbox(hooked) and outbox(hooked)[0][1] == "failed")

    assert {headers.get("webhook-id") is not None for headers, _, _ in receiver.calls} == {True}
    assert all(json.loads(body)["status"] == "COMPLETED" for _, body, _ in receiver.calls)
    assert outbox(hooked)[0][3] == "HTTP 302"


async def test_deliveries_carry_standard_webhooks_signatures_with_a_rotatable_team_secret(hooked: Gateway) -> None:
    async with hooked.http.get(hooked.url + "/admin/teams/design/webhook-secret", headers=ADMIN) as response:
        secret = (await response.json())["secret"]
    async with Receiver() as receiver:
        await hooked.submit(headers=auth() | {"X-Webhook-URL": receiver.url()})
        await until(lambda: len(receiver.calls) == 1)
        async with hooked.http.post(hooked.url + "/admin/teams/design/webhook-secret", headers=ADMIN) as response:
            assert response.status == 201
            rotated = (await response.json())["secret"]
        await hooked.submit(headers=auth() | {"X-Webhook-URL": receiver.url()})
        await until(lambda: len(receiver.calls) == 2)

    def verify(secret: str, headers: dict[str, str], body: bytes) -> bool:
        """What a receiver does, as docs/cache-and-webhooks.md shows."""
        key = base64.b64decode(secret.removeprefix("whsec_"))
        signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
        expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
        return any(hmac.compare_digest(expected, sig.split(",", 1)[1]) for sig in headers["webhook-signature"].split())

    (first_headers, first_body, _), (second_headers, second_body, _) = receiver.calls
    assert secret.startswith("whsec_") and rotated != secret
    assert verify(secret, first_headers, first_body) and not verify(rotated, first_headers, first_body)
    assert verify(rotated, second_headers, second_body) and not verify(secret, second_headers, second_body)
    assert abs(int(first_headers["webhook-timestamp"]) - time.time()) < 30
    async with hooked.http.get(hooked.url + "/admin/teams/design/webhook-secret", headers=auth()) as response:
        assert response.status == 403


async def test_a_cache_hit_with_a_webhook_is_told_at_once(hooked: Gateway) -> None:
    body = {"prompt": "a heron"}
    _, first, _ = await hooked.submit(TEXT_PATH, body)
    await wait_for_status(hooked, first["request_id"], {"COMPLETED"})
    async with Receiver() as receiver:
        code, hit, headers = await hooked.submit(TEXT_PATH, body, headers=auth() | {"X-Webhook-URL": receiver.url()})
        await until(lambda: len(receiver.calls) == 1)

    assert (code, headers["X-Proxy-Cache"]) == (202, "HIT")
    assert receiver.delivered()[0]["request_id"] == hit["request_id"]
    assert receiver.delivered()[0]["status"] == "COMPLETED"


async def test_deliveries_survive_a_restart(start_gateway, tmp_path) -> None:
    policies = policies_with(tmp_path, webhooks=FAST)
    port = free_port()
    first = await start_gateway(webhook_allow_private=True, policies_dir=policies)
    _, body, _ = await first.submit(headers=auth() | {"X-Webhook-URL": f"http://127.0.0.1:{port}/hook"})
    await wait_for_status(first, body["request_id"], {"COMPLETED"})
    await first.server.close()  # the receiver was not up: the delivery is pending in the outbox
    assert outbox(first)[0][1] == "pending"

    receiver = Receiver()
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    server = LoopbackServer(app, host="127.0.0.1", port=port)
    await server.start_server()
    try:
        second = await start_gateway(webhook_allow_private=True, policies_dir=policies)
        await until(lambda: outbox(second)[0][1] == "delivered")
    finally:
        await server.close()
    assert [d["request_id"] for d in receiver.delivered()] == [body["request_id"]]


TARGETS = [
    ("http://example.com/hook", "X-Webhook-URL must be an https:// URL"),
    ("https://127.0.0.1/hook", "X-Webhook-URL must point at a public address, not 127.0.0.1"),
    ("https://[::1]/hook", "X-Webhook-URL must point at a public address, not ::1"),
    ("https://[::ffff:127.0.0.1]/hook", "X-Webhook-URL must point at a public address, not ::ffff:127.0.0.1"),
    ("https://10.1.2.3/hook", "X-Webhook-URL must point at a public address, not 10.1.2.3"),
    ("https://172.16.0.9/hook", "X-Webhook-URL must point at a public address, not 172.16.0.9"),
    ("https://192.168.1.20/hook", "X-Webhook-URL must point at a public address, not 192.168.1.20"),
    ("https://169.254.169.254/latest/meta-data", "X-Webhook-URL must point at a public address, not 169.254.169.254"),
    ("https://100.64.0.1/hook", "X-Webhook-URL must point at a public address, not 100.64.0.1"),
    ("https://224.0.0.1/hook", "X-Webhook-URL must point at a public address, not 224.0.0.1"),
    ("https://0.0.0.0/hook", "X-Webhook-URL must point at a public address, not 0.0.0.0"),
    ("https://2130706433/hook", "X-Webhook-URL must point at a public address; 2130706433 resolves to a private one"),
    ("https://0177.0.0.1/hook", "X-Webhook-URL must point at a public address; 0177.0.0.1 resolves to a private one"),
    ("https://0x7f.0.0.1/hook", "X-Webhook-URL must point at a public address; 0x7f.0.0.1 resolves to a private one"),
    ("https://localhost/hook", "X-Webhook-URL must point at a public address; localhost resolves to a private one"),
    # IPv6 forms that carry or translate to a private IPv4 address
    ("https://[64:ff9b::a9fe:a9fe]/", "X-Webhook-URL must point at a public address, not 64:ff9b::a9fe:a9fe"),
    ("https://[64:ff9b::808:808]/", "X-Webhook-URL must point at a public address, not 64:ff9b::808:808"),
    ("https://[64:ff9b:1::a00:1]/", "X-Webhook-URL must point at a public address, not 64:ff9b:1::a00:1"),
    ("https://[::ffff:0:7f00:1]/", "X-Webhook-URL must point at a public address, not ::ffff:0:7f00:1"),
    ("https://[::7f00:1]/", "X-Webhook-URL must point at a public address, not ::7f00:1"),
    ("https://[::808:808]/", "X-Webhook-URL must point at a public address, not ::808:808"),
    ("https://[fec0::1]/", "X-Webhook-URL must point at a public address, not fec0::1"),
    ("https://[2002:a9fe:a9fe::1]/", "X-Webhook-URL must point at a public address, not 2002:a9fe:a9fe::1"),
    ("https://[2002:c0a8:101::1]/", "X-Webhook-URL must point at a public address, not 2002:c0a8:101::1"),
    ("https://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/",
     "X-Webhook-URL must point at a public address, not 2001:0:4136:e378:8000:63bf:3fff:fdd2"),
    # CRLF cannot arrive inside a header value (it ends the header on the wire; clients refuse to send it),
    # so what can arrive is checked: whitespace and tabs inside the URL.
    ("https://a.example/h X-Evil: 1", "X-Webhook-URL must not contain whitespace or control characters"),
    ("https://a.example/h\tX-Evil: 1", "X-Webhook-URL must not contain whitespace or control characters"),
    ("ftp://example.com/hook", "X-Webhook-URL must be an http:// or https:// URL"),
]


@pytest.mark.parametrize(("url", "message"), TARGETS, ids=[url[:40] for url, _ in TARGETS])
async def test_webhook_targets_that_are_not_public_https_are_refused_at_submit(
    gateway: Gateway, simulator: Simulator, url: str, message: str
) -> None:
    headers = auth() | {"X-Webhook-URL": url}

    code, body, _ = await gateway.submit(headers=headers)

    assert (code, body) == (400, {"error": "Bad Request", "message": message})
    assert simulator.calls == []


async def test_a_bad_mode_is_refused(gateway: Gateway) -> None:
    code, body, _ = await gateway.submit(headers=auth() | {"X-Webhook-URL": "https://8.8.8.8/h", "X-Webhook-Mode": "often"})

    assert (code, body["message"]) == (400, "X-Webhook-Mode must be terminal or sync")


async def test_delivery_checks_the_address_it_connects_to(start_gateway, tmp_path) -> None:
    """A target accepted once (as if DNS said public) but resolving to loopback at delivery is never contacted."""
    gateway = await start_gateway(policies_dir=policies_with(tmp_path, webhooks=FAST))
    async with Receiver() as receiver:
        port = receiver.url().split(":")[2].split("/")[0]
        _, body, _ = await gateway.submit()
        gateway.execute("UPDATE handles SET webhook_url = ?, webhook_mode = 'terminal' WHERE id = ?",  # as a
                        f"http://localhost:{port}/hook", body["request_id"])  # rebinding name would have got through
        await wait_for_status(gateway, body["request_id"], {"COMPLETED"})
        await until(lambda: outbox(gateway) and outbox(gateway)[0][1] == "failed")

    assert receiver.calls == []
    assert outbox(gateway)[0][3].startswith("blocked") or "non-public" in outbox(gateway)[0][3]


@pytest.mark.parametrize("address", ["8.8.8.8", "2606:4700:4700::1111", "2002:808:808::1", "::ffff:8.8.8.8"])
def test_public_addresses_stay_public(address: str) -> None:
    assert is_public_address(address)
