"""Capturing a forward as a graph and splitting it into stage programs (issue 14), in one process.

Float64 throughout: the stage programs run the same operations as the whole module, stage after
stage, so outputs, gradients and BatchNorm statistics must agree to float64 rounding (1e-12 here,
on magnitudes <= ~10; a wrong boundary, a lost skip connection or a dropped gradient path gives
O(1e-2) or more). Stages hand tensors over as a pipeline does: detached, requiring grad again
where the sent tensor did, and the backward runs stage by stage from the received gradients.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_asyncpipe.capture import CaptureError, capture
from lightning_asyncpipe.errors import PipelineConfigError
from lightning_asyncpipe.split import Split, meta_values, split_graph, stage_module
from tests.helpers.zoo import GPT, GPTConfig, ResNet, SkipNet

ATOL = 1e-12


def _split(module: nn.Module, args: tuple, kwargs: dict, points: list[str]) -> Split:
    captured = capture(module, args, kwargs)
    tensors = [t for t in [*args, *kwargs.values()] if isinstance(t, torch.Tensor)]
    return split_graph(captured, points, meta_values(captured, tensors))


def _run_pipeline(module: nn.Module, split: Split, args: tuple, kwargs: dict,
                  loss_of: Callable[[Any], torch.Tensor]) -> Any:  # fmt: skip
    """Forward stage by stage, then backward stage by stage; returns the last stage's output."""
    modules = [stage_module(module, p.attributes) for p in split.programs]
    received = [t for t in [*args, *kwargs.values()] if isinstance(t, torch.Tensor)]  # the first stage's
    kept = []
    for program, stage in zip(split.programs, modules):
        out = program(stage, *received)
        if program.sent:
            out = out if isinstance(out, tuple) else (out,)
            assert len(out) == len(program.sent)
            kept.append((received, out))
            received = [t.detach().requires_grad_(t.requires_grad) for t in out]  # as the executor's flags
        else:
            kept.append((received, None))
            final = out
    loss_of(final).backward()
    for s in range(len(split.programs) - 2, -1, -1):
        sent = kept[s][1]
        grads = [t.grad if t.requires_grad else None for t in kept[s + 1][0]]
        pairs = [(o, g) for o, g in zip(sent, grads) if g is not None]
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
    return final


def _assert_same_training(module: nn.Module, args: tuple, kwargs: dict, points: list[str],
                          loss_of: Callable[[Any], torch.Tensor]) -> Split:  # fmt: skip
    reference = copy.deepcopy(module)
    expected = reference(*args, **kwargs)
    loss_of(expected).backward()
    split = _split(module, args, kwargs, points)
    got = _run_pipeline(module, split, args, kwargs, loss_of)
    for a, b in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(expected)):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    grads = dict(reference.named_parameters())
    for name, p in module.named_parameters():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, grads[name].grad, atol=ATOL, rtol=0, msg=name)
    for (name, b), (_, ref) in zip(module.named_buffers(), reference.named_buffers()):
        torch.testing.assert_close(b, ref, atol=ATOL, rtol=0, msg=name)  # BatchNorm running statistics
    return split


def _gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=4)).double()


def _tokens() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 32, (3, 12), generator=g), torch.randint(0, 32, (3, 12), generator=g)


@pytest.mark.parametrize("points", [["transformer.h.2"], ["transformer.h.1", "transformer.h.3"],
                                    ["transformer.h.1", "transformer.h.2", "transformer.h.3"]],
                         ids=["2-stages", "3-stages", "4-stages"])  # fmt: skip
def test_gpt_with_tied_head_splits_into_stages_that_train_as_the_whole(points: list[str]) -> None:
    idx, targets = _tokens()
    split = _assert_same_training(_gpt(), (idx, targets), {}, points, lambda out: out[1])
    last = len(points)
    # the head is tied to the token embedding: both the first and the last stage hold it
    assert split.shared == {"transformer.wte.weight": [0, last]}
    assert "transformer.wte" in split.programs[0].attributes and "lm_head" in split.programs[last].attributes
    # the residual stream crosses each boundary, with the targets the last stage's loss needs
    assert all(p.sent == ["input_1", p.sent[1]] for p in split.programs[:-1])


def test_generation_call_without_targets_is_its_own_graph() -> None:
    model, (idx, _) = _gpt(), _tokens()
    split = _split(model, (idx,), {}, ["transformer.h.2"])
    modules = [stage_module(model, p.attributes) for p in split.programs]
    h = split.programs[0](modules[0], idx)
    logits, loss = split.programs[1](modules[1], h)
    expected, _ = model(idx)
    assert loss is None and logits.shape == (3, 1, 32)
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)


