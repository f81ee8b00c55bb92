"""Unit tests of lightning_asyncpipe.partition: balance, finding the Sequential, partitioning, restoring."""

from __future__ import annotations

import copy
import itertools
import random

import pytest
import torch
from torch import nn

from lightning_asyncpipe.errors import AsyncPipeError, BalanceError, PipelineConfigError
from lightning_asyncpipe.locate import balance_by_cost, check_parameters_inside, compute_balance, find_sequential
from lightning_asyncpipe.partition import StageModule, computing, partition_module, restore_module


class Holder(nn.Module):
    def __init__(self, n_layers: int = 6, width: int = 4) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(n_layers):
            layers.append(nn.Linear(width, width) if i % 2 == 0 else nn.Tanh())
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


def _linears(n: int, width: int = 2) -> nn.Sequential:
    return nn.Sequential(*(nn.Linear(width, width) for _ in range(n)))


# ---------------------------------------------------------------------------------------------- balance


@pytest.mark.parametrize(
    "n_layers, n_stages, expected",
    [(6, 3, [2, 2, 2]), (7, 3, [3, 2, 2]), (8, 3, [3, 3, 2]), (5, 5, [1] * 5), (10, 4, [3, 3, 2, 2]), (4, 1, [4])],
)
def test_uniform_balance(n_layers, n_stages, expected):
    assert compute_balance(_linears(n_layers), n_stages, "uniform") == expected


def test_parameters_balance():
    # parameter counts: 2*2+2=6, 10*10+10=110, 6, 6, 6
    layers = nn.Sequential(nn.Linear(2, 2), nn.Linear(10, 10), nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2))
    assert compute_balance(layers, 2, "parameters") == [2, 3]
    # the heavy layer alone on its stage
    assert compute_balance(layers, 3, "parameters") == [1, 1, 3]


def test_parameters_balance_counts_parameterless_layers_as_one():
    layers = nn.Sequential(nn.ReLU(), nn.ReLU(), nn.ReLU(), nn.ReLU())
    assert compute_balance(layers, 2, "parameters") == [2, 2]


@pytest.mark.parametrize(
    "costs, n_stages, expected",
    [([1, 1, 1, 1], 2, [2, 2]), ([5, 1, 1, 1, 1, 1], 2, [1, 5]), ([1, 2, 3, 4, 5], 3, [3, 1, 1]), ([7], 1, [1])],
)
def test_balance_by_cost_small(costs, n_stages, expected):
    assert balance_by_cost(costs, n_stages) == expected


def _brute_force_best(costs, n_stages):
    n = len(costs)
    best = float("inf")
    for cuts in itertools.combinations(range(1, n), n_stages - 1):
        edges = (0, *cuts, n)
        best = min(best, max(sum(costs[a:b]) for a, b in zip(edges[:-1], edges[1:])))
    return best


def test_balance_by_cost_is_optimal():
    rng = random.Random(1234)
    for _ in range(300):
        n = rng.randint(1, 8)
        n_stages = rng.randint(1, n)
        costs = [rng.randint(1, 20) for _ in range(n)]
        counts = balance_by_cost(costs, n_stages)
        assert len(counts) == n_stages and all(c >= 1 for c in counts) and sum(counts) == n
        edges = [sum(counts[:i]) for i in range(n_stages + 1)]
        largest = max(sum(costs[a:b]) for a, b in zip(edges[:-1], edges[1:]))
        assert largest == _brute_force_best(costs, n_stages), (costs, n_stages, counts)


def test_explicit_balance():
    assert compute_balance(_linears(7), 3, [3, 2, 2]) == [3, 2, 2]
    assert compute_balance(_linears(7), 3, (1, 1, 5)) == [1, 1, 5]


def test_more_stages_than_layers():
    with pytest.raises(BalanceError, match=r"cannot split 3 layers into 4 stages.*Use at most 3 stages"):
        compute_balance(_linears(3), 4, "uniform")


