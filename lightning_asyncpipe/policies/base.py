"""The weight-version policy interface: which weights each pass sees and when updates happen.

A policy never sends a tensor and never touches the transport. The executor asks it for a step's
actions, calls :meth:`WeightPolicy.forward` to run the stage's layers for a micro-batch, asks
:meth:`WeightPolicy.recompute` for a fresh graph when the backward must see other weights than
the forward, calls :meth:`WeightPolicy.after_backward`, and at a ``U`` action calls
:meth:`WeightPolicy.update` with a function that applies one optimizer update.

Versions are counted per stage: version ``v`` is the stage's weights after ``v`` updates since
training started (``W_s(v)``); the live parameters of the module always hold the newest version.
"""

from __future__ import annotations

from abc import ABC
from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import Any, Callable, ClassVar, Optional

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_asyncpipe.errors import PipelineConfigError
from lightning_asyncpipe.policies.slots import ParameterSlots
from lightning_asyncpipe.schedule import Action, async_1f1b_drain, async_1f1b_step

__all__ = ["WeightPolicy", "PolicyReport", "StepFn", "ApplyUpdate"]

StepFn = Callable[[Optimizer], None]
"""Performs the optimizer's update of the live parameters (default: ``optimizer.step()``)."""

ApplyUpdate = Callable[[int, Optional[StepFn]], None]
"""``apply(batch, step_fn)`` applies the update of ``batch``: reduce gradients over replicas, run
hooks and clipping, call the step function (or ``optimizer.step()``) with the learning rate the
scheduler gave for that batch's step, clear the gradients. Provided by the code around the
executor (see :class:`lightning_asyncpipe.pipeline.StagePipeline`)."""


@dataclass
class PolicyReport:
    """What a stage's policy holds and did: for metrics and tests.

    Attributes:
        weight_copies: weight versions held now (the live weights count as one).
        peak_weight_copies: the most versions held at once so far.
        extra_buffers: weight-sized buffers held besides versions (PipeMare's velocity, ...).
        stashed_bytes: bytes held beyond the live weights (older versions plus extra buffers).
        peak_stashed_bytes: the most such bytes held at once so far.
        delays: for each applied update, in order: the update's index minus the oldest weight
            version a forward pass of its batch used.
    """

    weight_copies: int = 1
    peak_weight_copies: int = 1
    extra_buffers: int = 0
    stashed_bytes: int = 0
    peak_stashed_bytes: int = 0
    delays: list[int] = field(default_factory=list)


