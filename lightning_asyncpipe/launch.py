"""Starting the stage processes: Lightning's launchers, plus what a pipeline needs from them.

- The module is checked in the main process before any child starts, so a model that cannot be
  pipelined fails at once instead of after N processes rendezvous.
- If the main process fails after launching, its children are killed (Lightning does so only
  on KeyboardInterrupt; a child blocked in a rendezvous would otherwise wait for the timeout).
- The main process watches its children and each child the main process
  (:mod:`lightning_asyncpipe.watchdog`): a lost stage process ends the job, named.
- Under Hydra the children are started with *this job's* overrides in run mode, so a multirun
  (``-m strategy=gpipe,pipedream_2bw``) starts one set of children per job instead of children
  that start sweeps of their own; after each multirun job the main process leaves the
  distributed state as it found it, so the next job launches afresh.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any, Callable, Optional, Protocol

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher, _SubprocessScriptLauncher
from lightning.pytorch.strategies.launchers.subprocess_script import _basic_subprocess_cmd

from lightning_asyncpipe.checkpoint_io import check_readable
from lightning_asyncpipe.signals import StopRequested
from lightning_asyncpipe.topology import Topology
from lightning_asyncpipe.watchdog import PARENT_PID_ENV, ChildWatch


__all__ = ["ScriptLauncher", "SpawnLauncher", "hydra_job_command", "reset_after_hydra_job"]

_LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


class LaunchedStrategy(Protocol):
    """What the launchers need of the strategy (no import of it: the strategy imports them)."""

    @property
    def topology(self) -> Topology: ...

    def _check_module(self, module: LightningModule) -> None: ...


def _hydra_config() -> Any:
    try:
        from hydra.core.hydra_config import HydraConfig
    except ImportError:
        return None
    return HydraConfig.get() if HydraConfig.initialized() else None


def hydra_job_command(local_rank: int) -> tuple[list[str], str]:
    """The command that re-runs the current Hydra job (run mode, this job's overrides) in a child."""
    import __main__
    from hydra.utils import get_original_cwd, to_absolute_path

    hc = _hydra_config()
    if __main__.__spec__ is None:
        command = [sys.executable, to_absolute_path(sys.argv[0])]
    else:
        command = [sys.executable, "-m", __main__.__spec__.name]
    command += list(hc.overrides.task)
    command += [f'hydra.run.dir="{hc.runtime.output_dir}"', f"hydra.job.name=train_ddp_process_{local_rank}",
                "hydra.output_subdir=null"]  # fmt: skip
    return command, get_original_cwd()


class _ValidatingMixin:
    strategy: LaunchedStrategy

    def launch(self, function: Callable, *args: Any, trainer: Optional[Trainer] = None, **kwargs: Any) -> Any:
        self._validate(args)
        return super().launch(function, *args, trainer=trainer, **kwargs)  # type: ignore[misc]

    def _validate(self, args: tuple[Any, ...]) -> None:
        if args and isinstance(args[0], LightningModule):
            self.strategy._check_module(args[0])
        for arg in args:  # fit/validate/test/predict's ckpt_path: a damaged file fails here, before any launch
            if isinstance(arg, str) and arg not in ("last", "best", "hpc") and not arg.startswith("registry"):
                check_readable(arg)


class ScriptLauncher(_ValidatingMixin, _SubprocessScriptLauncher):
    """Lightning's script launcher (as DDP), with the pipeline's checks and clean-ups."""

    watch: Optional[ChildWatch] = None

    def launch(self, function: Callable, *args: Any, trainer: Optional[Trainer] = None, **kwargs: Any) -> Any:
        self._validate(args)
        try:
            return self._launch(function, *args, **kwargs)
        except StopRequested:
            self._wait_for_children(timeout=30.0)  # they stop at the same step; kill only stragglers
            self.kill(getattr(signal, "SIGKILL", signal.SIGTERM))
            raise
        except BaseException:
            if self.watch is not None:
                self.watch.stop(failed=True)
            self.kill(getattr(signal, "SIGKILL", signal.SIGTERM))
            raise
        finally:
            if self.watch is not None:
                self.watch.stop()

    def _launch(self, function: Callable, *args: Any, **kwargs: Any) -> Any:
        """Lightning's launch without its child-process observer: that thread SIGKILLs the main
        process as soon as a child exits non-zero, also when every stage is stopping on purpose
        (a stop signal: the child may exit with 143 a moment before the main process does). The
        :class:`~lightning_asyncpipe.watchdog.ChildWatch` started with the children takes its
        place, with a grace period and a message naming the stage."""
        from lightning.fabric.utilities.distributed import _set_num_threads_if_needed

        self.cluster_environment.validate_settings(num_devices=self.num_processes, num_nodes=self.num_nodes)
        if not self.cluster_environment.creates_processes_externally:
            self._call_children_scripts()
        _set_num_threads_if_needed(num_processes=self.num_processes)
        return function(*args, **kwargs)

    def _wait_for_children(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for proc in getattr(self, "procs", []):
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass

    def _call_children_scripts(self) -> None:
        self._check_can_spawn_children()
        self.procs = []
        env = self.cluster_environment
        os.environ["MASTER_ADDR"] = env.main_address
        os.environ["MASTER_PORT"] = str(env.main_port)
        os.environ["NODE_RANK"] = str(env.node_rank())
        os.environ["LOCAL_RANK"] = str(env.local_rank())
        os.environ["WORLD_SIZE"] = f"{self.num_processes * self.num_nodes}"
        for local_rank in range(1, self.num_processes):
            child_env = {**os.environ, "LOCAL_RANK": str(local_rank), PARENT_PID_ENV: str(os.getpid())}
            if _hydra_config() is not None:
                command, cwd = hydra_job_command(local_rank)
            else:
                command, cwd = _basic_subprocess_cmd(), None
            self.procs.append(subprocess.Popen(command, env=child_env, cwd=cwd))
        first = env.node_rank() * self.num_processes
        topology = self.strategy.topology
        self.watch = ChildWatch(list(zip(range(first + 1, first + self.num_processes), self.procs)),
                                lambda rank: f"stage {topology.stage_of(rank)} (rank {rank})")  # fmt: skip
        self.watch.start()


class SpawnLauncher(_ValidatingMixin, _MultiProcessingLauncher):
    """Lightning's multiprocessing launcher with the pipeline's checks."""


def reset_after_hydra_job(launcher: ScriptLauncher) -> None:
    """After a Hydra multirun job, wait for the children and undo the launch in this process, so
    the next job's Trainer starts its own processes and process group."""
    from hydra.types import RunMode

    hc = _hydra_config()
    if hc is None or hc.mode != RunMode.MULTIRUN or not getattr(launcher, "procs", None):
        return
    for proc in launcher.procs:
        proc.wait()
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    for name in _LAUNCH_ENV:
        os.environ.pop(name, None)
    launcher.procs = []
