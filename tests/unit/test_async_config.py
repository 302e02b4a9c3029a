"""Async settings in ServerConfig: validation, the TOML round trip of --resume, CLI refusals."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from fedlearn.cli.run_cmd import run as run_command
from fedlearn.cli.server_cmds import resolve_config
from fedlearn.config import ServerConfig, from_mapping
from fedlearn.errors import ConfigError
from fedlearn.runs import RunDir


def test_async_settings_round_trip_through_config_toml(tmp_path: Path) -> None:
    for config in (
        ServerConfig(mode="async", max_updates=60),  # None fields are left out of TOML
        ServerConfig(mode="async", async_policy="fedbuff:3", max_seconds=12.5,
                     max_staleness=4, staleness_fn="hinge:10:4", eval_every=5, save_every=7,
                     server_lr=0.5, async_alpha=0.9),
        ServerConfig(),
    ):
        run = RunDir.create(tmp_path / str(id(config)),
                            {"mode": config.mode, "server": dataclasses.asdict(config)})
        back = from_mapping(ServerConfig, run.read_config()["server"])
        assert back == config


def test_sync_refuses_async_only_settings_and_async_needs_a_stop_rule() -> None:
    with pytest.raises(ConfigError, match="--max-updates applies to --mode async"):
        ServerConfig(max_updates=5)
    with pytest.raises(ConfigError, match="stop rule"):
        ServerConfig(mode="async")
    with pytest.raises(ConfigError, match="--mode"):
        ServerConfig(mode="rounds")


def test_rounds_are_refused_in_async_mode() -> None:
    with pytest.raises(ConfigError, match="--rounds is for --mode sync"):
        resolve_config(None, None, {"mode": "async", "rounds": 5, "max_updates": 5})
    assert resolve_config(None, None, {"mode": "async", "max_updates": 5}) == ServerConfig(
        mode="async", max_updates=5)
    with pytest.raises(ConfigError, match="--rounds is for --mode sync"):
        run_command(mode="async", rounds=5, max_updates=5)
    with pytest.raises(ConfigError, match="stop rule"):
        run_command(mode="async")
    with pytest.raises(ConfigError, match="async-policy"):
        run_command(mode="async", max_updates=5, async_policy="fedbuff:0")
