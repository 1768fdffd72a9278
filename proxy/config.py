"""Configuration: read once, from the environment and command-line flags, into a frozen object.

Every setting has an environment variable; a flag given on the command line
wins over it. A missing or malformed setting stops start-up with one line
that names it (:class:`ConfigError`).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_UPSTREAM_URL = "https://gateway.pixazo.ai"
#: The policies that ship inside the package (a copy of the repository's policies/, kept identical by a test).
PACKAGED_POLICIES = Path(__file__).resolve().parent / "policies"


def default_policies_dir() -> Path:
    """``./policies`` where there is one (the editable copy), else the packaged defaults: works from any directory."""
    local = Path("policies")
    return local if (local / "models.toml").is_file() else PACKAGED_POLICIES
SYMMETRIC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
ASYMMETRIC_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512"})
MIN_JWT_SECRET_LENGTH = 32
#: PROXY_SHUTDOWN_SECONDS: the longest a stop may take, SIGTERM to exit (docs/operations.md). Below 2 s the steps
#: after the requests in flight (background tasks, clients, the store) have no room; above 10 minutes a rolling
#: update would rather kill.
MIN_SHUTDOWN_SECONDS = 2.0
MAX_SHUTDOWN_SECONDS = 600.0
#: Of PROXY_SHUTDOWN_SECONDS, what is kept for the process to exit once its steps are done.
EXIT_SECONDS = 0.5


class ConfigError(ValueError):
    """A setting is missing or malformed; the message names the setting."""


class Secret:
    """A string that does not show itself in reprs, logs or tracebacks."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __repr__(self) -> str:
        return "Secret('********')" if self._value else "Secret('')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class Config:
    """Everything the gateway reads from its environment."""

    upstream_key: Secret
    jwt_secret: Secret = field(default_factory=lambda: Secret(""))
    host: str = "127.0.0.1"
    port: int = 8080
    public_url: str = ""
    upstream_url: str = DEFAULT_UPSTREAM_URL
    db_path: str = "pixazo-proxy.db"
    db_pool_size: int = 10
    policies_dir: Path = field(default_factory=default_policies_dir)
    simulate: bool = False
    jwt_algorithms: tuple[str, ...] = ("HS256",)
    jwt_public_key: str = ""
    jwt_jwks_url: str = ""
    jwt_issuer: str = ""
    jwt_audience: str = ""
    jwt_team_claim: str = "team"
    jwks_lifetime: float = 300.0
    jwks_cooldown: float = 10.0
    max_token_bytes: int = 8192
    max_body_bytes: int = 1024 * 1024
    upstream_timeout: float = 30.0
    upstream_connect_timeout: float = 5.0
    status_refresh_seconds: float = 5.0
    log_level: str = "INFO"
    probe_allow_private: bool = False
    tracker_concurrency: int = 8
    webhook_allow_private: bool = False
    log_format: str = "json"
    metrics_port: int = 0
    alert_webhook_url: str = ""
    event_loop: str = "auto"
    console_session_seconds: float = 8 * 3600.0
    shutdown_seconds: float = 10.0

    @property
    def uses_uvloop(self) -> bool:
        """Serve on uvloop: asked for, or ``auto`` and installed (``pixazo-proxy[fast]``)."""
        installed = importlib.util.find_spec("uvloop") is not None
        return self.event_loop == "uvloop" or (self.event_loop == "auto" and installed)

    @property
    def shutdown_steps_seconds(self) -> float:
        """Of ``shutdown_seconds``, what the stop's own steps may take: the rest is the interpreter's exit."""
        return self.shutdown_seconds - EXIT_SECONDS

    @property
    def shutdown_request_seconds(self) -> float:
        """Of those, how long requests in flight may take to finish before they are cancelled."""
        return self.shutdown_steps_seconds / 2

    @property
    def base_url(self) -> str:
        """The gateway's public URL, used to build ``polling_url``."""
        return (self.public_url or f"http://{self.host}:{self.port}").rstrip("/")


def _text(value: str) -> str:
    return value.strip()


def _int(value: str) -> int:
    try:
        return int(value.strip())
    except ValueError:
        raise ValueError("must be an integer") from None


