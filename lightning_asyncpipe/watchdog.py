"""Noticing a lost stage process, so the job ends fast with a message that names it.

When a stage process dies (killed, out of memory), its neighbours' transfers fail at once and
they stop with :class:`~lightning_asyncpipe.errors.StageFailure`; the failure then travels stage
by stage. Two watchers make sure the job ends even where nothing is waiting on the lost process,
and say which process was lost:

- :class:`ChildWatch` runs in the main process (rank 0) and polls the stage processes it
  started. A child that ends with a non-zero status is reported by stage, rank and pid; if the
  main process has not stopped by itself ``grace`` seconds later, it kills the other children
  and exits.
- :class:`ParentWatch` runs in every started child, during fit/validate/test/predict: if the
  main process disappears it reports it and, after ``grace`` seconds, exits.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Callable

__all__ = ["ChildWatch", "ParentWatch", "PARENT_PID_ENV", "report"]

PARENT_PID_ENV = "ASYNCPIPE_PARENT_PID"
"""Set by the launcher in each child: the pid of the main process to watch."""


def _how(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def report(message: str) -> None:
    """Print ``AsyncPipeStrategy: <message>`` on stderr at once (what every stage-lifecycle message looks like)."""
    sys.stderr.write(f"AsyncPipeStrategy: {message}\n")
    sys.stderr.flush()


class _Watch(threading.Thread):
    """Polls for a lost process; reports it; ends this process if it does not stop by itself."""

    def __init__(self, name: str, grace: float, interval: float) -> None:
        super().__init__(name=name, daemon=True)
        self.grace, self.interval = grace, interval
        self._stopped = threading.Event()
        self._lock = threading.Lock()

    def _report_lost(self) -> bool:
        """Report what was lost (once); whether anything was."""
        raise NotImplementedError

    def _finished(self) -> bool:
        """Nothing left to watch."""
        return False

    def _give_up(self) -> None:
        """This process did not stop within ``grace`` after the loss."""
        os._exit(1)

    def stop(self, failed: bool = False) -> None:
        """Stop watching; ``failed``: this process is failing, so first report a loss (usually the
        reason), waiting a moment for it: a killed process's connections close a little before
        its exit status can be seen."""
        with self._lock:
            if failed and not self._stopped.is_set():
                for _ in range(10):
                    if self._report_lost():
                        break
                    time.sleep(0.1)
            self._stopped.set()

    def run(self) -> None:
        while not self._stopped.wait(self.interval):
            with self._lock:
                lost = not self._stopped.is_set() and self._report_lost()
            if lost:
                if not self._stopped.wait(self.grace):
                    self._give_up()
                return
            if self._finished():
                return


class ChildWatch(_Watch):
    """Watches the main process's children (see the module docstring).

    Args:
        procs: the children, with the global rank of each.
        describe: names a rank (``"stage 1 (rank 1)"``).
        grace: seconds the main process gets to stop by itself after a child is lost.
        interval: polling period in seconds.
    """

    def __init__(self, procs: Sequence[tuple[int, subprocess.Popen]], describe: Callable[[int], str],
                 grace: float = 20.0, interval: float = 0.5) -> None:  # fmt: skip
        super().__init__("asyncpipe-child-watch", grace, interval)
        self.procs, self.describe = list(procs), describe
        self._reported: set[int] = set()

    def _report_lost(self) -> bool:
        lost = False
        for rank, proc in self.procs:
            code = proc.poll()
            if code not in (None, 0):
                lost = True
                if rank not in self._reported:
                    self._reported.add(rank)
                    report(f"{self.describe(rank)}, pid {proc.pid}, ended unexpectedly ({_how(code)}); "
                            "stopping every stage of the job.")  # fmt: skip
        return lost

    def _finished(self) -> bool:
        return all(proc.poll() is not None for _, proc in self.procs)

    def _give_up(self) -> None:
        report(f"the main process did not stop within {self.grace:.0f} s; killing the other stages.")
        for _, proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        os._exit(1)


class ParentWatch(_Watch):
    """Watches, from a child, the main process that started it (see the module docstring).

    Args:
        parent_pid: the main process's pid.
        describe_parent: names the main process (``"stage 1 (rank 0)"``).
        describe_self: names this process.
        grace: seconds this process gets to stop by itself after the main process is lost.
        interval: polling period in seconds.
    """

    def __init__(self, parent_pid: int, describe_parent: str, describe_self: str, grace: float = 10.0,
                 interval: float = 0.5) -> None:  # fmt: skip
        super().__init__("asyncpipe-parent-watch", grace, interval)
        self.parent_pid, self.describe_parent, self.describe_self = parent_pid, describe_parent, describe_self
        self._reported = False

    def _report_lost(self) -> bool:
        if os.getppid() == self.parent_pid:
            return False
        if not self._reported:
            self._reported = True
            report(f"the main process, {self.describe_parent}, pid {self.parent_pid}, ended unexpectedly; "
                    f"stopping {self.describe_self}.")  # fmt: skip
        return True
