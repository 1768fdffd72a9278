"""A gateway always stops: SIGTERM at any moment of a busy process exits 0 within the shutdown bound, logging no ERROR.

Each round starts ``serve`` on the same books, makes it busy in every way a background loop can be busy at once
(the upstream answering 429 so the local queue pauses, submits held in flight by a slow upstream, sync webhooks to
a receiver that never answers, new submits arriving all the while), waits a random moment and sends SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from proxy.simulator.server import Fault, Simulator
from tests.conftest import TEXT_PATH, auth, create_teams, ledger_mismatches, loopback_server, policies_with
from tests.processes import GatewayProcess

ROUNDS = 50
#: PROXY_SHUTDOWN_SECONDS for these gateways: the bound every exit must keep.
BOUND_SECONDS = 4.0
#: How long past the bound a round waits before it calls the process hung and kills it.
HUNG_AFTER_SECONDS = BOUND_SECONDS + 6.0


class HangingReceiver:
    """A webhook receiver that reads each POST and never answers it (until the test ends)."""

    def __init__(self) -> None:
        self.posts = 0
        self.released = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        self.posts += 1
        await self.released.wait()
        return web.Response(status=200)


async def _load(gateway: GatewayProcess, hook: str, stop: asyncio.Event, counts: dict[str, int]) -> None:
    """Submits with sync webhooks, one after another, until told to stop; whatever each gets is counted."""
    headers = auth() | {"X-Webhook-URL": hook, "X-Webhook-Mode": "sync"}
    timeout = aiohttp.ClientTimeout(total=HUNG_AFTER_SECONDS + 5)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while not stop.is_set():
            body = {"prompt": f"a lighthouse, take {random.getrandbits(48)}", "duration": 3, "resolution": "480p"}
            try:
                async with session.post(gateway.url + TEXT_PATH, json=body, headers=headers) as response:
                    await response.read()
                    counts[str(response.status)] = counts.get(str(response.status), 0) + 1
            except (aiohttp.ClientError, TimeoutError):
                counts["no answer"] = counts.get("no answer", 0) + 1
                await asyncio.sleep(0.02)  # the gateway is going or gone: do not spin on a refused port


def _error_lines(stderr: str) -> list[str]:
    """Lines at ERROR or above, and anything that is not one of the gateway's JSON log lines (a bare traceback)."""
    found = []
    for line in stderr.splitlines():
        if not line.strip():
            continue
        try:
            level = json.loads(line).get("level")
        except ValueError:
            found.append(line)
            continue
        if level in ("error", "critical"):
            found.append(line)
    return found


@pytest.mark.timeout(900)
async def test_sigterm_at_random_moments_of_a_busy_gateway_always_exits_0_within_the_bound(
        db_location: str, simulator: Simulator, tmp_path: Path) -> None:
    await create_teams(db_location, {"design": 10_000_000_000})
    policies = policies_with(tmp_path, upstream="account: max_in_flight = 3\naccount: throttle_seconds = 2",
                             webhooks="delivery: poll_seconds = 0.05\ndelivery: timeout_seconds = 30")
    receiver = HangingReceiver()
    rng = random.Random(20261207)
    exits: list[float] = []
    failures: list[str] = []
    counts: dict[str, int] = {}
    async with loopback_server(("POST", "/hook", receiver.handle)) as hooks:
        hook = str(hooks.make_url("/hook"))
        for round_number in range(ROUNDS):
            simulator.faults.clear()
            simulator.add_fault(Fault(op="submit", status=429, retry_after=str(rng.randint(1, 4)),
                                      times=rng.randint(1, 4)))
            simulator.add_fault(Fault(op="submit", kind="delay", delay=rng.uniform(0.2, 3.0), times=rng.randint(1, 3)))
            gateway = GatewayProcess(db_location, simulator.url, policies,  # type: ignore[attr-defined]
                                     PROXY_WEBHOOK_ALLOW_PRIVATE="1", PROXY_SHUTDOWN_SECONDS=str(BOUND_SECONDS),
                                     PROXY_UPSTREAM_TIMEOUT="20")
            await asyncio.to_thread(gateway.start)
            stop = asyncio.Event()
            loads = [asyncio.create_task(_load(gateway, hook, stop, counts)) for _ in range(3)]
            await asyncio.sleep(rng.uniform(0.05, 1.5))  # the random moment itself, not a wait for a condition
            assert gateway.process is not None
            gateway.process.send_signal(signal.SIGTERM)
            sent = time.monotonic()
            try:
                code = await asyncio.to_thread(gateway.process.wait, HUNG_AFTER_SECONDS)
            except Exception:  # noqa: BLE001 - hung: recorded, and the process is killed so the next round can run
                gateway.process.kill()
                code = await asyncio.to_thread(gateway.process.wait, 10)
                failures.append(f"round {round_number}: no exit {HUNG_AFTER_SECONDS:g} s after SIGTERM; killed")
            exits.append(time.monotonic() - sent)
            stop.set()
            await asyncio.gather(*loads)
            if code != 0:
                failures.append(f"round {round_number}: exit status {code}")
            failures += [f"round {round_number}: {line[:400]}" for line in _error_lines(gateway.stderr())]
        receiver.released.set()

    worst = max(exits)
    print(f"SIGTERM to exit over {ROUNDS} rounds: worst {worst:.2f} s, median {sorted(exits)[ROUNDS // 2]:.2f} s; "
          f"receiver held {receiver.posts} webhook POSTs; submits answered {counts}")
    assert failures == []
    assert worst <= BOUND_SECONDS
    assert receiver.posts > 0 and counts.get("202", 0) > 0  # it was busy in the ways this test means
    assert simulator.calls_of("submit")
    assert await ledger_mismatches(db_location) == []
