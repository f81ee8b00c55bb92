"""The weight-version policy interface: which weights each pass sees and when updates happen."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from torch import Tensor, nn

from lightning_asyncpipe.schedule import Action

__all__ = ["WeightPolicy", "PolicyReport"]


@dataclass
class PolicyReport:
    """What a stage's policy holds and did: for metrics and tests.

    Attributes:
        weight_copies: weight versions held now (the live weights count as one).
        peak_weight_copies: the most versions held at once so far.
        stashed_bytes: bytes of weight versions held beyond the live weights (plus correction buffers).
        delays: for each applied update, the delay of its gradient in updates (update number minus
            the version the gradient was computed on), in order.
    """

    weight_copies: int = 1
    peak_weight_copies: int = 1
    stashed_bytes: int = 0
    delays: list[int] = field(default_factory=list)


class WeightPolicy(ABC):
    """Decides the action order of a stage and which weight version each action sees.

    A policy never sends a tensor and never touches the transport: the executor asks it for the
    actions of a step, calls :meth:`forward` to run the stage's layers for a micro-batch, and calls
    :meth:`update` with a function that applies one optimizer update to the live weights.
    """

    name: ClassVar[str]
    synchronous: ClassVar[bool]

    def __init__(self) -> None:
        self._report = PolicyReport()
        self._updates = 0

    def validate(self, n_stages: int, n_microbatches: int) -> None:
        """Raise :class:`~lightning_asyncpipe.errors.PipelineConfigError` if the policy cannot run so."""

    @abstractmethod
    def step_actions(self, n_stages: int, n_microbatches: int, stage: int, step: int, fill_step: int) -> list[Action]:
        """The actions of ``stage`` for Lightning step ``step``; ``fill_step`` is the step at which
        the pipeline was last (re)filled from empty."""

    def drain_actions(self, n_stages: int, n_microbatches: int, stage: int, step: int, fill_step: int) -> list[Action]:
        """The actions that finish every micro-batch still in flight after ``step`` (none when synchronous)."""
        return []

    def forward(self, module: nn.Module, inputs: tuple[Tensor, ...], microbatch: int) -> Any:
        """Run ``module`` on ``inputs`` for ``microbatch`` with the weights the policy prescribes."""
        return module(*inputs)

    def update(self, batch: int, apply: Callable[[], None]) -> None:
        """Apply the gradient accumulated for ``batch`` by calling ``apply`` (one optimizer update)."""
        apply()
        self._report.delays.append(self._updates - self.gradient_version(batch))
        self._updates += 1

    def gradient_version(self, batch: int) -> int:
        """The weight version the gradient of ``batch`` was computed on (sync: ``batch`` itself)."""
        return self._updates

    def report(self) -> PolicyReport:
        return self._report

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self._updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._updates = int(state.get("updates", 0))
