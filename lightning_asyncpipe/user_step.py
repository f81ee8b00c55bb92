"""Running the user's LightningModule step methods on the first and last stage of a pipeline.

The user's ``training_step`` (or ``validation_step``, ...) runs unchanged, once per micro-batch:

- on the **first** stage it runs up to the call of the pipelined module; that call captures its
  arguments and leaves the step (a ``BaseException``, so a user's ``except Exception`` does not
  swallow it). Nothing after the call runs there.
- on the **last** stage it runs whole; the call of the pipelined module returns the output the
  pipeline computed for this micro-batch, so ``self(x)`` is the pipelined output.
- on the **other** stages it runs up to the call once per kind of step and batch structure, to
  learn the call's structure (which arguments are tensors, which are ``None`` or constants): that
  selects the stage's program (:meth:`~lightning_asyncpipe.partition.Partition.program`).

What the step logs with ``self.log`` is recorded per micro-batch and combined per batch by
:class:`LogRecorder` (a weighted mean for values, the last object for torchmetrics metrics), so
the logger sees one value per batch, equal to what a single-device run logs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, overload

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from lightning_asyncpipe.errors import PipelineConfigError
from lightning_asyncpipe.microbatch import merge, signature
from lightning_asyncpipe.partition import Partition, StageModule
from lightning_asyncpipe.split import StageProgram

__all__ = ["UserStep", "StepWindow", "LogRecord", "LogRecorder"]


class _StageExit(BaseException):
    def __init__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.args_, self.kwargs = args, kwargs


@dataclass
class LogRecord:
    """One ``self.log(name, value, **kwargs)`` call, combined over the micro-batches of a batch."""

    name: str
    value: Any
    kwargs: dict[str, Any]


class LogRecorder:
    """Stands in for ``LightningModule.log`` while user steps run per micro-batch."""

    def __init__(self) -> None:
        self._calls: dict[str, list[tuple[float, Any, Any]]] = {}
        self._kwargs: dict[str, dict[str, Any]] = {}
        self.weight = 1.0
        self.enabled = True

    def __call__(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        if args:
            raise PipelineConfigError("AsyncPipeStrategy records self.log calls: pass options by keyword, e.g. prog_bar=True.")
        if self.enabled:
            self._calls.setdefault(name, []).append((self.weight, value, kwargs.get("batch_size")))
            self._kwargs.setdefault(name, kwargs)

    def pop(self) -> list[LogRecord]:
        """The combined records of the batch, in first-logged order; clears the recorder."""
        records = []
        for name, calls in self._calls.items():
            kwargs = dict(self._kwargs[name])
            values = [v for _, v, _ in calls]
            if all(isinstance(v, (Tensor, float, int)) and not isinstance(v, bool) for v in values):
                total = sum(w for w, _, _ in calls)
                value: Any = sum(w * torch.as_tensor(v, dtype=torch.float32).detach() for w, v, _ in calls) / total
                sizes = [size for _, _, size in calls]
                # None (what log_dict passes when not given) lets Lightning infer it from the batch
                if all(size is not None for size in sizes):
                    kwargs["batch_size"] = sum(int(size) for size in sizes)
            else:
                value = values[-1]
            records.append(LogRecord(name, value, kwargs))
        self._calls, self._kwargs = {}, {}
        return records


@dataclass
class UserStep:
    """The user's step method applied to the micro-batches of one batch on this stage.

    Args:
        fn: the bound step method (``module.training_step``, ...).
        microbatches: the micro-batches of the batch, in order.
        first: the global index of ``microbatches[0]``.
        extra: the step's arguments after the batch (``batch_idx``, ``dataloader_idx``).
        partition: the stage's partition (its local stand-in of the pipelined module, programs).
        weights: each micro-batch's share of the batch (``n_i / N``).
        recorder: records ``self.log`` calls (installed on the module by the caller).
        training: whether the returned loss is backpropagated.
    """

    fn: Callable[..., Any]
    microbatches: Sequence[Any]
    first: int
    extra: tuple[Any, ...]
    partition: Partition
    weights: Sequence[float]
    recorder: LogRecorder
    training: bool
    loss_scale: float = 1.0
    """Multiplies every backpropagated loss (``1 / accumulate_grad_batches``, as Lightning scales it)."""
    outputs: dict[int, Any] = field(default_factory=dict)
    module_outputs: dict[int, Any] = field(default_factory=dict)
    """Evaluation, last stage: what the pipelined module returned for each micro-batch (for
    :meth:`run_rest` on the other stages)."""
    _calls: dict[int, tuple[tuple[Any, ...], dict[str, Any]]] = field(default_factory=dict)

    @property
    def stage_module(self) -> StageModule:
        return self.partition.local

    def key(self, microbatch: int) -> Any:
        # training and evaluation send the same shapes with different requires_grad flags
        return (self.training, signature(self.microbatches[microbatch - self.first]))

    def _call(self, microbatch: int, handler: Callable[[tuple[Any, ...]], Any]) -> Any:
        self.stage_module.call_handler = handler
        try:
            return self.fn(self.microbatches[microbatch - self.first], *self.extra)
        finally:
            self.stage_module.call_handler = None

    @overload
    def _capture(self, microbatch: int) -> tuple[tuple[Any, ...], dict[str, Any]]: ...

    @overload
    def _capture(self, microbatch: int, allow_skip: bool) -> Optional[tuple[tuple[Any, ...], dict[str, Any]]]: ...

    def _capture(self, microbatch: int, allow_skip: bool = False) -> Optional[tuple[tuple[Any, ...], dict[str, Any]]]:
        def capture(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            raise _StageExit(args, kwargs)

        self.recorder.enabled = False
        try:
            result = self._call(microbatch, capture)
        except _StageExit as exit_:
            return exit_.args_, exit_.kwargs
        finally:
            self.recorder.enabled = True
        if result is None and allow_skip and self.training:
            return None
        raise self._never_called(result)

    def skipped(self) -> bool:
        """Whether the step skips this batch: it returns ``None`` before calling the pipelined module
        (Lightning's way to skip a batch) for some micro-batch.

        Runs the step up to the call for every micro-batch, on every stage (each stage's process
        loads the same batch, so every stage decides alike without a message); the captured calls
        serve the stage's forwards. A skipped batch runs nothing on any stage."""
        for j in range(self.first, self.first + len(self.microbatches)):
            call = self._capture(j, allow_skip=True)
            if call is None:
                self._calls.clear()
                return True
            self._calls[j] = call
        return False

    def stage_inputs(self, microbatch: int) -> tuple[Tensor, ...]:
        call = self._calls.get(microbatch)
        args, kwargs = self._calls[microbatch] = call if call is not None else self._capture(microbatch)
        return Partition.inputs(args, kwargs)

    def stage_program(self, microbatch: int) -> StageProgram:
        """The program for this micro-batch's call: from the captured call on stage 0, else by the
        kind of step and the batch's structure (the call is captured the first time only)."""
        call = self._calls.pop(microbatch, None)
        key = (self.fn.__name__, self.key(microbatch))
        if call is None:
            found = self.partition.programs_by_step.get(key)
            if found is not None:
                return found
            call = self._capture(microbatch)
        program = self.partition.program(*call)
        self.partition.programs_by_step[key] = program
        return program

    def stage_outputs(self, microbatch: int, outputs: Any) -> Optional[Tensor]:
        calls = []

        def replay(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if calls:
                raise PipelineConfigError(
                    f"{self.fn.__name__} called the pipelined module '{self.stage_module.attr}' twice for one "
                    "micro-batch; a pipeline runs it once per step. Call it once (e.g. through self(x))."
                )
            calls.append(args)
            return outputs

        self.recorder.weight = self.weights[microbatch - self.first]
        result = self._call(microbatch, replay)
        if not calls and self.stage_module.n_stages > 1:
            raise self._never_called(result)
        self.outputs[microbatch] = result
        if not self.training:
            self.module_outputs[microbatch] = pytree.tree_map(
                lambda t: t.detach() if isinstance(t, Tensor) else t, outputs)
            return None
        if result is None:
            raise PipelineConfigError(
                f"{self.fn.__name__} returned None after calling the pipelined module '{self.stage_module.attr}' "
                f"(micro-batch {microbatch}): every stage has run this micro-batch's forward by then, so the batch "
                "cannot be skipped any more. Decide before the call (return None before self(x) to skip the batch "
                "on every stage), or return the loss multiplied by 0."
            )
        loss = result.get("loss") if isinstance(result, dict) else result
        return loss * (self.weights[microbatch - self.first] * self.loss_scale) if isinstance(loss, Tensor) else loss

    def run_rest(self, module_outputs: Mapping[int, Any]) -> None:
        """Validation and test, a stage other than the last: run the user's step for every micro-batch with
        the pipelined module's call answered by the last stage's ``module_outputs``, so that the
        step's code after the call (appending to ``self.validation_step_outputs``, metric updates)
        runs on every stage as under DDP. Its ``self.log`` calls are dropped: every stage logs the
        last stage's records."""
        self.recorder.enabled = False
        try:
            for j in sorted(module_outputs):
                self.outputs[j] = self._call(j, lambda args, kwargs, _out=module_outputs[j]: _out)
        finally:
            self.recorder.enabled = True

    def _never_called(self, result: Any = ...) -> PipelineConfigError:
        skipping = (" Returning None skips a training batch (before the call); evaluation steps cannot skip."
                    ) if result is None else ""  # fmt: skip
        return PipelineConfigError(
            f"{self.fn.__name__} returned without calling the pipelined module "
            f"'{self.stage_module.attr}'. AsyncPipeStrategy runs it once per micro-batch and expects it to call that "
            f"module (usually through self(x) in forward).{skipping}"
        )

    def merged_outputs(self) -> Any:
        """The step's outputs over the batch: losses combined by weight, the rest merged."""
        if not self.outputs:
            return None
        ordered = [self.outputs[j] for j in sorted(self.outputs)]
        weights = [self.weights[j - self.first] for j in sorted(self.outputs)]

        def combine(values: list[Any]) -> Any:
            if all(isinstance(v, Tensor) and v.dim() == 0 for v in values):
                return sum(w * v.detach().float() for w, v in zip(weights, values)) / sum(weights)
            return merge([v.detach() if isinstance(v, Tensor) else v for v in values])

        if all(isinstance(o, dict) for o in ordered):
            return {k: combine([o[k] for o in ordered]) for k in ordered[0]}
        return combine(ordered)


@dataclass
class StepWindow:
    """The user steps of one gradient-accumulation window run as one pipeline step (asynchronous
    policies): ``K`` batches of ``m`` micro-batches are one batch of ``K*m`` micro-batches, i.e.
    one update (see :mod:`lightning_asyncpipe.reference`). Each micro-batch runs in its own
    batch's step (its ``batch_idx``, its share ``n_i / N`` of its batch, times ``1/K``)."""

    steps: Sequence[UserStep]

    @property
    def microbatches(self) -> list[Any]:
        return [mb for step in self.steps for mb in step.microbatches]

    def _step(self, microbatch: int) -> UserStep:
        for step in self.steps:
            if step.first <= microbatch < step.first + len(step.microbatches):
                return step
        raise IndexError(f"micro-batch {microbatch} is not in this window")

    def key(self, microbatch: int) -> Any:
        return self._step(microbatch).key(microbatch)

    def stage_inputs(self, microbatch: int) -> tuple[Tensor, ...]:
        return self._step(microbatch).stage_inputs(microbatch)

    def stage_program(self, microbatch: int) -> StageProgram:
        return self._step(microbatch).stage_program(microbatch)

    def stage_outputs(self, microbatch: int, outputs: Any) -> Optional[Tensor]:
        return self._step(microbatch).stage_outputs(microbatch, outputs)

    def merged_outputs(self) -> Any:
        """The last batch's outputs (what Lightning reports at the window's optimizer step)."""
        return self.steps[-1].merged_outputs()
