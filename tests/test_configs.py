"""Every Hydra config composes and instantiates; overrides reach the objects."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from lightning_asyncpipe import AsyncPipeStrategy, available_policies

CONF = str(Path(__file__).resolve().parents[1] / "conf")
STRATEGIES = sorted(p.stem for p in (Path(CONF) / "strategy").glob("*.yaml"))


def test_one_strategy_config_per_policy() -> None:
    assert STRATEGIES == available_policies()


@pytest.mark.parametrize("name", STRATEGIES)
def test_strategy_config_instantiates(name: str) -> None:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"strategy={name}", "strategy.microbatches=8"])
    strategy = instantiate(cfg.strategy)
    assert isinstance(strategy, AsyncPipeStrategy)
    assert strategy.policy_name == name and strategy.microbatches == 8


def test_policy_option_override_reaches_the_policy() -> None:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["strategy=pipemare", "strategy.policy_options.anneal_updates=50"])
    assert instantiate(cfg.strategy).policy_options["anneal_updates"] == 50
