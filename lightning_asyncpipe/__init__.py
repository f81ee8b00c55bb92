"""lightning_asyncpipe: asynchronous pipeline-parallel training as a PyTorch Lightning strategy."""

from lightning_asyncpipe.errors import (
    AsyncPipeError,
    BalanceError,
    PipelineConfigError,
    ScheduleError,
    ShapeError,
    StageFailure,
)
from lightning_asyncpipe.policies import WeightPolicy, available_policies, get_policy, register_policy
from lightning_asyncpipe.callbacks import PipelineTimeline
from lightning_asyncpipe.strategy import AsyncPipeStrategy
from lightning_asyncpipe.topology import Topology

__version__ = "0.1.0"

__all__ = [
    "AsyncPipeStrategy",
    "PipelineTimeline",
    "Topology",
    "WeightPolicy",
    "available_policies",
    "get_policy",
    "register_policy",
    "AsyncPipeError",
    "BalanceError",
    "PipelineConfigError",
    "ScheduleError",
    "ShapeError",
    "StageFailure",
]
