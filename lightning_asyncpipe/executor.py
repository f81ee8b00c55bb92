"""The one interpreter: runs a stage's list of actions with a transport and a weight policy.

Each call to :meth:`PipelineExecutor.run` executes one Lightning step's actions in order::

    F(j)  1. get the stage input: stage 0 asks the hooks (the user's step up to the pipelined
             nn.Sequential), other stages wait for the receive posted at the start of the step
          2. run the layers through ``policy.forward`` (the policy picks the weight version)
          3. last stage: hand the output to the hooks (the user's step computes the loss), keep the
             loss; other stages: send the output, keep (input, output) and post the receive of
             its gradient
    B(j)  4. backpropagate the kept loss, or the output with the received gradient (the
             ``nn.Linear`` weight gradients are deferred: their ``(x, g)`` kept, tagged ``j``)
          5. send the input's gradient to the previous stage
    W(j)  compute micro-batch ``j``'s deferred weight gradients (zero-bubble schedules only)
    U(k)  6. complete the deferred weight gradients still kept (:mod:`lightning_asyncpipe.wgrad`), then
             ``policy.update(k, apply)``: the policy decides which weights the update lands on,
             ``apply`` performs one optimizer update of the live weights

Each step is atomic with respect to the other stages: everything a step receives is sent by a
neighbour in the same or an earlier step (see :mod:`lightning_asyncpipe.schedule`), so a barrier
or collective between two steps cannot deadlock.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Protocol

import torch
from torch import Tensor, nn

from lightning_asyncpipe.comm import PendingRecv, TensorMeta, Transport
from lightning_asyncpipe.errors import AsyncPipeError, NonFiniteError, PipelineConfigError
from lightning_asyncpipe.partition import computing
from lightning_asyncpipe.policies.base import ApplyUpdate, WeightPolicy
from lightning_asyncpipe.schedule import Action, ActionKind
from lightning_asyncpipe.wgrad import DeferredWeightGrad

__all__ = ["StepHooks", "PipelineExecutor", "ActionTiming", "as_tensors"]


class StepHooks(Protocol):
    """What the executor needs from the code around it for one step."""

    def key(self, microbatch: int) -> Hashable:
        """A hashable description of micro-batch ``microbatch``'s input shapes."""
        ...

    def stage_inputs(self, microbatch: int) -> tuple[Tensor, ...]:
        """Stage 0 only: the input of the first layer for ``microbatch``."""
        ...

    def stage_outputs(self, microbatch: int, outputs: Any) -> Optional[Tensor]:
        """Last stage only: consume the pipeline's output; return the weighted loss to backpropagate
        (training) or ``None`` (evaluation)."""
        ...

    # Optional: ``stage_program(microbatch) -> Optional[StageProgram]``, this stage's program for
    # the micro-batch's call of the pipelined module (after ``stage_inputs`` on stage 0); without
    # it (or ``None``) the stage module's own program runs.


@dataclass(frozen=True)
class ActionTiming:
    """When one action ran on this stage and how long it waited for a transfer."""

    action: Action
    start: float
    end: float
    wait: float


def as_tensors(outputs: Any, stage: int) -> tuple[Tensor, ...]:
    """A stage's output as a tuple of tensors, or a clear error."""
    items = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    if not items or not all(isinstance(t, Tensor) for t in items):
        raise PipelineConfigError(
            f"Stage {stage} produced {type(outputs).__name__} "
            f"{[type(t).__name__ for t in items] if isinstance(outputs, (tuple, list)) else ''}: only a tensor or a "
            "tuple of tensors can cross a stage boundary. Return tensors from the layers at stage boundaries, or "
            "choose another balance."
        )
    return tuple(items)


def _no_program(microbatch: int) -> None:
    return None


