"""The strategy's user-code side: the user's steps split into micro-batches, what they log recorded
on the stage that runs them and replayed on every stage, the step output handed to every stage,
and the per-step timings fed to metrics and the timeline (mixed into
:class:`~lightning_asyncpipe.strategy.AsyncPipeStrategy`)."""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor

from lightning_asyncpipe.metric_sync import MetricRef, metric_ref
from lightning_asyncpipe.metric_sync import resolve as resolve_metric
from lightning_asyncpipe.microbatch import batch_size, microbatch_weights, split
from lightning_asyncpipe.trace import TimelineEvent
from lightning_asyncpipe.trace import merge as merge_timeline
from lightning_asyncpipe.user_step import LogRecord, UserStep

__all__ = ["HandOffGlue"]


class HandOffGlue:
    """Mixin of :class:`~lightning_asyncpipe.strategy.AsyncPipeStrategy`; see the module docstring."""

    def _user_step(self, fn: Callable[..., Any], args: tuple[Any, ...], training: bool) -> UserStep:
        assert self._partition is not None and self._pipeline is not None and self._policy is not None
        # a batch with fewer samples than micro-batches: fewer micro-batches, where a step may have
        # them (evaluation; training with a synchronous policy); asynchronous streams need m per step
        short = not training or self._policy.synchronous
        chunks = min(self.microbatches, batch_size(args[0])) if short else self.microbatches
        microbatches = split(args[0], chunks)
        # an asynchronous accumulation window's later batches follow the ones waiting in it
        first = self._pipeline.first_microbatch + len(self._window) * self.microbatches if training else 0
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        scale = 1.0 / trainer.accumulate_grad_batches if training and trainer is not None else 1.0
        return UserStep(fn, microbatches, first, tuple(args[1:]), self._partition,
                        microbatch_weights(microbatches), self._recorder, training, loss_scale=scale)  # fmt: skip

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

    def _account_step(self, batch: Any, started: float, window_end: bool, batches: int = 1) -> None:
        """Feed this step's timings to the timeline and the metrics; log the metrics when due."""
        assert self._executor is not None and self._pipeline is not None and self._policy is not None
        timings = self._executor.pop_timings()
        if self.timeline is not None:
            self.timeline.record(self._pipeline.step - 1, timings)
        if self._metrics is None:
            return
        previous, self._last_step_start = self._last_step_start, started
        # (an asynchronous accumulation window trains `batches` batches in this step)
        samples = batch_size(batch) * batches * self.topology.n_replicas if previous is not None else 0
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

    def _hand_off(self, output: Any, records: list[LogRecord], training: bool) -> Any:
        """Give every stage of this replica the last stage's step output and log records, and log them.

        Asynchronous training steps get the last stage's payload one step late (see
        :mod:`lightning_asyncpipe.handoff`) and return the latest output they have (a NaN loss
        before the first one arrives); evaluation steps always exchange at once.
        """
        assert self._handoff is not None and self._pipeline is not None
        sent = [s for s in (self._sendable(r) for r in records) if s is not None]
        payload = (_to_cpu(output), sent)
        if training:
            # synchronous policies: the step's own output (the last stage has finished the step's
            # losses before any other stage finishes its backward); asynchronous: one step late
            wait = self._policy.synchronous or self.step_outputs == "own"
            payloads = self._handoff.exchange(self._pipeline.step - 1, payload, wait_current=wait)
        else:
            payloads = self._handoff.broadcast(payload)
        self._replay_payloads(payloads, records)
        if self._handoff.is_source:
            return output
        return self._latest_output() if training else _to_device(self._last_output, self.root_device)

    def _latest_output(self) -> Any:
        """The newest training step output this rank has (a NaN loss before the first arrives)."""
        if self._last_output is None:
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

    def _sendable(self, record: LogRecord) -> Optional[LogRecord]:
        """The record as it crosses to the other stages: values on the CPU, metric objects by name."""
        if _is_plain_value(record.value):
            return LogRecord(record.name, _to_cpu(record.value), record.kwargs)
        assert self.lightning_module is not None
        ref = metric_ref(self.lightning_module, record.value)
        return LogRecord(record.name, ref, record.kwargs) if ref is not None else None

    def _replay(self, records: list[LogRecord]) -> None:
        module = self.lightning_module
        assert module is not None
        for r in records:
            value = resolve_metric(module, r.value) if isinstance(r.value, MetricRef) else _to_device(r.value, self.root_device)
            module.log(r.name, value, **r.kwargs)


def _tokens_per_sample(batch: Any) -> int:
    """Sequence length when the batch's first tensor holds token ids (integers, ``[B, T, ...]``), else 0."""
    first = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
    if isinstance(first, Tensor) and not first.is_floating_point() and first.dim() >= 2:
        return int(first[0].numel())
    return 0


def _is_plain_value(value: Any) -> bool:
    return isinstance(value, (Tensor, int, float, bool))


def _to_cpu(obj: Any) -> Any:
    from lightning.fabric.utilities.apply_func import move_data_to_device

    return move_data_to_device(obj, torch.device("cpu"))


def _to_device(obj: Any, device: torch.device) -> Any:
    from lightning.fabric.utilities.apply_func import move_data_to_device

    return move_data_to_device(obj, device)
