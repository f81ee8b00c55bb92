"""The package's exception family: every user-facing error derives from ``AsyncPipeError``."""

from __future__ import annotations

__all__ = [
    "AsyncPipeError", "BalanceError", "ScheduleError", "PipelineConfigError", "StageFailure", "ShapeError",
    "NonFiniteError", "CheckpointError",
]  # fmt: skip


class AsyncPipeError(RuntimeError):
    """Base class of every error raised by lightning_asyncpipe."""


class PipelineConfigError(AsyncPipeError, ValueError):
    """A configuration that cannot work, detected at setup before any process can hang."""


class BalanceError(PipelineConfigError):
    """The module cannot be partitioned as asked (too few layers, bad explicit balance)."""


class ScheduleError(AsyncPipeError):
    """A schedule is malformed: a missing or duplicated action, a dependency that can never be met."""


class ShapeError(AsyncPipeError):
    """Tensors crossing a stage boundary are not what the transport negotiated."""


class StageFailure(AsyncPipeError):
    """Another stage of the pipeline failed; this process stops instead of waiting forever."""


class NonFiniteError(AsyncPipeError):
    """NaN or Inf in a stage's output or in the loss (raised when anomaly detection is on)."""


class CheckpointError(PipelineConfigError):
    """A checkpoint file that is missing, truncated or corrupt (named, with what to do)."""
