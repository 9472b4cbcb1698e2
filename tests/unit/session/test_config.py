"""SessionConfig defaults, environment overrides and cross-field checks."""

from __future__ import annotations

import pytest

from services.common.config import ConfigError, load_config
from services.session.config import SessionConfig


def test_defaults():
    config = load_config(SessionConfig, "session", env={})
    assert (config.host, config.port) == ("127.0.0.1", 50052)
    assert config.database_url == "" and config.state_dir == ".run" and config.auto_migrate is False
    assert config.default_page_size <= config.max_page_size


def test_environment_overrides():
    env = {
        "INFERMESH_SESSION_DATABASE_URL": "postgresql+asyncpg://u@db:5432/s",
        "INFERMESH_SESSION_AUTO_MIGRATE": "false",
        "INFERMESH_SESSION_DB_TIMEOUT_S": "1.5",
    }
    config = load_config(SessionConfig, "session", env=env)
    assert config.database_url == "postgresql+asyncpg://u@db:5432/s"
    assert config.auto_migrate is False and config.db_timeout_s == 1.5


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            {"default_page_size": 500, "max_page_size": 100},
            "session.default_page_size=500: must be <= max_page_size",
        ),
        ({"database_url": "mysql://db/x"}, "session.database_url scheme 'mysql': must be one of"),
        ({"pool_size": 0}, "session.pool_size=0: must be >= 1"),
        ({"db_timeout_s": 0}, "session.db_timeout_s=0.0: must be >= 0.05"),
        ({"max_message_chars": 0}, "session.max_message_chars=0: must be >= 1"),
    ],
)
def test_bad_values_are_named(overrides, expected):
    with pytest.raises(ConfigError) as info:
        load_config(SessionConfig, "session", env={}, overrides=overrides)
    assert expected in str(info.value)


def test_redis_url_scheme_is_checked_without_echoing_the_url():
    with pytest.raises(ConfigError, match="redis_url scheme 'http'") as info:
        load_config(SessionConfig, "session", env={}, overrides={"redis_url": "http://u:secret@cache:6379"})
    assert "secret" not in str(info.value)
    config = load_config(SessionConfig, "session", env={}, overrides={"redis_url": "redis://cache:6379/1"})
    assert config.redis_url == "redis://cache:6379/1"


def test_encryption_keys_are_checked_without_echoing_them():
    with pytest.raises(ConfigError, match=r"session\.encryption_keys: key 'k1': must be 32 bytes") as info:
        load_config(SessionConfig, "session", env={}, overrides={"encryption_keys": "k1:c2VjcmV0"})
    assert "c2VjcmV0" not in str(info.value)
