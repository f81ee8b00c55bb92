"""The raw engine: pipeline training of a module's ``nn.Sequential`` without Lightning.

One process per stage, in any torch.distributed program (the process group must be initialised).
Every rank calls :meth:`PipelineEngine.train_step` with the same batch; stage 0 uses the inputs,
the last stage the targets. The Lightning strategy is the same machinery plus Lightning's
lifecycle; this class exists for benchmarks and for proving the engine against
:mod:`lightning_asyncpipe.reference`.

Example::

    dist.init_process_group("gloo")
    engine = PipelineEngine(model, n_stages=dist.get_world_size(), policy="pipedream_2bw",
                            microbatches=8, optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-3),
                            loss_fn=F.cross_entropy)
    for x, y in loader:
        loss = engine.train_step(x, y)     # a float on the last stage, None elsewhere
    engine.drain()
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import Any, Callable, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_asyncpipe.comm import PipelineGroups, TorchP2PTransport
from lightning_asyncpipe.executor import PipelineExecutor
from lightning_asyncpipe.microbatch import microbatch_weights, signature, split
from lightning_asyncpipe.locate import Balance
from lightning_asyncpipe.partition import Partition, partition_module
from lightning_asyncpipe.split import StageProgram
from lightning_asyncpipe.pipeline import StagePipeline
from lightning_asyncpipe.policies import WeightPolicy, get_policy
from lightning_asyncpipe.policies.base import StepFn
from lightning_asyncpipe.tied import SharedParameters
from lightning_asyncpipe.topology import Topology

__all__ = ["PipelineEngine"]


class _Batch:
    def __init__(self, inputs: Any, targets: Any, m: int, first: int, loss_fn: Callable[[Any, Any], Tensor],
                 training: bool, partition: Partition) -> None:  # fmt: skip
        self.partition = partition
        self.inputs, self.targets = split(inputs, m), split(targets, m)
        self.weights = microbatch_weights(self.inputs)
        self.first, self.loss_fn, self.training = first, loss_fn, training
        self.losses: list[float] = []
        self.outputs: list[Any] = []

    def key(self, microbatch: int) -> Hashable:
        return (self.training, signature(self.inputs[microbatch - self.first]))

    def stage_inputs(self, microbatch: int) -> tuple[Tensor, ...]:
        x = self.inputs[microbatch - self.first]
        return tuple(x) if isinstance(x, (tuple, list)) else (x,)

    def stage_program(self, microbatch: int) -> StageProgram:
        return self.partition.program(self.stage_inputs(microbatch), {})  # every rank holds the batch

    def stage_outputs(self, microbatch: int, outputs: Any) -> Optional[Tensor]:
        i = microbatch - self.first
        if not self.training:
            self.outputs.append(outputs.detach() if isinstance(outputs, Tensor) else outputs)
            return None
        loss = self.loss_fn(outputs, self.targets[i]) * self.weights[i]
        self.losses.append(float(loss.detach()))
        return loss


class PipelineEngine:
    """Train ``model``'s pipelined ``nn.Sequential`` with one stage per process.

    Args:
        model: a module holding the layers in one top-level ``nn.Sequential`` (or the Sequential).
        n_stages: stages per pipeline; the world holds ``world_size / n_stages`` replicas.
        policy: a policy name or instance.
        microbatches: micro-batches per batch.
        optimizer: builds the stage's optimizer from its parameters.
        loss_fn: ``loss_fn(output, target)``, a mean over the micro-batch's samples.
        lr_scheduler: builds a scheduler from the optimizer; stepped once per batch.
        clip_grad_norm: clip by this norm (over all stages for synchronous policies, per stage
            for asynchronous ones).
        balance: see :mod:`lightning_asyncpipe.partition`.
        device: where this stage runs.
        policy_options: keyword arguments for a policy given by name.
        groups: process groups built earlier for the same layout (engines built one after the
            other in a process can share them).
    """

    def __init__(
        self,
        model: nn.Module,
        n_stages: int,
        policy: Union[str, WeightPolicy],
        microbatches: int,
        optimizer: Callable[[Iterable[nn.Parameter]], Optimizer],
        loss_fn: Callable[[Any, Any], Tensor],
        lr_scheduler: Optional[Callable[[Optimizer], Any]] = None,
        clip_grad_norm: Optional[float] = None,
        balance: Balance = "uniform",
        device: Optional[torch.device] = None,
        policy_options: Optional[dict[str, Any]] = None,
        groups: Optional[PipelineGroups] = None,
    ) -> None:
        self.topology = Topology(dist.get_world_size(), n_stages)
        rank = dist.get_rank()
        self.stage, self.replica = self.topology.stage_of(rank), self.topology.replica_of(rank)
        self.device = device or torch.device("cpu")
        self.groups = groups if groups is not None else PipelineGroups(self.topology, rank)
        holder = model if not isinstance(model, nn.Sequential) else nn.Module()
        if isinstance(model, nn.Sequential):
            holder.net = model
        self.model = holder
        self.partition = partition_module(holder, n_stages, self.stage, balance)
        holder.to(self.device)
        # before the optimizer: a stage that does not own a shared parameter holds a mirror of it
        self.shared = SharedParameters(self.partition.shared, self.partition.local, self.partition.shared_params,
                                       self.stage, self.topology, rank)  # fmt: skip
        self.optimizer = optimizer(self.partition.local.parameters())
        self.scheduler = lr_scheduler(self.optimizer) if lr_scheduler is not None else None
        self.policy = get_policy(policy, **(policy_options or {})) if isinstance(policy, str) else policy
        self.policy.bind(self.stage, n_stages, microbatches, self.partition.local, self.optimizer)
        self.shared.bind(self.policy, microbatches)
        self.clip_grad_norm, self.loss_fn, self.microbatches = clip_grad_norm, loss_fn, microbatches
        t = self.topology
        transport = TorchP2PTransport(
            t.rank_of(self.stage - 1, self.replica) if self.stage > 0 else None,
            t.rank_of(self.stage + 1, self.replica) if self.stage < n_stages - 1 else None,
            self.groups.p2p,
            self.device,
        )
        self.executor = PipelineExecutor(self.partition.local, self.stage, n_stages, transport, self.policy, self._apply)
        if self.shared:
            self.executor.select_shared = self.shared.select
        self.pipeline = StagePipeline(self.executor, microbatches, self.optimizer)
        self.last_timings: list[Any] = []

    @property
    def is_last(self) -> bool:
        return self.stage == self.topology.n_stages - 1

    def _apply(self, batch: int, step_fn: Optional[StepFn] = None) -> None:
        if self.shared:
            self.shared.before_update(batch)  # the owner of a shared parameter gets the holders' gradients
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.topology.n_replicas > 1:
            for p in params:
                if p.grad is not None:
                    dist.all_reduce(p.grad, group=self.groups.stage)
                    p.grad /= self.topology.n_replicas
        if self.clip_grad_norm is not None:
            dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
            squared = sum((p.grad.detach().to(dtype).pow(2).sum() for p in params if p.grad is not None),
                          torch.zeros((), dtype=dtype, device=self.device))  # fmt: skip
            if self.policy.synchronous and self.topology.n_stages > 1:
                dist.all_reduce(squared, group=self.groups.pipeline)
            coef = torch.clamp(self.clip_grad_norm / (squared.sqrt() + 1e-6), max=1.0)
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(coef)
        if step_fn is None:
            self.optimizer.step()
        else:
            step_fn(self.optimizer)
        for g in self.optimizer.param_groups:
            for p in g["params"]:
                p.grad = None
        if self.shared:
            self.shared.after_update()

    def train_step(self, inputs: Any, targets: Any, drain: bool = False) -> Optional[float]:
        """Run one batch; returns its mean loss on the last stage (``None`` elsewhere).

        ``drain=True`` empties the pipeline at the end of the step, before the learning-rate
        scheduler steps (as the Lightning strategy does at epoch end).
        """
        batch = _Batch(inputs, targets, self.microbatches, self.pipeline.first_microbatch, self.loss_fn, True,
                       self.partition)  # fmt: skip
        self.pipeline.train_step(batch)
        if drain:
            self.drain()
        self.last_timings = self.executor.pop_timings()  # bounded: only the last step's
        if self.scheduler is not None:
            self.scheduler.step()
        return sum(batch.losses) if self.is_last else None

    def drain(self) -> None:
        """Complete every micro-batch in flight and apply its update."""
        self.pipeline.drain()
        if self.shared:
            self.shared.settle()

    @torch.no_grad()
    def predict(self, inputs: Any) -> Optional[Any]:
        """Forward one batch (after a drain); the merged outputs on the last stage."""
        batch = _Batch(inputs, inputs, self.microbatches, 0, self.loss_fn, False, self.partition)
        self.pipeline.eval_step(batch)
        return torch.cat(batch.outputs) if self.is_last else None

    def stage_state_dict(self) -> dict[str, Tensor]:
        """This stage's weights, keyed as in the full model (``net.3.weight``)."""
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}
