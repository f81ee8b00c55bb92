"""The strategy's optimizer and checkpoint side: the one optimizer, the update a policy applies
(replica averaging, shared parameters, clipping), and consolidated checkpoints of weights,
optimizer state and pipeline state (mixed into :class:`~lightning_asyncpipe.strategy.AsyncPipeStrategy`)."""

from __future__ import annotations

import copy
from collections.abc import Generator, Mapping
from contextlib import contextmanager
from typing import Any, Callable, Optional, Union

import torch
import torch.distributed as dist
from lightning.pytorch import Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_asyncpipe.checkpoint import (
    PIPELINE_STATE_KEY,
    load_optimizer_state_by_name,
    merge_optimizer_states,
    merge_pipeline_states,
    optimizer_state_by_name,
)
from lightning_asyncpipe.errors import PipelineConfigError
from lightning_asyncpipe.partition import Partition, materialize
from lightning_asyncpipe.policies import policy_class
from lightning_asyncpipe.policies.base import StepFn
from lightning_asyncpipe.strategy_handoff import _to_cpu

__all__ = ["StateGlue"]


class StateGlue:
    """Mixin of :class:`~lightning_asyncpipe.strategy.AsyncPipeStrategy`; see the module docstring."""

    @override
    def setup_optimizers(self, trainer: Trainer) -> None:
        from lightning.pytorch.core.optimizer import _init_optimizers_and_lr_schedulers

        def several(n: Any) -> PipelineConfigError:
            return PipelineConfigError(
                f"{type(self).__name__} supports exactly one optimizer, but configure_optimizers returned {n}. "
                "Use one optimizer with several parameter groups instead (manual optimization is not supported)."
            )

        try:
            optimizers, self.lr_scheduler_configs = _init_optimizers_and_lr_schedulers(self.lightning_module)
        except (MisconfigurationException, RuntimeError) as err:  # Lightning's own check suggests manual optimization
            if "multiple optimizers" in str(err):
                raise several("several") from err
            raise
        except ValueError as err:  # torch: "optimizer got an empty parameter list"
            if "empty parameter list" not in str(err):
                raise
            raise PipelineConfigError(
                f"configure_optimizers built an optimizer over parameters that stage {self.stage} does not hold: each "
                f"stage's process holds only its own layers. This happens with several optimizers (e.g. a GAN's "
                f"generator and discriminator), which {type(self).__name__} does not support, or with an optimizer "
                "over some submodule's parameters only. Use one optimizer over self.parameters() (parameter groups "
                "for different settings)."
            ) from err
        if len(optimizers) != 1:
            raise several(len(optimizers))
        for opt in optimizers:
            # The pipeline owns the gradients: partial sums of in-flight micro-batches must survive
            # Lightning's zero_grad between steps. The executor clears gradients after each update.
            opt.zero_grad = _keep_gradients  # type: ignore[method-assign]
        self.optimizers = optimizers

    def _apply_update(self, batch: int, step_fn: Optional[StepFn] = None) -> None:
        """One optimizer update of this stage's live weights (called by the policy at a ``U`` action)."""
        assert self.lightning_module is not None
        optimizer = self.optimizers[0]
        if self._shared:
            self._shared.before_update(batch)  # the owner of a shared parameter gets the holders' gradients
        trainer = self.lightning_module.trainer
        if (trainer.accumulate_grad_batches > 1 and self._policy is not None and self._policy.synchronous
                and trainer.fit_loop.epoch_loop._should_accumulate()):  # fmt: skip
            # accumulate_grad_batches (synchronous policies, whose U of a batch runs in its own step):
            # Lightning steps the optimizer after this batch only at the accumulation boundary; the
            # gradients stay for the next batch
            if self._shared:
                self._shared.after_update()
            return
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if self.topology.n_replicas > 1:
            grads = [p.grad for p in params if p.grad is not None]
            if grads:
                flat = torch._utils._flatten_dense_tensors(grads)
                dist.all_reduce(flat, group=self._groups.stage if self._groups else None)
                flat /= self.topology.n_replicas
                for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
                    g.copy_(synced)
        # on_before_optimizer_step hooks and gradient clipping, as Lightning runs them after a closure
        self.precision_plugin._after_closure(self.lightning_module, optimizer)
        if step_fn is None:
            optimizer.step()
        else:
            step_fn(optimizer)
        for group in optimizer.param_groups:  # the policy may have swapped parameters in
            for p in group["params"]:
                p.grad = None
        if self._shared:
            self._shared.after_update()  # the owner sends the new weights to the other holders

    def _skip_step(self) -> None:
        """A batch the user's ``training_step`` skipped (returned ``None``), on every stage. Like
        Lightning, the optimizer still steps at the end of a gradient-accumulation window, over the
        window's other batches (accumulation is synchronous only: nothing is in flight)."""
        assert self.lightning_module is not None and self._pipeline is not None
        self._skipping = True  # Lightning's check of a None step output sees the replicas only
        trainer = self.lightning_module.trainer
        if self._policy is not None and self._policy.synchronous and trainer.accumulate_grad_batches > 1 \
                and not trainer.fit_loop.epoch_loop._should_accumulate():  # fmt: skip
            # through the policy, as a U action would: its update count (which the mirrors of
            # shared parameters follow, one weight message per update) stays the same on every stage
            assert self._executor is not None
            self._policy.update(max(self._pipeline.step - 1, 0), self._executor.apply_update)

    def _clip_grad_by_norm(self, optimizer: Optimizer, clip_val: Union[int, float]) -> None:
        """Clip by the norm over *all* stages for synchronous policies (exactly what one device does),
        by the stage's own norm for asynchronous ones (stages update at different times)."""
        assert self._policy is not None
        params = [p for p in self.precision_plugin.main_params(optimizer) if p.grad is not None]
        grads = [p.grad for p in params]
        device = grads[0].device if grads else self.root_device
        # float32 at least, float64 for a float64 model (every stage: the sum is all-reduced)
        dtype = torch.float64 if any(p.dtype == torch.float64 for p in self.precision_plugin.main_params(optimizer)) \
            else torch.float32  # fmt: skip
        squared = torch.zeros((), dtype=dtype, device=device)
        for p in params:  # a shared parameter is its owner's only
            squared += p.grad.detach().to(dtype).pow(2).sum()
        if self._policy.synchronous and self.topology.n_stages > 1:
            dist.all_reduce(squared, group=self._groups.pipeline if self._groups else None)
        coef = torch.clamp(float(clip_val) / (squared.sqrt() + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype))

    @override
    def backward(self, closure_loss: Tensor, optimizer: Optional[Optimizer], *args: Any, **kwargs: Any) -> Tensor:
        # the executor has already backpropagated every micro-batch inside training_step
        return closure_loss

    @override
    def optimizer_step(self, optimizer: Any, closure: Callable[[], Any], model: Any = None, **kwargs: Any) -> Any:
        # Running the closure runs training_step, i.e. the pipeline, whose U actions apply the updates.
        try:
            return closure()
        finally:
            self._skipping = False

    @contextmanager
    def block_backward_sync(self) -> Generator[None, None, None]:
        # Lightning runs the closure of a batch inside an accumulation window here (no optimizer_step)
        try:
            yield None
        finally:
            self._skipping = False

    def _gather_stages_to_zero(self, local: Any) -> Optional[list[Any]]:
        assert self._groups is not None
        return self._groups.gather_to_zero(_to_cpu(local))

    def _gather_stages(self, local: Any) -> list[Any]:
        assert self._groups is not None
        return self._groups.all_gather(_to_cpu(local))

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        assert self.lightning_module is not None
        if self._partition is None:  # after teardown every rank holds the whole, drained module again
            return self.lightning_module.state_dict()
        self.drain()  # a checkpoint holds no half-applied batch
        parts = self._gather_stages_to_zero(self.lightning_module.state_dict())
        return {} if parts is None else {k: v for part in parts for k, v in part.items()}

    @override
    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        module = self.lightning_module
        assert module is not None
        # each stage's optimizer holds its own layers' state, during fit and after teardown alike
        parts = self._gather_stages_to_zero(optimizer_state_by_name(optimizer, module))
        if parts is None:
            return {}
        if self._partition is not None:
            prefix = self._partition.attr + "."
            order = [prefix + n for n, _ in _named_parameters_of(self._partition)]
        else:  # after teardown: the module is whole again
            order = [n for n, _ in module.named_parameters(remove_duplicate=False)]
        return merge_optimizer_states(parts, order)

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        module = self.lightning_module
        assert module is not None
        try:
            super().load_model_state_dict(checkpoint, strict=strict)
        except RuntimeError as err:  # missing / unexpected keys, size mismatches
            raise PipelineConfigError(
                f"The checkpoint's weights do not fit {type(module).__name__}: it was written for another model (or "
                f"another configuration of it). Check ckpt_path. PyTorch reports: {err}"
            ) from err

    @override
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        # Lightning restores the training state (loops, then optimizers) through this hook when
        # fitting: the pipeline's own state comes back with the optimizer's.
        assert self.lightning_module is not None
        for optimizer, saved in zip(self.optimizers, checkpoint["optimizer_states"]):
            load_optimizer_state_by_name(optimizer, self.lightning_module, saved)
        self._load_pipeline_state(checkpoint.get(PIPELINE_STATE_KEY))

    def _load_pipeline_state(self, saved: Optional[Mapping[str, Any]]) -> None:
        """Continue the step counter and the policy's state (stashed versions, velocity, counters)."""
        assert self._pipeline is not None and self._policy is not None
        if saved is None:
            return  # a checkpoint without pipeline state (e.g. of a plain run): start the policy fresh
        if saved["policy"] != self._policy.name and not (
            self._policy.synchronous and policy_class(saved["policy"]).synchronous
        ):
            raise PipelineConfigError(
                f"This checkpoint was written with policy {saved['policy']!r}; resuming it with {self._policy.name!r} "
                "would continue from weight versions the new policy does not have. Resume with "
                f"policy={saved['policy']!r}, or load only the weights (Model.load_from_checkpoint) and fit afresh."
            )
        self._pipeline.load_state_dict(saved)
        if self._shared:
            self._shared.restart(saved.get("tensors"))

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Optional[Any] = None) -> None:
        """Add the drained pipeline's state (collective: every rank calls it, as Lightning does)."""
        if self._fit_pipeline is not None and self.optimizers and "optimizer_states" in checkpoint:
            self.drain()  # already drained by lightning_module_state_dict; a no-op then
            parts = self._gather_stages_to_zero(self._fit_pipeline.state_dict())
            if parts is not None:
                checkpoint[PIPELINE_STATE_KEY] = merge_pipeline_states(parts)
        if self.is_global_zero and self._partition is not None and "hyper_parameters" in checkpoint:
            checkpoint["hyper_parameters"] = _whole_hparams(checkpoint["hyper_parameters"], self._partition,
                                                            checkpoint.get("state_dict", {}))  # fmt: skip
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)


