"""Driving one stage's executor across steps: the actions of each step, fills and drains.

Synchronous policies start and end every step with an empty pipeline. Asynchronous ones keep
the micro-batches of consecutive steps in flight; :meth:`StagePipeline.drain` completes them and
applies their updates (called before validation, before a checkpoint is written, at epoch end
and at the end of fit), and the next step fills the pipeline again from the latest weights.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import replace
from typing import Any, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_asyncpipe.executor import PipelineExecutor, StepHooks
from lightning_asyncpipe.policies.base import StepFn, WeightPolicy
from lightning_asyncpipe.schedule import Action, ActionKind, forward_only

__all__ = ["StagePipeline"]


class _NoHooks:
    """Hooks for action lists without forwards (drains)."""

    def key(self, microbatch: int) -> Hashable:
        raise AssertionError("a drain runs no forward")

    def stage_inputs(self, microbatch: int) -> tuple[Tensor, ...]:
        raise AssertionError("a drain runs no forward")

    def stage_outputs(self, microbatch: int, outputs: Any) -> None:
        raise AssertionError("a drain runs no forward")


class StagePipeline:
    """The step-level state of one stage: step counter, last fill, whether work is in flight, and
    the learning rate of each step.

    [Note: the learning rate of a delayed update] An asynchronous stage applies the update of
    batch ``k`` during a later step, after the LR scheduler has moved on. The update of batch ``k``
    always uses the learning rates the scheduler gave for step ``k`` (recorded when the step
    starts), so a schedule means the same thing for every policy and every number of stages.

    Args:
        executor: this stage's executor (which holds the policy); its ``apply_update`` is wrapped.
        n_microbatches: micro-batches per step.
        optimizer: the stage's optimizer (``None`` when only evaluating).
    """

    def __init__(self, executor: PipelineExecutor, n_microbatches: int, optimizer: Optional[Optimizer] = None) -> None:
        self.executor = executor
        self.n_microbatches = n_microbatches
        self.optimizer = optimizer
        self.step = 0
        self.fill_step = 0
        self.pending = False
        self._apply = executor.apply_update
        self._step_lrs: dict[int, list[float]] = {}
        executor.apply_update = self._apply_with_step_lr

    def _apply_with_step_lr(self, batch: int, step_fn: Optional[StepFn]) -> None:
        lrs = self._step_lrs.pop(batch, None)
        if self.optimizer is None or lrs is None:
            self._apply(batch, step_fn)
            return
        groups = self.optimizer.param_groups
        current = [g["lr"] for g in groups]
        for g, lr in zip(groups, lrs):
            g["lr"] = lr
        try:
            self._apply(batch, step_fn)
        finally:
            for g, lr in zip(groups, current):
                g["lr"] = lr

    @property
    def policy(self) -> WeightPolicy:
        return self.executor.policy

    @property
    def first_microbatch(self) -> int:
        """Global index of the first micro-batch of the next training step."""
        return self.step * self.n_microbatches

    def train_actions(self, n_microbatches: Optional[int] = None) -> list[Action]:
        """This stage's actions of the next step; ``n_microbatches`` fewer than usual (a short batch,
        synchronous policies only) keep the usual numbering: micro-batches ``step*m ..``."""
        ex, m = self.executor, self.n_microbatches
        n = m if n_microbatches is None else n_microbatches
        if n == m:
            return self.policy.step_actions(ex.n_stages, m, ex.stage, self.step, self.fill_step)
        if not self.policy.synchronous or not 1 <= n < m:
            raise ValueError(f"a step of {n} micro-batches needs a synchronous policy and 1 <= n < {m}")
        actions = self.policy.step_actions(ex.n_stages, n, ex.stage, self.step, self.fill_step)
        return [a if a.kind is ActionKind.UPDATE else replace(a, index=a.index - self.step * n + self.step * m)
                for a in actions]  # fmt: skip

    def train_step(self, hooks: StepHooks, n_microbatches: Optional[int] = None) -> None:
        """Run this stage's actions of one training step (of ``n_microbatches`` for a short batch)."""
        if self.optimizer is not None:
            self._step_lrs[self.step] = [g["lr"] for g in self.optimizer.param_groups]
        self.executor.run(self.train_actions(n_microbatches), hooks, train=True)
        self.step += 1
        self.pending = not self.policy.synchronous

    def drain(self) -> None:
        """Complete every micro-batch in flight and apply its update; the next step refills."""
        if self.pending:
            ex = self.executor
            actions = self.policy.drain_actions(ex.n_stages, self.n_microbatches, ex.stage, self.step - 1, self.fill_step)
            # Drains are requested from Lightning's evaluation and checkpoint hooks, which run under
            # inference mode: backward passes, recomputation and updates need autograd back.
            with torch.inference_mode(False), torch.enable_grad():
                ex.run(actions, _NoHooks(), train=True)
            self.pending = False
        self.fill_step = self.step
        self.executor.transport.wait_sends()

    def state_dict(self) -> dict[str, Any]:
        """The step counter and the policy's state (:meth:`WeightPolicy.state_dict`), taken after a
        drain: what a resumed run needs to continue exactly (checkpoints drain first)."""
        if self.pending:
            raise RuntimeError("StagePipeline.state_dict needs a drained pipeline: call drain() first")
        return {"policy": self.policy.name, "step": self.step, **self.policy.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a drained pipeline's (possibly merged over stages) :meth:`state_dict`."""
        self.step = self.fill_step = int(state["step"])
        self.pending = False
        self.policy.load_state_dict(state)

    def eval_step(self, hooks: StepHooks, n_microbatches: Optional[int] = None) -> None:
        """Forward one batch (of ``n_microbatches``, default the usual) for evaluation; drains first
        so evaluation sees the latest weights."""
        self.drain()
        ex = self.executor
        n = self.n_microbatches if n_microbatches is None else n_microbatches
        self.executor.run(forward_only(ex.n_stages, n)[ex.stage], hooks, train=False)