def test_nanogpt_assert_is_kept_and_checked_when_the_graph_runs() -> None:
    model = _gpt()
    long = torch.zeros(1, 20, dtype=torch.long)  # longer than block_size=16
    split = _split(model, (long[:, :8],), {}, ["transformer.h.2"])
    stage0 = stage_module(model, split.programs[0].attributes)
    with pytest.raises(AssertionError, match="t <= self.config.block_size"):
        split.programs[0](stage0, long)


@pytest.mark.parametrize("points", [["layer1.1"], ["layer1.0", "layer2.0"], ["layer1.1", "layer2.0", "layer2.1"]],
                         ids=["2-stages", "3-stages", "4-stages"])  # fmt: skip
def test_resnet_with_batchnorm_and_skips_splits_into_stages_that_train_as_the_whole(points: list[str]) -> None:
    torch.manual_seed(0)
    model = ResNet().double().train()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([1, 3, 5, 7])
    split = _assert_same_training(model, (x,), {}, points, lambda out: F.cross_entropy(out, y))
    assert split.shared == {}


def test_skips_over_whole_stages_masks_integer_and_keyword_inputs() -> None:
    torch.manual_seed(0)
    model = SkipNet().double()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 8, dtype=torch.float64, generator=g)
    positions = torch.arange(5).expand(2, 5)  # integer, needs no grad
    mask = (torch.rand(2, 5, generator=g) > 0.3).double()
    kwargs = {"mask": mask, "scale": 0.5}
    split = _assert_same_training(model, (x, positions), kwargs, ["down.1", "middle", "up.1"],
                                  lambda out: out[0].pow(2).sum() + out[1])  # fmt: skip
    # the first encoder level's output (tanh) is stage 1's input and, as a skip, also waits for
    # stage 2's cat: stage 1 sends it on; the mask (input_2), used at the end, travels along;
    # the integer positions are used on the first stage only
    assert [p.sent for p in split.programs] == [["input_2", "tanh"], ["input_2", "tanh", "tanh_1"],
                                                ["input_2", "cat_1"], []]  # fmt: skip


def test_a_top_level_sequential_is_the_same_mechanism() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    split = _assert_same_training(model, (x,), {}, ["2", "4"], lambda out: out.pow(2).mean())
    assert [p.attributes for p in split.programs] == [["0", "1"], ["2", "3"], ["4"]]
    names = [n for p in split.programs for n, _ in stage_module(model, p.attributes).named_parameters()]
    assert names == [n for n, _ in model.named_parameters()]  # the user's names, each once


class _Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        h = self.a(x)
        if h.sum() > 0:  # depends on the data
            h = -h
        return self.b(h)


class _SizeBranch(_Branchy):
    def forward(self, x):
        if x.size(0) > 2:  # depends on the batch size: a graph is recorded once for all micro-batches
            x = x * 2
        return self.b(self.a(x))


class _Iterates(_Branchy):
    def forward(self, x):
        return self.b(torch.stack([self.a(row) for row in x]))


@pytest.mark.parametrize(("module", "construct"), [(_Branchy, "a branch on a tensor"),
                                                   (_SizeBranch, "a branch on a tensor"),
                                                   (_Iterates, "iteration over a tensor")])  # fmt: skip
def test_control_flow_on_tensors_is_a_clear_error_naming_the_line(module: type, construct: str) -> None:
    with pytest.raises(CaptureError) as info:
        capture(module(), (torch.randn(3, 4),))
    message = str(info.value)
    assert construct in message and "test_split.py:" in message and "torch.where" in message
    assert "leaf_modules" in message and "training_step" in message


class _Router(nn.Module):
    """Data-dependent inside: fine as a leaf, run whole."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x) if x.sum() > 0 else -self.lin(x)


class _WithRouter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.router, self.last = nn.Linear(4, 4), _Router(), nn.Linear(4, 2)

    def forward(self, x):
        return self.last(self.router(self.first(x)))


def test_a_leaf_module_may_hold_data_dependent_control_flow() -> None:
    torch.manual_seed(0)
    model = _WithRouter().double()
    x = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(CaptureError):
        capture(model, (x,))
    captured = capture(model, (x,), leaf_modules=["router"])
    split = split_graph(captured, ["router", "last"], meta_values(captured, [x]))
    assert [p.attributes for p in split.programs] == [["first"], ["router"], ["last"]]


def test_split_points_are_checked_against_what_forward_runs() -> None:
    model, (idx, targets) = _gpt(), _tokens()
    with pytest.raises(PipelineConfigError, match=r"'transformer.h.9' is not a module that GPT.forward runs.*transformer.h.3"):
        _split(model, (idx, targets), {}, ["transformer.h.9"])
    with pytest.raises(PipelineConfigError, match="must follow the order"):
        _split(model, (idx, targets), {}, ["transformer.h.3", "transformer.h.1"])
