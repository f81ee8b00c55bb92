"""The strategy's process side: topology, launch, process groups, data sharding over replicas,
collectives, and stopping every stage together on a signal (mixed into
:class:`~lightning_asyncpipe.strategy.AsyncPipeStrategy`)."""

from __future__ import annotations

import os
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from lightning.fabric.utilities.distributed import (
    _all_gather_ddp_if_available,
    _distributed_is_initialized,
    _get_default_process_group_backend_for_device,
    _init_dist_connection,
    _sync_ddp_if_available,
)
from lightning.fabric.utilities.distributed import group as _group
from lightning.fabric.utilities.seed import reset_seed
from lightning.fabric.utilities.types import _Stateful
from lightning.pytorch import Trainer
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch import Tensor
from torch.utils.data import RandomSampler
from typing_extensions import override

from lightning_asyncpipe.comm import PipelineGroups
from lightning_asyncpipe.data import ResumableLoader
from lightning_asyncpipe.errors import PipelineConfigError
from lightning_asyncpipe.launch import ScriptLauncher, SpawnLauncher
from lightning_asyncpipe.signals import StopRequest, StopRequested, StopSignals
from lightning_asyncpipe.policies import get_policy, policy_class
from lightning_asyncpipe.topology import Topology
from lightning_asyncpipe.watchdog import PARENT_PID_ENV, ParentWatch, report

__all__ = ["LaunchGlue"]


