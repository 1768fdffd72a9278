"""A submit whose answer was lost is indeterminate: held, never sent twice, then resolved by policy."""

from __future__ import annotations

import logging

import pytest

from proxy.jobs.sweeper import INDETERMINATE_CHARGED
from proxy.simulator.server import Fault, Simulator
from tests.conftest import TEXT_PATH, Gateway, auth, policies_with, until
from tests.test_metrics import scrape, value

SLOW_SWEEP = """
sweeper: interval_seconds = 0.1
sweeper: orphan_submit_seconds = 1.5
"""


async def test_a_lost_answer_keeps_its_key_and_fingerprint_bound_until_resolved_then_replays(
        start_gateway, simulator: Simulator, tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    gateway: Gateway = await start_gateway(upstream_timeout=0.3, policies_dir=policies_with(tmp_path, SLOW_SWEEP))
    simulator.add_fault(Fault(op="submit", kind="delay", delay=1.0, stage="after"))  # created upstream, answer lost
    body = {"prompt": "a lighthouse, once"}
    keyed = auth() | {"Idempotency-Key": "order-17"}

    first = await gateway.submit(TEXT_PATH, body, headers=keyed)
    retry = await gateway.submit(TEXT_PATH, body, headers=keyed)
    twin = await gateway.submit(TEXT_PATH, body)  # same body, no key: same fingerprint

    assert first[0] == 504 and "its cost stays reserved" in first[1]["message"]
    assert retry[0] == 409 and "answer is not known yet" in retry[1]["message"]
    assert twin[0] == 409 and "not sent again until the gateway resolves it" in twin[1]["message"]
    assert [row[1:] for row in gateway.totals()] == [(0, 420_000, 0)]

    await until(lambda: [k for (k,) in gateway.ledger_rows("kind")] == ["reserve", "settle"], timeout=10)
    replay = await gateway.submit(TEXT_PATH, body, headers=keyed)
    code, status = await gateway.status(replay[1]["request_id"])

    assert replay[0] == 202 and replay[2]["Idempotent-Replayed"] == "true"
    assert (code, status["status"], status["error"]) == (200, "FAILED", INDETERMINATE_CHARGED)
    assert len(simulator.calls_of("submit")) == 1 and len(simulator.jobs) == 1  # one upstream job, charged once
    assert gateway.ledger_rows("kind", "spent_delta", "basis")[-1] == ("settle", 420_000, "indeterminate")
    assert [row[1:] for row in gateway.totals()] == [(420_000, 0, 0)]
    samples = await scrape(gateway)
    assert value(samples, "pixazo_proxy_indeterminate_submits_total", model="grok-imagine-video-text-to-video") == 1
    assert value(samples, "pixazo_proxy_indeterminate_resolved_total", action="charge") == 1
    [line] = [r for r in caplog.records if getattr(r, "event", None) == "submit.indeterminate_resolved"]
    assert (line.levelno, line.handle, line.team, line.action, line.amount_micros) == (
        logging.WARNING, replay[1]["request_id"], "design", "charge", 420_000)

    fresh = await gateway.submit(TEXT_PATH, body)  # resolved: an identical request is a new job again
    assert fresh[0] == 202 and fresh[2]["X-Proxy-Cache"] == "MISS"


async def test_a_bypass_may_resubmit_a_body_whose_outcome_is_unknown(start_gateway, simulator: Simulator) -> None:
    gateway: Gateway = await start_gateway(upstream_timeout=0.3)
    simulator.add_fault(Fault(op="submit", kind="delay", delay=1.0))
    body = {"prompt": "again, knowingly"}

    assert (await gateway.submit(TEXT_PATH, body))[0] == 504
    code, _, headers = await gateway.submit(TEXT_PATH, body, headers=auth() | {"X-Proxy-Cache": "bypass"})

    assert (code, headers["X-Proxy-Cache"]) == (202, "BYPASS")
    assert len(simulator.calls_of("submit")) == 2
