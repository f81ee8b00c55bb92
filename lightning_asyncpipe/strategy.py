"""Lightning glue: ``AsyncPipeStrategy``, the lifecycle that wires partition, transport, policy and
executor into a Trainer. No pipeline logic lives here."""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any, Callable, Literal, Optional, Union

import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.distributed import (
    _distributed_is_initialized,
    _get_default_process_group_backend_for_device,
    _init_dist_connection,
    _sync_ddp_if_available,
)
from lightning.fabric.utilities.distributed import group as _group
from lightning.fabric.utilities.seed import reset_seed
from lightning.fabric.utilities.types import _Stateful
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import ParallelStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.data import RandomSampler
from typing_extensions import override

from lightning_asyncpipe.checkpoint import (
    PIPELINE_STATE_KEY,
    load_optimizer_state_by_name,
    merge_optimizer_states,
    merge_pipeline_states,
    optimizer_state_by_name,
)
from lightning_asyncpipe.checkpoint_io import AtomicCheckpointIO
from lightning_asyncpipe.comm import PipelineGroups, TorchP2PTransport
from lightning_asyncpipe.data import ResumableLoader
from lightning_asyncpipe.errors import PipelineConfigError
from lightning_asyncpipe.executor import PipelineExecutor
from lightning_asyncpipe.handoff import StepHandoff
from lightning_asyncpipe.launch import ScriptLauncher, SpawnLauncher, reset_after_hydra_job
from lightning_asyncpipe.metrics import PipelineMetrics
from lightning_asyncpipe.microbatch import batch_size, microbatch_weights, split
from lightning_asyncpipe.pipeline import StagePipeline
from lightning_asyncpipe.partition import (
    MEASURED_BALANCES,
    Balance,
    Partition,
    balance_by_cost,
    check_parameters_inside,
    example_call,
    find_pipelined,
    partition_module,
    plan_partition,
    restore_module,
)
from lightning_asyncpipe.tied import SharedParameters
from lightning_asyncpipe.signals import StopRequest, StopRequested, StopSignals
from lightning_asyncpipe.profiling import layer_costs, profile_layers, sequential_input
from lightning_asyncpipe.policies import WeightPolicy, available_policies, get_policy, policy_class
from lightning_asyncpipe.policies.base import StepFn
from lightning_asyncpipe.topology import Topology
from lightning_asyncpipe.trace import TimelineEvent, TimelineRecorder
from lightning_asyncpipe.trace import merge as merge_timeline
from lightning_asyncpipe.watchdog import PARENT_PID_ENV, ParentWatch, report
from lightning_asyncpipe.user_step import LogRecord, LogRecorder, UserStep

__all__ = ["AsyncPipeStrategy"]

log = logging.getLogger(__name__)

StartMethod = Literal["popen", "spawn", "fork", "forkserver"]