def _whole_hparams(hparams: Mapping[str, Any], part: Partition, state: Mapping[str, Tensor]) -> dict[str, Any]:
    """``hparams`` with every module that holds this stage's stand-in of the pipelined module (a net
    passed to ``__init__`` and saved with ``save_hyperparameters``, as lightning-hydra-template does)
    replaced by a copy of the whole module with the checkpoint's weights: what a single-device
    checkpoint pickles, and what ``load_from_checkpoint`` rebuilds the module from."""
    whole: Optional[nn.Module] = None
    out = dict(hparams)
    for key, value in hparams.items():
        if not isinstance(value, nn.Module) or not any(m is part.local for m in value.modules()):
            continue
        if whole is None:
            whole = copy.deepcopy(part.original)
            for m in whole.modules():
                m.__dict__.pop("forward", None)  # the deferred-weight-gradient forwards of linear layers
            prefix = part.attr + "."
            materialize(whole, state, prefix, torch.device("cpu"))
            whole.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=False)
        out[key] = copy.deepcopy(value, memo={id(part.local): whole})
    return out


def _keep_gradients(set_to_none: bool = True) -> None:
    """Stands in for ``optimizer.zero_grad`` while the pipeline owns the gradients."""


def _named_parameters_of(part: Partition) -> list[tuple[str, Any]]:
    return [(n, p) for n, p in part.original.named_parameters(remove_duplicate=False)]