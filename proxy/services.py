"""The gateway's shared objects, built once by ``proxy/app.py`` and reached through one AppKey."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from .alerts import Alerts
from .auth import Authenticator
from .budget import BudgetRules
from .catalog import Catalog
from .clock import Clock
from .config import Config
from .metrics import Metrics
from .pipeline import Pipeline
from .refresh import StatusRefresher
from .store import Store
from .sweeper import Sweeper
from .tracker import Tracker
from .upstream import Upstream
from .views import TerminalAnswers
from .webhooks import WebhookSender


@dataclass(frozen=True)
class Services:
    config: Config
    catalog: Catalog
    store: Store
    upstream: Upstream
    authenticator: Authenticator
    pipeline: Pipeline
    refresher: StatusRefresher
    rules: BudgetRules
    clock: Clock
    metrics: Metrics
    alerts: Alerts
    sweeper: Sweeper
    tracker: Tracker
    webhooks: WebhookSender
    terminal_answers: TerminalAnswers


SERVICES = web.AppKey("services", Services)