def _positive_float(value: str) -> float:
    try:
        number = float(value.strip())
    except ValueError:
        raise ValueError("must be a number") from None
    if not number > 0:
        raise ValueError("must be greater than 0")
    return number


def _bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError("must be one of 1/0, true/false, yes/no, on/off")


def _algorithms(value: str) -> tuple[str, ...]:
    return tuple(part.strip().upper() for part in value.split(",") if part.strip())


#: setting name -> (environment variable, parser)
ENVIRONMENT: dict[str, tuple[str, Any]] = {
    "upstream_key": ("PIXAZO_API_KEY", lambda v: Secret(v.strip())),
    "upstream_url": ("PIXAZO_UPSTREAM_URL", _text),
    "jwt_secret": ("PROXY_JWT_SECRET", lambda v: Secret(v.strip())),
    "host": ("PROXY_HOST", _text),
    "port": ("PROXY_PORT", _int),
    "public_url": ("PROXY_PUBLIC_URL", _text),
    "db_path": ("PROXY_DB", _text),
    "db_pool_size": ("PROXY_DB_POOL_SIZE", _int),
    "policies_dir": ("PROXY_POLICIES", lambda v: Path(v.strip())),
    "simulate": ("PROXY_SIMULATE", _bool),
    "jwt_algorithms": ("PROXY_JWT_ALGORITHMS", _algorithms),
    "jwt_public_key": ("PROXY_JWT_PUBLIC_KEY", _text),
    "jwt_jwks_url": ("PROXY_JWT_JWKS_URL", _text),
    "jwt_issuer": ("PROXY_JWT_ISSUER", _text),
    "jwt_audience": ("PROXY_JWT_AUDIENCE", _text),
    "jwt_team_claim": ("PROXY_JWT_TEAM_CLAIM", _text),
    "jwks_lifetime": ("PROXY_JWKS_LIFETIME", _positive_float),
    "jwks_cooldown": ("PROXY_JWKS_COOLDOWN", _positive_float),
    "max_token_bytes": ("PROXY_MAX_TOKEN_BYTES", _int),
    "max_body_bytes": ("PROXY_MAX_BODY_BYTES", _int),
    "upstream_timeout": ("PROXY_UPSTREAM_TIMEOUT", _positive_float),
    "upstream_connect_timeout": ("PROXY_UPSTREAM_CONNECT_TIMEOUT", _positive_float),
    "status_refresh_seconds": ("PROXY_POLL_INTERVAL", _positive_float),
    "log_level": ("PROXY_LOG_LEVEL", lambda v: v.strip().upper()),
    "probe_allow_private": ("PROXY_PROBE_ALLOW_PRIVATE", _bool),
    "tracker_concurrency": ("PROXY_TRACKER_CONCURRENCY", _int),
    "webhook_allow_private": ("PROXY_WEBHOOK_ALLOW_PRIVATE", _bool),
    "log_format": ("PROXY_LOG_FORMAT", lambda v: v.strip().lower()),
    "metrics_port": ("PROXY_METRICS_PORT", _int),
    "alert_webhook_url": ("PROXY_ALERT_WEBHOOK_URL", _text),
    "event_loop": ("PROXY_EVENT_LOOP", lambda v: v.strip().lower()),
    "console_session_seconds": ("PROXY_CONSOLE_SESSION_SECONDS", _positive_float),
    "shutdown_seconds": ("PROXY_SHUTDOWN_SECONDS", _positive_float),
}


def load_config(env: Mapping[str, str] | None = None, **overrides: Any) -> Config:
    """Build the config from ``env`` (default: ``os.environ``) and flag ``overrides``.

    Overrides whose value is ``None`` are ignored, so unset flags fall back to
    the environment and then to the defaults.
    """
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for name, (variable, parse) in ENVIRONMENT.items():
        raw = env.get(variable)
        if raw is None or raw.strip() == "":
            continue
        try:
            values[name] = parse(raw)
        except ValueError as exc:
            raise ConfigError(f"{variable} is malformed: {exc}") from None
    values.update({name: value for name, value in overrides.items() if value is not None})
    if isinstance(values.get("upstream_key"), str):
        values["upstream_key"] = Secret(values["upstream_key"])
    if isinstance(values.get("jwt_secret"), str):
        values["jwt_secret"] = Secret(values["jwt_secret"])
    values.setdefault("upstream_key", Secret(""))
    config = Config(**values)
    check_config(config)
    return config


