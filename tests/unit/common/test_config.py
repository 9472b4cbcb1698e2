"""The typed config loader: precedence, coercion and errors that name the value."""

from __future__ import annotations

import dataclasses

import pytest

from services.common.config import ConfigError, describe, load_config, setting


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    port: int = setting(50051, "Port to listen on; 0 picks a free one.", min=0, max=65535)
    ratio: float = setting(0.5, "A fraction.", min=0.0, max=1.0)
    name: str = setting("demo", "A name.")
    enabled: bool = setting(True, "A switch.")
    peers: list[str] = setting([], "Addresses.")
    level: str = setting("info", "Log level.", choices=["debug", "info", "warning"])
    optional_url: str | None = setting(None, "An optional URL.")

    def check(self) -> None:
        if self.name == "forbidden" and self.enabled:
            raise ConfigError(f"demo.name={self.name!r}: not allowed while enabled")


def test_defaults_apply_without_file_or_env() -> None:
    cfg = load_config(DemoConfig, "demo", env={})
    assert cfg.port == 50051 and cfg.peers == [] and cfg.optional_url is None


def test_file_then_env_then_overrides(tmp_path) -> None:
    path = tmp_path / "infermesh.toml"
    path.write_text('[demo]\nport = 1000\nname = "from-file"\npeers = ["a:1", "b:2"]\n')
    env = {"INFERMESH_DEMO_PORT": "2000", "INFERMESH_DEMO_ENABLED": "off"}
    cfg = load_config(DemoConfig, "demo", path=path, env=env, overrides={"ratio": 0.25})
    assert cfg.port == 2000  # env beats file
    assert cfg.name == "from-file"
    assert cfg.peers == ["a:1", "b:2"]
    assert cfg.enabled is False
    assert cfg.ratio == 0.25


def test_file_found_through_environment(tmp_path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[demo]\nport = 7\n")
    cfg = load_config(DemoConfig, "demo", env={"INFERMESH_DEMO_CONFIG": str(path)})
    assert cfg.port == 7


def test_env_list_is_comma_separated() -> None:
    cfg = load_config(DemoConfig, "demo", env={"INFERMESH_DEMO_PEERS": "h1:1, h2:2,"})
    assert cfg.peers == ["h1:1", "h2:2"]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"INFERMESH_DEMO_PORT": "-1"}, "demo.port=-1: must be >= 0"),
        ({"INFERMESH_DEMO_PORT": "70000"}, "demo.port=70000: must be <= 65535"),
        ({"INFERMESH_DEMO_PORT": "eighty"}, "demo.port='eighty': must be an integer"),
        ({"INFERMESH_DEMO_RATIO": "2"}, "demo.ratio=2.0: must be <= 1.0"),
        ({"INFERMESH_DEMO_ENABLED": "maybe"}, "demo.enabled='maybe': must be a boolean"),
        ({"INFERMESH_DEMO_LEVEL": "loud"}, "demo.level='loud': must be one of debug, info, warning"),
        ({"INFERMESH_DEMO_NAME": "forbidden"}, "demo.name='forbidden': not allowed while enabled"),
    ],
)
def test_errors_name_the_value(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(DemoConfig, "demo", env=env)
    assert message in str(exc.value)


def test_unknown_key_in_file_is_refused(tmp_path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[demo]\nprot = 1\n")
    with pytest.raises(ConfigError, match=r"demo\.prot: unknown setting"):
        load_config(DemoConfig, "demo", path=path, env={})


def test_missing_and_malformed_files_are_named(tmp_path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(DemoConfig, "demo", path=tmp_path / "nope.toml", env={})
    bad = tmp_path / "bad.toml"
    bad.write_text("[demo\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(DemoConfig, "demo", path=bad, env={})


def test_describe_lists_docs() -> None:
    docs = {name: doc for name, doc, _ in describe(DemoConfig)}
    assert docs["port"].startswith("Port to listen on")
