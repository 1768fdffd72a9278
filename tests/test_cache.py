"""Never pay twice: cache hits, coalescing, scopes, bypasses, and results that are never reused."""

from __future__ import annotations

import asyncio

import pytest

from proxy.simulator.server import Fault, Simulator
from tests.conftest import TEXT_PATH, Gateway, auth, policies_with, wait_for_status

BODY = {"prompt": "a red kite over the sea"}


async def submit(gateway: Gateway, body: dict = BODY, **header_kw: str) -> tuple[int, dict, dict]:
    headers = auth(**{k: v for k, v in header_kw.items() if k in ("team", "user")})
    headers.update({k.replace("_", "-"): v for k, v in header_kw.items() if k not in ("team", "user")})
    code, answer, response_headers = await gateway.submit(TEXT_PATH, body, headers=headers)
    return code, answer, dict(response_headers)


async def test_a_completed_job_answers_an_identical_request_at_once_for_free(gateway: Gateway, simulator: Simulator) -> None:
    _, first, first_headers = await submit(gateway)
    done = await wait_for_status(gateway, first["request_id"], {"COMPLETED"})

    code, second, headers = await submit(gateway)

    assert first_headers["X-Proxy-Cache"] == "MISS"
    assert (code, second["status"], headers["X-Proxy-Cache"], headers["X-Proxy-Saved-USD"]) == (202, "COMPLETED", "HIT", "0.42")
    assert second["request_id"] != first["request_id"]
    hit = (await gateway.status(second["request_id"]))[1]
    assert (hit["status"], hit["output"], hit["request_id"]) == ("COMPLETED", done["output"], second["request_id"])
    assert len(simulator.calls_of("submit")) == 1
    assert gateway.ledger_rows("kind", "reserved_delta", "spent_delta", "saved_micros") == [
        ("reserve", 420_000, 0, 0), ("settle", -420_000, 420_000, 0), ("saving", 0, 0, 420_000)]


async def test_a_hit_is_served_even_when_the_budget_is_spent(start_gateway, simulator: Simulator) -> None:
    gateway = await start_gateway(teams={"design": 420_000})
    _, first, _ = await submit(gateway)
    await wait_for_status(gateway, first["request_id"], {"COMPLETED"})

    assert (await submit(gateway, {"prompt": "something new"}))[0] == 402
    assert (await submit(gateway))[:2][0] == 202
    assert len(simulator.calls_of("submit")) == 1


async def test_identical_concurrent_submits_make_exactly_one_upstream_job(gateway: Gateway, simulator: Simulator) -> None:
    count = 30
    barrier = asyncio.Barrier(count)
    headers = auth()

    async def one() -> tuple[int, dict, dict]:
        await barrier.wait()
        code, body, response_headers = await gateway.submit(TEXT_PATH, BODY, headers=headers)
        return code, body, dict(response_headers)

    results = await asyncio.gather(*(one() for _ in range(count)))

    assert {code for code, _, _ in results} == {202}
    assert sorted(h["X-Proxy-Cache"] for _, _, h in results) == ["COALESCED"] * (count - 1) + ["MISS"]
    assert len({body["request_id"] for _, body, _ in results}) == count
    assert len(simulator.calls_of("submit")) == 1
    finals = [await wait_for_status(gateway, body["request_id"], {"COMPLETED"}) for _, body, _ in results]
    assert len({str(final["output"]) for final in finals}) == 1
    assert [row[1:] for row in gateway.totals()] == [(420_000, 0, 0)]
    kinds = [row[0] for row in gateway.ledger_rows("kind")]
    assert (kinds.count("reserve"), kinds.count("settle"), kinds.count("saving")) == (1, 1, count - 1)


async def test_when_the_first_of_twins_is_refused_upstream_so_are_the_twins(gateway: Gateway, simulator: Simulator) -> None:
    simulator.add_fault(Fault(op="submit", status=503, delay=0.2))
    headers = auth()

    results = await asyncio.gather(*(gateway.submit(TEXT_PATH, BODY, headers=headers) for _ in range(5)))

    assert [code for code, _, _ in results] == [503] * 5
    assert len(simulator.calls_of("submit")) == 1
    assert (await submit(gateway))[0] == 202  # nothing was cached from the refusal


async def test_teams_do_not_share_results_in_team_scope(gateway: Gateway, simulator: Simulator) -> None:
    _, design, _ = await submit(gateway, team="design")
    await wait_for_status(gateway, design["request_id"], {"COMPLETED"})

    code, research, headers = await submit(gateway, team="research")

    assert (code, headers["X-Proxy-Cache"]) == (202, "MISS")
    assert len(simulator.calls_of("submit")) == 2
    assert (await gateway.status(design["request_id"], auth(team="research")))[0] == 404


