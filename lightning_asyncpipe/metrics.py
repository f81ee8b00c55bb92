"""Pipeline metrics as torchmetrics: throughput, bubble, staleness, stashed weights, activations,
transfer wait, one value per stage.

[Note: one slot per stage] Each stage updates only its own slot of a vector state of length
``p``; states are summed (or maxed) over the pipeline's process group, so after a sync every rank
of the pipeline holds every stage's value. Every rank updates its metrics at every step, so no
rank ever waits in a sync on a rank that never updates; the strategy computes them at the same
step on every rank (every ``log_every_n_steps`` steps and at epoch end).

Bubble fraction is measured, not modelled: for each action the executor records its wall time
and the part of it spent blocked on a transfer; ``bubble = wait / (wait + compute)`` over the
window. :func:`theoretical_bubble` gives the schedule simulator's value for comparison.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_asyncpipe.executor import ActionTiming
from lightning_asyncpipe.policies.base import PolicyReport
from lightning_asyncpipe.schedule import Schedule, simulate

__all__ = ["StageMean", "StageMax", "Throughput", "PipelineMetrics", "theoretical_bubble"]


class StageMean(Metric):
    """Per-stage mean of a quantity (weighted by ``weight``), synced over the pipeline group."""

    full_state_update = False
    is_differentiable = False

    def __init__(self, n_stages: int, stage: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.stage = stage
        self.add_state("total", default=torch.zeros(n_stages, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("weight", default=torch.zeros(n_stages, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, value: float, weight: float = 1.0) -> None:  # type: ignore[override]
        self.total[self.stage] += float(value) * weight
        self.weight[self.stage] += weight

    def compute(self) -> Tensor:
        return self.total / self.weight.clamp(min=1e-12)


class StageMax(Metric):
    """Per-stage maximum of a quantity, synced over the pipeline group."""

    full_state_update = False
    is_differentiable = False

    def __init__(self, n_stages: int, stage: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.stage = stage
        self.add_state("value", default=torch.zeros(n_stages, dtype=torch.float64), dist_reduce_fx="max")

    def update(self, value: float) -> None:  # type: ignore[override]
        self.value[self.stage] = max(float(self.value[self.stage]), float(value))

    def compute(self) -> Tensor:
        return self.value


class Throughput(Metric):
    """Samples (and tokens) per second of wall time, as this rank saw them (no sync needed)."""

    full_state_update = False
    is_differentiable = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(sync_on_compute=False, **kwargs)
        self.add_state("samples", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("seconds", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, samples: int, tokens: int, seconds: float) -> None:  # type: ignore[override]
        self.samples += samples
        self.tokens += tokens
        self.seconds += seconds

    def compute(self) -> dict[str, Tensor]:
        seconds = self.seconds.clamp(min=1e-12)
        return {"samples_per_sec": self.samples / seconds, "tokens_per_sec": self.tokens / seconds}


class PipelineMetrics:
    """The metrics of one stage, fed from executor timings and the policy's report.

    Args:
        n_stages, stage: the layout.
        process_group: the pipeline replica's group (states are reduced over it).
    """

    def __init__(self, n_stages: int, stage: int, process_group: Optional[Any] = None) -> None:
        kw = {"process_group": process_group, "dist_sync_on_step": False}
        self.n_stages, self.stage = n_stages, stage
        self.bubble = StageMean(n_stages, stage, **kw)
        self.transfer_wait = StageMean(n_stages, stage, **kw)
        self.staleness = StageMean(n_stages, stage, **kw)
        self.max_staleness = StageMax(n_stages, stage, **kw)
        self.weight_copies = StageMax(n_stages, stage, **kw)
        self.stashed_bytes = StageMax(n_stages, stage, **kw)
        self.activation_bytes = StageMax(n_stages, stage, **kw)
        self.throughput = Throughput()
        self._delays_seen = 0

    def _all(self) -> list[Metric]:
        return [self.bubble, self.transfer_wait, self.staleness, self.max_staleness, self.weight_copies,
                self.stashed_bytes, self.activation_bytes, self.throughput]  # fmt: skip

    def update(self, timings: Sequence[ActionTiming], report: PolicyReport, activation_bytes: int,
               samples: int, tokens: int, seconds: float) -> None:  # fmt: skip
        """Account one step of this stage."""
        wait = sum(t.wait for t in timings)
        busy = sum(t.end - t.start for t in timings)
        if busy > 0:
            self.bubble.update(wait / busy, weight=busy)
        self.transfer_wait.update(wait)
        for delay in report.delays[self._delays_seen :]:
            self.staleness.update(delay)
            self.max_staleness.update(delay)
        self._delays_seen = len(report.delays)
        self.weight_copies.update(report.peak_weight_copies)
        self.stashed_bytes.update(report.peak_stashed_bytes)
        self.activation_bytes.update(activation_bytes)
        self.throughput.update(samples, tokens, seconds)

    def compute(self) -> dict[str, float]:
        """``{"pipeline/stage{s}/<name>": value}`` for every stage, plus throughput; resets the window.

        Collective over the pipeline group: every rank of it must call it at the same step.
        """
        values: dict[str, float] = {}
        per_stage = {
            "bubble": self.bubble, "transfer_wait_s": self.transfer_wait, "staleness": self.staleness,
            "max_staleness": self.max_staleness, "weight_copies": self.weight_copies,
            "stashed_bytes": self.stashed_bytes, "activation_bytes": self.activation_bytes,
        }  # fmt: skip
        for name, metric in per_stage.items():
            vector = metric.compute().reshape(-1)  # one stage: a 0-dim result
            for s in range(self.n_stages):
                values[f"pipeline/stage{s}/{name}"] = float(vector[s])
        for name, value in self.throughput.compute().items():
            values[f"pipeline/{name}"] = float(value)
        for metric in self._all():
            metric.reset()
        return values


def theoretical_bubble(schedule: Schedule, weight_time: float = 0.0) -> dict[int, float]:
    """The idle fraction of each stage when ``schedule`` runs with unit forward and input-gradient
    times and ``weight_time`` per weight gradient (a ``W`` action, or part of a ``B`` in a schedule
    without ``W`` actions; see :func:`~lightning_asyncpipe.schedule.simulate`)."""
    return simulate(schedule, weight_time=weight_time).bubble
