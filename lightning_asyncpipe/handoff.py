"""Handing the last stage's step output and ``self.log`` records to the other stages.

Every stage replays the last stage's log records, so ``callback_metrics`` agree on every rank.
No stage should wait for another at a step boundary: with asynchronous policies stage 0 finishes
step ``k`` while the last stage still works on the step's last micro-batches (a blocking hand-off
would put the bubble back), and even with synchronous ones a blocking broadcast made the last
stage wait for stage 0's update every step (measured: about 10 ms of a 120 ms step). So the last
stage sends each step's payload with non-blocking point-to-point messages, and the other stages
collect it one step later (when it has certainly been sent) or at a drain (:meth:`flush`). With
several replicas the strategy keeps the blocking broadcast (``sync_dist`` logs need every rank
to log in the same step).
"""

from __future__ import annotations

import pickle
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["StepHandoff"]

_TAG_SPACE = 1 << 28


class StepHandoff:
    """The hand-off of one pipeline replica.

    Args:
        ranks: global ranks of the replica's stages, stage order (the last one sends).
        rank: this process's global rank.
        group: the replica's process group.
        deferred: collect payloads one step late instead of broadcasting.
        device: where the collectives' tensors live (CUDA under NCCL).
    """

    def __init__(self, ranks: list[int], rank: int, group: Any, deferred: bool, device: torch.device) -> None:
        self.ranks, self.rank, self.group, self.deferred, self.device = ranks, rank, group, deferred, device
        self.src = ranks[-1]
        self._sends: list[tuple[Any, Tensor]] = []
        self._pending: list[tuple[int, Any, Tensor]] = []  # (step, work, size) on receivers

    @property
    def is_source(self) -> bool:
        return self.rank == self.src

    def exchange(self, step: int, payload: Any) -> list[Any]:
        """Publish step ``step``'s payload (on the last stage) and return the payloads this rank can
        replay now, oldest first."""
        if len(self.ranks) == 1 or not self.deferred:
            return self.broadcast(payload)
        if self.is_source:
            self._send(step, payload)
            return [payload]
        ready = self._collect(wait_all=False)
        size = torch.empty(1, dtype=torch.int64, device=self.device)
        self._pending.append((step, dist.irecv(size, src=self.src, group=self.group, tag=self._tag(step, 0)), size))
        return ready

    def broadcast(self, payload: Any) -> list[Any]:
        """Blocking: every rank gets the last stage's payload now."""
        if len(self.ranks) == 1:
            return [payload]
        box = [payload if self.is_source else None]
        dist.broadcast_object_list(box, src=self.src, group=self.group,
                                   device=self.device if self.device.type == "cuda" else None)  # fmt: skip
        return [box[0]]

    def flush(self) -> list[Any]:
        """Wait for every payload still on its way (call on every rank at a drain)."""
        if self.is_source:
            for work, _ in self._sends:
                work.wait()
            self._sends = []
            return []
        return self._collect(wait_all=True)

    def _tag(self, step: int, part: int) -> int:
        return (2 * step + part) % _TAG_SPACE

    def _send(self, step: int, payload: Any) -> None:
        data = torch.frombuffer(bytearray(pickle.dumps(payload)), dtype=torch.uint8).to(self.device)
        size = torch.tensor([data.numel()], dtype=torch.int64, device=self.device)
        for dst in self.ranks[:-1]:
            self._sends.append((dist.isend(size, dst=dst, group=self.group, tag=self._tag(step, 0)), size))
            self._sends.append((dist.isend(data, dst=dst, group=self.group, tag=self._tag(step, 1)), data))
        while self._sends and self._sends[0][0].is_completed():
            self._sends.pop(0)

    def _collect(self, wait_all: bool) -> list[Any]:
        """Receive the pending payloads: all of them, or all but the newest (sent this very step)."""
        keep = 0 if wait_all else 1
        ready: list[Any] = []
        while len(self._pending) > keep:
            step, work, size = self._pending.pop(0)
            work.wait()
            data = torch.empty(int(size.item()), dtype=torch.uint8, device=self.device)
            dist.irecv(data, src=self.src, group=self.group, tag=self._tag(step, 1)).wait()
            ready.append(pickle.loads(data.cpu().numpy().tobytes()))
        return ready


def deferred_sigterm_check(trainer: Any) -> Optional[Any]:
    """A replacement for Lightning's per-batch SIGTERM broadcast that does not stall the pipeline.

    Lightning broadcasts rank 0's SIGTERM flag, blocking, at the start of every training batch,
    which would make every stage wait for the last stage's previous step. This version posts the
    broadcast without waiting and checks the one from the previous batch instead: a SIGTERM still
    stops every rank, one batch later.
    """
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    pending: list[tuple[Any, Tensor]] = []
    device = trainer.strategy.root_device

    def check() -> None:
        flag = torch.tensor([1 if getattr(trainer, "received_sigterm", False) else 0], device=device)
        pending.append((dist.broadcast(flag, src=0, async_op=True), flag))
        while len(pending) > 1:
            work, previous = pending.pop(0)
            work.wait()
            if int(previous.item()) == 1:
                dist.barrier()
                raise SIGTERMException()

    def drain() -> None:
        while pending:
            work, _ = pending.pop(0)
            work.wait()

    check.drain = drain  # type: ignore[attr-defined]
    return check