@pytest.mark.parametrize(
    "balance",
    [[3, 3], [2, 2, 2, 1], [3, 0, 4], [4, 4, -1], [1, 1, 1]],
)
def test_wrong_explicit_balance(balance):
    with pytest.raises(BalanceError, match=r"must give 3 positive layer counts .* summing to the 7 layers.*\[3, 2, 2\]"):
        compute_balance(_linears(7), 3, balance)


def test_unknown_balance_name():
    with pytest.raises(BalanceError, match=r"Unknown balance 'flops'"):
        compute_balance(_linears(4), 2, "flops")


def test_balance_error_is_a_config_error():
    with pytest.raises(PipelineConfigError):
        compute_balance(_linears(1), 2, "uniform")


# ---------------------------------------------------------------------------------------------- find_sequential


class NoSeq(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(2, 2)
        self.head = nn.Linear(2, 2)


class TwoSeq(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(2, 2))
        self.tail = nn.Sequential(nn.Linear(2, 2))
        self.other = nn.Linear(2, 2)


def test_find_sequential_single():
    assert find_sequential(Holder()) == "net"


def test_find_pipelined_several_holders():
    with pytest.raises(PipelineConfigError, match=r"several top-level children hold parameters: \['encoder', 'head'\]"):
        find_sequential(NoSeq())


def test_find_pipelined_no_parameters():
    with pytest.raises(PipelineConfigError, match=r"Module has no parameters"):
        find_sequential(nn.Module())


def test_find_pipelined_descends_to_the_single_holder():
    outer = nn.Module()
    outer.net = nn.Module()
    outer.net.model = nn.Sequential(nn.Linear(2, 2))
    outer.net.loss = nn.MSELoss()  # no parameters: not a candidate
    assert find_sequential(outer) == "net.model"
    assert find_sequential(outer, "net.model") == "net.model" and find_sequential(outer, "net") == "net"


def test_find_sequential_several():
    with pytest.raises(PipelineConfigError, match=r"several top-level children hold parameters: \['body', 'tail', 'other'\].*sequential='body'"):
        find_sequential(TwoSeq())


def test_find_sequential_explicit():
    assert find_sequential(TwoSeq(), "tail") == "tail"


def test_find_pipelined_explicit_checks_the_path():
    assert find_sequential(TwoSeq(), "other") == "other"  # any module, not only a Sequential
    with pytest.raises(PipelineConfigError, match=r"TwoSeq\.nope is missing\. Modules of TwoSeq that hold parameters: \['body', 'body.0'"):
        find_sequential(TwoSeq(), "nope")
    holder = nn.Module()
    holder.blocks = nn.ModuleList([nn.Linear(2, 2)])
    with pytest.raises(PipelineConfigError, match=r"blocks is a ModuleList \(it has no forward\)"):
        find_sequential(holder, "blocks")


# ---------------------------------------------------------------------------------------------- parameters inside


class OutsideParams(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 2)
        self.net = nn.Sequential(nn.Linear(2, 2))
        self.scale = nn.Parameter(torch.ones(1))


def test_check_parameters_inside_ok():
    check_parameters_inside(Holder(), "net")


def test_check_parameters_inside_lists_outside():
    with pytest.raises(PipelineConfigError, match=r"found 2 outside it: (embed\.weight, scale|scale, embed\.weight)\. Move"):
        check_parameters_inside(OutsideParams(), "net")


def test_check_parameters_inside_truncates_long_lists():
    module = nn.Module()
    module.net = nn.Sequential(nn.Linear(1, 1))
    for i in range(4):
        setattr(module, f"l{i}", nn.Linear(1, 1))
    with pytest.raises(PipelineConfigError, match=r"found 8 outside it: l0\.weight, l0\.bias, .*l2\.bias, \.\.\."):
        check_parameters_inside(module, "net")


def test_partition_refuses_outside_params():
    with pytest.raises(PipelineConfigError, match="outside it"):
        partition_module(OutsideParams(), 1, 0, attr="net")


# ---------------------------------------------------------------------------------------------- partition / restore


@pytest.mark.parametrize(
    "stage, expected",
    [(0, ["net.0.weight", "net.0.bias"]), (1, ["net.2.weight", "net.2.bias"]), (2, ["net.4.weight", "net.4.bias"])],
)
def test_partition_keeps_names(stage, expected):
    torch.manual_seed(0)
    model = Holder(6)
    full = copy.deepcopy(model.state_dict())
    part = partition_module(model, 3, stage)
    assert part.counts == [2, 2, 2]
    assert part.bounds == [(0, 2), (2, 4), (4, 6)]
    assert part.attr == "net" and part.stage == stage
    assert isinstance(model.net, StageModule) and model.net is part.local
    assert list(model.net._modules) == [str(2 * stage), str(2 * stage + 1)]
    sd = model.state_dict()
    assert list(sd) == expected
    for k, v in sd.items():
        assert torch.equal(v, full[k])
    assert [n for n, _ in model.named_parameters()] == expected
    # the other stages' layers are on the meta device, the local ones are not
    for i, layer in enumerate(part.original):
        for p in layer.parameters():
            assert p.is_meta == (not 2 * stage <= i < 2 * stage + 2)


def test_partition_stage1_of_uneven_sequential():
    model = Holder(7)  # uniform over 3 stages: 3, 2, 2
    part = partition_module(model, 3, 1)
    assert part.counts == [3, 2, 2]
    assert list(model.net._modules) == ["3", "4"]
    assert sorted(model.state_dict()) == ["net.4.bias", "net.4.weight"]


def test_partition_with_explicit_balance_and_attr():
    module = nn.Module()
    module.body = nn.Sequential(*(nn.Linear(2, 2) for _ in range(3)))
    module.extra = nn.Sequential(nn.ReLU())  # a second, parameter-free Sequential: needs attr=
    part = partition_module(module, 2, 1, balance=[1, 2], attr="body")
    assert part.counts == [1, 2]
    assert list(module.state_dict()) == ["body.1.weight", "body.1.bias", "body.2.weight", "body.2.bias"]


class Classifier(nn.Module):
    """A network as projects write one: its settings as attributes, helper methods and properties."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.encoder = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8))
        self.head = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))

    def decay_groups(self, weight_decay: float) -> list[dict]:
        named = dict(self.named_parameters())
        return [{"params": [p for p in named.values() if p.dim() >= 2], "weight_decay": weight_decay},
                {"params": [p for p in named.values() if p.dim() < 2], "weight_decay": 0.0}]  # fmt: skip

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @classmethod
    def from_config(cls, config: dict) -> "Classifier":
        return cls(**config)


@pytest.mark.parametrize("stage", [0, 1])
def test_stage_module_keeps_the_users_attributes_and_methods(stage):
    """``self.model.num_classes`` and ``self.model.configure_optimizers(...)`` (nanoGPT) in user code:
    attributes read and written on the whole module, methods run on this stage's part."""
    holder = nn.Module()
    holder.model = Classifier()
    whole = holder.model
    part = partition_module(holder, 2, stage, attr="model", example=((torch.randn(2, 4),), {}))
    local = holder.model
    assert isinstance(local, StageModule)
    assert local.num_classes == 3
    local.num_classes = 5  # one copy: the whole module's, which fit puts back
    assert whole.num_classes == 5 and local.num_classes == 5 and "num_classes" not in vars(local)
    groups = local.decay_groups(0.1)  # bound to this stage: only its own parameters, none on meta
    held = list(local.parameters())
    assert held and sorted(id(p) for g in groups for p in g["params"]) == sorted(id(p) for p in held)
    assert not any(p.is_meta for g in groups for p in g["params"])
    assert local.n_params == sum(p.numel() for p in held) < sum(p.numel() for p in whole.parameters())
    assert type(local.from_config({"num_classes": 2})) is Classifier
    if stage == 0:  # encoder.0, encoder.1 here; encoder.2 and the head on stage 1
        with pytest.raises(AttributeError, match=r"'model\.head' is not on stage 0: this process holds only stage 0"):
            local.head  # noqa: B018
    with pytest.raises(AttributeError, match="'Classifier' object has no attribute 'nothing'"):
        local.nothing  # noqa: B018
    assert not hasattr(local, "nothing")
    assert part.local is local


def test_partition_keeps_training_mode():
    model = Holder(4)
    model.eval()
    part = partition_module(model, 2, 0)
    assert part.local.training is False


def test_restore_module_with_given_weights():
    torch.manual_seed(0)
    model = Holder(6)
    reference = Holder(6)  # other weights
    full_state = {k: v.clone() for k, v in reference.state_dict().items()}
    part = partition_module(model, 3, 1)
    restore_module(model, part, full_state)
    assert isinstance(model.net, nn.Sequential) and not isinstance(model.net, StageModule)
    assert model.net is part.original
    sd = model.state_dict()
    assert list(sd) == list(full_state)
    for k in sd:
        assert not sd[k].is_meta
        assert torch.equal(sd[k], full_state[k])
    x = torch.randn(3, 4)
    torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)


