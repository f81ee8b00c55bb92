"""Deferred weight gradients equal autograd's, for live and stashed weights, and step aside where
they do not apply."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from lightning_asyncpipe.policies.recompute import shifted_weights
from lightning_asyncpipe.wgrad import DeferredWeightGrad, grad_into_live


# float64: these are identities (the same sums in another order), checked far below float32's
# rounding so that no CPU's GEMM blocking matters. A weight gradient here sums 36 products (3
# micro-batches x 12 rows) of magnitude <= ~1: two summation orders differ by at most
# 36 * eps64 * sum|terms| ~ 1e-13; ATOL allows 1e-11, while a lost, repeated or mis-scaled
# micro-batch changes a gradient by ~1e-2.
ATOL = 1e-11


def _stage() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5)).double()


def _micro_batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(3, 4, 6, generator=g, dtype=torch.float64) for _ in range(3)]  # 3-d, as in a transformer


def _reference_grads(inputs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    model = _stage()
    for x in inputs:
        model(x).pow(2).mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_deferred_weight_grads_equal_autograd() -> None:
    inputs = _micro_batches()
    model = _stage()
    deferral = DeferredWeightGrad(model)
    deferral.active = True
    for x in inputs:
        model(x.requires_grad_()).pow(2).mean().backward()
    assert deferral.pending and model[0].weight.grad is None and model[2].weight.grad is None  # really deferred
    assert model[0].bias.grad is not None  # biases take the usual path
    deferral.flush()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, _reference_grads(inputs)[name], rtol=0, atol=ATOL, msg=name)
    assert not deferral.pending


def test_flush_adds_to_existing_gradients_and_reuses_buffers() -> None:
    inputs = _micro_batches()
    model = _stage()
    deferral = DeferredWeightGrad(model)
    deferral.active = True
    model(inputs[0]).pow(2).mean().backward()
    deferral.flush()
    first = model[0].weight.grad
    for x in inputs[1:]:
        model(x).pow(2).mean().backward()
    deferral.flush()
    assert model[0].weight.grad is first  # accumulated in place
    torch.testing.assert_close(model[0].weight.grad, _reference_grads(inputs)["0.weight"], rtol=0, atol=ATOL)
    model.zero_grad(set_to_none=True)
    model(inputs[0]).pow(2).mean().backward()
    deferral.flush()
    assert model[0].weight.grad.data_ptr() == first.data_ptr()  # the work buffer is reused
    torch.testing.assert_close(model[0].weight.grad, _reference_grads(inputs[:1])["0.weight"], rtol=0, atol=ATOL)


def test_flush_of_one_microbatch_takes_only_its_backward() -> None:
    """Zero-bubble W actions: ``flush(j)`` adds the weight gradient of the backward tagged ``j`` and
    keeps the others; flushing every micro-batch that way equals autograd."""
    inputs = _micro_batches()
    model = _stage()
    deferral = DeferredWeightGrad(model)
    deferral.active = True
    for j, x in enumerate(inputs):
        deferral.microbatch = 10 + j
        model(x).pow(2).mean().backward()
    deferral.flush(11)
    torch.testing.assert_close(model[0].weight.grad, _reference_grads(inputs[1:2])["0.weight"], rtol=0, atol=ATOL)
    assert {mb for items in deferral._kept.values() for mb, _, _ in items} == {10, 12}
    deferral.flush(12)
    deferral.flush(11)  # nothing left of 11: a no-op
    deferral.flush(10)
    assert not deferral.pending
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, _reference_grads(inputs)[name], rtol=0, atol=ATOL, msg=name)


def test_stashed_weights_defer_into_the_live_layer() -> None:
    """A forward on a stashed version (functional_call with other Parameters): the weight
    gradient ``g^T x`` does not depend on the version and lands on the live weights."""
    inputs = _micro_batches()
    model = _stage()
    stashed = {n: nn.Parameter(p.detach().clone()) for n, p in model.named_parameters()}
    deferral = DeferredWeightGrad(model)
    deferral.active = True
    for x in inputs:
        functional_call(model, stashed, (x,)).pow(2).mean().backward()
    assert stashed["0.weight"].grad is None and stashed["0.bias"].grad is not None
    deferral.flush()
    torch.testing.assert_close(model[0].weight.grad, _reference_grads(inputs)["0.weight"], rtol=0, atol=ATOL)


def test_marked_computed_weights_defer_into_the_live_layer() -> None:
    """PipeMare's corrected weights ``W - c``: marked with grad_into_live, their weight gradient
    waits for the flush and lands on the live weights, equal to autograd's through ``W - c``."""
    inputs = _micro_batches()
    offsets = {n: 0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2), dtype=p.dtype) for n, p in
               _stage().named_parameters()}  # fmt: skip

    def run(defer: bool) -> nn.Sequential:
        model = _stage()
        deferral = DeferredWeightGrad(model)
        deferral.active = defer
        for x in inputs:
            weights = {n: p - offsets[n] for n, p in model.named_parameters()}
            if defer:
                weights = {n: grad_into_live(w, dict(model.named_parameters())[n]) for n, w in weights.items()}
            functional_call(model, weights, (x,)).pow(2).mean().backward()
        if defer:
            assert deferral.pending and model[0].weight.grad is None and model[2].weight.grad is None
            deferral.flush()
        return model

    deferred, usual = run(True), run(False)
    for (name, a), (_, b) in zip(deferred.named_parameters(), usual.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=ATOL, msg=name)


