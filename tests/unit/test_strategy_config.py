"""Strategy settings: validated once in the run's config, TOML, the Python API's objects."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from fedlearn.api import simulate
from fedlearn.cli.server_cmds import resolve_config
from fedlearn.config import (
    ServerConfig,
    build_strategy,
    from_mapping,
    strategy_settings,
)
from fedlearn.errors import ConfigError
from fedlearn.runs import RunDir, load_model_file
from fedlearn.sim import SimConfig
from fedlearn.strategies import Rule, Strategy, Update, parse_strategy
from fedlearn.strategies.server_opt import adam
from fedlearn.training import initial_state
from fedlearn.types import Weights
from tests.unit.test_sim_loop import toy_task


@pytest.mark.parametrize(("settings", "words"), [
    ({"strategy": "fedfoo"}, "unknown strategy 'fedfoo'; choose one of fedavg, fedavgm"),
    ({"strategy": "krum"}, "krum in 'krum' needs F"),
    ({"strategy": "fedavg", "beta1": 0.5}, "--beta1 applies only to fedadam"),
    ({"strategy": "norm-bounding"}, "norm-bounding needs --clip-norm C"),
    ({"strategy": "fedadam", "tau": -1.0}, "--tau must be a positive number"),
    ({"mode": "async", "max_updates": 3, "strategy": "fedadam"},
     "--strategy fedadam applies to --mode sync"),
    ({"mode": "async", "max_updates": 3, "prox_mu": 0.1}, "--prox-mu applies to --mode sync"),
    ({"client": {"prox_mu": 0.1}}, "prox_mu in [client] is set by the strategy"),
    ({"client": {"scaffold": 1}}, "scaffold in [client] is set by the strategy"),
])
def test_bad_strategy_settings_are_one_config_error(settings: dict[str, object],
                                                    words: str) -> None:
    with pytest.raises(ConfigError) as err:
        ServerConfig(**settings)  # type: ignore[arg-type]
    assert words in str(err.value) and "\n" not in str(err.value)


def test_settings_build_the_strategy_and_round_trip_through_toml(tmp_path: Path) -> None:
    cfg = ServerConfig(strategy="trimmed-mean:0.2+fedadam", server_lr=0.05, beta2=0.9,
                       clip_norm=3.0)
    assert build_strategy(cfg) == parse_strategy("trimmed-mean:0.2+fedadam", server_lr=0.05,
                                                 beta2=0.9, clip_norm=3.0)
    run = RunDir.create(tmp_path / "run", {"mode": "sync", "server": dataclasses.asdict(cfg)})
    assert from_mapping(ServerConfig, run.read_config()["server"]) == cfg
    assert ServerConfig().server_lr is None  # the strategy's own default
    assert ServerConfig(mode="async", max_updates=2).async_server_lr == 1.0


def test_a_toml_file_names_the_strategy_and_flags_win(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('[server]\nstrategy = "fedprox"\nprox_mu = 0.2\nrounds = 3\n')
    cfg = resolve_config(path, None, {"strategy": None, "server_lr": 0.5})
    assert cfg is not None and build_strategy(cfg) == parse_strategy(
        "fedprox", prox_mu=0.2, server_lr=0.5)
    path.write_text('[server]\nstrategy = "fedprox+fedadam"\n')
    with pytest.raises(ConfigError, match="unknown robust rule 'fedprox'"):
        resolve_config(path, None, {})


@dataclass(frozen=True)
class Ignore:
    """A user's own rule: every round's aggregate is zero (so the model never moves)."""

    spec: str = "ignore"
    streams: bool = False
    min_updates: int = 1

    def apply(self, updates: Sequence[Update]) -> Weights:
        return {k: np.zeros_like(v) for k, v in updates[0].delta.items()}


def test_objects_are_recorded_as_their_spec_or_as_objects() -> None:
    assert strategy_settings("median") == {"strategy": "median"}
    assert strategy_settings(parse_strategy("fedadam", beta1=0.8)) == {
        "strategy": "fedadam", "server_lr": 0.01, "beta1": 0.8, "beta2": 0.99, "tau": 0.001}
    mine = Strategy(name="ignore+fedadam", rule=Ignore(), optimizer=adam())
    assert strategy_settings(mine) == {"strategy": "object:ignore+fedadam"}
    cfg = ServerConfig(strategy="object:ignore+fedadam")  # accepted as a record...
    with pytest.raises(ConfigError, match="was a Python object; pass it again"):
        build_strategy(cfg)  # ...but cannot be rebuilt from it
    with pytest.raises(ConfigError, match="applies to --mode sync"):
        ServerConfig(strategy="object:x", mode="async", max_updates=3)


def test_simulate_takes_a_users_own_strategy_object(tmp_path: Path) -> None:
    task = toy_task()
    mine = Strategy(name="ignore", rule=Ignore())
    history = simulate(task, clients=4, rounds=2, strategy=mine, out=tmp_path / "mine",
                       config={"optimizer": "sgd", "lr": 0.1})
    start = initial_state(task, 0)
    model = load_model_file(tmp_path / "mine" / "model.safetensors")
    for k, v in start.items():
        np.testing.assert_array_equal(model[k], v)  # the rule kept every round at zero
    saved = RunDir(tmp_path / "mine").read_config()["sim"]
    assert saved["strategy"] == "object:ignore" and len(history.records) == 2
    # A spec with options is recorded as such, and changes the result.
    simulate(task, clients=4, rounds=2, strategy="fedavgm", server_momentum=0.5,
             out=tmp_path / "m", config={"optimizer": "sgd", "lr": 0.1})
    saved = RunDir(tmp_path / "m").read_config()["sim"]
    assert (saved["strategy"], saved["server_momentum"]) == ("fedavgm", 0.5)
    with pytest.raises(ConfigError, match="a Strategy object carries its own settings"):
        simulate(task, clients=4, rounds=1, strategy=mine, server_lr=0.1, out=tmp_path / "x")
    with pytest.raises(ConfigError, match=r"unknown option\(s\) momentum"):
        simulate(task, clients=4, rounds=1, momentum=0.1, out=tmp_path / "y")


def test_a_rule_that_needs_more_updates_than_a_round_has_is_refused() -> None:
    with pytest.raises(ConfigError, match="bulyan:1 needs at least 7 updates a round"):
        SimConfig(clients=10, per_round=5, strategy="bulyan:1")
    assert parse_strategy("multi-krum:1:6").min_updates == 6
    assert Rule("bulyan", f=2).min_updates == 11
