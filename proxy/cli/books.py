"""The books: ``spend report``, ``ledger``, ``db copy`` and ``rollup rebuild``."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from ..domain.clock import Clock
from ..store import SpendRow, Store
from ..store.factory import shown
from .common import CommandError, _print_rows, _store_path, _with_store


def _spend_report(args: argparse.Namespace) -> int:
    from ..domain.budget import period_key

    async def work(store: Store) -> list[SpendRow]:
        teams = await store.list_teams()
        if args.team is not None and args.team not in {t.name for t in teams}:
            raise CommandError(f"team '{args.team}' does not exist")
        now = Clock().now()
        keys = {t.name: args.period or period_key(t.period, now) for t in teams if args.team in (None, t.name)}
        return await store.spend_report(keys)

    from ..http.admin import report_json

    _print_rows([report_json(row) for row in asyncio.run(_with_store(_store_path(args), work))], args.format)
    return 0


def _ledger(args: argparse.Namespace) -> int:
    from ..http.admin import entry_json

    if not 1 <= args.limit <= 100_000:
        raise CommandError("--limit must be between 1 and 100000")
    entries = asyncio.run(_with_store(_store_path(args), lambda s: s.ledger(args.team, args.period, args.limit)))
    _print_rows([entry_json(entry) for entry in entries], args.format)
    return 0


def _db_copy(args: argparse.Namespace) -> int:
    from ..store.copy import TargetNotEmpty, copy_books

    async def copy(source: Any) -> Any:
        return await _with_store(args.target, lambda target: copy_books(source, target))

    try:
        copied = asyncio.run(_with_store(args.source, copy))
    except TargetNotEmpty as exc:
        raise CommandError(f"{shown(args.target)}: {exc}") from None
    for table, count in copied.rows.items():
        print(f"{table}: {count} rows")
    if copied.mismatches:
        raise CommandError("the copy's totals do not match its ledger: " + "; ".join(copied.mismatches[:5]))
    print(f"copied into {shown(args.target)}; its totals match its ledger")
    return 0


def _rollup_rebuild(args: argparse.Namespace) -> int:
    async def work(store: Store) -> tuple[int, list[str]]:
        return await store.rebuild_day_rollup(), await store.ledger_mismatches()

    rows, mismatches = asyncio.run(_with_store(_store_path(args), work))
    print(f"day rollup rebuilt from the ledger: {rows} rows")
    if mismatches:
        raise CommandError("the store's totals still differ from its ledger: " + "; ".join(mismatches[:5]))
    return 0
