"""Lightning glue: ``AsyncPipeStrategy``, the lifecycle that wires partition, transport, policy and
executor into a Trainer. No pipeline logic lives here. The strategy is assembled from mixins, one
job each: :mod:`~lightning_asyncpipe.strategy_launch` (processes and collectives),
:mod:`~lightning_asyncpipe.strategy_checks` (what is checked before and at setup),
:mod:`~lightning_asyncpipe.strategy_state` (optimizer, updates, checkpoints) and
:mod:`~lightning_asyncpipe.strategy_handoff` (user steps, logging, step outputs)."""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any, Callable, Literal, Optional, Union

import torch
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.distributed import _distributed_is_initialized
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import ParallelStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn
from typing_extensions import override

from lightning_asyncpipe.checkpoint_io import AtomicCheckpointIO
from lightning_asyncpipe.comm import PipelineGroups, TorchP2PTransport
from lightning_asyncpipe.errors import PipelineConfigError
from lightning_asyncpipe.executor import PipelineExecutor
from lightning_asyncpipe.handoff import StepHandoff
from lightning_asyncpipe.launch import ScriptLauncher, reset_after_hydra_job
from lightning_asyncpipe.metrics import PipelineMetrics
from lightning_asyncpipe.pipeline import StagePipeline
from lightning_asyncpipe.locate import MEASURED_BALANCES, Balance, example_call, find_pipelined
from lightning_asyncpipe.partition import Partition, partition_module, restore_module
from lightning_asyncpipe.strategy_checks import ChecksGlue
from lightning_asyncpipe.strategy_handoff import HandOffGlue
from lightning_asyncpipe.strategy_launch import LaunchGlue
from lightning_asyncpipe.strategy_state import StateGlue
from lightning_asyncpipe.metric_sync import sync_states, use_group
from lightning_asyncpipe.tied import SharedParameters
from lightning_asyncpipe.signals import StopRequest, StopRequested, StopSignals
from lightning_asyncpipe.policies import WeightPolicy, available_policies, get_policy, policy_class
from lightning_asyncpipe.topology import Topology
from lightning_asyncpipe.trace import TimelineRecorder
from lightning_asyncpipe.watchdog import ParentWatch
from lightning_asyncpipe.user_step import LogRecorder, StepWindow, UserStep

__all__ = ["AsyncPipeStrategy"]

log = logging.getLogger(__name__)

StartMethod = Literal["popen", "spawn", "fork", "forkserver"]