class _Rotary(nn.Module):
    """Scales by a non-persistent buffer, as rotary frequencies and causal masks are registered."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.register_buffer("freq", torch.arange(1.0, width + 1.0), persistent=False)

    def forward(self, x):
        return x * self.freq


def test_restore_module_keeps_other_stages_non_persistent_buffers_and_trained_dtype():
    """No state dict carries non-persistent buffers: the other stages' must survive partitioning
    (they came back as zeros), and the other stages' layers come back in the dtype of the state
    (float64 under precision="64-true"; they came back float32)."""
    torch.manual_seed(0)
    model = nn.Module()
    model.net = nn.Sequential(nn.Linear(4, 4), _Rotary(4), nn.Linear(4, 4), nn.Tanh())
    model.forward = lambda x: model.net(x)  # type: ignore[method-assign]
    reference = copy.deepcopy(model).double()
    full_state = {k: v.clone() for k, v in reference.state_dict().items()}
    assert "net.1.freq" not in full_state
    part = partition_module(model, 2, 1, balance=[2, 2])  # the rotary layer is on stage 0
    part.local.double()  # what the precision plugin does to the stage's own layers
    restore_module(model, part, full_state)
    assert torch.equal(model.net[1].freq, torch.arange(1.0, 5.0))
    assert model.net[0].weight.dtype == torch.float64
    x = torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(model.net(x), reference.net(x), rtol=0, atol=0)


def test_stage_module_refuses_direct_call():
    model = Holder(6)
    partition_module(model, 3, 1)
    x = torch.randn(2, 4)
    with pytest.raises(AsyncPipeError, match=r"holds only stage 1 \(2\.\.3\) of 'net'; it cannot run the whole model"):
        model.net(x)


def test_stage_module_runs_inside_computing():
    torch.manual_seed(0)
    model = Holder(6)
    reference = copy.deepcopy(model)
    partition_module(model, 3, 1)
    x = torch.randn(2, 4)
    with computing(model.net):
        assert model.net.executing is True
        out = model.net(x)
    assert model.net.executing is False
    torch.testing.assert_close(out, torch.tanh(reference.net[2](x)), rtol=0, atol=0)
    with pytest.raises(AsyncPipeError):
        model.net(x)


def test_computing_on_plain_module_is_noop():
    layer = nn.Linear(2, 2)
    with computing(layer):
        assert not hasattr(layer, "executing")


def test_single_stage_module_runs_directly():
    torch.manual_seed(0)
    model = Holder(4)
    reference = copy.deepcopy(model)
    partition_module(model, 1, 0)
    x = torch.randn(2, 4)
    torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)


def test_stage_module_call_handler():
    model = Holder(4)
    partition_module(model, 2, 0)
    seen = []
    model.net.call_handler = lambda args, kwargs: seen.append(args) or "handled"
    x = torch.randn(1, 4)
    assert model.net(x) == "handled"
    assert len(seen) == 1 and seen[0][0] is x
    with computing(model.net):  # the executor's own calls bypass the handler
        assert isinstance(model.net(x), torch.Tensor)