def _nbytes(tensors: Sequence[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class PipelineExecutor:
    """Runs one stage's actions.

    Args:
        module: the stage's layers.
        stage: this stage's index.
        n_stages: stages in the pipeline.
        transport: how tensors reach the neighbouring stages.
        policy: the weight-version policy.
        apply_update: performs one optimizer update of the live weights (called by the policy, which
            may pass its own step function).
        defer_weight_grad: compute ``nn.Linear`` weight gradients once per batch, at the update
            (:class:`~lightning_asyncpipe.wgrad.DeferredWeightGrad`).
    """

    def __init__(
        self,
        module: nn.Module,
        stage: int,
        n_stages: int,
        transport: Transport,
        policy: WeightPolicy,
        apply_update: ApplyUpdate,
        defer_weight_grad: bool = True,
    ) -> None:
        self.module, self.stage, self.n_stages = module, stage, n_stages
        self.transport, self.policy, self.apply_update = transport, policy, apply_update
        self.is_first, self.is_last = stage == 0, stage == n_stages - 1
        self._in_flight: dict[int, tuple[tuple[Tensor, ...], tuple[Tensor, ...], tuple[bool, ...]]] = {}
        self._act_recv: dict[int, PendingRecv] = {}
        self._grad_recv: dict[int, PendingRecv] = {}
        self._programs: dict[int, Any] = {}
        self.timings: list[ActionTiming] = []
        self.record_timings = True
        self.check_finite = False
        self.activation_bytes = 0
        self.peak_activation_bytes = 0
        self.wgrad = DeferredWeightGrad(module) if defer_weight_grad else None
        self.select_shared: Optional[Callable[[int, bool], None]] = None
        """Called before each pass of a micro-batch, ``(microbatch, training)``: puts the owner's
        version of parameters another stage owns into place (:mod:`lightning_asyncpipe.tied`)."""

    def close(self) -> None:
        """Give the stage's layers back unmodified (the deferred-gradient forwards are removed)."""
        if self.wgrad is not None:
            self.wgrad.remove()
            self.wgrad = None

    @property
    def in_flight(self) -> list[int]:
        """Micro-batches forwarded on this stage and not yet backpropagated."""
        return sorted(self._in_flight)

    def run(self, actions: Sequence[Action], hooks: StepHooks, train: bool = True) -> None:
        """Execute ``actions`` in order (``train=False``: forwards only, no state kept)."""
        if not self.is_first:
            for a in actions:
                if a.kind is ActionKind.FORWARD:
                    self._act_recv[a.index] = self.transport.recv_activation(hooks.key(a.index))
        if self.wgrad is not None:
            self.wgrad.active = train
        for a in actions:
            waited = self.transport.wait_seconds
            start = time.perf_counter()
            if a.kind is ActionKind.FORWARD:
                self._forward(a.index, hooks, train)
            elif a.kind is ActionKind.BACKWARD:
                self._backward(a.index)
            elif a.kind is ActionKind.WEIGHT:
                if self.wgrad is not None:  # without deferral B computed the weight gradients
                    self.wgrad.flush(a.index)
            else:
                if self.wgrad is not None:
                    self.wgrad.flush()
                self.policy.update(a.index, self.apply_update)
            if self.record_timings:
                self.timings.append(ActionTiming(a, start, time.perf_counter(), self.transport.wait_seconds - waited))

    def _forward(self, j: int, hooks: StepHooks, train: bool) -> None:
        inputs = hooks.stage_inputs(j) if self.is_first else self._act_recv.pop(j).wait()
        program = getattr(hooks, "stage_program", _no_program)(j)
        if self.select_shared is not None:
            self.select_shared(j, train)
        if train:
            self._programs[j] = program  # a recomputation in the backward runs the same program
        with computing(self.module, program):
            outputs = self.policy.forward(self.module, inputs, j, train)
        if self.check_finite:
            self._check_finite(as_tensors(outputs, self.stage), j, "output")
        if self.is_last:
            loss = hooks.stage_outputs(j, outputs)
            if self.check_finite and isinstance(loss, Tensor):
                self._check_finite((loss,), j, "loss")
            if train:
                if loss is None or not isinstance(loss, Tensor) or not loss.requires_grad:
                    raise PipelineConfigError(
                        f"The training step returned {type(loss).__name__} for micro-batch {j}: in automatic "
                        "optimization it must return a loss tensor that requires grad (or a dict with 'loss')."
                    )
                self._keep(j, (inputs, (loss,), (True,)))
            return
        out = as_tensors(outputs, self.stage)
        # outputs of a forward that the backward recomputes carry no graph yet: every floating
        # output is then differentiable
        recompute = train and self.policy.recomputes(j)
        flags = tuple(t.requires_grad or (recompute and t.is_floating_point()) for t in out)
        if train and not any(flags):
            raise PipelineConfigError(
                f"Stage {self.stage}'s output for micro-batch {j} does not require grad, so no gradient can flow back "
                "through the pipeline. Make sure the layers before this stage boundary have trainable parameters "
                "or take inputs that require grad."
            )
        self.transport.send_activation(out, hooks.key(j), flags)
        if train:
            self._keep(j, (inputs, out, flags))
            self._grad_recv[j] = self.transport.recv_grad([TensorMeta.of(t) for t, f in zip(out, flags) if f])

    def _backward(self, j: int) -> None:
        try:
            inputs, outputs, flags = self._in_flight.pop(j)
        except KeyError:
            raise AsyncPipeError(f"Stage {self.stage} has no forward state for micro-batch {j}.") from None
        self.activation_bytes -= _nbytes(inputs) + _nbytes(outputs)
        if self.wgrad is not None:
            self.wgrad.microbatch = j
        if self.is_last:
            torch.autograd.backward(outputs[0])
        else:
            grads = self._grad_recv.pop(j).wait()
            if self.policy.recomputes(j):
                if self.select_shared is not None:
                    self.select_shared(j, True)
                with computing(self.module, self._programs.get(j)):
                    outputs = as_tensors(self.policy.recompute(self.module, inputs, j), self.stage)
            pairs = [(t, g) for t, g in zip([t for t, f in zip(outputs, flags) if f], grads) if t.requires_grad]
            torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
        self._programs.pop(j, None)
        self.policy.after_backward(j)
        if not self.is_first:
            self.transport.send_grad(
                [x.grad if x.grad is not None else torch.zeros_like(x) for x in inputs if x.requires_grad]
            )

    def _check_finite(self, tensors: Sequence[Tensor], j: int, what: str) -> None:
        for i, t in enumerate(tensors):
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad = "NaN" if bool(torch.isnan(t).any()) else "Inf"
                where = f"tensor {i} of the " if len(tensors) > 1 else ""
                raise NonFiniteError(
                    f"{bad} in {where}{what} of stage {self.stage} for micro-batch {j} (micro-batches are numbered "
                    "from the start of fit). Lower the learning rate, clip gradients, or check the data; this check "
                    "runs because anomaly detection is on."
                )

    def _keep(self, j: int, state: tuple[tuple[Tensor, ...], tuple[Tensor, ...], tuple[bool, ...]]) -> None:
        self._in_flight[j] = state
        self.activation_bytes += _nbytes(state[0]) + _nbytes(state[1])
        self.peak_activation_bytes = max(self.peak_activation_bytes, self.activation_bytes)

    def pop_peak_activation_bytes(self) -> int:
        """The most bytes of stage inputs and outputs kept for backward since the last call."""
        peak, self.peak_activation_bytes = self.peak_activation_bytes, self.activation_bytes
        return peak

    def pop_timings(self) -> list[ActionTiming]:
        timings, self.timings = self.timings, []
        return timings
