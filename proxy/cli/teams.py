"""``pixazo-proxy teams``: create, update, show and list teams."""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from ..domain.clock import Clock
from ..domain.money import micros_to_usd, usd_to_micros
from ..store import Store, TeamExists, UnknownTeam, team_name_problem
from .common import CommandError, _limit_settings, _rules, _store_path, _with_store


def _teams_create(args: argparse.Namespace) -> int:
    try:
        limit = usd_to_micros(args.budget)
    except ValueError as exc:
        raise CommandError(f"--budget: {exc}") from None
    if (problem := team_name_problem(args.name)) is not None:
        raise CommandError(problem)
    settings = _limit_settings(args)
    if "soft_threshold_percent" not in settings:
        settings["soft_threshold_percent"] = _rules(args.policies).soft_threshold_percent
    try:
        team = asyncio.run(_with_store(
            _store_path(args), lambda s: s.create_team(args.name, limit, args.period, **settings)))
    except TeamExists:
        if args.exist_ok:
            print(f"team {args.name} already exists; left as it is")
            return 0
        raise CommandError(f"team '{args.name}' already exists") from None
    print(f"created team {team.name}: budget {micros_to_usd(team.budget_limit_micros)} USD per {team.period}")
    return 0


def _teams_update(args: argparse.Namespace) -> int:
    settings = _limit_settings(args)
    if not settings:
        raise CommandError("nothing to change: give --budget, --period or a limit flag")
    try:
        team = asyncio.run(_with_store(_store_path(args), lambda s: s.update_team(args.name, **settings)))
    except UnknownTeam:
        raise CommandError(f"team '{args.name}' does not exist") from None
    print(f"updated team {team.name}: budget {micros_to_usd(team.budget_limit_micros)} USD per {team.period}")
    return 0


def _teams_show(args: argparse.Namespace) -> int:
    from ..domain.budget import period_key

    async def work(store: Store) -> tuple[Any, Any]:
        team = await store.get_team(args.name)
        if team is None:
            raise CommandError(f"team '{args.name}' does not exist")
        return team, await store.budget_view(team.name, period_key(team.period, Clock().now()))

    team, view = asyncio.run(_with_store(_store_path(args), work))
    shown = {
        "name": team.name, "budget_usd": micros_to_usd(team.budget_limit_micros), "period": team.period,
        "soft_threshold_percent": team.soft_threshold_percent,
        "user_cap_usd": micros_to_usd(team.user_cap_micros) if team.user_cap_micros is not None else None,
        "max_concurrent_jobs": team.max_concurrent_jobs, "max_submits_per_minute": team.max_submits_per_minute,
        "weight": team.weight, "on_limit": team.on_limit,
        "current_period": view.period_key, "spent_usd": micros_to_usd(view.spent_micros),
        "reserved_usd": micros_to_usd(view.reserved_micros), "credit_usd": micros_to_usd(view.credit_micros),
        "remaining_usd": micros_to_usd(view.remaining_micros),
    }
    if args.json:
        print(json.dumps(shown, indent=2))
    else:
        for name, value in shown.items():
            print(f"{name:<24} {'-' if value is None else value}")
    return 0


def _teams_list(args: argparse.Namespace) -> int:
    teams = asyncio.run(_with_store(_store_path(args), lambda s: s.list_teams()))
    rows = [
        {"name": t.name, "budget_usd": micros_to_usd(t.budget_limit_micros), "period": t.period, "created_at": t.created_at}
        for t in teams
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'TEAM':<24} {'BUDGET (USD)':>14} {'PERIOD':<7} CREATED")
    for row in rows:
        print(f"{row['name']:<24} {row['budget_usd']:>14} {row['period']:<7} {row['created_at']}")
    return 0
