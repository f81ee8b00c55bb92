"""Stop signals (SIGTERM, SIGINT) sent to any stage process: every stage stops at the same step.

A cluster scheduler preempting a job sends SIGTERM, a person presses Ctrl+C (SIGINT to the whole
process group) or ``kill``s one process. Whichever process gets the signal, the job must stop as
a whole, fast, with a non-zero status that names the signal and the stage, and, where the run
writes checkpoints, leave a resumable one. A signal handler may not run collectives (the other
ranks are not in them: Lightning's own SIGTERM handler broadcasts from inside the handler and
hangs a pipeline), so:

1. The handler only records the signal, says so on stderr, and arms a deadline: if this process
   has not ended ``grace`` seconds later (it was blocked, or not training), it exits by itself with
   status ``128 + signum``. A second SIGINT exits at once.
2. At every training step boundary :meth:`StopSignals.check` posts a non-blocking all-reduce of
   "which signal did each rank get" over the world and reads the one posted a step earlier, so
   no rank waits for another and every rank learns of the signal at the same step.
3. The strategy then drains the pipeline, writes the checkpoint (collective), and every rank
   raises :class:`StopRequested`, a ``SystemExit`` with status ``128 + signum`` (143 for SIGTERM,
   130 for SIGINT), which Lightning lets through after its ``on_exception`` hooks and teardown.
"""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import dataclass
from types import FrameType
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_asyncpipe.watchdog import report

__all__ = ["StopSignals", "StopRequested", "StopRequest"]


@dataclass(frozen=True)
class StopRequest:
    """What the ranks agreed on: the signal each rank that got one received (``{rank: signum}``)."""

    received: dict[int, int]

    @property
    def signum(self) -> int:
        return self.received[min(self.received)]

    def describe(self, describe_rank: Callable[[int], str]) -> str:
        return ", ".join(f"{signal.Signals(s).name} to {describe_rank(r)}" for r, s in sorted(self.received.items()))


class StopRequested(SystemExit):
    """Every stage stops after a stop signal; the exit status is ``128 + signum``.

    Args:
        request: the agreed signals.
        message: what happened and where the checkpoint is.
    """

    def __init__(self, request: StopRequest, message: str) -> None:
        super().__init__(128 + request.signum)
        self.request, self.message = request, message

    def __str__(self) -> str:
        return self.message


class StopSignals:
    """Records stop signals in one process and agrees on them with every rank at step boundaries.

    Args:
        rank: this process's global rank.
        world_size: number of processes.
        device: where the all-reduce's tensor lives (CUDA under NCCL).
        describe: names a rank (``"stage 0 (rank 1)"``).
        grace: seconds after a signal before this process exits by itself.
    """

    def __init__(self, rank: int, world_size: int, device: torch.device, describe: Callable[[int], str],
                 grace: float = 45.0) -> None:  # fmt: skip
        self.rank, self.world_size, self.device, self.describe, self.grace = rank, world_size, device, describe, grace
        self.received: Optional[int] = None
        self._pending: list[tuple[Any, Tensor]] = []
        self._previous: dict[int, Any] = {}
        self._deadline: Optional[threading.Timer] = None

    def install(self) -> None:
        """Handle SIGINT here; SIGTERM comes through :meth:`handler` (Lightning's signal connector
        calls it, see the strategy). Only from the main thread, as Python requires."""
        if threading.current_thread() is threading.main_thread():
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self.handler)

    def uninstall(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}

    def handler(self, signum: int, frame: Optional[FrameType] = None) -> None:
        """Record the signal (no collectives here); a second SIGINT exits at once."""
        name = signal.Signals(signum).name
        if self.received is not None:
            if signum == signal.SIGINT:
                report(f"{self.describe(self.rank)} received a second SIGINT; exiting now.")
                os._exit(128 + signum)
            return
        self.received = signum
        report(f"{self.describe(self.rank)} received {name}; every stage stops at the next step boundary "
                f"(this process exits within {self.grace:.0f} s).")  # fmt: skip
        self._deadline = threading.Timer(self.grace, self._give_up, args=(signum,))
        self._deadline.daemon = True
        self._deadline.start()

    def _give_up(self, signum: int) -> None:
        report(f"{self.describe(self.rank)} did not stop within {self.grace:.0f} s of "
                f"{signal.Signals(signum).name}; exiting.")  # fmt: skip
        os._exit(128 + signum)

    def check(self) -> Optional[StopRequest]:
        """Post this step's all-reduce and read the previous step's (call on every rank, once per
        training step, at the same point)."""
        flags = torch.zeros(self.world_size, dtype=torch.int32)
        flags[self.rank] = self.received or 0
        flags = flags.to(self.device)
        self._pending.append((dist.all_reduce(flags, op=dist.ReduceOp.MAX, async_op=True), flags))
        return self._read(keep=1)

    def drain(self) -> Optional[StopRequest]:
        """Wait for every posted all-reduce (every rank, at the end of training)."""
        return self._read(keep=0)

    def _read(self, keep: int) -> Optional[StopRequest]:
        request: Optional[StopRequest] = None
        while len(self._pending) > keep:
            work, flags = self._pending.pop(0)
            work.wait()
            received = {r: int(s) for r, s in enumerate(flags.cpu().tolist()) if s}
            if received and request is None:
                request = StopRequest(received)
        return request
