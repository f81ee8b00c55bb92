"""PipeMare: asynchronous pipelines without weight stashing (Yang et al., MLSys 2021).

The forward of micro-batch ``j`` at stage ``s`` uses the latest weights (as PipeDream), the
backward the weights current at backward time, ``gap(j)`` updates newer, by recomputing the stage
from its stored input: one weight copy per stage instead of ``p - s``.

Step x stage table, p = 3, m = 1 (``B0w1``: backward of micro-batch 0 on ``W_s(1)``)::

    stage 0:  F0v0 F1v0 F2v0 B0w0 U F3v1 B1w1 U F4v2 B2w2 U ...   forward 2 updates stale
    stage 1:       F0v0 F1v0 B0w0 U F2v1 B1w1 U F3v2 B2w2 U ...   forward 1 update stale
    stage 2:            F0v0 B0w0 U F1v1 B1w1 U ...                no delay

Two techniques, each switchable:

1. **Learning-rate rescheduling** (section 3.1): stage ``s`` with delay ``tau_s >= 1`` uses
   ``lr(k) * tau_s ** -(1 - min(k / K, 1))`` for its ``k``-th update, multiplying whatever the LR
   scheduler gives. The paper's analysis of delayed SGD on a quadratic shows stability needs
   ``lr <~ 1 / (lambda * tau)``: the most delayed stages start with ``1/tau`` of the step and
   anneal to the full step over ``K`` updates, by which time the weights move slowly.
   Default ``K = 500`` updates (the paper anneals over a few epochs; set it to about that many
   updates for long runs).
2. **Discrepancy correction** (section 3.2): keep a velocity ``delta <- g*delta + (1-g)*(W(t+1) -
   W(t))`` per stage and run the backward of micro-batch ``j`` on ``W - gap(j) * delta``, an
   estimate of the weights its forward used, at the cost of two weight-sized buffers (the
   velocity, and a scratch for the corrected weights and the weights before an update). Default
   ``g = 0.5``, i.e. the paper's ``D ** (1 / tau)`` with ``D = 0.5`` for ``tau = 1``: a short
   memory, as the correction extrapolates over only ``tau`` updates.

Defaults: both on.
"""

from __future__ import annotations

from typing import ClassVar, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_asyncpipe.errors import PipelineConfigError
from lightning_asyncpipe.policies.base import ApplyUpdate
from lightning_asyncpipe.policies.recompute import RecomputingPolicy, shifted_weights
from lightning_asyncpipe.policies.registry import register_policy

__all__ = ["PipeMarePolicy", "pipemare_lr_factor"]


def pipemare_lr_factor(tau: int, update: int, anneal_updates: int) -> float:
    """Technique 1's factor for a stage with delay ``tau`` at its ``update``-th update."""
    if tau < 1:
        return 1.0
    progress = 1.0 if anneal_updates <= 0 else min(update / anneal_updates, 1.0)
    return float(tau) ** -(1.0 - progress)


@register_policy
class PipeMarePolicy(RecomputingPolicy):
    """PipeMare with learning-rate rescheduling and discrepancy correction.

    Args:
        lr_rescheduling: technique 1.
        anneal_updates: ``K``, updates over which technique 1 anneals to the plain schedule.
        discrepancy_correction: technique 2.
        velocity_decay: ``g`` of technique 2's velocity.
    """

    name: ClassVar[str] = "pipemare"

    def __init__(self, lr_rescheduling: bool = True, anneal_updates: int = 500,
                 discrepancy_correction: bool = True, velocity_decay: float = 0.5) -> None:  # fmt: skip
        super().__init__()
        if anneal_updates < 0 or not 0.0 <= velocity_decay < 1.0:
            raise PipelineConfigError(
                f"PipeMarePolicy needs anneal_updates >= 0 and 0 <= velocity_decay < 1, got {anneal_updates}, "
                f"{velocity_decay}."
            )
        self.lr_rescheduling, self.anneal_updates = lr_rescheduling, anneal_updates
        self.discrepancy_correction, self.velocity_decay = discrepancy_correction, velocity_decay
        self._velocity: Optional[list[Tensor]] = None
        # one weight-sized scratch: the corrected weights of a recomputed backward, and the weights
        # before an update (never needed at the same time)
        self._scratch: Optional[list[Tensor]] = None

    def backward_weights(self, microbatch: int, gap: int) -> Optional[dict[str, Tensor]]:
        if not self.discrepancy_correction or self._velocity is None or gap == 0:
            return None
        named = self._named_live()
        self._scratch = self._scratch_buffers(self._scratch, [p for _, p in named])
        return shifted_weights(named, self._velocity, [gap] * len(named), self._scratch)

    def lr_factor(self) -> float:
        return pipemare_lr_factor(self.tau, self.updates, self.anneal_updates) if self.lr_rescheduling else 1.0

    def update(self, batch: int, apply: ApplyUpdate) -> None:
        factor = self.lr_factor()
        correcting = self.discrepancy_correction and self.tau >= 1  # the last stage never needs it
        before = None
        if correcting:
            live = [p.detach() for _, p in self._named_live()]
            before = self._scratch = self._scratch_buffers(self._scratch, live)
            torch._foreach_copy_(before, live)

        def step(optimizer: Optimizer) -> None:
            saved = [g["lr"] for g in optimizer.param_groups]
            for g in optimizer.param_groups:
                g["lr"] = g["lr"] * factor
            try:
                optimizer.step()
            finally:
                for g, lr in zip(optimizer.param_groups, saved):
                    g["lr"] = lr

        apply(batch, step if factor != 1.0 else None)
        if before is not None:
            live = [p.detach() for _, p in self._named_live()]
            if self._velocity is None:
                self._velocity = [torch.zeros_like(p) for p in live]
            g = self.velocity_decay
            # delta <- g * delta + (1 - g) * (new - old), in place: (old - new) * -(1 - g) is the same
            # float as (new - old) * (1 - g), and no weight-sized temporaries are allocated
            torch._foreach_sub_(before, live)
            torch._foreach_mul_(self._velocity, g)
            torch._foreach_add_(self._velocity, before, alpha=-(1.0 - g))
        self._finish_update(batch)

    def extra_buffers(self) -> int:
        return 2 if self.discrepancy_correction and self.tau >= 1 else 0  # the velocity and the scratch

    def _named_buffers(self) -> dict[str, dict[str, Tensor]]:
        if self._velocity is None:
            return {}
        return {"velocity": {n: d for (n, _), d in zip(self._named_live(), self._velocity)}}

    def _load_buffers(self, buffers: dict[str, dict[str, Tensor]]) -> None:
        velocity = buffers.get("velocity")
        if velocity is None or self.tau < 1:
            self._velocity = None
            return
        # a stage that had no delay before the layout changed had no velocity: it starts at zero
        self._velocity = [velocity[n].clone() if n in velocity else torch.zeros_like(p) for n, p in self._named_live()]
