"""PipeDream-2BW: double-buffered weights (Narayanan et al., ICML 2021, section 3.1).

Every micro-batch of batch ``k`` uses ``W(max(0, k-1))`` for its forward and backward, at every
stage, so ``W(k+1) = W(k) - lr * step(mean gradient at W(k-1))``: a uniform delay of one update,
independent of the number of stages. Two versions per stage suffice when ``m >= p`` (the
micro-batches of batch ``k+1`` a stage forwards before its update of batch ``k`` all use ``W(k)``).
The delay is kept across drains: a drain completes batch ``k``, and batch ``k+1`` still uses
``W(k)``, so where validation or checkpoints happen does not change the result.

Step x stage table, p = 2, m = 2 (``F2v0``: forward of micro-batch 2 on ``W(0)``)::

    stage 0:  F0v0 F1v0 B0 F2v0 B1 U0 F3v0 B2 F4v1 B3 U1 F5v1 ...
    stage 1:       F0v0 B0 F1v0 B1 U0 F2v0 B2 F3v0 B3 U1 F4v1 ...
"""

from __future__ import annotations

from typing import ClassVar

from lightning_asyncpipe.errors import PipelineConfigError
from lightning_asyncpipe.policies.registry import register_policy
from lightning_asyncpipe.policies.stash import StashingPolicy

__all__ = ["PipeDream2BWPolicy"]


@register_policy
class PipeDream2BWPolicy(StashingPolicy):
    """PipeDream-2BW: uniform one-update delay, two weight buffers per stage."""

    name: ClassVar[str] = "pipedream_2bw"

    def validate(self, n_stages: int, n_microbatches: int) -> None:
        if n_microbatches < n_stages:
            raise PipelineConfigError(
                f"Policy {self.name!r} needs microbatches >= stages so that two weight buffers suffice, got "
                f"microbatches={n_microbatches} with {n_stages} stages. Use microbatches >= {n_stages}."
            )

    def forward_version(self, microbatch: int) -> int:
        return max(0, microbatch // self.n_microbatches - 1)

    def forward_version_at(self, stage: int, microbatch: int) -> int:
        return self.forward_version(microbatch)  # the same at every stage
