"""Odd and hostile values from the upstream: the key never comes back in any piece, ids and URLs are checked."""

from __future__ import annotations

import time

import pytest

from proxy.domain.redact import Redactor
from proxy.simulator.server import Fault, Simulator
from tests.conftest import UPSTREAM_KEY, Gateway, Receiver, auth, make_token, policies_with, until, wait_for_status

PIECES = {UPSTREAM_KEY[i:i + 8] for i in range(len(UPSTREAM_KEY) - 7)}


def holds_a_piece_of_the_key(text: str) -> bool:
    return any(piece in text for piece in PIECES)


def test_the_redactor_blanks_whole_and_partial_echoes() -> None:
    redactor = Redactor(UPSTREAM_KEY)
    assert redactor.text(f"key={UPSTREAM_KEY}!") == "key=[redacted]!"
    assert redactor.text(f"a {UPSTREAM_KEY[:20]} b {UPSTREAM_KEY[-9:]}") == "a [redacted] b [redacted]"
    assert redactor.text(UPSTREAM_KEY[3:10]) == UPSTREAM_KEY[3:10]  # 7 characters: too short to mean anything
    assert redactor.value({UPSTREAM_KEY: [UPSTREAM_KEY[5:15], 3, None]}) == {"[redacted]": ["[redacted]", 3, None]}


async def test_the_key_in_status_fields_is_scrubbed_before_it_is_stored_answered_or_delivered(
        start_gateway, simulator: Simulator, tmp_path) -> None:
    gateway: Gateway = await start_gateway(
        policies_dir=policies_with(tmp_path, webhooks="delivery: poll_seconds = 0.05"), webhook_allow_private=True)
    simulator.add_fault(Fault(op="status", kind="patch", times=1000, patch={
        "error": f"upstream says {UPSTREAM_KEY}",
        "output": {"media_url": [f"https://cdn.example/v.mp4?sig={UPSTREAM_KEY[:20]}"], "media_type": "video/mp4",
                   "debug": {"echo": UPSTREAM_KEY[10:30]}},
    }))
    async with Receiver() as receiver:
        code, body, _ = await gateway.submit(headers=auth() | {"X-Webhook-URL": receiver.url(),
                                                               "X-Webhook-Mode": "sync"})
        assert code == 202
        final = await wait_for_status(gateway, body["request_id"], {"COMPLETED"})
        await until(lambda: any(b"COMPLETED" in call[1] for call in receiver.calls))
        async with gateway.http.get(f"{gateway.url}/v2/requests/status/{body['request_id']}",
                                    headers=auth()) as response:
            answered = await response.text()

    assert final["error"] == "upstream says [redacted]"
    assert final["output"]["media_url"] == ["https://cdn.example/v.mp4?sig=[redacted]"]
    assert final["output"]["debug"] == {"echo": "[redacted]"}
    assert not holds_a_piece_of_the_key(answered)
    assert not any(holds_a_piece_of_the_key(call[1].decode()) for call in receiver.calls)
    stored = " ".join(str(row) for row in gateway.sql("SELECT * FROM jobs"))
    stored += " ".join(str(row) for row in gateway.sql("SELECT * FROM outbox"))
    assert not holds_a_piece_of_the_key(stored)


@pytest.mark.parametrize(("sent", "pause"), [
    (UPSTREAM_KEY, 5.0),  # not a Retry-After: the policy's throttle_seconds
    (f"7, {UPSTREAM_KEY[:12]}", 5.0),
    ("7", 7.0),
    ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),  # a date long past: no pause
    ("Wednesday, 21-Oct-15 07:28:00 GMT", 0.0),
    ("soon", 5.0),
    ("-1", 5.0),
])
async def test_an_upstream_retry_after_pauses_submits_only_as_seconds_or_a_date(gateway: Gateway, simulator: Simulator,
                                                                                sent: str, pause: float) -> None:
    simulator.add_fault(Fault(op="submit", status=429, retry_after=sent))
    before = time.time()

    code, body, headers = await gateway.submit()

    assert (code, body["status"]) == (202, "QUEUED") and "Retry-After" not in headers
    [(paused_until,)] = gateway.sql("SELECT next_send FROM upstream_gate")
    if pause:
        assert before + pause <= paused_until <= time.time() + pause
    else:
        assert paused_until < before
    stored = " ".join(str(row) for row in gateway.sql("SELECT * FROM jobs"))
    assert not holds_a_piece_of_the_key(stored)


@pytest.mark.parametrize("upstream_id", ["..", ".", "a/../../admin", "x y", "", UPSTREAM_KEY, None, 7])
async def test_an_unusable_upstream_request_id_is_never_stored_or_put_in_a_path(gateway: Gateway, simulator: Simulator,
                                                                                upstream_id) -> None:
    simulator.add_fault(Fault(op="submit", kind="patch", patch={"request_id": upstream_id}))

    code, body, _ = await gateway.submit()

    assert (code, body["error"]) == (502, "Bad Gateway")
    assert "request_id" in body["message"]
    assert gateway.sql("SELECT upstream_id FROM jobs") == [(None,)]
    assert simulator.calls_of("status") == []


async def test_a_lone_media_url_string_becomes_the_documented_list(gateway: Gateway, simulator: Simulator) -> None:
    simulator.add_fault(Fault(op="status", kind="patch", times=1000, patch={
        "output": {"media_url": "https://cdn.example/one.mp4", "media_type": "video/mp4"}}))

    _, body, _ = await gateway.submit()
    final = await wait_for_status(gateway, body["request_id"], {"COMPLETED"})

    assert final["output"]["media_url"] == ["https://cdn.example/one.mp4"]


@pytest.mark.parametrize("media_url", [{"url": "https://cdn.example/x.mp4"}, [1, 2], 42])
async def test_a_media_url_of_another_shape_is_a_malformed_answer(gateway: Gateway, simulator: Simulator,
                                                                 media_url) -> None:
    simulator.add_fault(Fault(op="status", kind="patch", times=3, patch={
        "status": "COMPLETED", "output": {"media_url": media_url, "media_type": "video/mp4"}}))

    _, body, _ = await gateway.submit()
    final = await wait_for_status(gateway, body["request_id"], {"COMPLETED"})

    assert simulator.faults == []  # the three odd answers were all given, and none was stored
    assert isinstance(final["output"]["media_url"], list) and all(
        isinstance(url, str) for url in final["output"]["media_url"])


async def test_a_token_of_the_documented_size_arrives(gateway: Gateway, simulator: Simulator) -> None:
    token = make_token(padding="x" * 6000)
    assert 8000 < len(token) <= 8192

    for headers in (auth(token), {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}):
        code, body, _ = await gateway.submit(headers=headers)
        assert code == 202, body
    over = make_token(padding="x" * 6200)
    assert 8192 < len(over) < 9000
    code, body, _ = await gateway.submit(headers=auth(over))
    assert (code, body["message"]) == (401, "The token is longer than 8192 bytes")
