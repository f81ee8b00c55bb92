"""Tolerances for comparing two float32 trainings that differ only in the order of floating-point
sums, derived from float32's epsilon and the magnitudes involved (so they hold on any x86-64 CPU
and any BLAS blocking).

Where the two sides differ: a batch split into micro-batches (per-micro-batch sums of the weight
gradients against one sum), deferred weight gradients (one GEMM over the batch,
:mod:`lightning_asyncpipe.wgrad`), the gradient-clipping norm summed per stage then over stages,
another CPU's GEMM blocking. Each differs by a few ulps of a gradient; an update moves a weight
by at most ``lr * |update| << |W|`` and rounds it to float32 once, so a difference of a few ulps
of ``max|W|`` per step is what reordered sums can produce; the bound below allows ``ULPS_PER_STEP``
ulps per optimizer step. Any real error (a wrong weight version, a lost or repeated micro-batch, a
mis-scaled loss) moves weights by about ``lr * |g|`` per step, orders of magnitude more (the tests
check that the weights really moved).

Where both sides run the same kernels on the same operands (one micro-batch, the same layout),
the tests compare bitwise instead.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

EPS32 = torch.finfo(torch.float32).eps
EPS64 = torch.finfo(torch.float64).eps
ULPS_PER_STEP = 8


def scale_of(tensors: Iterable[Tensor]) -> float:
    """The largest magnitude among the floating-point tensors."""
    return max(float(t.detach().abs().max()) for t in tensors if t.is_floating_point() and t.numel())


def training_atol(expected: Mapping[str, Tensor], steps: int) -> float:
    """Allowed absolute difference of weights after ``steps`` optimizer steps:
    ``steps * ULPS_PER_STEP * eps32 * max|W|``."""
    return steps * ULPS_PER_STEP * EPS32 * scale_of(expected.values())


def training_atol64(expected: Mapping[str, Tensor], steps: int) -> float:
    """:func:`training_atol` for float64 trainings."""
    return steps * ULPS_PER_STEP * EPS64 * scale_of(expected.values())


def loss_atol(losses: Iterable[float], steps: int) -> float:
    """Allowed absolute difference of logged losses over ``steps`` steps: the same count of ulps
    of the largest loss (a loss is a mean computed from weights that may differ by as much)."""
    return steps * ULPS_PER_STEP * EPS32 * max(abs(x) for x in losses)


def forward_atol(expected: Tensor, depth: int, width: int) -> float:
    """Allowed absolute difference of a forward pass run on micro-batches against the whole batch:
    a GEMM over fewer rows may take another kernel path and round each dot product of length
    ``width`` differently (at most ``width * eps`` of its magnitude), once per layer of ``depth``."""
    return depth * width * EPS32 * scale_of([expected])


def mse_atol(outputs: Tensor, targets: Tensor, depth: int, width: int) -> float:
    """Allowed absolute difference of a mean squared error whose outputs may differ by
    :func:`forward_atol`: ``2 * max|out - y|`` times that, plus the rounding of the mean itself."""
    mse = float((outputs - targets).pow(2).mean())
    return 2 * float((outputs - targets).abs().max()) * forward_atol(outputs, depth, width) + 16 * EPS32 * mse