async def test_global_scope_shares_across_teams_and_charges_only_the_first(start_gateway, simulator: Simulator,
                                                                         tmp_path) -> None:
    gateway = await start_gateway(policies_dir=policies_with(tmp_path, cache='dedup: scope = "global"'))
    _, design, _ = await submit(gateway, team="design")
    await wait_for_status(gateway, design["request_id"], {"COMPLETED"})

    code, research, headers = await submit(gateway, team="research")

    assert (code, headers["X-Proxy-Cache"]) == (202, "HIT")
    assert len(simulator.calls_of("submit")) == 1
    assert gateway.totals("team:research") == []  # never reserved a cent
    assert gateway.ledger_rows("kind", "team", "saved_micros")[-1] == ("saving", "research", 420_000)


@pytest.mark.parametrize("outcome", ["FAILED", "ERROR"])
async def test_failed_and_error_results_are_never_reused(gateway: Gateway, simulator: Simulator, outcome: str) -> None:
    simulator.queue_outcomes(outcome)
    _, first, _ = await submit(gateway)
    await wait_for_status(gateway, first["request_id"], {outcome})

    code, second, headers = await submit(gateway)

    assert (code, second["status"], headers["X-Proxy-Cache"]) == (202, "QUEUED", "MISS")
    assert len(simulator.calls_of("submit")) == 2


@pytest.mark.parametrize(("header", "value", "expected"), [
    ("Cache-Control", "no-cache", "HIT"),
    ("Cache-Control", "no-store", "BYPASS"),
    ("Cache-Control", "max-age=0, No-Store", "BYPASS"),
    ("X-Proxy-Cache", "bypass", "BYPASS"),
])
async def test_bypass_headers(gateway: Gateway, simulator: Simulator, header: str, value: str, expected: str) -> None:
    _, first, _ = await submit(gateway)
    await wait_for_status(gateway, first["request_id"], {"COMPLETED"})
    headers = auth() | {header: value}

    code, _, response_headers = await gateway.submit(TEXT_PATH, BODY, headers=headers)

    assert (code, response_headers["X-Proxy-Cache"]) == (202, expected)
    assert len(simulator.calls_of("submit")) == (1 if expected == "HIT" else 2)


async def test_no_cache_bypasses_when_the_policy_says_so(start_gateway, simulator: Simulator, tmp_path) -> None:
    gateway = await start_gateway(policies_dir=policies_with(tmp_path, cache="dedup: honor_no_cache = true"))
    _, first, _ = await submit(gateway)
    await wait_for_status(gateway, first["request_id"], {"COMPLETED"})

    assert (await submit(gateway))[2]["X-Proxy-Cache"] == "BYPASS"  # auth() sends Cache-Control: no-cache


async def test_equivalent_bodies_share_a_job_and_different_ones_do_not(gateway: Gateway, simulator: Simulator) -> None:
    _, first, _ = await submit(gateway, {"prompt": "kite", "duration": 6})
    await wait_for_status(gateway, first["request_id"], {"COMPLETED"})

    spelled_out = await submit(gateway, {"resolution": "720p", "aspect_ratio": "16:9", "duration": 6, "prompt": "kite"})
    defaults = await submit(gateway, {"prompt": "kite"})
    longer = await submit(gateway, {"prompt": "kite", "duration": 7})
    other_ratio = await submit(gateway, {"prompt": "kite", "aspect_ratio": "9:16"})

    assert [r[2]["X-Proxy-Cache"] for r in (spelled_out, defaults, longer, other_ratio)] == ["HIT", "HIT", "MISS", "MISS"]
    assert len(simulator.calls_of("submit")) == 3


async def test_results_older_than_the_ttl_are_not_reused(start_gateway, simulator: Simulator, tmp_path) -> None:
    gateway = await start_gateway(policies_dir=policies_with(tmp_path, cache="dedup: ttl_seconds = 0.3"))
    _, first, _ = await submit(gateway)
    await wait_for_status(gateway, first["request_id"], {"COMPLETED"})
    await asyncio.sleep(0.4)

    assert (await submit(gateway))[2]["X-Proxy-Cache"] == "MISS"
    assert len(simulator.calls_of("submit")) == 2


async def test_a_dry_run_creates_no_handle(gateway: Gateway, simulator: Simulator) -> None:
    _, first, _ = await submit(gateway)
    await wait_for_status(gateway, first["request_id"], {"COMPLETED"})

    code, body, headers = await submit(gateway, X_Proxy_Dry_Run="1")

    assert code == 200 and body["dry_run"] is True and "X-Proxy-Cache" not in headers
    assert [row[0] for row in gateway.ledger_rows("kind")] == ["reserve", "settle"]


@pytest.mark.parametrize("dry_run", [False, True])
async def test_a_bad_cache_header_is_refused_even_on_a_dry_run(gateway: Gateway, simulator: Simulator,
                                                                 dry_run: bool) -> None:
    headers = auth() | {"X-Proxy-Cache": "~n;oSiw."} | ({"X-Proxy-Dry-Run": "true"} if dry_run else {})

    code, body, _ = await gateway.submit(body={"prompt": "p"}, headers=headers)

    assert (code, body) == (400, {"error": "Bad Request", "message": "X-Proxy-Cache on a request may only be 'bypass'"})
    assert simulator.calls_of("submit") == []
