"""``pixazo-proxy``: serve the gateway, manage teams, mint tokens, check policies.

Every ``serve`` flag can also be set by its environment variable (see
``proxy/config.py``); a flag given on the command line wins.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..config import Config, ConfigError, default_policies_dir, load_config
from ..domain.budget import PERIODS
from ..domain.clock import Clock
from ..domain.errors import StoreUnavailable
from ..domain.money import micros_to_usd, usd_to_micros
from ..domain.policyfile import PolicyError
from ..domain.queueing import ON_LIMIT
from ..domain.tabular import write_csv
from ..ops.logs import configure_logging
from ..store import SettingProblem, SpendRow, Store, TeamExists, UnknownTeam, check_team_settings, team_name_problem
from ..store.factory import shown, store_at

#: Set in each worker process ``serve --workers N`` starts (its index); the port is then shared (SO_REUSEPORT).
WORKER_ENV = "PROXY_WORKER_INDEX"

logger = logging.getLogger("proxy.cli")  # a fixed name: under "python -m" __name__ is "__main__"
POLICIES_HELP = "policy directory (PROXY_POLICIES; default ./policies if present, else the packaged defaults)"


class CommandError(Exception):
    """A command could not do what was asked; the message says why."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ConfigError, PolicyError, CommandError) as exc:
        print(f"pixazo-proxy: error: {exc}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pixazo-proxy", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--host", help="address to listen on (PROXY_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (PROXY_PORT, default 8080)")
    serve.add_argument("--public-url", help="URL clients reach the gateway at (PROXY_PUBLIC_URL)")
    serve.add_argument("--upstream", help="Pixazo base URL (PIXAZO_UPSTREAM_URL, default https://gateway.pixazo.ai)")
    serve.add_argument("--db", help="SQLite database path or postgresql:// URL (PROXY_DB, default pixazo-proxy.db)")
    serve.add_argument("--workers", type=int, help="gateway processes sharing the port (PROXY_WORKERS, default 1)")
    serve.add_argument("--policies", type=Path, help=POLICIES_HELP)
    serve.add_argument("--metrics-port", type=int, help="also serve /metrics on this port (PROXY_METRICS_PORT)")
    serve.add_argument("--simulate", action="store_true", default=None,
                       help="run the Pixazo simulator in-process as the upstream (PROXY_SIMULATE=1)")
    serve.set_defaults(run=_serve)

    teams = commands.add_parser("teams", help="manage teams").add_subparsers(dest="action", required=True)
    create = teams.add_parser("create", help="create a team with a budget")
    create.add_argument("name")
    create.add_argument("--budget", required=True, help="budget limit in USD, e.g. 250 or 12.50")
    create.add_argument("--period", choices=PERIODS, default="month", help="budget period (default month)")
    create.add_argument("--exist-ok", action="store_true", help="succeed without change if the team exists")
    create.add_argument("--db", help="SQLite database path or postgresql:// URL (PROXY_DB)")
    create.add_argument("--policies", type=Path, help=POLICIES_HELP + "; its soft threshold is the default")
    create.set_defaults(run=_teams_create)
    update = teams.add_parser("update", help="change a team's budget or limits (takes effect on the next request)")
    update.add_argument("name")
    update.add_argument("--db", help="SQLite database path or postgresql:// URL (PROXY_DB)")
    show = teams.add_parser("show", help="a team's settings and its current period's spend")
    show.add_argument("name")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.add_argument("--db", help="SQLite database path or postgresql:// URL (PROXY_DB)")
    show.set_defaults(run=_teams_show)
    for command in (create, update):
        if command is update:
            command.add_argument("--budget", help="budget limit in USD")
            command.add_argument("--period", choices=PERIODS)
        command.add_argument("--soft-threshold", type=int, help="percent of the budget that raises an alert (1-100)")
        command.add_argument("--user-cap", help="USD each user of the team may spend per period ('none' to clear)")
        command.add_argument("--max-concurrent", help="jobs running at once ('none' to clear)")
        command.add_argument("--max-per-minute", help="submits per minute ('none' to clear)")
        command.add_argument("--weight", type=int, help="share of the upstream when teams wait together (1-1000)")
        command.add_argument("--on-limit", choices=ON_LIMIT,
                             help="at max-concurrent: wait in the local queue (queue) or answer 429 (refuse)")
    update.set_defaults(run=_teams_update)
    listing = teams.add_parser("list", help="list teams")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.add_argument("--db", help="SQLite database path or postgresql:// URL (PROXY_DB)")
    listing.set_defaults(run=_teams_list)

    token = commands.add_parser("token", help="gateway tokens").add_subparsers(dest="action", required=True)
    mint = token.add_parser("mint", help="print a JWT signed with PROXY_JWT_SECRET")
    mint.add_argument("--team", required=True)
    mint.add_argument("--user", required=True)
    mint.add_argument("--ttl", type=int, default=3600, help="seconds until it expires (default 3600)")
    mint.add_argument("--admin", action="store_true", help="give the token the admin role")
    mint.set_defaults(run=_token_mint)

    spend = commands.add_parser("spend", help="spend").add_subparsers(dest="action", required=True)
    report = spend.add_parser("report", help="each team's spend for a period")
    report.add_argument("--team", help="only this team")
    report.add_argument("--period", help="period key (2026-11, 2026-W48, 2026-11-24, total); default: each team's current")
    report.add_argument("--format", choices=("table", "csv", "json"), default="table")
    report.add_argument("--db", help="SQLite database path or postgresql:// URL (PROXY_DB)")
    report.set_defaults(run=_spend_report)

    ledger = commands.add_parser("ledger", help="a team's ledger, newest first")
    ledger.add_argument("--team", required=True)
    ledger.add_argument("--period", help="only this period key")
    ledger.add_argument("--limit", type=int, default=100)
    ledger.add_argument("--format", choices=("table", "csv", "json"), default="table")
    ledger.add_argument("--db", help="SQLite database path or postgresql:// URL (PROXY_DB)")
    ledger.set_defaults(run=_ledger)

    simulator = commands.add_parser("simulator", help="run the Pixazo simulator alone (one upstream for several "
                                                      "gateways; its key is PIXAZO_API_KEY)")
    simulator.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    simulator.add_argument("--port", type=int, default=9000, help="port to listen on (default 9000)")
    simulator.add_argument("--policies", type=Path, help=POLICIES_HELP)
    simulator.set_defaults(run=_simulator)

    db = commands.add_parser("db", help="the store").add_subparsers(dest="action", required=True)
    copy = db.add_parser("copy", help="copy a gateway's books into an empty store (e.g. SQLite to PostgreSQL)")
    copy.add_argument("--from", dest="source", required=True, help="the store to read: a SQLite path or a URL")
    copy.add_argument("--to", dest="target", required=True, help="an empty store: a postgresql:// URL or a path")
    copy.set_defaults(run=_db_copy)

    rollup = commands.add_parser("rollup", help="the per-day spend rollup").add_subparsers(dest="action", required=True)
    rebuild = rollup.add_parser("rebuild", help="recompute the per-day rollup the console and reports read from the ledger")
    rebuild.add_argument("--db", help="SQLite database path or postgresql:// URL (PROXY_DB)")
    rebuild.set_defaults(run=_rollup_rebuild)

    console = commands.add_parser("console", help="the web console").add_subparsers(dest="action", required=True)
    link = console.add_parser("link", help="print a one-time sign-in link to the console")
    link.add_argument("--team", required=True, help="the team the person belongs to")
    link.add_argument("--user", required=True, help="who the link signs in (recorded as the actor of what they change)")
    link.add_argument("--admin", action="store_true", help="an admin session: sees and changes every team")
    link.add_argument("--ttl", default="10m", help="how long the link stays valid: 90s, 10m, 2h, 1d (default 10m)")
    link.add_argument("--public-url", help="the gateway's URL (PROXY_PUBLIC_URL, else http://PROXY_HOST:PROXY_PORT)")
    link.add_argument("--db", help="SQLite database path or postgresql:// URL (PROXY_DB)")
    link.set_defaults(run=_console_link)

    policies = commands.add_parser("policies", help="policy files").add_subparsers(dest="action", required=True)
    check = policies.add_parser("check", help="validate the policy files")
    check.add_argument("dir", nargs="?", type=Path, help=POLICIES_HELP)
    check.set_defaults(run=_policies_check)
    return parser


def _serve(args: argparse.Namespace) -> int:
    from ..app import build_app
    from ..http.server import run

    workers = args.workers if args.workers is not None else int(os.environ.get("PROXY_WORKERS", "1") or "1")
    if workers < 1 or workers > 64:
        raise CommandError("--workers must be from 1 to 64")
    config = load_config(
        host=args.host,
        port=args.port,
        public_url=args.public_url,
        upstream_url=args.upstream,
        db_path=args.db,
        policies_dir=args.policies,
        simulate=args.simulate,
        metrics_port=args.metrics_port,
    )
    if workers > 1:  # the config is checked once here, so a bad setting fails once, not in every worker
        from ..ops.workers import supervise

        return supervise(workers, sys.argv[1:], stop_seconds=config.shutdown_seconds)
    configure_logging(config.log_level, config.log_format)
    app = build_app(config)
    logger.info(
        "pixazo-proxy listening on %s (upstream: %s)", config.base_url,
        "in-process simulator" if config.simulate else config.upstream_url,
    )
    # SIGTERM/SIGINT: stop accepting, let in-flight requests finish (half of PROXY_SHUTDOWN_SECONDS), then run
    # the cleanup contexts: background tasks stop, clients close, the store closes last; all within the bound.
    run(app, host=config.host, port=config.port, loop=_event_loop(config),
        request_seconds=config.shutdown_request_seconds, reuse_port=os.environ.get(WORKER_ENV) is not None)
    logger.info("pixazo-proxy stopped", extra={"event": "shutdown"})
    return 0


def _event_loop(config: Config) -> asyncio.AbstractEventLoop:
    if config.uses_uvloop:
        import uvloop

        logger.info("event loop: uvloop %s", uvloop.__version__)
        return uvloop.new_event_loop()
    logger.info("event loop: asyncio")
    return asyncio.new_event_loop()


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


def _policies_dir(given: Path | None) -> Path:
    """A command's policy directory: its flag, else PROXY_POLICIES, else ./policies or the packaged defaults."""
    return given or (Path(os.environ["PROXY_POLICIES"]) if os.environ.get("PROXY_POLICIES") else default_policies_dir())


def _rules(given: Path | None) -> Any:
    from ..domain.budget import load_budget_rules

    return load_budget_rules(_policies_dir(given))


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


def _simulator(args: argparse.Namespace) -> int:
    from aiohttp import web

    from ..domain.catalog import load_catalog
    from ..simulator.server import Simulator, SimulatorSettings

    key = os.environ.get("PIXAZO_API_KEY", "").strip()
    if not key:
        raise CommandError("set PIXAZO_API_KEY: the key the simulator accepts (the gateways send it)")
    configure_logging("INFO", "json")
    simulator = Simulator(load_catalog(args.policies or default_policies_dir()), SimulatorSettings(key=key))
    web.run_app(simulator.build_app(), host=args.host, port=args.port, print=None, access_log=None)
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


def _console_link(args: argparse.Namespace) -> int:
    from ..console.signin import new_link, parse_ttl
    from ..store import ConsoleIdentity

    try:
        seconds = parse_ttl(args.ttl)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    user = args.user.strip()
    if not user or len(user) > 200:
        raise CommandError("--user must be a name of 1 to 200 characters")
    base = (args.public_url or os.environ.get("PROXY_PUBLIC_URL", "").strip()
            or f"http://{os.environ.get('PROXY_HOST', '').strip() or '127.0.0.1'}:"
               f"{os.environ.get('PROXY_PORT', '').strip() or '8080'}").rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise CommandError("--public-url must start with http:// or https://")

    async def work(store: Store) -> str:
        if await store.get_team(args.team) is None:
            raise CommandError(f"no team named {args.team!r}")
        return await new_link(store, ConsoleIdentity(args.team, user, args.admin), seconds)

    token = asyncio.run(_with_store(_store_path(args), work))
    print(f"{base}/console/login?token={token}")
    return 0


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


def _token_mint(args: argparse.Namespace) -> int:
    from ..auth.tokens import mint_token
    from ..config import SYMMETRIC_ALGORITHMS

    config = load_config(simulate=True)  # minting needs the JWT settings only, not the upstream key
    if not set(config.jwt_algorithms) & SYMMETRIC_ALGORITHMS:
        raise CommandError("token mint signs with PROXY_JWT_SECRET; this gateway is set up for public-key tokens")
    if args.ttl < 1:
        raise CommandError("--ttl must be at least 1 second")
    print(mint_token(config, team=args.team, user=args.user, ttl_seconds=args.ttl, admin=args.admin))
    return 0


def _policies_check(args: argparse.Namespace) -> int:
    from ..domain.budget import load_budget_rules
    from ..domain.cache import load_cache_rules
    from ..domain.catalog import load_catalog
    from ..domain.queueing import load_queue_rules
    from ..jobs.webhooks import load_delivery_rules

    directory = _policies_dir(args.dir)
    catalog = load_catalog(directory)
    rules = load_budget_rules(directory)
    load_cache_rules(directory)
    load_delivery_rules(directory)
    load_queue_rules(directory)
    wallet = f"global cap ${micros_to_usd(rules.global_limit_micros)} per {rules.global_period}" \
        if rules.global_limit_micros is not None else "no global cap"
    print(f"{directory}: ok ({len(catalog.models)} models: {', '.join(catalog.models)}; {wallet})")
    return 0

