"""Router config: defaults, environment, and errors that name the bad value."""

from __future__ import annotations

import pytest

from services.common.config import ConfigError, load_config
from services.router.config import RouterConfig


def test_defaults() -> None:
    config = load_config(RouterConfig, "router", env={})
    assert (config.host, config.port) == ("127.0.0.1", 50051)
    assert config.worker_addresses == [] and config.session_address == ""


def test_addresses_from_environment() -> None:
    env = {
        "INFERMESH_ROUTER_WORKER_ADDRESSES": "127.0.0.1:50053, 127.0.0.1:50063",
        "INFERMESH_ROUTER_SESSION_ADDRESS": "127.0.0.1:50052",
    }
    config = load_config(RouterConfig, "router", env=env)
    assert config.worker_addresses == ["127.0.0.1:50053", "127.0.0.1:50063"]
    assert config.session_address == "127.0.0.1:50052"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"worker_addresses": ["localhost"]}, "router.worker_addresses='localhost': must be host:port"),
        ({"embedder_addresses": ["h:0"]}, "router.embedder_addresses='h:0': must be host:port"),
        ({"worker_addresses": ["h:1", "h:1"]}, "addresses must be distinct"),
        ({"session_address": ":50052"}, "router.session_address=':50052': must be host:port"),
        ({"default_max_tokens": 5000}, "router.default_max_tokens=5000: must be <= max_tokens_limit (4096)"),
        ({"endpoint_stale_s": 0.1}, "router.endpoint_stale_s=0.1: must be at least twice"),
        ({"max_tokens_limit": 0}, "router.max_tokens_limit=0: must be >= 1"),
        ({"port": 70000}, "router.port=70000: must be <= 65535"),
    ],
)
def test_bad_values_are_named(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(RouterConfig, "router", env={}, overrides=overrides)
    assert message in str(err.value)
