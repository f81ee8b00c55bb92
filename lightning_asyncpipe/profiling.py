"""Measuring each layer's cost, for ``balance="time"`` and ``balance="memory"``.

Every layer of the pipelined ``nn.Sequential`` is run, in order, on one micro-batch of a sample
input, on the device the stage will train on: forward, then backward with a gradient of ones,
``repeats`` times after a warm-up (the median counts). Memory is what training keeps per layer:
parameter bytes (weights, their gradient and up to two optimizer states: 4x) and the bytes the
forward saves for backward (counted through ``torch.autograd.graph.saved_tensors_hooks``) for
every micro-batch a stage holds in flight (up to ``min(microbatches, stages)`` in 1F1B).

``balance="time"`` then minimises the slowest stage's forward + backward time, ``"memory"`` the
largest stage's memory (:func:`~lightning_asyncpipe.locate.balance_by_cost`). Every rank
profiles its own device; the strategy averages the profiles over ranks so all agree.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_asyncpipe.errors import PipelineConfigError
from lightning_asyncpipe.microbatch import batch_size, split
from lightning_asyncpipe.wgrad import DeferredWeightGrad

__all__ = ["LayerProfile", "profile_layers", "layer_costs", "sequential_input"]


@dataclass(frozen=True)
class LayerProfile:
    """Measured cost of one layer on one micro-batch.

    Attributes:
        forward_s: median forward time in seconds.
        backward_s: median backward time in seconds (0 when nothing needs a gradient).
        saved_bytes: bytes the forward saves for the backward.
        parameter_bytes: bytes of the layer's parameters.
    """

    forward_s: float
    backward_s: float
    saved_bytes: int
    parameter_bytes: int


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _as_tuple(x: Any) -> tuple[Tensor, ...]:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _prepare(inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return tuple(t.detach().requires_grad_(t.is_floating_point()) for t in inputs)


def profile_layers(layers: nn.Sequential, sample: Sequence[Tensor], device: torch.device, repeats: int = 3,
                   microbatches: int = 1, defer_weight_grad: bool = False) -> list[LayerProfile]:  # fmt: skip
    """Profile every layer of ``layers`` on ``sample`` (the Sequential's input for one micro-batch).

    With ``defer_weight_grad`` the layers' ``nn.Linear`` weight gradients are deferred as in
    training (:mod:`lightning_asyncpipe.wgrad`): the backward time is the input-gradient pass
    plus a ``1/microbatches`` share of the once-per-batch weight-gradient GEMM, timed over
    ``microbatches`` copies of the micro-batch.

    Each layer is moved to ``device`` for its measurement and back afterwards; its weights,
    gradients, buffers (BatchNorm statistics) and the random state are left as they were.
    """
    profiles: list[LayerProfile] = []
    x = tuple(t.to(device) for t in sample)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for layer in layers:
            profile, x = _profile_layer(layer, x, device, repeats, microbatches if defer_weight_grad else 0)
            profiles.append(profile)
    return profiles


def _profile_layer(layer: nn.Module, x: tuple[Tensor, ...], device: torch.device, repeats: int,
                   deferred_over: int) -> tuple[LayerProfile, tuple[Tensor, ...]]:  # fmt: skip
    """One layer's profile, and its output (the next layer's input); ``deferred_over > 0``: with
    deferred weight gradients, flushed over that many micro-batches."""
    home = next((p.device for p in layer.parameters()), device)
    layer.to(device)
    deferral = DeferredWeightGrad(layer) if deferred_over > 0 else None
    if deferral is not None:
        deferral.active = True
    grads = {p: p.grad for p in layer.parameters()}
    buffers = {n: b.detach().clone() for n, b in layer.named_buffers()}
    weights = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    fwd, bwd, saved_bytes, out = [], [], 0, x
    for r in range(repeats + 1):
        inputs = _prepare(x)
        counted = [0]

        def pack(t: Tensor) -> Tensor:
            if t.untyped_storage().data_ptr() not in weights:  # saved weights are no extra memory
                counted[0] += t.numel() * t.element_size()
            return t

        _sync(device)
        start = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = layer(*inputs)
        _sync(device)
        middle = time.perf_counter()
        outs = [t for t in _as_tuple(out) if isinstance(t, Tensor) and t.requires_grad]
        if outs:
            torch.autograd.backward(outs, [torch.ones_like(t) for t in outs])
        not_ours = 0.0
        if deferral is not None and deferral.pending:
            deferral.repeat_kept(deferred_over)  # the weight-gradient GEMM of a whole batch ...
            _sync(device)
            flush_start = time.perf_counter()
            deferral.flush()
            _sync(device)
            not_ours = (time.perf_counter() - flush_start) * (1 - 1 / deferred_over)  # ... a 1/m share of it
        _sync(device)
        end = time.perf_counter()
        if r > 0:  # the first run warms up allocators and kernels
            fwd.append(middle - start)
            bwd.append(end - middle - not_ours if outs else 0.0)
            saved_bytes = counted[0]
    if deferral is not None:
        deferral.remove()
    for p, g in grads.items():
        p.grad = g
    with torch.no_grad():
        for n, b in layer.named_buffers():
            b.copy_(buffers[n])
    layer.to(home)
    profile = LayerProfile(statistics.median(fwd), statistics.median(bwd), saved_bytes,
                           sum(p.numel() * p.element_size() for p in layer.parameters()))  # fmt: skip
    return profile, tuple(t.detach() for t in _as_tuple(out))


def layer_costs(profiles: Sequence[LayerProfile], kind: str, microbatches: int, n_stages: int) -> list[float]:
    """Per-layer costs to balance: seconds (``"time"``) or bytes (``"memory"``)."""
    if kind == "time":
        return [p.forward_s + p.backward_s for p in profiles]
    in_flight = min(microbatches, n_stages)
    return [4.0 * p.parameter_bytes + in_flight * p.saved_bytes for p in profiles]


class _Captured(Exception):
    def __init__(self, args: tuple[Any, ...]) -> None:
        self.args_ = args


def sequential_input(module: nn.Module, layers: nn.Sequential, microbatches: int) -> tuple[Tensor, ...]:
    """The input ``layers`` receive for one micro-batch of ``module.example_input_array``.

    Runs ``module`` on the example until it calls ``layers`` (the rest does not run).

    Raises:
        PipelineConfigError: if the module has no ``example_input_array``, or never calls ``layers``.
    """
    example = getattr(module, "example_input_array", None)
    if example is None:
        raise PipelineConfigError(
            "balance='time' and balance='memory' measure each layer on a sample input: set "
            "`self.example_input_array` in your LightningModule's __init__ to a batch such as training uses "
            "(e.g. torch.zeros(batch_size, features)); one micro-batch of it is profiled."
        )

    def capture(_: nn.Module, args: tuple[Any, ...]) -> None:
        raise _Captured(args)

    handle = layers.register_forward_pre_hook(capture)
    try:
        with torch.no_grad():
            module(*example) if isinstance(example, tuple) else module(example)
    except _Captured as captured:
        args = captured.args_
    else:
        raise PipelineConfigError(f"{type(module).__name__}.forward(example_input_array) never calls the pipelined "
                                  "nn.Sequential, so its input cannot be profiled.")  # fmt: skip
    finally:
        handle.remove()
    chunks = max(1, min(microbatches, batch_size(args)))
    first = split(args, chunks)[0]
    return tuple(t for t in _as_tuple(first) if isinstance(t, Tensor))