class WeightPolicy(ABC):
    """Decides the action order of a stage and which weight version each action sees.

    The base class is the synchronous behaviour: forwards and backwards use the live weights, one
    update per batch. Asynchronous policies set ``synchronous = False`` (the asynchronous 1F1B
    stream, drained only when asked) and override the hooks they need.
    """

    name: ClassVar[str]
    synchronous: ClassVar[bool] = False

    def __init__(self) -> None:
        self.report_ = PolicyReport()
        self.updates = 0
        self.fill_step = 0
        self.fill_update = 0
        self.stage = 0
        self.n_stages = 1
        self.n_microbatches = 1
        self.module: Optional[nn.Module] = None
        self.optimizer: Optional[Optimizer] = None
        self._forward_version: dict[int, int] = {}
        self._batch_oldest: dict[int, int] = {}
        self._slots: Optional[ParameterSlots] = None

    # ------------------------------------------------------------------ configuration

    def validate(self, n_stages: int, n_microbatches: int) -> None:
        """Raise :class:`~lightning_asyncpipe.errors.PipelineConfigError` if the policy cannot run so."""

    def validate_optimizer(self, optimizer: Optimizer) -> None:
        """Raise :class:`~lightning_asyncpipe.errors.PipelineConfigError` for an optimizer it cannot use."""

    def bind(self, stage: int, n_stages: int, n_microbatches: int, module: nn.Module,
             optimizer: Optional[Optimizer]) -> None:  # fmt: skip
        """Attach the policy to one stage's layers and optimizer (``None`` when only evaluating)."""
        self.validate(n_stages, n_microbatches)
        if optimizer is not None:
            self.validate_optimizer(optimizer)
        self.stage, self.n_stages, self.n_microbatches = stage, n_stages, n_microbatches
        self.module, self.optimizer = module, optimizer
        self._slots = None

    def slots(self) -> ParameterSlots:
        """Where the stage's parameters sit, found at the first pass after :meth:`bind` (when the
        stage is fully built: parameters other stages own are no longer among them)."""
        if self._slots is None:
            assert self.module is not None
            self._slots = ParameterSlots(self.module)
        return self._slots

    @property
    def warmup(self) -> int:
        """Forwards this stage runs ahead of its backwards in the 1F1B stream: ``p - 1 - s``."""
        return self.n_stages - 1 - self.stage

    # ------------------------------------------------------------------ schedule

    def step_actions(self, n_stages: int, n_microbatches: int, stage: int, step: int, fill_step: int) -> list[Action]:
        """The actions of ``stage`` for Lightning step ``step``; ``fill_step`` is the step at which
        the pipeline was last (re)filled from empty."""
        if fill_step != self.fill_step or step == fill_step:
            self.fill_step, self.fill_update = fill_step, self.updates
        return async_1f1b_step(n_stages, n_microbatches, stage, step, fill_step)

    def drain_actions(self, n_stages: int, n_microbatches: int, stage: int, step: int, fill_step: int) -> list[Action]:
        """The actions that finish every micro-batch still in flight after ``step``."""
        return async_1f1b_drain(n_stages, n_microbatches, stage, step, fill_step)

    def updates_before(self, j: int, backward: bool) -> int:
        """Updates this stage has applied when it runs the forward (or backward) of micro-batch ``j``
        in the 1F1B stream since the last fill."""
        m, rel = self.n_microbatches, j - self.fill_step * self.n_microbatches
        return self.fill_update + (rel // m if backward else max(0, rel - self.warmup) // m)

    def forward_version_at(self, stage: int, microbatch: int) -> int:
        """The weight version ``stage`` uses for the forward of ``microbatch`` (this stage's stream
        and fills; :mod:`lightning_asyncpipe.tied` asks it for the stage that owns a shared
        parameter). Default: the latest, ``W(floor(max(0, j - (p-1-stage)) / m))`` since the fill."""
        m, rel = self.n_microbatches, microbatch - self.fill_step * self.n_microbatches
        return self.fill_update + max(0, rel - (self.n_stages - 1 - stage)) // m

    # ------------------------------------------------------------------ passes

    def forward(self, module: nn.Module, inputs: tuple[Tensor, ...], microbatch: int, training: bool) -> Any:
        """Run ``module`` on ``inputs`` for ``microbatch`` with the weights the policy prescribes."""
        if training:
            self._note_forward(microbatch, self.updates)
        return module(*inputs)

    def recomputes(self, microbatch: int) -> bool:
        """Whether the backward of ``microbatch`` re-runs the forward (see :meth:`recompute`)."""
        return False

    def recompute(self, module: nn.Module, inputs: tuple[Tensor, ...], microbatch: int) -> Any:
        """Re-run the forward of ``microbatch`` with grad, with the weights its backward must see."""
        raise NotImplementedError

    def after_backward(self, microbatch: int) -> None:
        """Called after the backward of ``microbatch``."""
        self._forward_version.pop(microbatch, None)

    def update(self, batch: int, apply: ApplyUpdate) -> None:
        """Apply the gradient accumulated for ``batch`` to the live weights."""
        apply(batch, None)
        self._finish_update(batch)

    # ------------------------------------------------------------------ bookkeeping

    def _note_forward(self, microbatch: int, version: int) -> None:
        self._forward_version[microbatch] = version
        batch = microbatch // self.n_microbatches
        self._batch_oldest[batch] = min(version, self._batch_oldest.get(batch, version))

    def in_flight_versions(self) -> set[int]:
        return set(self._forward_version.values())

    def _finish_update(self, batch: int) -> None:
        oldest = self._batch_oldest.pop(batch, self.updates)
        self.report_.delays.append(self.updates - oldest)
        self.updates += 1
        self._refresh_report()

    def weight_copies(self) -> int:
        return 1

    def extra_buffers(self) -> int:
        return 0

    def _live_bytes(self) -> int:
        if self.module is None:
            return 0
        return sum(p.numel() * p.element_size() for p in self.module.parameters())

    def _refresh_report(self) -> None:
        r = self.report_
        r.weight_copies, r.extra_buffers = self.weight_copies(), self.extra_buffers()
        r.stashed_bytes = (r.weight_copies - 1 + r.extra_buffers) * self._live_bytes()
        r.peak_weight_copies = max(r.peak_weight_copies, r.weight_copies)
        r.peak_stashed_bytes = max(r.peak_stashed_bytes, r.stashed_bytes)

    def report(self) -> PolicyReport:
        self._refresh_report()
        return self.report_

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs, taken right after a drain (nothing in flight).

        Tensors are keyed by parameter name (names inside the pipelined ``nn.Sequential``, the
        same whatever the stage layout), so the states of all stages merge into one dict and
        split again over any number of stages: ``{"updates": n, "tensors": {buffer: {parameter name: tensor}}}``.
        """
        return {"updates": self.updates, "tensors": {k: {n: t.detach().cpu() for n, t in v.items()}
                                                     for k, v in self._named_buffers().items()}}  # fmt: skip

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load a (possibly merged) :meth:`state_dict`: this stage takes its own parameters' entries."""
        self.updates = int(state.get("updates", 0))
        assert self.module is not None
        local = dict(self.module.named_parameters())
        self._load_buffers({
            key: {n: t.to(device=local[n].device, dtype=local[n].dtype) for n, t in tensors.items() if n in local}
            for key, tensors in state.get("tensors", {}).items()
        })

    def _missing(self, tensors: Mapping[str, Tensor]) -> list[str]:
        """Local parameters without an entry in ``tensors``."""
        assert self.module is not None
        return [n for n, _ in self.module.named_parameters() if n not in tensors]

    def _named_buffers(self) -> dict[str, dict[str, Tensor]]:
        """The policy's weight-sized state by buffer name, each a dict by parameter name."""
        return {}

    def _load_buffers(self, buffers: dict[str, dict[str, Tensor]]) -> None:
        """Take back what :meth:`_named_buffers` gave, restricted to this stage's parameters and
        moved to their devices (entries of a parameter may be missing when the stage layout changed)."""


def require_sgd_momentum(policy: str, optimizer: Optimizer) -> torch.optim.SGD:
    """The optimizer as SGD with momentum, or a clear error."""
    group = optimizer.param_groups[0] if optimizer.param_groups else {}
    if not isinstance(optimizer, torch.optim.SGD) or not group.get("momentum") or group.get("nesterov"):
        raise PipelineConfigError(
            f"Policy {policy!r} needs torch.optim.SGD with momentum > 0 (and nesterov=False): spike compensation "
            f"and weight prediction are defined on the momentum buffer. configure_optimizers returned "
            f"{type(optimizer).__name__} with momentum={group.get('momentum')}. Use e.g. "
            "torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)."
        )
    return optimizer
