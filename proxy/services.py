"""The gateway's shared objects, built once by ``proxy/app.py`` and reached through one AppKey."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from .alerts import Alerts
from .auth import Authenticator
from .budget import BudgetRules
from .catalog import Catalog
from .clock import Clock
from .metrics import Metrics
from .pipeline import Pipeline
from .refresh import StatusRefresher
from .store import Store
from .tracker import Tracker
from .views import TerminalAnswers


@dataclass(frozen=True)
class Services:
    """What handlers reach (alerts and the tracker also by tests, which read what they did)."""

    catalog: Catalog
    store: Store
    authenticator: Authenticator
    pipeline: Pipeline
    refresher: StatusRefresher
    rules: BudgetRules
    clock: Clock
    metrics: Metrics
    alerts: Alerts
    tracker: Tracker
    terminal_answers: TerminalAnswers


SERVICES = web.AppKey("services", Services)
