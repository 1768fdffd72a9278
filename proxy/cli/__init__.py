"""``pixazo-proxy``: serve the gateway, manage teams, mint tokens, check policies.

Every ``serve`` flag can also be set by its environment variable (see
``proxy/config.py``); a flag given on the command line wins.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ..config import ConfigError
from ..domain.budget import PERIODS
from ..domain.policyfile import PolicyError
from ..domain.queueing import ON_LIMIT
from .books import _db_copy, _ledger, _rollup_rebuild, _spend_report
from .common import POLICIES_HELP, CommandError
from .serve import _serve
from .teams import _teams_create, _teams_list, _teams_show, _teams_update
from .tools import _console_link, _policies_check, _simulator, _token_mint


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
