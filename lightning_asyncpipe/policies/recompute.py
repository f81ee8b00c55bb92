"""No stashing: the backward of a micro-batch re-runs its stage from the stored input.

Policies without weight stashing (PipeMare, Pipelined Backpropagation) run the forward with one
set of weights and the backward with another: the weights current at backward time, possibly
corrected. The forward of a micro-batch whose backward will see other weights runs without
grad (only its input is kept); the backward re-runs the stage with grad on the backward's
weights, replaying the random state of the forward so dropout draws the same mask. Micro-batches
with no update between their forward and backward (all of them on the last stage) keep their
forward graph: recomputing them would give the same result.

``gap(j)``, the number of updates between the forward and the backward of micro-batch ``j`` at
stage ``s``, follows from the 1F1B stream: ``floor(j/m) - floor(max(0, j-(p-1-s))/m)`` counted
from the last fill. The stage's delay ``tau_s`` is its largest gap, ``ceil((p-1-s)/m)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import Tensor, nn

from lightning_asyncpipe.policies.base import WeightPolicy
from lightning_asyncpipe.wgrad import grad_into_live

__all__ = ["RecomputingPolicy", "shifted_weights"]


class _Shifted(torch.autograd.Function):
    """``live - alpha * delta`` written into a reused buffer; its Jacobian in ``live`` is the identity."""

    @staticmethod
    def forward(ctx: Any, live: Tensor, delta: Tensor, alpha: float, holder: list[Tensor]) -> Tensor:
        ctx.set_materialize_grads(False)  # a deferred weight gradient arrives as None: pass it on, no zeros
        out = holder[0]
        torch.sub(live, delta, alpha=alpha, out=out)
        return out.view_as(out)  # a fresh tensor object per call; the buffer itself carries no history

    @staticmethod
    def backward(ctx: Any, grad: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
        return grad, None, None, None


def shifted_weights(named_live: Sequence[tuple[str, nn.Parameter]], deltas: Sequence[Tensor],
                    alphas: Sequence[float], buffers: Sequence[Tensor]) -> dict[str, Tensor]:  # fmt: skip
    """``W - alpha * delta`` for every live weight, written into ``buffers`` (one per weight).

    A fresh weight-sized tensor per weight and call costs page faults on every call (about 1 us
    per 4 KiB page here: 10 ms for 16 MiB), more than the arithmetic; the buffers are reused. The
    results are differentiable in the live weights (identity Jacobian) and marked
    :func:`~lightning_asyncpipe.wgrad.grad_into_live`, so linear layers defer their weight
    gradient as for the live weights. A buffer may be overwritten by the next call: use the
    results within one action (a recomputation and its backward), as the executor does.
    """
    return {
        name: grad_into_live(_Shifted.apply(p, d, float(a), [buf]), p)
        for (name, p), d, a, buf in zip(named_live, deltas, alphas, buffers)
    }


class RecomputingPolicy(WeightPolicy):
    """Base of the policies whose backward sees the current weights, through recomputation."""

    def __init__(self) -> None:
        super().__init__()
        self._replay: dict[int, tuple[Tensor, Optional[list[Tensor]]]] = {}

    @property
    def tau(self) -> int:
        """This stage's delay in updates: ``ceil((p-1-s)/m)``."""
        return math.ceil(self.warmup / self.n_microbatches)

    def gap(self, microbatch: int) -> int:
        return self.updates_before(microbatch, backward=True) - self.updates_before(microbatch, backward=False)

    def forward_weights(self, microbatch: int, gap: int) -> Optional[dict[str, Tensor]]:
        """Weights for the forward (``None``: the live ones)."""
        return None

    def backward_weights(self, microbatch: int, gap: int) -> Optional[dict[str, Tensor]]:
        """Weights for the backward's recomputation, differentiable in the live parameters
        (``None``: the live ones)."""
        return None

    def _run(self, module: nn.Module, inputs: tuple[Tensor, ...], weights: Optional[dict[str, Tensor]]) -> Any:
        return module(*inputs) if weights is None else self.slots().run(module, weights, inputs)

    def forward(self, module: nn.Module, inputs: tuple[Tensor, ...], microbatch: int, training: bool) -> Any:
        if not training:
            return module(*inputs)
        self._note_forward(microbatch, self.updates)
        gap = self.gap(microbatch)
        weights = self.forward_weights(microbatch, gap)
        if gap == 0:
            return self._run(module, inputs, weights)
        cuda = [torch.cuda.get_rng_state()] if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        self._replay[microbatch] = (torch.get_rng_state(), cuda)
        with torch.no_grad():
            return self._run(module, inputs, weights)

    def recomputes(self, microbatch: int) -> bool:
        return microbatch in self._replay

    def recompute(self, module: nn.Module, inputs: tuple[Tensor, ...], microbatch: int) -> Any:
        cpu_state, cuda_state = self._replay.pop(microbatch)
        gap = self.updates - self._forward_version[microbatch]
        devices = [torch.cuda.current_device()] if cuda_state is not None else []
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            torch.set_rng_state(cpu_state)
            if cuda_state is not None:
                torch.cuda.set_rng_state(cuda_state[0])
            return self._run(module, inputs, self.backward_weights(microbatch, gap))

    def _named_live(self) -> list[tuple[str, nn.Parameter]]:
        assert self.module is not None
        return list(self.module.named_parameters())

    @staticmethod
    def _scratch_buffers(scratch: Optional[list[Tensor]], live: Sequence[Tensor]) -> list[Tensor]:
        """``scratch`` if it still matches the shapes of ``live``, else new buffers like them."""
        if scratch is None or [b.shape for b in scratch] != [p.shape for p in live]:
            scratch = [torch.empty_like(p, memory_format=torch.contiguous_format) for p in live]
        return scratch