class LaunchGlue:
    """Mixin of :class:`~lightning_asyncpipe.strategy.AsyncPipeStrategy`; see the module docstring."""

    @property
    def is_distributed(self) -> bool:
        # Lightning injects a DistributedSampler (sharding over replicas) and syncs `sync_dist` logs
        # only when this is True. With one replica every stage must read exactly the user's own
        # batches, as a single-device run would: see `process_dataloader`.
        return self.topology.n_replicas > 1

    @override
    def process_dataloader(self, dataloader: Any) -> Any:
        """Make a shuffling sampler draw the same order on every stage of a pipeline, and keep the
        training loader's position in checkpoints (:class:`~lightning_asyncpipe.data.ResumableLoader`).

        With one replica the user's sampler is kept (single-device semantics); a ``RandomSampler``
        without its own generator would draw from each process's global RNG, which diverges as
        stages consume different amounts of randomness (dropout), so it gets a generator seeded
        identically on every rank.
        """
        sampler = getattr(dataloader, "sampler", None)
        if isinstance(sampler, RandomSampler) and sampler.generator is None and self._data_seed is not None:
            sampler.generator = torch.Generator().manual_seed(self._data_seed)
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        training = trainer is not None and trainer.state.stage == RunningStage.TRAINING
        if training and not policy_class(self.policy_name).synchronous:
            self._check_last_batch(dataloader)
        if training and not isinstance(dataloader, _Stateful) and hasattr(dataloader, "__len__"):
            return ResumableLoader(dataloader, self._data_position, self._unrestored_loader_state)
        return dataloader

    def _unrestored_loader_state(self, loader: ResumableLoader) -> Optional[dict[str, Any]]:
        """The state the checkpoint holds for ``loader`` if Lightning skipped loading it: it loads the
        training loaders' states only when it counts the resume as a restart, not from a checkpoint
        saved at the end of an epoch in epoch-based training, where the sampler's generator must
        still continue from the saved state (else the next epochs repeat the first ones' orders)."""
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if trainer is None:
            return None
        fit_loop = trainer.fit_loop
        states = fit_loop._combined_loader_states_to_load
        combined = fit_loop._combined_loader
        if not states or fit_loop.restarting or combined is None:
            return None  # nothing saved, or Lightning loads it itself
        stateful = [dl for dl in combined.flattened if isinstance(dl, _Stateful)]
        if loader not in stateful or len(stateful) != len(states):
            return None
        i = stateful.index(loader)
        state, states[i] = states[i], {}  # handed over once
        if not any(states):
            fit_loop._combined_loader_states_to_load = []
        return state or None

    def _check_last_batch(self, dataloader: Any) -> None:
        """Asynchronous policies: a training loader whose last batch holds fewer samples than
        ``microbatches`` (or whose batches do not fill whole accumulation windows) fails here,
        before the first step, rather than at the end of an epoch of work (synchronous policies
        run such a batch on fewer micro-batches)."""
        size, drop_last = getattr(dataloader, "batch_size", None), getattr(dataloader, "drop_last", True)
        sampler = getattr(dataloader, "sampler", None)
        try:
            n = len(sampler) if sampler is not None else len(dataloader.dataset)
        except TypeError:  # an iterable without a length: nothing to check
            return
        if not isinstance(size, int) or size <= 0:
            return
        last = n % size if not drop_last else 0
        batches = -(-n // size) if not drop_last else n // size
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        trained, window = batches, 1
        if trainer is not None:  # the batches an epoch trains (limit_train_batches)
            limit = trainer.limit_train_batches
            if isinstance(limit, int):
                trained = min(batches, limit)
            elif isinstance(limit, float) and limit < 1.0:
                trained = int(batches * limit)
            window = trainer.accumulate_grad_batches
        if window > 1 and trained % window and not (trainer is not None and 0 <= trainer.max_steps * window <= trained):
            raise PipelineConfigError(
                f"{type(self).__name__}(policy={self.policy_name!r}) with accumulate_grad_batches={window}: an epoch "
                f"trains {trained} batches, not a multiple of {window}. An asynchronous policy trains every {window} "
                f"batches as one update of {window} x {self.microbatches} micro-batches and cannot end an epoch inside "
                "one. Use a number of batches per epoch divisible by accumulate_grad_batches (drop_last=True, the "
                "dataset or batch size, limit_train_batches), or a synchronous policy (gpipe, pipedream_flush)."
            )
        if trained < batches or (trainer is not None and 0 <= trainer.max_steps * window < batches):
            last = 0  # training does not reach the last batch
        if 0 < last < self.microbatches:
            raise PipelineConfigError(
                f"{type(self).__name__}(microbatches={self.microbatches}): the training loader's last batch holds "
                f"{last} sample(s) ({n} samples in batches of {size}), fewer than the micro-batches every step is split "
                "into. Set drop_last=True on the DataLoader, a batch size that divides the dataset, or "
                f"microbatches <= {last}."
            )

    def _data_position(self) -> tuple[int, bool]:
        """Batches of the current epoch trained so far, and whether the epoch is complete."""
        assert self.lightning_module is not None
        trainer = self.lightning_module.trainer
        trained = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return trained, trained >= trainer.num_training_batches

    @property
    def num_nodes(self) -> int:
        return self._num_nodes

    @num_nodes.setter
    def num_nodes(self, num_nodes: int) -> None:
        self._num_nodes = num_nodes

    @property
    def num_processes(self) -> int:
        return len(self.parallel_devices) if self.parallel_devices is not None else 0

    @property
    def n_stages(self) -> int:
        return self._stages if self._stages is not None else self.num_processes * self.num_nodes

    @property
    def topology(self) -> Topology:
        """The rank layout; available once the Trainer knows the devices."""
        if self._topology is None:
            self._topology = Topology(self.num_nodes * self.num_processes, self.n_stages)
        return self._topology

    @property
    def stage(self) -> int:
        return self.topology.stage_of(self.global_rank)

    @property
    def replica(self) -> int:
        return self.topology.replica_of(self.global_rank)

    @property
    @override
    def root_device(self) -> torch.device:
        assert self.parallel_devices is not None
        return self.parallel_devices[self.local_rank]

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        # every stage of a replica reads the same batches: shard over replicas, not over the world
        return {"num_replicas": self.topology.n_replicas, "rank": self.replica}

    def set_world_ranks(self) -> None:
        if self.cluster_environment is not None:
            self.cluster_environment.set_global_rank(self.node_rank * self.num_processes + self.local_rank)
            self.cluster_environment.set_world_size(self.num_nodes * self.num_processes)
        rank_zero_only.rank = self.global_rank

    @override
    def _configure_launcher(self) -> None:
        assert self.cluster_environment is not None
        self._topology = None
        self.topology  # noqa: B018  (devices not divisible by stages fail here, before any launch)
        policy = get_policy(self.policy_name, **self.policy_options)
        policy.validate(self.n_stages, self.microbatches)
        if self._start_method == "popen":
            self._launcher = ScriptLauncher(self.cluster_environment, self.num_processes, self.num_nodes)
        else:
            self._launcher = SpawnLauncher(self, start_method=self._start_method)
        self._launcher.strategy = self  # type: ignore[union-attr]

    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        reset_seed()
        self.set_world_ranks()
        backend = self._process_group_backend or _get_default_process_group_backend_for_device(self.root_device)
        self._process_group_backend = backend
        kwargs: dict[str, Any] = {"timeout": self._timeout}
        if self.root_device.type != "cpu":
            kwargs["device_id"] = self.root_device
        _init_dist_connection(self.cluster_environment, backend, **kwargs)
        self._groups = PipelineGroups(self.topology, self.global_rank)
        self._watch_parent()
        self._data_seed = int(self.broadcast(int(torch.randint(0, 2**62, ()).item())))

    def _watch_parent(self) -> None:
        """In a child started by :class:`ScriptLauncher`: end this process if the main one is lost."""
        parent = os.environ.get(PARENT_PID_ENV)
        if parent is None or int(parent) != os.getppid() or self._parent_watch is not None:
            return
        topo, parent_rank = self.topology, self.global_rank - self.local_rank  # this node's main process
        self._parent_watch = ParentWatch(int(parent), f"stage {topo.stage_of(parent_rank)} (rank {parent_rank})",
                                         f"stage {self.stage} (rank {self.global_rank})")  # fmt: skip
        self._parent_watch.start()

    def _setup_stop_signals(self, trainer: Trainer) -> None:
        """SIGTERM / SIGINT to any process stop every stage at the same step (:mod:`~lightning_asyncpipe.signals`).

        Lightning's own SIGTERM handler broadcasts from inside the handler (a collective the other
        ranks are not in) and its per-batch check blocks every stage on rank 0: both are replaced."""
        if self._stop_signals is not None:
            self._stop_signals.uninstall()
        self._stop_signals = None
        if self.world_size < 2:
            return
        topo = self.topology
        self._stop_signals = StopSignals(self.global_rank, self.world_size, self.root_device,
                                         lambda rank: f"stage {topo.stage_of(rank)} (rank {rank})")  # fmt: skip
        self._stop_signals.install()
        trainer._signal_connector._sigterm_notifier_fn = self._stop_signals.handler  # type: ignore[method-assign]
        if trainer.state.fn == TrainerFn.FITTING:
            trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor = self._check_stop  # type: ignore[method-assign]

    def _check_stop(self) -> None:
        """At each training step boundary: stop if any rank got a stop signal (agreed a step late)."""
        assert self._stop_signals is not None
        request = self._stop_signals.check()
        if request is not None:
            self._stop_request = request
        # an asynchronous accumulation window's batches have not run yet: stop once it is complete
        # (the same step on every rank: every rank holds the same window), so the checkpoint resumes
        if self._stop_request is not None and not getattr(self, "_window", None):
            self._stop(self._stop_request)

    def _stop(self, request: StopRequest) -> None:
        """Every rank, at the same step: drain, write a resumable checkpoint where a checkpoint
        callback is configured, and end with ``128 + signum``."""
        assert self._stop_signals is not None and self.lightning_module is not None
        self._stop_signals.drain()
        trainer = self.lightning_module.trainer
        callback = trainer.checkpoint_callback
        path = None
        if callback is not None and getattr(callback, "dirpath", None):
            path = os.path.join(str(callback.dirpath), "interrupted.ckpt")
            trainer.save_checkpoint(path)  # drains the pipeline first
        watch = getattr(self._launcher, "watch", None)
        if watch is not None:
            watch.stop()  # in the main process: the other stages now end on purpose
        self.barrier()
        where = request.describe(lambda rank: f"stage {self.topology.stage_of(rank)} (rank {rank})")
        saved = f"resumable checkpoint: {path}" if path else "no checkpoint callback, so no checkpoint was written"
        message = (f"stopped every stage after step {trainer.global_step} on {where}; {saved} "
                   f"(exit status {128 + request.signum}).")  # fmt: skip
        if self.global_rank == 0:
            report(message)
        raise StopRequested(request, message)

    @property
    @override
    def world_size(self) -> int:
        # While Lightning runs the setup hooks (DataModule.setup sizes per-device batches and
        # samplers as `batch_size // trainer.world_size`, the data-parallel convention), the world
        # is the data-parallel replicas: every pipeline gets the user's whole batch.
        # The same while Lightning checks a skipped training step (`training_step` returned None):
        # every stage skipped it alike, so only data-parallel replicas could disagree.
        if getattr(self, "_in_setup_hooks", False) or getattr(self, "_skipping", False):
            return self.topology.n_replicas
        return super().world_size  # type: ignore[misc]

    @override
    def barrier(self, name: Optional[str] = None) -> None:
        if name in ("pre_setup", "post_setup"):  # around the setup hooks (lightning/pytorch/trainer/call.py)
            self._in_setup_hooks = name == "pre_setup"
        if _distributed_is_initialized():
            dist.barrier()

    @override
    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if not _distributed_is_initialized():
            return obj
        payload = [obj]
        dist.broadcast_object_list(payload, src, group=_group.WORLD, device=_object_device(self.root_device))
        return payload[0]

    @override
    def reduce(self, tensor: Union[Tensor, Any], group: Optional[Any] = None,
               reduce_op: Optional[Union[Any, str]] = "mean") -> Union[Tensor, Any]:  # fmt: skip
        """``sync_dist`` logging: over the replicas of this stage (every stage logs the same values, the
        last stage's, replayed), never the world, which the other stages do not enter at that point."""
        if isinstance(tensor, Tensor):
            if group is None:
                if self.topology.n_replicas == 1:
                    return tensor
                group = self._groups.stage if self._groups is not None else None
            return _sync_ddp_if_available(tensor, group, reduce_op=reduce_op)
        return tensor

    @override
    def all_gather(self, tensor: Tensor, group: Optional[Any] = None, sync_grads: bool = False) -> Tensor:
        """``self.all_gather`` in user code: over the replicas of this stage, stacked as under DDP
        (``(replicas, ...)``; with one replica the tensor itself, as Lightning documents for a world
        of one). The stages of one pipeline hold the same evaluation results (every
        stage runs the step's code after the model call on the last stage's outputs), so gathering
        over the world would repeat each one once per stage. ``LightningModule.all_gather`` passes
        the world group when the user names none: read as the default too."""
        if group is None or group is _group.WORLD:
            if self.topology.n_replicas == 1 or not _distributed_is_initialized():
                return tensor
            group = self._groups.stage if self._groups is not None else None
        return _all_gather_ddp_if_available(tensor, group=group, sync_grads=sync_grads)

    @override
    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        """Over every process (callbacks such as ModelCheckpoint and EarlyStopping call it on all ranks)."""
        if not _distributed_is_initialized():
            return decision
        votes = torch.tensor(int(decision), device=self.root_device)
        dist.all_reduce(votes, op=dist.ReduceOp.SUM)
        return bool(votes == dist.get_world_size()) if all else bool(votes)


def _object_device(device: torch.device) -> Optional[torch.device]:
    return device if device.type == "cuda" else None
