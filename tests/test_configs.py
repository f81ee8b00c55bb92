"""Every Hydra config group composes and instantiates on CPU; typos and wrong types fail clearly."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import open_dict
from omegaconf.errors import ConfigKeyError, ValidationError

from lightning_asyncpipe import AsyncPipeStrategy, available_policies
from lightning_asyncpipe.config import register_configs

CONF = Path(__file__).resolve().parents[1] / "conf"
STRATEGIES = sorted(p.stem for p in (CONF / "strategy").glob("*.yaml"))


def _compose(*overrides: str):  # type: ignore[no-untyped-def]
    GlobalHydra.instance().clear()
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):  # what hydra.main would provide: the run's output folder
        cfg.hydra.runtime.output_dir = "/tmp/asyncpipe-configs"
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().set_config(cfg)
    return cfg


def test_one_strategy_config_per_policy() -> None:
    assert STRATEGIES == available_policies()


@pytest.mark.parametrize("name", STRATEGIES)
def test_strategy_config_instantiates(name: str) -> None:
    cfg = _compose(f"strategy={name}", "strategy.microbatches=8")
    strategy = instantiate(cfg.strategy)
    assert isinstance(strategy, AsyncPipeStrategy)
    assert strategy.policy_name == name and strategy.microbatches == 8


def test_policy_option_override_reaches_the_policy() -> None:
    cfg = _compose("strategy=pipemare", "strategy.policy_options.anneal_updates=50")
    assert instantiate(cfg.strategy).policy_options["anneal_updates"] == 50


@pytest.mark.parametrize(
    ("group", "option"),
    [(g.name, o.stem) for g in sorted(CONF.iterdir()) if g.is_dir() and g.name not in ("strategy", "experiment")
     for o in sorted(g.glob("*.yaml"))],  # fmt: skip
)
def test_every_group_option_instantiates(group: str, option: str) -> None:
    import sys

    sys.path.insert(0, str(CONF.parent))  # examples.chargpt
    cfg = _compose(f"{group}={option}")
    node = cfg[group]
    if group == "callbacks":
        objects = [instantiate(c) for c in node.values()]
        assert all(o is not None for o in objects)
    elif group == "trainer":
        import lightning as L

        trainer = instantiate(node, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
        assert isinstance(trainer, L.Trainer)
    else:
        assert instantiate(node) is not None


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_experiments_compose(experiment: str) -> None:
    cfg = _compose(f"experiment={experiment}")
    assert cfg.trainer.max_steps > 0


def test_misspelt_key_fails_with_its_name() -> None:
    with pytest.raises(ConfigCompositionException) as info:
        _compose("strategy.microbatchs=8")
    assert "microbatchs" in str(info.value) or "microbatchs" in str(info.value.__cause__)


def test_wrong_type_fails_with_its_name() -> None:
    with pytest.raises((ConfigCompositionException, ValidationError)) as info:
        _compose("strategy.microbatches=eight")
    assert "microbatches" in str(info.value) + str(info.value.__cause__)


def test_unknown_trainer_key_fails() -> None:
    with pytest.raises((ConfigCompositionException, ConfigKeyError)) as info:
        _compose("trainer.max_stepz=3")
    assert "max_stepz" in str(info.value) + str(info.value.__cause__)