@pytest.mark.parametrize("defer", [True, False])
def test_shifted_weights_reuse_buffers_and_pass_the_gradient_to_the_live_weights(defer: bool) -> None:
    """shifted_weights gives ``W - alpha * delta`` in the same buffers at every call, and the
    gradient through it reaches the live weights as autograd's through ``W - alpha * delta`` does,
    deferred (linear weights) or not (biases, or every weight with deferral off)."""
    inputs = _micro_batches()
    deltas = {n: torch.randn(p.shape, generator=torch.Generator().manual_seed(3), dtype=p.dtype) for n, p in
              _stage().named_parameters()}  # fmt: skip
    alpha = 2.0

    usual = _stage()
    for x in inputs:
        weights = {n: p - alpha * deltas[n] for n, p in usual.named_parameters()}
        functional_call(usual, weights, (x,)).pow(2).mean().backward()

    model = _stage()
    deferral = DeferredWeightGrad(model)
    deferral.active = defer
    named = list(model.named_parameters())
    buffers = [torch.empty_like(p) for _, p in named]
    for x in inputs:
        weights = shifted_weights(named, [deltas[n] for n, _ in named], [alpha] * len(named), buffers)
        for (name, p), buf in zip(named, buffers):
            w = weights[name]
            assert w.data_ptr() == buf.data_ptr() and buf.grad_fn is None and w.requires_grad
            torch.testing.assert_close(w, p - alpha * deltas[name], rtol=0, atol=ATOL)
        functional_call(model, weights, (x,)).pow(2).mean().backward()
    if defer:
        assert deferral.pending and model[0].weight.grad is None  # the linear weights waited
        deferral.flush()
    for (name, a), (_, b) in zip(model.named_parameters(), usual.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=ATOL, msg=name)


@pytest.mark.parametrize("case", ["inactive", "computed-weights", "autocast", "no-grad"])
def test_usual_path_where_deferral_does_not_apply(case: str) -> None:
    x = _micro_batches()[0]
    model = _stage()
    deferral = DeferredWeightGrad(model)
    deferral.active = case != "inactive"
    if case == "computed-weights":  # a function of the live ones, not marked with grad_into_live
        weights = {n: p * 1.0 for n, p in model.named_parameters()}
        functional_call(model, weights, (x,)).pow(2).mean().backward()
    elif case == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(x).float().pow(2).mean().backward()
    elif case == "no-grad":
        with torch.no_grad():
            model(x)
    else:
        model(x).pow(2).mean().backward()
    assert not deferral.pending
    if case != "no-grad":
        assert model[0].weight.grad is not None


def test_remove_gives_the_layers_their_forward_back() -> None:
    model = _stage()
    deferral = DeferredWeightGrad(model)
    assert "forward" in vars(model[0])
    deferral.remove()
    assert "forward" not in vars(model[0]) and "forward" not in vars(model[2])
