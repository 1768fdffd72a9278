"""The gateway's shared objects, built once by ``proxy/app.py`` and reached through one AppKey."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from .auth.tokens import Authenticator
from .domain.budget import BudgetRules
from .domain.catalog import Catalog
from .domain.clock import Clock
from .domain.views import TerminalAnswers
from .jobs.alerts import Alerts
from .jobs.refresh import StatusRefresher
from .jobs.tracker import Tracker
from .ops.metrics import Metrics
from .store import Store


@dataclass(frozen=True)
class Services:
    """What handlers reach (alerts and the tracker also by tests, which read what they did)."""

    catalog: Catalog
    store: Store
    authenticator: Authenticator
    refresher: StatusRefresher
    rules: BudgetRules
    clock: Clock
    metrics: Metrics
    alerts: Alerts
    tracker: Tracker
    terminal_answers: TerminalAnswers


SERVICES = web.AppKey("services", Services)
