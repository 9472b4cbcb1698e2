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


def test_sections_read_the_same_setting_from_each_source(tmp_path: pytest.TempPathFactory) -> None:
    """A section's setting keeps its flat name in the environment and in overrides, and may sit
    under its own TOML table or flat in [router]; later sources win, as for any setting."""
    toml = tmp_path / "router.toml"  # type: ignore[operator]
    toml.write_text(
        "[router]\nguard_pii_output = true\n[router.quota]\ntokens_per_minute = 100\nrequests_per_s = 3\n"
        "[router.batch]\nconcurrency = 4\n"
    )
    config = load_config(
        RouterConfig,
        "router",
        path=toml,
        env={"INFERMESH_ROUTER_QUOTA_REQUESTS_PER_S": "7"},
        overrides={"batch_lease_s": 2.5},
    )
    assert config.quota.tokens_per_minute == 100  # file, sub-table
    assert config.quota.requests_per_s == 7  # environment over file
    assert config.guard.pii_output is True and config.guard.policy().pii_output  # file, flat
    assert (config.batch.concurrency, config.batch.lease_s) == (4, 2.5)  # file, override
    assert config.quota.base().tokens_per_minute == 100


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"quota_tokens_per_minute": -1}, "router.quota_tokens_per_minute=-1: must be >= 0"),
        ({"quota": {"redis_url": "http://x"}}, "router.quota_redis_url scheme 'http': must be redis"),
        ({"quota_overrides": ["acme:tokens_per_minute=x"]}, "router.quota_overrides:"),
        ({"batch_concurrency": 0}, "router.batch_concurrency=0: must be >= 1"),
        ({"quota": {"tokens_per_hour": 5}}, "router.quota_tokens_per_hour: unknown setting"),
    ],
)
def test_bad_section_values_are_named_by_their_flat_names(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(RouterConfig, "router", env={}, overrides=overrides)
    assert message in str(err.value)
