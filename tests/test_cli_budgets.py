"""The budget CLI: teams update/show, spend report in three formats, ledger."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.domain.budget import BudgetRules, period_key
from proxy.domain.clock import Clock
from proxy.domain.values import Estimate, Hold
from proxy.store import Decision, JobUpdate, Submission
from proxy.store.sqlite import SQLiteStore
from tests.conftest import JWT_SECRET, POLICIES, ROOT


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    values = {key: value for key, value in os.environ.items() if not key.startswith(("PROXY_", "PIXAZO_"))}
    values.update({"PROXY_JWT_SECRET": JWT_SECRET, "PROXY_DB": str(tmp_path / "cli.db"), "PROXY_POLICIES": str(POLICIES)})
    return values


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy.cli", *args], capture_output=True, text=True, env=env, cwd=ROOT)


def spend_some(db: str) -> str:
    """Reserve and settle one 0.42 job for team ops, as the gateway would; the period key."""
    async def work() -> str:
        store = SQLiteStore(db)
        await store.open()
        key = period_key("month", Clock().now())
        receipt = await store.begin_submission(Submission("h1", "ops", "alice", "grok-imagine-video-text-to-video", "{}"),
                                               Hold(Estimate(420_000, 6, "720p", "params", True), key, key, None))
        await store.mark_submitted(receipt.job_id, "up-1", "QUEUED")
        await store.update_job(receipt.job_id, JobUpdate("COMPLETED", None, None, "t", "t", 0.0),
                               Decision("settle", 420_000, 6, "720p", "params", "COMPLETED"))
        await store.close()
        return key

    return asyncio.run(work())


def test_update_show_report_and_ledger(env: dict[str, str]) -> None:
    assert cli(env, "teams", "create", "ops", "--budget", "10", "--user-cap", "2").returncode == 0
    updated = cli(env, "teams", "update", "ops", "--budget", "12.5", "--max-concurrent", "3", "--user-cap", "none")
    assert (updated.returncode, updated.stdout) == (0, "updated team ops: budget 12.50 USD per month\n")
    key = spend_some(env["PROXY_DB"])

    shown = json.loads(cli(env, "teams", "show", "ops", "--json").stdout)
    assert shown == {"name": "ops", "budget_usd": "12.50", "period": "month", "soft_threshold_percent": 80,
                     "user_cap_usd": None, "max_concurrent_jobs": 3, "max_submits_per_minute": None,
                     "weight": 1, "on_limit": "queue", "current_period": key, "spent_usd": "0.42", "reserved_usd": "0.00", "credit_usd": "0.00",
                     "remaining_usd": "12.08"}
    as_csv = list(csv.DictReader(io.StringIO(cli(env, "spend", "report", "--format", "csv").stdout)))
    assert as_csv == [{"team": "ops", "period": key, "limit_usd": "12.50", "credit_usd": "0.00", "spent_usd": "0.42",
                       "reserved_usd": "0.00", "remaining_usd": "12.08", "charged_jobs": "1", "saved_usd": "0.00"}]
    as_json = json.loads(cli(env, "spend", "report", "--team", "ops", "--period", key, "--format", "json").stdout)
    assert as_json[0]["spent_usd"] == "0.42"
    table = cli(env, "spend", "report").stdout.splitlines()
    assert table[0].split()[:3] == ["TEAM", "PERIOD", "LIMIT_USD"] and table[1].split()[:5] == ["ops", key, "12.50", "0.00", "0.42"]
    ledger = json.loads(cli(env, "ledger", "--team", "ops", "--format", "json").stdout)
    assert [(e["kind"], e["reserved_delta_usd"], e["spent_delta_usd"]) for e in ledger] == [
        ("settle", "-0.42", "0.42"), ("reserve", "0.42", "0.00")]


def test_cli_mistakes_are_one_clear_line(env: dict[str, str]) -> None:
    cli(env, "teams", "create", "ops", "--budget", "1")
    cases = [
        (("teams", "update", "ghost", "--budget", "1"), "team 'ghost' does not exist"),
        (("teams", "update", "ops"), "nothing to change: give --budget, --period or a limit flag"),
        (("teams", "update", "ops", "--budget", "none"), "--budget cannot be cleared; give an amount"),
        (("teams", "update", "ops", "--soft-threshold", "101"), "--soft-threshold must be a whole number between 1 and 100"),
        (("teams", "update", "ops", "--max-concurrent", "0"), "--max-concurrent must be a whole number of at least 1"),
        (("teams", "update", "ops", "--max-concurrent", "x"), "--max-concurrent: must be a whole number"),
        (("teams", "show", "ghost"), "team 'ghost' does not exist"),
        (("spend", "report", "--team", "ghost"), "team 'ghost' does not exist"),
        (("teams", "list", "--db", "postgresql://postgres:hunter2@127.0.0.1:1/proxy"),
         "postgresql://postgres:***@127.0.0.1:1/proxy: the database cannot be reached: ConnectionRefusedError"),
        (("teams", "list", "--db", "mysql://root@127.0.0.1/proxy"),
         "mysql://root@127.0.0.1/proxy: must be a SQLite database path or a postgresql:// URL"),
    ]
    for args, message in cases:
        result = cli(env, *args)
        assert (result.returncode, result.stderr) == (2, f"pixazo-proxy: error: {message}\n"), args


def test_budget_rules_defaults_match_the_shipped_file() -> None:
    from proxy.domain.budget import load_budget_rules

    assert load_budget_rules(POLICIES) == BudgetRules()


@pytest.mark.parametrize("name", ["=1+1", "@SUM(A1)", "a b/c", "a/b", "design\n", "x!", "+x", "", "x" * 101])
def test_teams_create_takes_only_the_names_the_admin_api_takes(env: dict[str, str], name: str) -> None:
    result = cli(env, "teams", "create", name, "--budget", "1")

    assert result.returncode == 2
    assert result.stderr == ("pixazo-proxy: error: a team name must be 1-100 letters, digits, '.', '_' or '-', "
                             "starting with a letter or digit\n")
    assert cli(env, "teams", "list", "--json").stdout.strip() == "[]"


def test_the_store_refuses_such_names_too(tmp_path: Path) -> None:
    """So no path (CLI, admin, a script) can make team 'a/b', whose user 'x' would share user:a/b/x with team a's 'b/x'."""
    async def work() -> None:
        store = SQLiteStore(tmp_path / "names.db")
        await store.open()
        try:
            with pytest.raises(ValueError, match="a team name must be"):
                await store.create_team("a/b", 1, "month")
        finally:
            await store.close()

    asyncio.run(work())


def test_csv_cells_that_would_be_formulas_are_neutralised(env: dict[str, str]) -> None:
    cli(env, "teams", "create", "ops", "--budget", "1")
    key = spend_some(env["PROXY_DB"])

    async def note() -> None:
        store = SQLiteStore(env["PROXY_DB"])
        await store.open()
        await store.add_entry("ops", "adjust", -20_000, key, key, "=HYPERLINK(\"http://x\")", "@SUM(A1:A9)")
        await store.add_entry("ops", "topup", 10_000, key, key, "root", "+cmd|' /C calc'!A0")
        await store.close()

    asyncio.run(note())
    rows = list(csv.DictReader(io.StringIO(cli(env, "ledger", "--team", "ops", "--format", "csv").stdout)))

    assert [(r["kind"], r["actor"], r["note"], r["spent_delta_usd"]) for r in rows[:2]] == [
        ("topup", "root", "'+cmd|' /C calc'!A0", "0.00"),
        ("adjust", "'=HYPERLINK(\"http://x\")", "'@SUM(A1:A9)", "-0.02"),  # a plain negative number stays a number
    ]
    assert json.loads(cli(env, "ledger", "--team", "ops", "--format", "json").stdout)[1]["note"] == "@SUM(A1:A9)"
