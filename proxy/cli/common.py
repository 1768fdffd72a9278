"""What the commands share: the store they open, flags to settings, rows printed as a table or CSV."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from ..config import default_policies_dir
from ..domain.errors import StoreUnavailable
from ..domain.money import usd_to_micros
from ..domain.tabular import write_csv
from ..store import SettingProblem, check_team_settings
from ..store.factory import shown, store_at

POLICIES_HELP = "policy directory (PROXY_POLICIES; default ./policies if present, else the packaged defaults)"


class CommandError(Exception):
    """A command could not do what was asked; the message says why."""


def _store_path(args: argparse.Namespace) -> str:
    return args.db or os.environ.get("PROXY_DB") or "pixazo-proxy.db"


async def _with_store(path: str, work: Any) -> Any:
    try:
        store = store_at(path)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    try:
        await store.open()
    except StoreUnavailable as exc:
        raise CommandError(f"{shown(path)}: {exc.message}") from None
    try:
        return await work(store)
    finally:
        await store.close()


def _optional(flag: str, value: str | None, parse: Any) -> Any:
    """A flag's value parsed, None when not given, ``CLEAR`` for 'none'."""
    if value is None:
        return None
    if value.strip().lower() == "none":
        return CLEAR
    try:
        return parse(value)
    except ValueError as exc:
        raise CommandError(f"{flag}: {exc}") from None


CLEAR = object()


def _whole_number(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError("must be a whole number") from None


#: The flag that sets each team setting, to name it in an error.
_FLAGS = {"budget_limit_micros": "--budget", "period": "--period", "soft_threshold_percent": "--soft-threshold",
          "user_cap_micros": "--user-cap", "max_concurrent_jobs": "--max-concurrent",
          "max_submits_per_minute": "--max-per-minute", "weight": "--weight", "on_limit": "--on-limit"}


def _limit_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The team settings the flags give; 'none' clears an optional limit."""
    parsed: dict[str, Any] = {
        "soft_threshold_percent": args.soft_threshold,
        "user_cap_micros": _optional("--user-cap", args.user_cap, usd_to_micros),
        "max_concurrent_jobs": _optional("--max-concurrent", args.max_concurrent, _whole_number),
        "max_submits_per_minute": _optional("--max-per-minute", args.max_per_minute, _whole_number),
        "weight": args.weight,
        "on_limit": args.on_limit,
    }
    if args.action == "update":
        parsed["budget_limit_micros"] = _optional("--budget", args.budget, usd_to_micros)
        parsed["period"] = args.period
        if parsed["budget_limit_micros"] is CLEAR:
            raise CommandError("--budget cannot be cleared; give an amount")
    settings = {name: None if value is CLEAR else value for name, value in parsed.items() if value is not None}
    try:
        check_team_settings(settings)  # the same rules the admin API and the store apply
    except SettingProblem as problem:
        raise CommandError(f"{_FLAGS.get(problem.setting, problem.setting)} {problem.rule}") from None
    return settings


def _policies_dir(given: Path | None) -> Path:
    """A command's policy directory: its flag, else PROXY_POLICIES, else ./policies or the packaged defaults."""
    return given or (Path(os.environ["PROXY_POLICIES"]) if os.environ.get("PROXY_POLICIES") else default_policies_dir())


def _rules(given: Path | None) -> Any:
    from ..domain.budget import load_budget_rules

    return load_budget_rules(_policies_dir(given))


def _print_rows(rows: list[dict[str, Any]], fmt: str) -> None:
    if fmt == "json":
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        print("(nothing)" if fmt == "table" else "")
        return
    columns = list(rows[0])
    if fmt == "csv":
        write_csv(sys.stdout, columns, rows)
        return
    widths = {c: max(len(c), *(len("" if r[c] is None else str(r[c])) for r in rows)) for c in columns}
    print("  ".join(c.upper().ljust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(("" if row[c] is None else str(row[c])).ljust(widths[c]) for c in columns))
