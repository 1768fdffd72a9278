"""Configuration: one frozen object from the environment; a bad setting stops start-up naming it."""

from __future__ import annotations

import pytest

from proxy.config import ConfigError, Secret, load_config

SECRET = "s" * 40
BASE = {"PIXAZO_API_KEY": "real-key", "PROXY_JWT_SECRET": SECRET}


def test_defaults() -> None:
    config = load_config(BASE)

    assert config.upstream_url == "https://gateway.pixazo.ai"
    assert config.base_url == "http://127.0.0.1:8080"
    assert config.max_body_bytes == 1024 * 1024
    assert config.jwt_algorithms == ("HS256",)
    assert config.status_refresh_seconds == 5.0


def test_flags_win_over_the_environment() -> None:
    config = load_config(BASE | {"PROXY_PORT": "9000", "PROXY_DB": "env.db"}, port=9100, db_path=None)

    assert (config.port, config.db_path) == (9100, "env.db")
    assert config.base_url == "http://127.0.0.1:9100"


def test_public_url_is_used_for_polling_urls() -> None:
    assert load_config(BASE | {"PROXY_PUBLIC_URL": "https://video.corp.example/"}).base_url == "https://video.corp.example"


@pytest.mark.parametrize(("env", "message"), [
    ({"PROXY_JWT_SECRET": SECRET}, "PIXAZO_API_KEY is not set: the real Pixazo subscription key (or run with --simulate)"),
    ({"PIXAZO_API_KEY": "k"}, "PROXY_JWT_SECRET is not set: the secret that signs gateway tokens"),
    (BASE | {"PROXY_JWT_SECRET": "short"}, "PROXY_JWT_SECRET is too short: use at least 32 characters"),
    (BASE | {"PIXAZO_API_KEY": SECRET}, "PROXY_JWT_SECRET must not be the upstream key"),
    (BASE | {"PROXY_JWT_ALGORITHMS": "none"}, "PROXY_JWT_ALGORITHMS has unsupported algorithms: NONE"),
    (BASE | {"PROXY_JWT_ALGORITHMS": "HS256,RS256"},
     "PROXY_JWT_ALGORITHMS mixes HMAC and public-key algorithms (an algorithm-confusion risk)"),
    (BASE | {"PROXY_JWT_ALGORITHMS": "RS256"}, "PROXY_JWT_PUBLIC_KEY or PROXY_JWT_JWKS_URL is needed for public-key algorithms"),
    (BASE | {"PROXY_PORT": "eighty"}, "PROXY_PORT is malformed: must be an integer"),
    (BASE | {"PROXY_PORT": "70000"}, "PROXY_PORT must be between 0 and 65535"),
    (BASE | {"PROXY_UPSTREAM_TIMEOUT": "0"}, "PROXY_UPSTREAM_TIMEOUT is malformed: must be greater than 0"),
    (BASE | {"PROXY_SIMULATE": "maybe"}, "PROXY_SIMULATE is malformed: must be one of 1/0, true/false, yes/no, on/off"),
    (BASE | {"PIXAZO_UPSTREAM_URL": "gateway.pixazo.ai"}, "PIXAZO_UPSTREAM_URL must start with http:// or https://"),
    (BASE | {"PROXY_LOG_LEVEL": "loud"}, "PROXY_LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL"),
    (BASE | {"PROXY_MAX_BODY_BYTES": "10"}, "PROXY_MAX_BODY_BYTES must be at least 1024"),
    (BASE | {"PROXY_DB": "postgresql:///proxy"},
     "PROXY_DB is a PostgreSQL URL without a host (postgresql://user@host:port/database)"),
    (BASE | {"PROXY_DB": "postgresql://postgres@127.0.0.1:port/proxy"},
     "PROXY_DB is not a valid PostgreSQL URL: Port could not be cast to integer value as 'port'"),
    (BASE | {"PROXY_DB": "mysql://root@127.0.0.1/proxy"}, "PROXY_DB must be a SQLite database path or a postgresql:// URL"),
    (BASE | {"PROXY_DB_POOL_SIZE": "0"}, "PROXY_DB_POOL_SIZE must be a whole number from 1 to 1000"),
])
def test_bad_settings_name_themselves(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(env)
    assert str(caught.value) == message


def test_simulate_needs_no_upstream_key() -> None:
    assert load_config({"PROXY_JWT_SECRET": SECRET, "PROXY_SIMULATE": "1"}).simulate is True


def test_secrets_do_not_show_in_reprs() -> None:
    config = load_config(BASE)

    assert "real-key" not in repr(config)
    assert SECRET not in repr(config)
    assert str(Secret("abc")) == "Secret('********')"
    assert config.upstream_key.reveal() == "real-key"


def test_the_event_loop_choice_is_checked_at_start_up() -> None:
    with pytest.raises(ConfigError, match="PROXY_EVENT_LOOP must be auto, asyncio or uvloop"):
        load_config({**BASE, "PROXY_EVENT_LOOP": "trio"})
    assert load_config({**BASE, "PROXY_EVENT_LOOP": " UVLOOP "}).event_loop == "uvloop"
    assert load_config(BASE).event_loop == "auto"
