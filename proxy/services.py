"""The gateway's shared objects, built once by ``proxy/app.py`` and reached through one AppKey."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from .auth import Authenticator
from .catalog import Catalog
from .config import Config
from .pipeline import Pipeline
from .refresh import StatusRefresher
from .store import Store
from .upstream import Upstream


@dataclass(frozen=True)
class Services:
    config: Config
    catalog: Catalog
    store: Store
    upstream: Upstream
    authenticator: Authenticator
    pipeline: Pipeline
    refresher: StatusRefresher


SERVICES = web.AppKey("services", Services)
