"""The strategy's checks of the module and the Trainer, before and at setup, and the measured
balance (mixed into :class:`~lightning_asyncpipe.strategy.AsyncPipeStrategy`)."""

from __future__ import annotations

import logging
from typing import Any

import torch.distributed as dist
from lightning.pytorch import LightningModule, Trainer
from torch import nn

from lightning_asyncpipe.errors import PipelineConfigError
from lightning_asyncpipe.policies import policy_class
from lightning_asyncpipe.locate import (
    MEASURED_BALANCES,
    balance_by_cost,
    check_parameters_inside,
    example_call,
    find_pipelined,
)
from lightning_asyncpipe.partition import plan_partition
from lightning_asyncpipe.profiling import layer_costs, profile_layers, sequential_input

__all__ = ["ChecksGlue"]

log = logging.getLogger(__name__)


class ChecksGlue:
    """Mixin of :class:`~lightning_asyncpipe.strategy.AsyncPipeStrategy`; see the module docstring."""

    def _check_module(self, module: LightningModule) -> None:
        """Everything about the module that can be checked before processes start."""
        name = type(self).__name__
        if not module.automatic_optimization:
            raise PipelineConfigError(
                f"{name} does not support manual optimization: the pipeline runs the backward passes and applies the "
                "updates itself. Remove `self.automatic_optimization = False` and return the loss from training_step."
            )
        attr = find_pipelined(module, self.sequential)
        check_parameters_inside(module, attr)
        balance = self.balance
        if balance in MEASURED_BALANCES:
            layers = module.get_submodule(attr)
            if not isinstance(layers, nn.Sequential):
                raise PipelineConfigError(
                    f"balance={self.balance!r} profiles the layers of an nn.Sequential, but '{attr}' is a "
                    f"{type(layers).__name__}. Use balance='parameters', a list of block counts per stage, or "
                    "split_points=[...]."
                )
            sequential_input(module, layers, self.microbatches)  # an example to profile?
            balance = "uniform"  # the measured counts come at setup; enough layers?
        # capture and split as setup will (a forward that cannot be captured, bad split points, too
        # few blocks): in the main process, before any other starts
        plan_partition(module, self.n_stages, balance, attr, self.split_points, self.leaf_modules,
                       example_call(module, attr))  # fmt: skip

    def _check_trainer(self, trainer: Trainer) -> None:
        name = type(self).__name__
        if trainer.accumulate_grad_batches != 1 and not policy_class(self.policy_name).synchronous:
            raise PipelineConfigError(
                f"{name}(policy={self.policy_name!r}) does not support accumulate_grad_batches="
                f"{trainer.accumulate_grad_batches}: an asynchronous policy applies one update per batch (its weight "
                "versions count batches). Use a larger batch (or more micro-batches) instead, or a synchronous "
                "policy (gpipe, pipedream_flush, zero_bubble), which accumulates as Lightning does."
            )
        scaler = getattr(self.precision_plugin, "scaler", None)
        if scaler is not None:
            raise PipelineConfigError(
                f"{name} does not support precision='16-mixed' (a gradient scaler cannot see the loss on every stage). "
                "Use precision='bf16-mixed' or '32-true'."
            )

    def _measured_balance(self, module: LightningModule) -> list[int]:
        """``balance="time"`` / ``"memory"``: profile every layer on this rank's device, average the
        costs over all ranks (so every rank partitions alike) and minimise the largest stage."""
        layers = module.get_submodule(find_pipelined(module, self.sequential))
        sample = sequential_input(module, layers, self.microbatches)
        profiles = profile_layers(layers, sample, self.root_device, microbatches=self.microbatches,
                                  defer_weight_grad=self.defer_weight_grad)  # fmt: skip
        costs = layer_costs(profiles, str(self.balance), self.microbatches, self.n_stages)
        everyone: list[Any] = [None] * self.world_size
        dist.all_gather_object(everyone, costs)
        costs = [sum(c[i] for c in everyone) / len(everyone) for i in range(len(costs))]
        counts = balance_by_cost(costs, self.n_stages, [any(True for _ in layer.parameters()) for layer in layers])
        self.measured_costs, self.resolved_balance = costs, counts
        unit, scale = ("ms", 1e3) if self.balance == "time" else ("MiB", 2**-20)
        per_stage, i = [], 0
        for n in counts:
            per_stage.append(sum(costs[i : i + n]) * scale)
            i += n
        log.info(f"balance={self.balance!r}: layers per stage {counts}, cost per stage "
                 f"{[round(c, 2) for c in per_stage]} {unit} (per micro-batch)")  # fmt: skip
        return counts