def check_config(config: Config) -> None:
    """Refuse a config that cannot work, naming the setting at fault."""
    if not config.upstream_key and not config.simulate:
        raise ConfigError("PIXAZO_API_KEY is not set: the real Pixazo subscription key (or run with --simulate)")
    algorithms = set(config.jwt_algorithms)
    if not algorithms:
        raise ConfigError("PROXY_JWT_ALGORITHMS is empty")
    unknown = algorithms - SYMMETRIC_ALGORITHMS - ASYMMETRIC_ALGORITHMS
    if unknown:
        raise ConfigError(f"PROXY_JWT_ALGORITHMS has unsupported algorithms: {', '.join(sorted(unknown))}")
    if algorithms & SYMMETRIC_ALGORITHMS and algorithms & ASYMMETRIC_ALGORITHMS:
        raise ConfigError("PROXY_JWT_ALGORITHMS mixes HMAC and public-key algorithms (an algorithm-confusion risk)")
    if algorithms & SYMMETRIC_ALGORITHMS:
        if not config.jwt_secret:
            raise ConfigError("PROXY_JWT_SECRET is not set: the secret that signs gateway tokens")
        if len(config.jwt_secret.reveal()) < MIN_JWT_SECRET_LENGTH:
            raise ConfigError(f"PROXY_JWT_SECRET is too short: use at least {MIN_JWT_SECRET_LENGTH} characters")
        if config.upstream_key and config.jwt_secret == config.upstream_key:
            raise ConfigError("PROXY_JWT_SECRET must not be the upstream key")
    elif not (config.jwt_public_key or config.jwt_jwks_url):
        raise ConfigError("PROXY_JWT_PUBLIC_KEY or PROXY_JWT_JWKS_URL is needed for public-key algorithms")
    if not config.jwt_team_claim:
        raise ConfigError("PROXY_JWT_TEAM_CLAIM is empty")
    for name, variable in (("upstream_url", "PIXAZO_UPSTREAM_URL"), ("public_url", "PROXY_PUBLIC_URL"),
                           ("alert_webhook_url", "PROXY_ALERT_WEBHOOK_URL")):
        url = getattr(config, name)
        if url and not url.startswith(("http://", "https://")):
            raise ConfigError(f"{variable} must start with http:// or https://")
    from .store.factory import location_problem  # the store decides what it can open

    if (problem := location_problem(config.db_path)) is not None:
        raise ConfigError(f"PROXY_DB {problem}")
    if not 1 <= config.db_pool_size <= 1000:
        raise ConfigError("PROXY_DB_POOL_SIZE must be a whole number from 1 to 1000")
    if not 0 <= config.port <= 65535:
        raise ConfigError("PROXY_PORT must be between 0 and 65535")
    if config.max_body_bytes < 1024:
        raise ConfigError("PROXY_MAX_BODY_BYTES must be at least 1024")
    if config.tracker_concurrency < 1:
        raise ConfigError("PROXY_TRACKER_CONCURRENCY must be at least 1")
    if config.max_token_bytes < 256:
        raise ConfigError("PROXY_MAX_TOKEN_BYTES must be at least 256")
    if config.log_format not in ("json", "text"):
        raise ConfigError("PROXY_LOG_FORMAT must be json or text")
    if not 0 <= config.metrics_port <= 65535:
        raise ConfigError("PROXY_METRICS_PORT must be between 0 and 65535")
    if config.event_loop not in ("auto", "asyncio", "uvloop"):
        raise ConfigError("PROXY_EVENT_LOOP must be auto, asyncio or uvloop")
    if config.event_loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
        raise ConfigError("PROXY_EVENT_LOOP is uvloop but uvloop is not installed: pip install 'pixazo-proxy[fast]'")
    if not MIN_SHUTDOWN_SECONDS <= config.shutdown_seconds <= MAX_SHUTDOWN_SECONDS:
        raise ConfigError(f"PROXY_SHUTDOWN_SECONDS must be from {MIN_SHUTDOWN_SECONDS:g} to {MAX_SHUTDOWN_SECONDS:g}")
    if config.log_level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
        raise ConfigError("PROXY_LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
