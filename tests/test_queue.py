"""The local queue: one upstream key shared fairly, no 429s for a team at a limit, nothing lost or paid twice.

Every test runs on SQLite and on PostgreSQL (the ``backend`` fixture); the simulator counts the jobs it runs at
once, so the account's limit is checked where it matters, at the upstream.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.domain.queueing import fairness_bound
from proxy.simulator.server import Fault, Simulator
from tests.conftest import (
    REFERENCE_PATH,
    TEXT_PATH,
    Gateway,
    Receiver,
    auth,
    create_teams,
    ledger_mismatches,
    make_token,
    policies_with,
    until,
    wait_for_status,
)
from tests.databases import Peek
from tests.processes import GatewayProcess, stop_all

PRICE = 420_000  # the default text-to-video submit: 6 s at 720p
TERMINAL = {"COMPLETED", "FAILED", "ERROR"}
BUDGET = 500_000_000


def queue_policies(tmp_path: Path, account: str = "", queue: str = "") -> Path:
    lines = [f"account: {line.strip()}" for line in account.split(";") if line.strip()]
    lines += [f"queue: {line.strip()}" for line in queue.split(";") if line.strip()]
    return policies_with(tmp_path, upstream="\n".join(["queue: poll_seconds = 0.02", *lines]))


def team_auth(team: str, user: str = "alice") -> dict[str, str]:
    return auth(make_token(team, user, ttl=3600))


async def submit(gateway: Gateway, prompt: str, team: str = "design", **headers: str) -> tuple[int, Any, Any]:
    return await gateway.submit(body={"prompt": prompt}, headers=team_auth(team) | headers)


async def delete(gateway: Gateway, handle: str, headers: dict[str, str]) -> tuple[int, Any]:
    async with gateway.http.delete(f"{gateway.url}/v2/requests/status/{handle}", headers=headers) as response:
        return response.status, await response.json()


def books_closed(gateway: Gateway) -> bool:
    return gateway.sql("SELECT COUNT(*) FROM reservations WHERE state = 'open'") == [(0,)]


def spent(gateway: Gateway, team: str) -> tuple[int, int]:
    rows = gateway.sql("SELECT spent_micros, reserved_micros FROM budget_totals WHERE scope = ?", f"team:{team}")
    return rows[0] if rows else (0, 0)


async def test_a_team_at_its_own_limit_waits_instead_of_a_429_and_every_job_runs(start_gateway,
                                                                                 simulator: Simulator) -> None:
    gateway = await start_gateway(teams={"design": {"budget_limit_micros": BUDGET, "max_concurrent_jobs": 1}})
    simulator.settings.processing_seconds = 0.3

    answers = [await submit(gateway, f"fox {n}") for n in range(3)]

    assert [code for code, _, _ in answers] == [202, 202, 202]
    assert [body["status"] for _, body, _ in answers] == ["QUEUED"] * 3
    assert [headers.get("X-Proxy-Queue-Position") for _, _, headers in answers] == [None, "1", "2"]
    assert len(simulator.calls_of("submit")) == 1  # the other two wait in the gateway, not upstream
    assert spent(gateway, "design") == (0, 3 * PRICE)  # all three reserved at admission
    async with gateway.http.get(f"{gateway.url}/v2/requests/status/{answers[2][1]['request_id']}",
                                headers=team_auth("design")) as response:
        body = await response.json()
        assert (body["status"], response.headers["X-Proxy-Queue-Position"]) == ("QUEUED", "2")
        assert float(response.headers["X-Proxy-Queue-Wait-Seconds"]) >= 0.0
    for _, body, _ in answers:
        assert (await wait_for_status(gateway, body["request_id"], TERMINAL, team_auth("design"),
                                      timeout=15))["status"] == "COMPLETED"
    assert simulator.most_in_flight == 1 and len(simulator.calls_of("submit")) == 3
    await until(lambda: books_closed(gateway))
    assert spent(gateway, "design") == (3 * PRICE, 0)
    assert await ledger_mismatches(gateway.db_path) == []


async def test_a_team_that_refuses_at_its_limit_keeps_the_429(start_gateway, simulator: Simulator) -> None:
    gateway = await start_gateway(teams={"design": {"budget_limit_micros": BUDGET, "max_concurrent_jobs": 1,
                                                    "on_limit": "refuse"}})
    simulator.settings.processing_seconds = 5
    assert (await submit(gateway, "first"))[0] == 202

    code, body, headers = await submit(gateway, "second")

    assert (code, body["error"], headers["Retry-After"]) == (429, "Too Many Requests", "5")
    assert "its limit of concurrent jobs" in body["message"]
    assert spent(gateway, "design") == (0, PRICE)  # the refused one reserved nothing


async def test_a_flood_cannot_delay_another_team_beyond_its_fair_share(start_gateway, simulator: Simulator,
                                                                       tmp_path) -> None:
    gateway = await start_gateway(teams={"flood": BUDGET, "steady": BUDGET},
                                  policies_dir=queue_policies(tmp_path, account="max_in_flight = 4"))
    simulator.settings.max_in_flight = 4  # the account's own limit: one more would be a 429 upstream
    simulator.settings.queued_seconds, simulator.settings.processing_seconds = 0.02, 0.06

    flood = await asyncio.gather(*(submit(gateway, f"flood {n}", "flood") for n in range(200)))
    before = len(simulator.calls_of("submit"))
    steady = [await submit(gateway, f"steady {n}", "steady") for n in range(5)]
    after = len(simulator.calls_of("submit"))

    assert [code for code, _, _ in flood + steady] == [202] * 205
    for _, body, _ in steady:
        await wait_for_status(gateway, body["request_id"], TERMINAL, team_auth("steady"), timeout=30)
    calls = [json.loads(call.body) if isinstance(call.body, str) else call.body
             for call in simulator.calls_of("submit")]
    prompts = [call["prompt"] for call in calls]
    last_steady = max(i for i, prompt in enumerate(prompts) if prompt.startswith("steady"))
    flood_sent_meanwhile = sum(1 for prompt in prompts[before:last_steady] if prompt.startswith("flood"))
    # Equal weights: at most ceil(5 * 1 / 1) + 1 = 6 flood jobs go before steady's fifth, plus those sent while
    # steady was still submitting (they were due before it waited at all).
    assert flood_sent_meanwhile <= fairness_bound(5, 1, [1]) + (after - before)
    for _, body, _ in flood:
        await wait_for_status(gateway, body["request_id"], TERMINAL, team_auth("flood"), timeout=60)
    stats = simulator.most_in_flight, simulator.over_capacity, len(simulator.jobs)
    assert stats == (4, 0, 205)  # never more than the account's 4 at once; every job ran once
    await until(lambda: books_closed(gateway), timeout=10)
    assert (spent(gateway, "flood"), spent(gateway, "steady")) == ((200 * PRICE, 0), (5 * PRICE, 0))
    assert await ledger_mismatches(gateway.db_path) == []


async def test_a_heavier_team_gets_its_weight_and_a_team_orders_its_own_queue(start_gateway, simulator: Simulator,
                                                                              tmp_path) -> None:
    gateway = await start_gateway(teams={"light": BUDGET, "heavy": {"budget_limit_micros": BUDGET, "weight": 3}},
                                  policies_dir=queue_policies(tmp_path, account="max_in_flight = 1"))
    simulator.settings.processing_seconds = 2  # the first job holds the one slot while the rest queue
    first = await submit(gateway, "hold the slot", "light")
    light = [await submit(gateway, f"light {n}", "light") for n in range(4)]
    heavy = [await submit(gateway, f"heavy {n}", "heavy") for n in range(8)]
    urgent = await submit(gateway, "heavy urgent", "heavy", **{"X-Proxy-Priority": "50"})
    assert urgent[2]["X-Proxy-Queue-Position"] == "1"  # ahead of its team's eight
    assert (await submit(gateway, "bad", "heavy", **{"X-Proxy-Priority": "high"}))[0] == 400
    simulator.settings.queued_seconds, simulator.settings.processing_seconds = 0.01, 0.02
    simulator.finish(list(simulator.jobs)[0], "COMPLETED")

    for _, body, _ in [first, *light, *heavy, urgent]:
        await wait_for_status(gateway, body["request_id"], TERMINAL, auth(make_token("light", role="admin")), timeout=30)

    prompts = [(call.body if isinstance(call.body, dict) else json.loads(call.body))["prompt"]
               for call in simulator.calls_of("submit")][1:]
    assert prompts[0] == "heavy urgent" or prompts[1] == "heavy urgent"  # both teams started level
    # While both waited, heavy got three turns for light's one (stride scheduling is exact for 3:1).
    window = prompts[:8]
    assert (sum(p.startswith("heavy") for p in window), sum(p.startswith("light") for p in window)) == (6, 2)


async def test_an_upstream_429_storm_reaches_no_client_and_sends_each_job_once(start_gateway, simulator: Simulator,
                                                                               tmp_path) -> None:
    gateway = await start_gateway(policies_dir=queue_policies(tmp_path))
    simulator.add_fault(Fault(op="submit", status=429, retry_after="1", times=6))

    answers = await asyncio.gather(*(submit(gateway, f"storm {n}") for n in range(4)))

    assert [(code, body["status"]) for code, body, _ in answers] == [(202, "QUEUED")] * 4
    for _, body, _ in answers:
        assert (await wait_for_status(gateway, body["request_id"], TERMINAL, timeout=20))["status"] == "COMPLETED"
    assert len(simulator.jobs) == 4  # each accepted once: the 429s made none
    upstream_ids = gateway.sql("SELECT upstream_id FROM jobs ORDER BY id")
    assert len({row[0] for row in upstream_ids}) == 4
    assert len(simulator.calls_of("submit")) == 10  # 6 refused with 429, 4 accepted
    assert gateway.services.metrics.upstream_throttled._value.get() == 6
    await until(lambda: books_closed(gateway))
    assert spent(gateway, "design") == (4 * PRICE, 0)


async def test_cancel_releases_a_waiting_job_and_refuses_one_the_upstream_has(start_gateway,
                                                                              simulator: Simulator) -> None:
    gateway = await start_gateway(teams={"design": {"budget_limit_micros": BUDGET, "max_concurrent_jobs": 1},
                                         "research": BUDGET})
    simulator.settings.processing_seconds = 5
    sent = (await submit(gateway, "sent"))[1]["request_id"]
    waiting = (await submit(gateway, "waits"))[1]["request_id"]
    assert spent(gateway, "design") == (0, 2 * PRICE)

    assert (await delete(gateway, waiting, team_auth("research")))[0] == 404  # another team's: as if missing
    code, body = await delete(gateway, waiting, team_auth("design", "bob"))

    assert (code, body["status"]) == (200, "ERROR")
    assert "Cancelled by 'bob'" in body["error"] and "not charged" in body["error"]
    assert spent(gateway, "design") == (0, PRICE)  # released at once
    assert gateway.sql("SELECT kind, reserved_delta, spent_delta FROM ledger WHERE handle = ? ORDER BY id", waiting) == [
        ("reserve", PRICE, 0), ("release", -PRICE, 0)]
    code, body = await delete(gateway, sent, team_auth("design"))
    assert code == 409 and "cannot be cancelled" in body["message"]
    assert (await delete(gateway, waiting, team_auth("design")))[0] == 409  # already ended
    assert len(simulator.calls_of("submit")) == 1


async def test_the_queue_is_bounded_in_length_and_in_wait(start_gateway, simulator: Simulator, tmp_path) -> None:
    gateway = await start_gateway(teams={"design": {"budget_limit_micros": BUDGET, "max_concurrent_jobs": 1}},
                                  policies_dir=queue_policies(tmp_path, queue="max_queued_per_team = 2; "
                                                                               "max_wait_seconds = 1"))
    simulator.settings.processing_seconds = 30
    await submit(gateway, "runs")
    queued = [(await submit(gateway, f"waits {n}"))[1]["request_id"] for n in range(2)]

    code, body, headers = await submit(gateway, "one too many")

    assert (code, headers["Retry-After"]) == (429, "30")
    assert "queue is full" in body["message"]
    assert spent(gateway, "design") == (0, 3 * PRICE)  # the refused one reserved nothing
    for handle in queued:
        ended = await wait_for_status(gateway, handle, TERMINAL, timeout=10)
        assert ended["status"] == "ERROR" and "waited" in ended["error"] and "not charged" in ended["error"]
    assert spent(gateway, "design") == (0, PRICE)
    assert len(simulator.calls_of("submit")) == 1


async def test_identical_requests_and_idempotency_keys_join_a_waiting_job(start_gateway, simulator: Simulator,
                                                                          tmp_path) -> None:
    async with Receiver() as receiver:
        gateway = await start_gateway(teams={"design": {"budget_limit_micros": BUDGET, "max_concurrent_jobs": 1}},
                                      webhook_allow_private=True)
        simulator.settings.processing_seconds = 0.5
        await submit(gateway, "holds the slot")
        hooks = {"X-Webhook-URL": receiver.url(), "X-Webhook-Mode": "sync", "Idempotency-Key": "k-1"}
        code, first, headers = await submit(gateway, "the same", **hooks)
        assert (code, first["status"]) == (202, "QUEUED")

        replay = await submit(gateway, "the same", **hooks)
        twin = await submit(gateway, "the same", **{"X-Webhook-URL": receiver.url()})

        assert (replay[1]["request_id"], replay[2]["Idempotent-Replayed"]) == (first["request_id"], "true")
        assert (twin[1]["status"], twin[2]["X-Proxy-Cache"]) == ("QUEUED", "COALESCED")
        for handle in (first["request_id"], twin[1]["request_id"]):
            assert (await wait_for_status(gateway, handle, TERMINAL, timeout=15))["status"] == "COMPLETED"
        assert len(simulator.calls_of("submit")) == 2  # the first job and the shared one
        await until(lambda: len(receiver.delivered()) >= 4, timeout=15)
        mine = [d["status"] for d in receiver.delivered() if d["request_id"] == first["request_id"]]
        assert mine[0] == "QUEUED" and mine[-1] == "COMPLETED" and mine.count("QUEUED") == 1


async def test_a_team_weight_and_on_limit_are_settings_like_the_others(start_gateway) -> None:
    gateway = await start_gateway()
    admin = auth(make_token("design", "root", role="admin"))
    async with gateway.http.patch(f"{gateway.url}/admin/teams/design", json={"weight": 4, "on_limit": "refuse"},
                                  headers=admin) as response:
        body = await response.json()
        assert (response.status, body["weight"], body["on_limit"]) == (200, 4, "refuse")
    for bad in ({"weight": 0}, {"weight": 1001}, {"on_limit": "drop"}, {"weight": "2"}):
        async with gateway.http.patch(f"{gateway.url}/admin/teams/design", json=bad, headers=admin) as response:
            assert response.status == 400, bad


# several processes on one store, and SIGKILL


async def _until_ended(url: str, handle: str, timeout: float = 30.0) -> Any:
    """Poll a gateway process (without blocking the loop the simulator runs on) until the handle ends."""
    deadline = asyncio.get_running_loop().time() + timeout
    async with aiohttp.ClientSession() as http:
        while True:
            async with http.get(f"{url}/v2/requests/status/{handle}", headers=team_auth("design")) as response:
                body = await response.json()
            if response.status == 200 and body["status"] in TERMINAL:
                return body
            assert asyncio.get_running_loop().time() < deadline, f"{handle}: {response.status} {body}"
            await asyncio.sleep(0.05)


async def _post_all(urls: list[str], prompts: list[str]) -> list[tuple[int, Any]]:
    async with aiohttp.ClientSession() as http:
        async def one(i: int, prompt: str) -> tuple[int, Any]:
            async with http.post(urls[i % len(urls)] + TEXT_PATH, json={"prompt": prompt},
                                 headers=team_auth("design")) as response:
                return response.status, await response.json()
        return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))


@pytest.fixture
async def processes(simulator: Simulator):
    started: list[GatewayProcess] = []

    def start(db: str, policies: Path) -> GatewayProcess:
        process = GatewayProcess(db, simulator.url, policies).start()  # type: ignore[attr-defined]
        started.append(process)
        return process

    yield start
    await asyncio.to_thread(stop_all, started)


async def test_two_processes_on_one_store_never_exceed_the_account_and_send_each_job_once(
        db_location: str, processes, simulator: Simulator, tmp_path) -> None:
    await create_teams(db_location, {"design": BUDGET})
    policies = queue_policies(tmp_path, account="max_in_flight = 3")
    simulator.settings.max_in_flight = 3
    simulator.settings.queued_seconds, simulator.settings.processing_seconds = 0.02, 0.1
    gateways = [await asyncio.to_thread(processes, db_location, policies) for _ in range(2)]

    answers = await _post_all([g.url for g in gateways], [f"shared {n}" for n in range(30)])

    assert [code for code, _ in answers] == [202] * 30
    db = Peek(db_location)

    def ended() -> bool:
        return db.rows("SELECT COUNT(*) FROM jobs WHERE status IN ('COMPLETED', 'FAILED', 'ERROR')") == [(30,)]

    await until(ended, timeout=60)
    assert (simulator.most_in_flight <= 3, simulator.over_capacity, len(simulator.jobs)) == (True, 0, 30)
    assert db.rows("SELECT in_flight, queued FROM upstream_gate") == [(0, 0)]
    assert await ledger_mismatches(db_location) == []


async def test_jobs_queued_when_a_gateway_is_killed_are_sent_once_after_it_restarts(
        db_location: str, processes, simulator: Simulator, tmp_path) -> None:
    await create_teams(db_location, {"design": BUDGET})
    policies = queue_policies(tmp_path, account="max_in_flight = 1")
    simulator.settings.processing_seconds = 60  # the first job holds the only slot until the test ends it
    gateway = await asyncio.to_thread(processes, db_location, policies)
    answers = await _post_all([gateway.url], [f"survives {n}" for n in range(5)])
    assert [body["status"] for _, body in answers] == ["QUEUED"] * 5
    db = Peek(db_location)
    assert db.rows("SELECT COUNT(*) FROM queued_jobs") == [(4,)]

    await asyncio.to_thread(gateway.kill)
    simulator.settings.queued_seconds, simulator.settings.processing_seconds = 0.02, 0.05
    for job_id in list(simulator.jobs):
        simulator.finish(job_id, "COMPLETED")
    restarted = await asyncio.to_thread(processes, db_location, policies)

    for _, body in answers:
        assert (await _until_ended(restarted.url, body["request_id"]))["status"] == "COMPLETED"
    assert len(simulator.jobs) == 5 and len(simulator.calls_of("submit")) == 5  # each sent once, none twice
    assert db.rows("SELECT spent_micros, reserved_micros FROM budget_totals WHERE scope = 'team:design'") == [
        (5 * PRICE, 0)]
    assert await ledger_mismatches(db_location) == []


@pytest.mark.parametrize(("line", "problem"), [
    ("account: max_in_flight = 0", "account.max_in_flight: must be at least 1"),
    ("account: submits_per_second = -1", "account.submits_per_second: must be greater than 0"),
    ("queue: max_wait_seconds = \"long\"", "queue.max_wait_seconds: must be a number"),
    ("queue: max_queud = 5", "queue.max_queud: unknown key"),
])
def test_a_bad_upstream_policy_stops_start_up_naming_the_key(tmp_path, line: str, problem: str) -> None:
    from proxy.domain.policyfile import PolicyError
    from proxy.domain.queueing import load_queue_rules

    with pytest.raises(PolicyError) as refused:
        load_queue_rules(policies_with(tmp_path, upstream=line))
    assert str(refused.value).endswith(problem)


def test_the_shipped_upstream_policy_counts_no_account_limit_until_one_is_set(tmp_path) -> None:
    from proxy.domain.queueing import load_queue_rules

    shipped = load_queue_rules(policies_with(tmp_path))
    assert (shipped.limits_upstream, shipped.max_queued, shipped.max_queued_per_team, shipped.max_wait_seconds) == (
        False, 10_000, 1_000, 3600.0)
    limited = load_queue_rules(policies_with(tmp_path, upstream="account: max_in_flight = 8\naccount: submits_per_second = 4"))
    assert (limited.max_in_flight, limited.interval, limited.limits_upstream) == (8, 0.25, True)


async def test_a_queued_job_the_upstream_refuses_ends_released_and_a_5xx_is_tried_again(start_gateway,
                                                                                       simulator: Simulator,
                                                                                       tmp_path) -> None:
    gateway = await start_gateway(teams={"design": {"budget_limit_micros": BUDGET, "max_concurrent_jobs": 1}},
                                  policies_dir=queue_policies(tmp_path, account="throttle_seconds = 0.2"))
    simulator.settings.processing_seconds = 0.3
    await submit(gateway, "runs first")
    refused = (await submit(gateway, "refused when sent"))[1]["request_id"]
    retried = (await submit(gateway, "meets a 503 once"))[1]["request_id"]
    simulator.add_fault(Fault(op="submit", status=400))  # the next send: the upstream refuses the request itself
    await until(lambda: len(simulator.calls_of("submit")) == 2, timeout=10)
    simulator.add_fault(Fault(op="submit", status=503))  # the one after: unavailable, not accepted

    ended = await wait_for_status(gateway, refused, TERMINAL, timeout=10)
    done = await wait_for_status(gateway, retried, TERMINAL, timeout=15)

    assert ended["status"] == "ERROR" and "refused this queued request" in ended["error"]
    assert "not charged" in ended["error"]
    assert done["status"] == "COMPLETED"
    assert len(simulator.calls_of("submit")) == 4 and len(simulator.jobs) == 2  # 400, 503, then sent again
    await until(lambda: books_closed(gateway))
    assert spent(gateway, "design") == (2 * PRICE, 0)
    assert gateway.sql("SELECT kind, spent_delta FROM ledger WHERE handle = ? ORDER BY id", refused) == [
        ("reserve", 0), ("release", 0)]


async def test_a_waiting_job_whose_model_left_the_catalog_ends_released_not_sent(
        db_location: str, processes, simulator: Simulator, tmp_path) -> None:
    await create_teams(db_location, {"design": BUDGET})
    policies = queue_policies(tmp_path, account="max_in_flight = 1")
    simulator.settings.processing_seconds = 60
    gateway = await asyncio.to_thread(processes, db_location, policies)
    async with aiohttp.ClientSession() as http:
        async with http.post(gateway.url + TEXT_PATH, json={"prompt": "holds the slot"}, headers=team_auth("design")):
            pass
        async with http.post(gateway.url + REFERENCE_PATH, json={"prompt": "waits", "reference_image_urls": [
                "https://example.com/a.png"]}, headers=team_auth("design")) as response:
            waiting = await response.json()
            assert (response.status, waiting["status"]) == (202, "QUEUED"), waiting
    await asyncio.to_thread(gateway.kill)
    trimmed = tmp_path / "trimmed"
    shutil.copytree(policies, trimmed)
    models = (trimmed / "models.toml").read_text()
    (trimmed / "models.toml").write_text(models[:models.index("[models.grok-imagine-video-reference-to-video]")])
    for job_id in list(simulator.jobs):
        simulator.finish(job_id, "COMPLETED")
    restarted = await asyncio.to_thread(processes, db_location, trimmed)

    ended = await _until_ended(restarted.url, waiting["request_id"])

    assert ended["status"] == "ERROR" and "never sent" in ended["error"] and "not charged" in ended["error"]
    assert len(simulator.calls_of("submit")) == 1
    db = Peek(db_location)
    await until(lambda: db.rows("SELECT COUNT(*) FROM reservations WHERE state = 'open'") == [(0,)], timeout=10)
    assert await ledger_mismatches(db_location) == []


async def test_while_an_upstream_429_pauses_submits_a_new_submit_waits_instead_of_pressing_on(
        start_gateway, simulator: Simulator, tmp_path) -> None:
    gateway = await start_gateway(policies_dir=queue_policies(tmp_path))  # no account limits configured
    simulator.add_fault(Fault(op="submit", status=429, retry_after="2"))
    throttled = await submit(gateway, "meets the 429")

    later = await submit(gateway, "arrives during the pause")

    assert [(code, body["status"]) for code, body, _ in (throttled, later)] == [(202, "QUEUED")] * 2
    assert later[2]["X-Proxy-Queue-Position"] == "2"  # behind the throttled one, its team's head
    assert len(simulator.calls_of("submit")) == 1  # the pause held it back: the upstream was not asked again
    for _, body, _ in (throttled, later):
        assert (await wait_for_status(gateway, body["request_id"], TERMINAL, timeout=15))["status"] == "COMPLETED"
    assert len(simulator.calls_of("submit")) == 3 and len(simulator.jobs) == 2
    await until(lambda: books_closed(gateway))
    assert spent(gateway, "design") == (2 * PRICE, 0)
