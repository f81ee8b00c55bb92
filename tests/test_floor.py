"""benchmarks/floor.py's bare kernels do the model's arithmetic: two stages wired together give the
gradients (momentum buffers) and weight changes that autograd and torch.optim.SGD give for the
whole MLP, so the floor measures real work."""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import floor  # noqa: E402
from throughput import LAYERS, LR, MOMENTUM  # noqa: E402


def _reference(stages: list[floor.StageKernels], steps: int) -> tuple[list[nn.Linear], torch.optim.SGD]:
    layers: list[nn.Module] = []
    for st in stages:
        for w, b in zip(st.w, st.b):
            lin = nn.Linear(w.shape[1], w.shape[0])
            with torch.no_grad():
                lin.weight.copy_(w)
                lin.bias.copy_(b)
            layers += [lin, nn.ReLU()]
    model = nn.Sequential(*layers[:-1])  # no ReLU after the last layer
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    x, target = stages[0].input.clone(), stages[-1].target.clone()
    for _ in range(steps):
        opt.zero_grad()
        F.mse_loss(model(x), target).backward()
        opt.step()
    return [mod for mod in model if isinstance(mod, nn.Linear)], opt


def test_two_stage_kernels_equal_autograd_and_sgd() -> None:
    m, steps = 4, 2
    s0, s1 = floor.StageKernels(0, LAYERS // 2, m, seed=0), floor.StageKernels(LAYERS // 2, LAYERS, m, seed=1)
    with torch.no_grad():  # non-zero biases, so their gradients and the ReLU masks matter
        for b in s0.b + s1.b:
            b.uniform_(-0.1, 0.1)
    initial = [t.clone() for t in s0.w + s1.w + s0.b + s1.b]
    linears, opt = _reference([s0, s1], steps)
    for _ in range(steps):  # wired: stage 1 reads stage 0's outputs, stage 0 the gradients stage 1 returns
        for j in range(m):
            s0.forward(j)
        s1.input.copy_(s0.out[-1])
        for j in range(m):
            s1.forward(j)
            s0.incoming[s1._rows(j)] = s1.backward(j)
        for j in range(m):
            assert s0.backward(j) is None
        s0.update()
        s1.update()
    ours = s0.w + s1.w + s0.b + s1.b
    buffers = s0.momentum[: len(s0.w)] + s1.momentum[: len(s1.w)] + s0.momentum[len(s0.w):] + s1.momentum[len(s1.w):]
    theirs = [lin.weight for lin in linears] + [lin.bias for lin in linears]
    # Tolerances from float32's epsilon and the magnitudes, so they hold for any CPU's GEMM blocking:
    # - momentum buffers: both sides sum the same products in float32, in different orders (BLAS
    #   blocking, micro-batches); a dot product of length n = 1024 through 8 layers drifts by about
    #   sqrt(n) * depth ~ 256 eps relative to the magnitude of its terms. Allowed: 1e-4 (~840 eps)
    #   of the tensor's largest magnitude, elementwise (errors scale with the terms, not with the
    #   result, so elements near zero get the tensor's scale).
    # - weight changes: W(t) is rounded to float32 at every update (half an ulp of |W| each), so
    #   W(steps) - W(0) carries up to steps * eps * max|W| of rounding that either side may round
    #   the other way (the changes are ~1e-6 against |W| ~ 0.15: 2-30 % of a change); on top of it
    #   the buffers' own relative error.
    # A missing ReLU mask, a doubled loss scale or a missing bias gradient change a buffer by O(1)
    # of its scale and fail both checks.
    eps = torch.finfo(torch.float32).eps
    for i, (mine, buf, ref, start) in enumerate(zip(ours, buffers, theirs, initial)):
        ref_buf = opt.state[ref]["momentum_buffer"]
        assert ref_buf.abs().max() > 1e-5  # the step did something to compare
        scale = float(ref_buf.abs().max())
        torch.testing.assert_close(buf, ref_buf, rtol=1e-4, atol=1e-4 * scale, msg=f"tensor {i}: momentum buffer")
        change = ref.detach() - start
        rounding = steps * eps * float(torch.maximum(start.abs(), ref.detach().abs()).max())
        torch.testing.assert_close(mine - start, change, rtol=1e-4, atol=rounding + 1e-4 * float(change.abs().max()),
                                   msg=f"tensor {i}: weight change")  # fmt: skip