class AsyncPipeStrategy(LaunchGlue, ChecksGlue, StateGlue, HandOffGlue, ParallelStrategy):
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
        step_outputs: what a training step returns on the ranks of the other stages (callbacks'
            ``on_train_batch_end(outputs=...)``; the last stage always has its own). Synchronous
            policies always give the step's own. Under an asynchronous policy ``"latest"`` gives the
            newest that has arrived without waiting (two steps earlier); ``"own"`` makes every rank
            wait at the step's end for the last stage to finish the step, which costs the overlap
            across the step boundary.
        eval_steps_everywhere: in validation and test, send the last stage's outputs of the
            pipelined module to the other stages, which run the rest of ``validation_step`` /
            ``test_step`` on them, so that what those steps keep (a list of step outputs for the
            epoch-end hooks) and return (callbacks' ``outputs``) is the same on every rank
            (``predict_step``'s predictions are shared instead). ``False`` saves that transfer (large for a
            language model's logits) when only the logged values matter: the code after the call
            then runs on the last stage only.
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
        step_outputs: Literal["latest", "own"] = "latest",
        eval_steps_everywhere: bool = True,
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
        self._wrapped_hooks: list[str] = []
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
        if step_outputs not in ("latest", "own"):
            raise PipelineConfigError(f"{name} takes step_outputs='latest' or 'own', got {step_outputs!r}.")
        self.step_outputs = step_outputs
        if not isinstance(eval_steps_everywhere, bool):
            raise PipelineConfigError(f"{name} takes eval_steps_everywhere=True or False, got {eval_steps_everywhere!r}.")
        self.eval_steps_everywhere = eval_steps_everywhere
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
        self._skipping = False  # a training step returned None (see world_size)
        self._window_batches = 1  # batches per update: accumulate_grad_batches under asynchronous policies
        self._window: list[UserStep] = []  # the batches of an asynchronous accumulation window so far
        self._dropping = False  # dropping the rest of a window whose first batches did not run here
        self._stop_request: Optional[StopRequest] = None  # a stop signal waiting for a window to end
        self._parent_watch: Optional[ParentWatch] = None

    # ------------------------------------------------------------------ topology and launch

    # ------------------------------------------------------------------ setup

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
        if topo.n_replicas == 1:
            # Lightning advises sync_dist=True for epoch-level tensors whenever torch.distributed is
            # up; the stages of one pipeline share one batch, there is nothing to accumulate
            warnings.filterwarnings("ignore", message=r"It is recommended to use `self\.log\(.*sync_dist=True\)`")
        if not self._policy.synchronous:
            # by design the first update of an asynchronous stage comes after the scheduler's first step
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before `optimizer.step\(\)`")
        stage, replica = self.stage, self.replica
        # micro-batches per update: an asynchronous policy trains an accumulation window of K batches
        # as one batch of K x microbatches (synchronous ones accumulate as Lightning does)
        self._window_batches = trainer.accumulate_grad_batches if not self._policy.synchronous else 1
        self._window = []
        per_update = self.microbatches * self._window_batches
        self._policy.bind(stage, topo.n_stages, per_update, self._partition.local,
                          self.optimizers[0] if self.optimizers else None)  # fmt: skip
        self._shared.bind(self._policy, per_update)
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
        self._pipeline = StagePipeline(self._executor, per_update, self.optimizers[0] if self.optimizers else None)
        if trainer.state.fn == TrainerFn.FITTING:
            # checkpoints hold this one's state, also when saved after fit and a later validate/test
            self._fit_pipeline = self._pipeline
        use_group(module, self._groups.stage)  # metric objects synchronise over the replicas of the stage
        self._wrap_hooks(module)
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

    @override
    def model_to_device(self) -> None:
        assert self.model is not None
        self.model.to(self.root_device)

    # ------------------------------------------------------------------ training

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        assert self._pipeline is not None and self.lightning_module is not None
        started = time.perf_counter()
        self._replay_pending()
        self._skipping = False
        dropped = False
        if not self._policy.synchronous:
            dropped = self._align_window(int(args[1]) if len(args) > 1 and isinstance(args[1], int) else None)
        step: Union[UserStep, StepWindow] = self._user_step(self.lightning_module.training_step, args, training=True)
        with self.precision_plugin.train_step_context(), self._recording():
            skipped = not dropped and step.skipped()
            if skipped and self._window_batches > 1:
                raise PipelineConfigError(
                    f"training_step returned None (skipping a batch) with policy={self.policy_name!r} and "
                    f"accumulate_grad_batches={self._window_batches}: an asynchronous policy trains "
                    "each accumulation window as one update of a fixed number of micro-batches, which a skipped "
                    "batch would leave short. Skip with accumulate_grad_batches=1, or use a synchronous policy."
                )
            if not skipped and not dropped and self._window_batches > 1:
                # an asynchronous accumulation window: its batches run as one pipeline step
                self._window.append(step)
                step = StepWindow(self._window)
            waiting = dropped or (not skipped and isinstance(step, StepWindow) and len(step.steps) < self._window_batches)
            if not skipped and not waiting:
                self._pipeline.train_step(step, len(step.microbatches))
                self._window = []
        if skipped:
            # Lightning's way to skip a batch, decided alike on every stage before any stage runs it
            self._skip_step()
            output = None
        elif waiting:
            output = self._latest_output()  # a window's batch waiting for its last one: nothing ran yet
        else:
            output = self._hand_off(step.merged_outputs(), self._recorder.pop(), training=True)
        drain_due = self._drain_due()
        if drain_due and self._window:
            raise PipelineConfigError(
                f"The epoch ended inside an accumulation window ({len(self._window)} of "
                f"{self._window_batches} batches): with policy={self.policy_name!r} those batches "
                "would form an update of fewer micro-batches than the others. Skipped batches (training_step returning "
                "None) and accumulate_grad_batches do not mix under an asynchronous policy; use a synchronous one."
            )
        if drain_due:
            self.drain()
            self._replay_pending()  # the epoch's (or fit's) last records, on every stage
        if not skipped and not waiting:
            self._account_step(args[0], started, drain_due, len(step.microbatches) // self.microbatches)
        return output

    def _align_window(self, batch_idx: Optional[int]) -> bool:
        """Asynchronous policies: the window holds exactly this epoch's batches since the last
        multiple of accumulate_grad_batches (Lightning's own windows), and K may not change while
        training (GradientAccumulationScheduler). A run resumed from a checkpoint written inside a
        window, or an epoch ended early inside one, leaves batches that cannot form a whole
        window: they are dropped, with a warning (Lightning drops such a partial accumulation too)."""
        assert self.lightning_module is not None
        window = self._window_batches
        now = self.lightning_module.trainer.accumulate_grad_batches
        if now != window:
            raise PipelineConfigError(
                f"accumulate_grad_batches changed from {window} to {now} during training (a "
                f"GradientAccumulationScheduler?): policy={self.policy_name!r} sized its update to {window} x "
                f"{self.microbatches} micro-batches at setup. Use a fixed accumulate_grad_batches with an asynchronous "
                "policy, or a synchronous one."
            )
        if batch_idx is None or window == 1:
            return False
        if len(self._window) == batch_idx % window:
            return False
        if self._window or not self._dropping:
            warnings.warn(f"AsyncPipeStrategy: batch {batch_idx} is inside an accumulation window of {window} whose "
                          "earlier batches did not run here (a resume from a checkpoint written inside a window, or an "
                          "epoch ended early inside one): that window's batches are dropped; training continues with "
                          "the next whole window.")  # fmt: skip
        self._window, self._dropping = [], True
        if batch_idx % window == 0:  # a new window starts here (the old one was left by an earlier epoch)
            self._dropping = False
            return False
        return True


    def _drain_due(self) -> bool:
        """Whether this step ends an epoch or the fit: the pipeline must be empty afterwards."""
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if trainer is None:
            return True
        loop = trainer.fit_loop
        # the data ran out, or limit_train_batches was reached
        last_batch = loop.epoch_loop.batch_progress.is_last_batch or loop.epoch_loop._num_ready_batches_reached()
        max_steps = trainer.max_steps if trainer.max_steps is not None and trainer.max_steps >= 0 else None
        # (global_step counts optimizer steps: with accumulation the final one ends the last window)
        final_step = max_steps is not None and trainer.global_step + 1 >= max_steps and not loop.epoch_loop._should_accumulate()
        return bool(last_batch or final_step)

    def _wrap_hooks(self, module: LightningModule) -> None:
        """Run something before some of the module's hooks (on this instance; undone at teardown):

        - ``on_validation_model_zero_grad``: Lightning clears the gradients before a validation run
          inside fit, which would wipe the partial gradients of micro-batches still in flight:
          drain first;
        - ``on_train_epoch_end``: the metric objects take the last stage's state on every stage
          first (:meth:`_sync_metrics`), so that ``compute()`` in the hook and in Lightning's
          epoch-end logging agrees on every rank (evaluation syncs after its last batch, where
          Lightning computes the logged metrics, before the epoch-end hooks)."""
        before = {"on_validation_model_zero_grad": self.drain, "on_train_epoch_end": self._sync_metrics}
        for name, first in before.items():
            if name in vars(module):
                continue
            original = getattr(module, name)

            def hook(*args: Any, _original: Any = original, _first: Any = first, **kwargs: Any) -> Any:
                _first()
                return _original(*args, **kwargs)

            setattr(module, name, hook)
            self._wrapped_hooks.append(name)

    def _sync_metrics(self) -> None:
        """The last stage's torchmetrics states on every stage of this replica (collective over the
        pipeline; :mod:`~lightning_asyncpipe.metric_sync`)."""
        topo, module = self.topology, self.lightning_module
        assert module is not None
        sync_states(module, topo.rank_of(topo.n_stages - 1, self.replica), self._groups.pipeline if self._groups else None,
                    self.global_rank)  # fmt: skip

    def drain(self) -> None:
        """Complete the micro-batches in flight and apply their updates (all stages call it together)."""
        if self._pipeline is not None and self._executor is not None:
            self._pipeline.drain()  # backwards and updates only: no user code runs
            if self._shared:
                self._shared.settle()
        if self._handoff is not None:
            self._pending_payloads += self._handoff.flush()

    # ------------------------------------------------------------------ evaluation

    def _eval_step(self, fn: Callable[..., Any], args: tuple[Any, ...], share_output: bool) -> Any:
        assert self._pipeline is not None
        step = self._user_step(fn, args, training=False)
        with self._recording():
            self._pipeline.eval_step(step, len(step.microbatches))
        if self._executor is not None:
            self._executor.pop_timings()  # evaluation does not count in the training metrics
        output = step.merged_outputs() if step.outputs else None
        records = self._recorder.pop()
        # validation and test: the last stage's module outputs go along, so that the rest of the step
        # runs on every stage (predict shares the step's own output instead; one stage needs nothing)
        everywhere = self.eval_steps_everywhere and not share_output and self.topology.n_stages > 1
        sent = step.module_outputs if everywhere else None
        shared, module_outputs = self._hand_off((output if share_output else None, sent), records, training=False)
        self._last_output = self._last_output[0] if isinstance(self._last_output, tuple) else self._last_output
        if module_outputs and not step.module_outputs:
            with self._recording():
                step.run_rest(module_outputs)
            output = step.merged_outputs()  # what the step returned here, as on the last stage
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if trainer is not None and (trainer.validating or trainer.testing or trainer.sanity_checking):
            if trainer._evaluation_loop.batch_progress.is_last_batch:
                # Lightning computes the logged metric objects right after the last batch
                self._sync_metrics()
        return shared if share_output else output

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

    # ------------------------------------------------------------------ checkpoints

    # ------------------------------------------------------------------ teardown

    @override
    def on_exception(self, exception: BaseException) -> None:
        self._failed = True
        if self._parent_watch is not None:  # says so if the main process was lost
            self._parent_watch.stop(failed=not isinstance(exception, StopRequested))

    @override
    def teardown(self) -> None:
        module = self.lightning_module
        for name in self._wrapped_hooks:
            if module is not None and name in vars(module):
                delattr(module, name)
        self._wrapped_hooks = []
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


AsyncPipeStrategy.register_strategies(StrategyRegistry)
