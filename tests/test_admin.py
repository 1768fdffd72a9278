"""The admin API: admins only; teams, budgets, spend, ledger, handles, top-ups and adjustments."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest

from proxy.http.admin import ADMIN_ROUTES
from proxy.simulator.server import Simulator
from proxy.store import SettingProblem
from tests.conftest import POLICIES, ROOT, Gateway, auth, make_token, until, wait_for_status

# made once, at import: valid for the whole run (the suite takes longer than a default token's 10 minutes)
ADMIN = {"Authorization": f"Bearer {make_token(team='research', user='root', role='admin', ttl=86400)}"}


async def call(gateway: Gateway, method: str, path: str, body: Any = None,
               headers: dict[str, str] | None = None) -> tuple[int, Any]:
    kwargs: dict[str, Any] = {"headers": ADMIN if headers is None else headers}
    if body is not None:
        kwargs["json"] = body
    async with gateway.http.request(method, gateway.url + path, **kwargs) as response:
        return response.status, await response.json()


@pytest.mark.parametrize(("method", "path"), [(m, p.replace("{team}", "design")) for m, p, _ in ADMIN_ROUTES])
async def test_every_admin_route_refuses_non_admins(gateway: Gateway, method: str, path: str) -> None:
    body = {"name": "x", "budget_usd": "1", "amount_usd": "1", "reason": "r"} if method in ("POST", "PATCH") else None

    member = await call(gateway, method, path, body, headers=auth())
    anonymous = await call(gateway, method, path, body, headers={})

    assert member == (403, {"error": "Forbidden", "message": "This route needs an admin token"})
    assert anonymous[0] == 401
    assert await gateway.services.store.get_team("x") is None


async def test_create_show_list_and_update_teams(gateway: Gateway) -> None:
    code, created = await call(gateway, "POST", "/admin/teams", {
        "name": "video-lab", "budget_usd": "120.50", "period": "week", "user_cap_usd": 20,
        "max_concurrent_jobs": 4})
    assert code == 201
    assert {k: created[k] for k in ("name", "budget_usd", "period", "soft_threshold_percent", "user_cap_usd",
                                     "max_concurrent_jobs", "max_submits_per_minute")} == {
        "name": "video-lab", "budget_usd": "120.50", "period": "week", "soft_threshold_percent": 80,
        "user_cap_usd": "20.00", "max_concurrent_jobs": 4, "max_submits_per_minute": None}
    assert created["current"]["remaining_usd"] == "120.50"
    assert created["current"]["period"].count("-W") == 1

    assert (await call(gateway, "POST", "/admin/teams", {"name": "video-lab", "budget_usd": "1"}))[0] == 409
    assert (await call(gateway, "GET", "/admin/teams/video-lab"))[1] == created
    assert [t["name"] for t in (await call(gateway, "GET", "/admin/teams"))[1]] == ["design", "research", "video-lab"]

    code, updated = await call(gateway, "PATCH", "/admin/teams/video-lab",
                               {"budget_usd": 99.99, "user_cap_usd": None, "max_submits_per_minute": 10})
    assert code == 200
    assert (updated["budget_usd"], updated["user_cap_usd"], updated["max_submits_per_minute"]) == ("99.99", None, 10)
    assert (await call(gateway, "PATCH", "/admin/teams/ghost", {"budget_usd": "1"}))[0] == 404


@pytest.mark.parametrize(("body", "message"), [
    ({"budget_usd": "1"}, "'name' must be 1-100 letters, digits, '.', '_' or '-', starting with a letter or digit"),
    ({"name": "n"}, "'budget_usd' is required"),
    ({"name": "n", "budget_usd": "-1"}, "'budget_usd': '-1' must be a finite amount of at least 0"),
    ({"name": "n", "budget_usd": "0.0000001"}, "'budget_usd': '0.0000001' is more precise than a micro-dollar"),
    ({"name": "n", "budget_usd": True}, "'budget_usd' must be an amount in USD, e.g. \"12.50\""),
    ({"name": "n", "budget_usd": "1", "period": "year"}, "'period' must be one of month, week, day, total"),
    ({"name": "n", "budget_usd": "1", "colour": "red"}, "unknown field(s): 'colour'"),
    ({"name": "n", "budget_usd": "1", "soft_threshold_percent": 120}, "'soft_threshold_percent' must be a whole number between 1 and 100"),
    ({"name": "n", "budget_usd": "1", "max_concurrent_jobs": 0}, "'max_concurrent_jobs' must be a whole number of at least 1"),
])
async def test_bad_team_bodies(gateway: Gateway, body: dict, message: str) -> None:
    assert await call(gateway, "POST", "/admin/teams", body) == (400, {"error": "Bad Request", "message": message})


async def test_top_ups_and_adjustments_are_ledger_entries_with_who_and_why(gateway: Gateway) -> None:
    await gateway.services.store.update_team("design", budget_limit_micros=420_000)
    assert (await gateway.submit())[0] == 202
    assert (await gateway.submit())[0] == 402

    code, topup = await call(gateway, "POST", "/admin/teams/design/topups",
                             {"amount_usd": "0.42", "reason": "launch week"})
    assert code == 201
    assert (topup["kind"], topup["credit_delta_usd"], topup["actor"], topup["note"]) == ("topup", "0.42", "root", "launch week")
    assert (await gateway.submit())[0] == 202
    await until(lambda: [kind for (kind,) in gateway.ledger_rows("kind")].count("settle") == 2)  # a refund needs spend

    code, adjusted = await call(gateway, "POST", "/admin/teams/design/adjustments",
                                {"amount_usd": "-0.10", "reason": "refund for a broken render"})
    assert (code, adjusted["spent_delta_usd"], adjusted["actor"]) == (201, "-0.10", "root")
    bad = await call(gateway, "POST", "/admin/teams/design/topups", {"amount_usd": "0", "reason": "x"})
    no_reason = await call(gateway, "POST", "/admin/teams/design/adjustments", {"amount_usd": "1"})
    assert bad == (400, {"error": "Bad Request", "message": "'amount_usd' of a top-up must be more than 0"})
    assert no_reason[1]["message"] == "'reason' is required: say why, in at most 500 characters"

    shown = (await call(gateway, "GET", "/admin/teams/design"))[1]["current"]
    assert (shown["limit_usd"], shown["credit_usd"], shown["spent_usd"], shown["reserved_usd"], shown["remaining_usd"]) == (
        "0.42", "0.42", "0.74", "0.00", "0.10")
    assert await gateway.services.store.ledger_mismatches() == []


async def test_spend_ledger_and_requests(gateway: Gateway, simulator: Simulator) -> None:
    simulator.queue_outcomes("COMPLETED", "ERROR")
    _, first, _ = await gateway.submit()
    _, second, _ = await gateway.submit(headers=auth(user="bob"))
    await wait_for_status(gateway, first["request_id"], {"COMPLETED"})
    await wait_for_status(gateway, second["request_id"], {"ERROR"})

    code, spend = await call(gateway, "GET", "/admin/teams/design/spend")
    assert code == 200
    assert {k: spend[k] for k in ("team", "limit_usd", "spent_usd", "reserved_usd", "remaining_usd", "charged_jobs")} == {
        "team": "design", "limit_usd": "50.00", "spent_usd": "0.42", "reserved_usd": "0.00",
        "remaining_usd": "49.58", "charged_jobs": 1}
    everyone = (await call(gateway, "GET", "/admin/spend"))[1]
    assert [(row["team"], row["spent_usd"]) for row in everyone] == [("design", "0.42"), ("research", "0.00")]

    ledger = (await call(gateway, "GET", "/admin/teams/design/ledger?limit=10"))[1]
    assert sorted((e["kind"], e["user"], e["reserved_delta_usd"], e["spent_delta_usd"]) for e in ledger) == [
        ("release", "bob", "-0.42", "0.00"), ("reserve", "alice", "0.42", "0.00"),
        ("reserve", "bob", "0.42", "0.00"), ("settle", "alice", "-0.42", "0.42")]
    assert [e["id"] for e in ledger] == sorted((e["id"] for e in ledger), reverse=True)
    older = (await call(gateway, "GET", f"/admin/teams/design/ledger?before={ledger[1]['id']}"))[1]
    assert [e["id"] for e in older] == [e["id"] for e in ledger[2:]]

    requests_ = (await call(gateway, "GET", "/admin/teams/design/requests"))[1]
    assert {(r["request_id"], r["status"], r["user"]) for r in requests_} == {
        (first["request_id"], "COMPLETED", "alice"), (second["request_id"], "ERROR", "bob")}
    assert (await call(gateway, "GET", "/admin/teams/design/ledger?period=lastyear"))[0] == 400
    assert (await call(gateway, "GET", "/admin/teams/design/requests?limit=0"))[0] == 400
    assert (await call(gateway, "GET", "/admin/teams/ghost/spend"))[0] == 404


@pytest.mark.parametrize("name", ["design\n", "new\n", "a/b", "=1+1"])
async def test_team_names_are_matched_whole(gateway: Gateway, name: str) -> None:
    code, body = await call(gateway, "POST", "/admin/teams", {"name": name, "budget_usd": "1"})

    assert code == 400 and body["message"].startswith("'name' must be 1-100 letters")
    assert [team.name for team in await gateway.services.store.list_teams()] == ["design", "research"]


async def test_period_keys_are_matched_whole(gateway: Gateway) -> None:
    for path in ("/admin/teams/design/spend?period=2026-11%0A", "/admin/teams/design/ledger?period=2026-11%0A"):
        code, body = await call(gateway, "GET", path)
        assert code == 400 and "'period'" in body["message"], (path, body)


@pytest.mark.parametrize(("setting", "value", "flag"), [
    ("soft_threshold_percent", 0, "--soft-threshold"), ("soft_threshold_percent", 101, "--soft-threshold"),
    ("max_concurrent_jobs", 0, "--max-concurrent"), ("max_submits_per_minute", 0, "--max-per-minute"),
])
async def test_admin_cli_and_store_refuse_the_same_settings_with_the_same_rule(gateway: Gateway, tmp_path, setting: str,
                                                                               value: int, flag: str) -> None:
    with pytest.raises(SettingProblem) as stored:
        await gateway.services.store.update_team("design", **{setting: value})
    code, body = await call(gateway, "PATCH", "/admin/teams/design", {setting: value})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PROXY_", "PIXAZO_"))} | {
        "PROXY_DB": gateway.db_path, "PROXY_POLICIES": str(POLICIES)}
    cli = subprocess.run([sys.executable, "-m", "proxy.cli", "teams", "update", "design", flag, str(value)],
                         capture_output=True, text=True, env=env, cwd=ROOT)

    rule = stored.value.rule
    assert (code, body["message"]) == (400, f"'{setting}' {rule}")
    assert (cli.returncode, cli.stderr) == (2, f"pixazo-proxy: error: {flag} {rule}\n")