class AsyncPipeStrategy(ParallelStrategy):
    """Pipeline-parallel training of a LightningModule, one process per stage.

    ``devices = stages x replicas``: each process holds one stage of one pipeline replica (see
    :mod:`lightning_asyncpipe.topology` for the rank layout). The user's steps run unchanged on the
    last stage, one micro-batch at a time; the weight-version ``policy`` decides the schedule and
    which weights every forward and backward sees.

    Args:
        policy: a registered policy name (``"gpipe"``, ``"pipedream_flush"``, ...).
        microbatches: micro-batches per batch; each batch is split along dim 0.
        stages: pipeline stages; default: all devices form one pipeline.
        balance: ``"uniform"``, ``"parameters"``, ``"time"``, ``"memory"`` (measured at setup on
            one micro-batch of ``example_input_array``) or a list of layer counts per stage.
        sequential: dotted path of the submodule to pipeline, e.g. ``"model"`` or ``"net.model"``
            (any module, not only an ``nn.Sequential``; found automatically: the single child,
            descending, that holds every parameter). Its forward is captured as a graph
            (:mod:`lightning_asyncpipe.capture`) and split before its blocks
            (:mod:`lightning_asyncpipe.partition`).
        split_points: the module each stage after the first begins with, e.g.
            ``["transformer.h.2"]`` (names from the pipelined module's ``named_modules()``);
            default: chosen among its repeated blocks by ``balance``.
        leaf_modules: modules of the pipelined module to run whole instead of tracing through
            (e.g. one with data-dependent control flow); each runs on one stage.
        policy_options: keyword arguments for the policy.
        process_group_backend: ``"gloo"``, ``"nccl"``; default from the device.
        timeout: timeout of the process groups and of every wait for a neighbour's tensors.
        start_method: ``"popen"`` (re-run the script, as DDP) or a multiprocessing start method.
        detect_anomaly: raise :class:`~lightning_asyncpipe.errors.NonFiniteError`, naming the stage
            and micro-batch, when a stage output or the loss holds NaN or Inf.
        defer_weight_grad: compute ``nn.Linear`` weight gradients once per batch at the update
            instead of once per micro-batch (:mod:`lightning_asyncpipe.wgrad`): the same result,
            faster with small micro-batches; costs keeping each layer's output gradient until then.
        pipeline_metrics: log ``pipeline/stage{s}/...`` metrics (bubble, staleness, stashed
            weights, activations, transfer wait) and throughput every ``log_every_n_steps`` steps.

    Raises:
        PipelineConfigError: for an unknown policy, ``microbatches < 1`` or bad options; at setup,
            for a module that cannot be pipelined or an unsupported Trainer configuration.

    Example::

        trainer = L.Trainer(accelerator="cpu", devices=4,
                            strategy=AsyncPipeStrategy(policy="pipedream_flush", microbatches=8))
        trainer.fit(model, datamodule)
    """

    strategy_name = "async_pipe"

    def __init__(
        self,
        policy: str = "pipedream_flush",
        microbatches: int = 4,
        stages: Optional[int] = None,
        balance: Balance = "uniform",
        sequential: Optional[str] = None,
        split_points: Optional[Sequence[str]] = None,
        leaf_modules: Sequence[str] = (),
        policy_options: Optional[Mapping[str, Any]] = None,
        accelerator: Optional[Accelerator] = None,
        parallel_devices: Optional[list[torch.device]] = None,
        cluster_environment: Optional[ClusterEnvironment] = None,
        checkpoint_io: Optional[CheckpointIO] = None,
        precision_plugin: Optional[Precision] = None,
        process_group_backend: Optional[str] = None,
        timeout: Optional[timedelta] = default_pg_timeout,
        start_method: StartMethod = "popen",
        pipeline_metrics: bool = True,
        detect_anomaly: bool = False,
        defer_weight_grad: bool = True,
    ) -> None:
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io if checkpoint_io is not None else AtomicCheckpointIO(),
            precision_plugin=precision_plugin,
        )
        name = type(self).__name__
        if not isinstance(microbatches, int) or isinstance(microbatches, bool) or microbatches < 1:
            raise PipelineConfigError(f"{name} requires microbatches >= 1 (an int), got {microbatches!r}.")
        if stages is not None and (not isinstance(stages, int) or stages < 1):
            raise PipelineConfigError(f"{name} requires stages >= 1 (an int) or None, got {stages!r}.")
        if start_method not in ("popen", "spawn", "fork", "forkserver"):
            raise PipelineConfigError(f"{name}: start_method must be popen, spawn, fork or forkserver, not {start_method!r}.")
        policy_class(policy)  # unknown names fail here, in the main process
        self.policy_name = policy
        self.policy_options = dict(policy_options or {})
        get_policy(policy, **self.policy_options)  # bad options too
        self.microbatches = microbatches
        self.balance = balance
        self.sequential = sequential
        self.split_points = list(split_points) if split_points is not None else None
        self.leaf_modules = tuple(leaf_modules)
        self._shared: Optional[SharedParameters] = None
        self._stages = stages
        self._num_nodes = 1
        self._process_group_backend = process_group_backend
        self._timeout = timeout
        self._start_method = start_method
        self._topology: Optional[Topology] = None
        self._groups: Optional[PipelineGroups] = None
        self._partition: Optional[Partition] = None
        self._policy: Optional[WeightPolicy] = None
        self._executor: Optional[PipelineExecutor] = None
        self._recorder = LogRecorder()
        self._pipeline: Optional[StagePipeline] = None
        self._fit_pipeline: Optional[StagePipeline] = None
        self.pipeline_metrics = pipeline_metrics
        self.detect_anomaly = detect_anomaly
        self.defer_weight_grad = defer_weight_grad
        self.measured_costs: Optional[list[float]] = None
        self.resolved_balance: Optional[list[int]] = None
        self._metrics: Optional[PipelineMetrics] = None
        self._last_step_start: Optional[float] = None
        self.timeline: Optional[TimelineRecorder] = None
        self._handoff: Optional[StepHandoff] = None
        self._stop_signals: Optional[StopSignals] = None
        self._last_output: Any = None
        self._pending_payloads: list[Any] = []
        self._failed = False
        self._data_seed: Optional[int] = None
        self._parent_watch: Optional[ParentWatch] = None

    # ------------------------------------------------------------------ topology and launch

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
        if training and not isinstance(dataloader, _Stateful) and hasattr(dataloader, "__len__"):
            return ResumableLoader(dataloader, self._data_position)
        return dataloader

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

    # ------------------------------------------------------------------ setup

    def _check_module(self, module: LightningModule) -> None:
        """Everything about the module that can be checked before processes start."""
        name = type(self).__name__
        if not module.automatic_optimization:
            raise PipelineConfigError(
                f"{name} does not support manual optimization: the pipeline runs the backward passes and applies the "
                "updates itself. Remove `self.automatic_optimization = False` and return the loss from training_step."
            )
        attr = find_pipelined(module, self.sequential)
        check_parameters_inside(module, attr)
        balance = self.balance
        if balance in MEASURED_BALANCES:
            layers = module.get_submodule(attr)
            if not isinstance(layers, nn.Sequential):
                raise PipelineConfigError(
                    f"balance={self.balance!r} profiles the layers of an nn.Sequential, but '{attr}' is a "
                    f"{type(layers).__name__}. Use balance='parameters', a list of block counts per stage, or "
                    "split_points=[...]."
                )
            sequential_input(module, layers, self.microbatches)  # an example to profile?
            balance = "uniform"  # the measured counts come at setup; enough layers?
        # capture and split as setup will (a forward that cannot be captured, bad split points, too
        # few blocks): in the main process, before any other starts
        plan_partition(module, self.n_stages, balance, attr, self.split_points, self.leaf_modules,
                       example_call(module, attr))  # fmt: skip

    def _check_trainer(self, trainer: Trainer) -> None:
        name = type(self).__name__
        if trainer.accumulate_grad_batches != 1:
            raise PipelineConfigError(
                f"{name} does not support accumulate_grad_batches={trainer.accumulate_grad_batches}: gradients are "
                "already accumulated over micro-batches. Use a larger batch (or more micro-batches) instead."
            )
        scaler = getattr(self.precision_plugin, "scaler", None)
        if scaler is not None:
            raise PipelineConfigError(
                f"{name} does not support precision='16-mixed' (a gradient scaler cannot see the loss on every stage). "
                "Use precision='bf16-mixed' or '32-true'."
            )

    @override
    def setup(self, trainer: Trainer) -> None:
        assert self.accelerator is not None and self.model is not None and self._groups is not None
        module = self.lightning_module
        assert module is not None
        self._check_module(module)
        self._check_trainer(trainer)
        self.accelerator.setup(trainer)
        topo = self.topology
        balance = self._measured_balance(module) if self.balance in MEASURED_BALANCES else self.balance
        attr = find_pipelined(module, self.sequential)
        self._partition = partition_module(module, topo.n_stages, self.stage, balance, attr, self.split_points,
                                           self.leaf_modules, example_call(module, attr))  # fmt: skip
        self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        # before the user's configure_optimizers: a stage that does not own a shared parameter
        # holds a mirror of it, not a parameter
        self._shared = SharedParameters(self._partition.shared, self._partition.local, self._partition.shared_params,
                                        self.stage, topo, self.global_rank)  # fmt: skip
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            from lightning.fabric.utilities.optimizer import _optimizers_to_device

            _optimizers_to_device(self.optimizers, self.root_device)
        self.precision_plugin.clip_grad_by_norm = self._clip_grad_by_norm  # type: ignore[method-assign]
        self._policy = get_policy(self.policy_name, **self.policy_options)
        if not self._policy.synchronous:
            # by design the first update of an asynchronous stage comes after the scheduler's first step
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before `optimizer.step\(\)`")
        stage, replica = self.stage, self.replica
        self._policy.bind(stage, topo.n_stages, self.microbatches, self._partition.local,
                          self.optimizers[0] if self.optimizers else None)  # fmt: skip
        self._shared.bind(self._policy, self.microbatches)
        transport = TorchP2PTransport(
            prev_rank=topo.rank_of(stage - 1, replica) if stage > 0 else None,
            next_rank=topo.rank_of(stage + 1, replica) if stage < topo.n_stages - 1 else None,
            groups=self._groups.p2p,
            device=self.root_device,
            timeout=self._timeout,
            describe=lambda rank: f"stage {topo.stage_of(rank)} (rank {rank})",
        )
        self._executor = PipelineExecutor(
            self._partition.local, stage, topo.n_stages, transport, self._policy, self._apply_update,
            defer_weight_grad=self.defer_weight_grad,
        )
        self._executor.check_finite = self.detect_anomaly
        if self._shared:
            self._executor.select_shared = self._shared.select
        self._pipeline = StagePipeline(self._executor, self.microbatches, self.optimizers[0] if self.optimizers else None)
        if trainer.state.fn == TrainerFn.FITTING:
            # checkpoints hold this one's state, also when saved after fit and a later validate/test
            self._fit_pipeline = self._pipeline
        self._drain_before_validation_zero_grad(module)
        self._metrics = PipelineMetrics(topo.n_stages, stage, self._groups.pipeline) if self.pipeline_metrics else None
        self._last_step_start = None
        # No stage waits for the last one at step boundaries: asynchronous policies would get their
        # bubble back, and even synchronous ones pay for it (a blocking hand-off made the last stage
        # of pipedream_flush wait ~10 ms a step for stage 0's update; benchmarks/overhead.py). With
        # several replicas `sync_dist` logs need every rank to log in the same step: keep it blocking.
        overlap = topo.n_replicas == 1
        self._handoff = StepHandoff(topo.pipeline_ranks(replica), self.global_rank, self._groups.pipeline,
                                    deferred=overlap, device=self.root_device)  # fmt: skip
        self._setup_stop_signals(trainer)

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
            self._stop(request)

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

    def _measured_balance(self, module: LightningModule) -> list[int]:
        """``balance="time"`` / ``"memory"``: profile every layer on this rank's device, average the
        costs over all ranks (so every rank partitions alike) and minimise the largest stage."""
        layers = module.get_submodule(find_pipelined(module, self.sequential))
        sample = sequential_input(module, layers, self.microbatches)
        profiles = profile_layers(layers, sample, self.root_device, microbatches=self.microbatches,
                                  defer_weight_grad=self.defer_weight_grad)  # fmt: skip
        costs = layer_costs(profiles, str(self.balance), self.microbatches, self.n_stages)
        everyone: list[Any] = [None] * self.world_size
        dist.all_gather_object(everyone, costs)
        costs = [sum(c[i] for c in everyone) / len(everyone) for i in range(len(costs))]
        counts = balance_by_cost(costs, self.n_stages, [any(True for _ in layer.parameters()) for layer in layers])
        self.measured_costs, self.resolved_balance = costs, counts
        unit, scale = ("ms", 1e3) if self.balance == "time" else ("MiB", 2**-20)
        per_stage, i = [], 0
        for n in counts:
            per_stage.append(sum(costs[i : i + n]) * scale)
            i += n
        log.info(f"balance={self.balance!r}: layers per stage {counts}, cost per stage "
                 f"{[round(c, 2) for c in per_stage]} {unit} (per micro-batch)")  # fmt: skip
        return counts

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
        if len(optimizers) != 1:
            raise several(len(optimizers))
        for opt in optimizers:
            # The pipeline owns the gradients: partial sums of in-flight micro-batches must survive
            # Lightning's zero_grad between steps. The executor clears gradients after each update.
            opt.zero_grad = _keep_gradients  # type: ignore[method-assign]
        self.optimizers = optimizers

    @override
    def model_to_device(self) -> None:
        assert self.model is not None
        self.model.to(self.root_device)

    # ------------------------------------------------------------------ training

    def _user_step(self, fn: Callable[..., Any], args: tuple[Any, ...], training: bool) -> UserStep:
        assert self._partition is not None and self._pipeline is not None
        microbatches = split(args[0], self.microbatches)
        first = self._pipeline.first_microbatch if training else 0
        return UserStep(fn, microbatches, first, tuple(args[1:]), self._partition,
                        microbatch_weights(microbatches), self._recorder, training)  # fmt: skip

    def _recording(self) -> Any:
        """While user steps run, ``self.log`` goes to the recorder."""
        module = self.lightning_module
        assert module is not None
        recorder = self._recorder

        class _Recording:
            def __enter__(self) -> None:
                module.log = recorder  # type: ignore[method-assign]

            def __exit__(self, *exc: Any) -> None:
                del module.log

        return _Recording()

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        assert self._pipeline is not None and self.lightning_module is not None
        started = time.perf_counter()
        self._replay_pending()
        step = self._user_step(self.lightning_module.training_step, args, training=True)
        with self.precision_plugin.train_step_context(), self._recording():
            self._pipeline.train_step(step)
        output = self._hand_off(step.merged_outputs(), self._recorder.pop(), training=True)
        drain_due = self._drain_due()
        if drain_due:
            self.drain()
            self._replay_pending()  # the epoch's (or fit's) last records, on every stage
        self._account_step(args[0], started, drain_due)
        return output

    def _account_step(self, batch: Any, started: float, window_end: bool) -> None:
        """Feed this step's timings to the timeline and the metrics; log the metrics when due."""
        assert self._executor is not None and self._pipeline is not None and self._policy is not None
        timings = self._executor.pop_timings()
        if self.timeline is not None:
            self.timeline.record(self._pipeline.step - 1, timings)
        if self._metrics is None:
            return
        previous, self._last_step_start = self._last_step_start, started
        samples = batch_size(batch) * self.topology.n_replicas if previous is not None else 0
        self._metrics.update(timings, self._policy.report(), self._executor.pop_peak_activation_bytes(),
                             samples, samples * _tokens_per_sample(batch), started - previous if previous else 0.0)  # fmt: skip
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        every = max(1, trainer.log_every_n_steps) if trainer is not None else 50
        if window_end or self._pipeline.step % every == 0:
            assert self.lightning_module is not None
            for name, value in self._metrics.compute().items():
                self.lightning_module.log(name, value, on_step=True, on_epoch=False)

    def gather_timeline(self) -> list[TimelineEvent]:
        """Every stage's recorded timeline events of this replica (collective over the pipeline)."""
        local = self.timeline.events if self.timeline is not None else []
        return merge_timeline(self._gather_stages(local))

    def _drain_due(self) -> bool:
        """Whether this step ends an epoch or the fit: the pipeline must be empty afterwards."""
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if trainer is None:
            return True
        loop = trainer.fit_loop
        # the data ran out, or limit_train_batches was reached
        last_batch = loop.epoch_loop.batch_progress.is_last_batch or loop.epoch_loop._num_ready_batches_reached()
        max_steps = trainer.max_steps if trainer.max_steps is not None and trainer.max_steps >= 0 else None
        final_step = max_steps is not None and trainer.global_step + 1 >= max_steps
        return bool(last_batch or final_step)

    def _drain_before_validation_zero_grad(self, module: LightningModule) -> None:
        """Lightning clears the module's gradients (``on_validation_model_zero_grad``) before a
        validation run inside fit, which would wipe the partial gradients of micro-batches still in
        flight: drain first."""
        if "on_validation_model_zero_grad" in vars(module):
            return
        original = module.on_validation_model_zero_grad

        def drain_then_zero_grad() -> None:
            self.drain()
            original()

        module.on_validation_model_zero_grad = drain_then_zero_grad  # type: ignore[method-assign]

    def drain(self) -> None:
        """Complete the micro-batches in flight and apply their updates (all stages call it together)."""
        if self._pipeline is not None and self._executor is not None:
            self._pipeline.drain()  # backwards and updates only: no user code runs
            if self._shared:
                self._shared.settle()
        if self._handoff is not None:
            self._pending_payloads += self._handoff.flush()

    def _hand_off(self, output: Any, records: list[LogRecord], training: bool) -> Any:
        """Give every stage of this replica the last stage's step output and log records, and log them.

        Asynchronous training steps get the last stage's payload one step late (see
        :mod:`lightning_asyncpipe.handoff`) and return the latest output they have (a NaN loss
        before the first one arrives); evaluation steps always exchange at once.
        """
        assert self._handoff is not None and self._pipeline is not None
        sent = [LogRecord(r.name, _to_cpu(r.value), r.kwargs) for r in records if _is_plain_value(r.value)]
        payload = (_to_cpu(output), sent)
        if training:
            payloads = self._handoff.exchange(self._pipeline.step - 1, payload)
        else:
            payloads = self._handoff.broadcast(payload)
        self._replay_payloads(payloads, records)
        if self._handoff.is_source:
            return output
        if training and self._last_output is None:
            return {"loss": torch.tensor(float("nan"), device=self.root_device)}
        return _to_device(self._last_output, self.root_device)

    def _replay_payloads(self, payloads: list[Any], own_records: Optional[list[LogRecord]] = None) -> None:
        assert self._handoff is not None
        for payload_output, payload_records in payloads:
            # the last stage replays its own records, torchmetrics objects included
            self._replay(own_records if self._handoff.is_source and own_records is not None else payload_records)
            self._last_output = payload_output

    def _replay_pending(self) -> None:
        """Log the payloads a drain collected (a drain may run in hooks where logging is not allowed)."""
        payloads, self._pending_payloads = self._pending_payloads, []
        self._replay_payloads(payloads)

    def _replay(self, records: list[LogRecord]) -> None:
        module = self.lightning_module
        assert module is not None
        for r in records:
            module.log(r.name, _to_device(r.value, self.root_device), **r.kwargs)

    def _apply_update(self, batch: int, step_fn: Optional[StepFn] = None) -> None:
        """One optimizer update of this stage's live weights (called by the policy at a ``U`` action)."""
        assert self.lightning_module is not None
        optimizer = self.optimizers[0]
        if self._shared:
            self._shared.before_update(batch)  # the owner of a shared parameter gets the holders' gradients
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
        return closure()

    # ------------------------------------------------------------------ evaluation

    def _eval_step(self, fn: Callable[..., Any], args: tuple[Any, ...], share_output: bool) -> Any:
        assert self._pipeline is not None
        step = self._user_step(fn, args, training=False)
        with self._recording():
            self._pipeline.eval_step(step)
        if self._executor is not None:
            self._executor.pop_timings()  # evaluation does not count in the training metrics
        output = step.merged_outputs() if step.outputs else None
        records = self._recorder.pop()
        if not share_output:
            self._hand_off(None, records, training=False)
            return output
        return self._hand_off(output, records, training=False)

    @override
    def on_validation_start(self) -> None:
        self.drain()

    @override
    def on_test_start(self) -> None:
        self.drain()

    @override
    def on_predict_start(self) -> None:
        self.drain()

    @override
    def on_train_end(self) -> None:
        self.drain()
        if self._stop_signals is not None and (request := self._stop_signals.drain()) is not None:
            self._stop(request)  # a signal during the last step: the job still ends as stopped

    @override
    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        assert self.lightning_module is not None
        with self.precision_plugin.val_step_context():
            return self._eval_step(self.lightning_module.validation_step, args, share_output=False)

    @override
    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        assert self.lightning_module is not None
        with self.precision_plugin.test_step_context():
            return self._eval_step(self.lightning_module.test_step, args, share_output=False)

    @override
    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        assert self.lightning_module is not None
        with self.precision_plugin.predict_step_context():
            return self._eval_step(self.lightning_module.predict_step, args, share_output=True)

    # ------------------------------------------------------------------ collectives

    @override
    def barrier(self, name: Optional[str] = None) -> None:
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
        if isinstance(tensor, Tensor):
            return _sync_ddp_if_available(tensor, group, reduce_op=reduce_op)
        return tensor

    # ------------------------------------------------------------------ checkpoints

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
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    # ------------------------------------------------------------------ teardown

    @override
    def on_exception(self, exception: BaseException) -> None:
        self._failed = True
        if self._parent_watch is not None:  # says so if the main process was lost
            self._parent_watch.stop(failed=not isinstance(exception, StopRequested))

    @override
    def teardown(self) -> None:
        module = self.lightning_module
        if module is not None and "on_validation_model_zero_grad" in vars(module):
            del module.on_validation_model_zero_grad
        if self._executor is not None:
            self._executor.close()  # the layers get their own forward back
        if self._partition is not None and module is not None:
            if not self._failed and _distributed_is_initialized():
                if self._executor is not None:
                    self._executor.transport.wait_sends()
                if self._shared is not None:
                    self._shared.close()  # the parameter back in every holder's module
                parts = self._gather_stages(module.state_dict())
                restore_module(module, self._partition, {k: v for part in parts for k, v in part.items()})
            self._partition = None
        self._executor = None
        if self._parent_watch is not None:
            self._parent_watch.stop()
            self._parent_watch = None
        if self._stop_signals is not None:
            self._stop_signals.uninstall()  # the deadline of a received signal stays armed
        super().teardown()
        if isinstance(self._launcher, ScriptLauncher):
            reset_after_hydra_job(self._launcher)

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(
            cls.strategy_name, cls, description="Pipeline parallelism with asynchronous weight-version policies",
            override=True,
        )
        for name in available_policies():
            strategy_registry.register(name, cls, description=f"AsyncPipeStrategy(policy={name!r})", policy=name,
                                       override=True)  # fmt: skip


def _tokens_per_sample(batch: Any) -> int:
    """Sequence length when the batch's first tensor holds token ids (integers, ``[B, T, ...]``), else 0."""
    first = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
    if isinstance(first, Tensor) and not first.is_floating_point() and first.dim() >= 2:
        return int(first[0].numel())
    return 0


def _is_plain_value(value: Any) -> bool:
    return isinstance(value, (Tensor, int, float, bool))


def _keep_gradients(set_to_none: bool = True) -> None:
    """Stands in for ``optimizer.zero_grad`` while the pipeline owns the gradients."""


def _named_parameters_of(part: Partition) -> list[tuple[str, Any]]:
    return [(n, p) for n, p in part.original.named_parameters(remove_duplicate=False)]


def _object_device(device: torch.device) -> Optional[torch.device]:
    return device if device.type == "cuda" else None


def _to_cpu(obj: Any) -> Any:
    from lightning.fabric.utilities.apply_func import move_data_to_device

    return move_data_to_device(obj, torch.device("cpu"))


def _to_device(obj: Any, device: torch.device) -> Any:
    from lightning.fabric.utilities.apply_func import move_data_to_device

    return move_data_to_device(obj, device)


AsyncPipeStrategy.register_strategies(StrategyRegistry)
