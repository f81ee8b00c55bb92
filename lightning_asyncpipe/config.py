"""Structured configs: the typed schema of the Hydra config groups in ``conf/``.

Each YAML option of a group starts its defaults list with the group's schema (e.g.
``conf/strategy/pipemare.yaml`` has ``defaults: [strategy_schema, _self_]``), so a misspelt key
or a value of the wrong type fails when the config is composed, with Hydra's message naming the
key, instead of deep inside a run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

__all__ = ["StrategyConfig", "TrainerConfig", "ModelConfig", "DataConfig", "RunConfig", "register_configs"]


@dataclass
class StrategyConfig:
    """``AsyncPipeStrategy``'s arguments (see its docstring)."""

    _target_: str = "lightning_asyncpipe.AsyncPipeStrategy"
    policy: str = "pipedream_2bw"
    microbatches: int = 4  # chunks per batch
    stages: Optional[int] = None  # default: every device is a stage
    balance: Any = "uniform"  # "uniform" | "parameters" | [blocks per stage]
    sequential: Optional[str] = None  # dotted path of the pipelined submodule (default: found)
    split_points: Optional[list[str]] = None  # first module of each stage after the first
    leaf_modules: list[str] = field(default_factory=list)  # run whole, not traced through
    policy_options: dict[str, Any] = field(default_factory=dict)
    start_method: str = "popen"
    pipeline_metrics: bool = True
    detect_anomaly: bool = False  # NaN/Inf in stage outputs or the loss -> error naming stage and micro-batch
    defer_weight_grad: bool = True  # nn.Linear weight gradients once per batch (same result, faster)
    step_outputs: str = "latest"  # async: "own" makes every rank wait for the step's own outputs


@dataclass
class TrainerConfig:
    """The Lightning Trainer arguments the configs set (others: add them to this schema)."""

    _target_: str = "lightning.pytorch.Trainer"
    accelerator: str = "cpu"
    devices: int = 2
    num_nodes: int = 1
    precision: str = "32-true"
    max_steps: int = -1
    max_epochs: Optional[int] = None
    val_check_interval: Optional[Any] = None
    limit_train_batches: Optional[Any] = None
    limit_val_batches: Optional[Any] = None
    log_every_n_steps: int = 50
    gradient_clip_val: Optional[float] = None
    num_sanity_val_steps: int = 2
    enable_progress_bar: bool = True
    enable_model_summary: bool = True
    deterministic: bool = False
    default_root_dir: Optional[str] = None


@dataclass
class ModelConfig:
    """Hyper-parameters of ``examples.chargpt.CharGPT``."""

    _target_: str = "examples.chargpt.CharGPT"
    vocab_size: int = 256  # bytes
    block_size: int = 64  # context length
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    lr: float = 3e-3  # peak AdamW learning rate
    weight_decay: float = 0.01
    warmup_steps: int = 20


@dataclass
class DataConfig:
    """Arguments of ``examples.chargpt.StdlibText``."""

    _target_: str = "examples.chargpt.StdlibText"
    max_bytes: int = 2_000_000
    block_size: int = 64
    batch_size: int = 32  # per pipeline replica
    train_windows: int = 32_000
    val_windows: int = 512
    seed: int = 0


@dataclass
class TimelineConfig:
    first_step: int = 20  # skip the fill and warm-up
    steps: int = 3


@dataclass
class RunConfig:
    """The root: what the groups do not cover."""

    seed: int = 0
    ckpt_path: Optional[str] = None
    timeline: TimelineConfig = field(default_factory=TimelineConfig)
    strategy: Any = MISSING
    model: Any = MISSING
    data: Any = MISSING
    trainer: Any = MISSING
    logger: Any = None
    callbacks: Any = None


def register_configs() -> None:
    """Put the schemas in Hydra's ConfigStore (call before composing ``conf/``)."""
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    cs.store(group="strategy", name="strategy_schema", node=StrategyConfig)
    cs.store(group="trainer", name="trainer_schema", node=TrainerConfig)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="data", name="data_schema", node=DataConfig)
