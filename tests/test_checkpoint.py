"""Unit tests of lightning_asyncpipe.checkpoint: named optimizer states, merging and splitting them."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from lightning_asyncpipe.checkpoint import (
    load_optimizer_state_by_name,
    merge_optimizer_states,
    optimizer_state_by_name,
)
from lightning_asyncpipe.errors import PipelineConfigError
from lightning_asyncpipe.partition import partition_module

LR, WD = 1e-2, 0.05


class Holder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        # 6 layers: 2 stages -> [3, 3], 3 stages -> [2, 2, 2]; every stage holds parameters
        self.net = nn.Sequential(
            nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 4), nn.Linear(4, 2)
        )

    def forward(self, x):
        return self.net(x)


FULL_ORDER = [
    "net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias",
    "net.4.weight", "net.4.bias", "net.5.weight", "net.5.bias",
]  # fmt: skip


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(8, 3, generator=gen), torch.randn(8, 2, generator=gen)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _trained_full():
    torch.manual_seed(0)
    model = Holder()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
    _train(model, opt, 3, seed=1)
    return model, opt


def _saved(*parts: dict) -> dict:
    """The merged state as read back from a checkpoint file (no tensor shared with a live optimizer)."""
    buffer = io.BytesIO()
    torch.save(merge_optimizer_states(parts, FULL_ORDER), buffer)
    buffer.seek(0)
    return torch.load(buffer)


def _stages(full: nn.Module, n_stages: int):
    """Deep copies of ``full`` holding one stage each, with a fresh AdamW over the local parameters
    (deliberately other hyper-parameters: they must come from the checkpoint)."""
    out = []
    for s in range(n_stages):
        module = copy.deepcopy(full)
        partition_module(module, n_stages, s)
        out.append((module, torch.optim.AdamW(module.parameters(), lr=0.5, weight_decay=0.0)))
    return out


def _assert_state_equal(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def _assert_merged_equals(merged: dict, reference: dict) -> None:
    """``merged`` (with param_names) equals a plain ``optimizer.state_dict()``."""
    assert list(merged["state"]) == list(reference["state"])
    for i in reference["state"]:
        _assert_state_equal(merged["state"][i], reference["state"][i])
    assert len(merged["param_groups"]) == len(reference["param_groups"])
    for mg, rg in zip(merged["param_groups"], reference["param_groups"]):
        assert mg["param_names"] == [FULL_ORDER[i] for i in mg["params"]]
        assert {k: v for k, v in mg.items() if k != "param_names"} == rg


def test_full_order_fixture():
    assert [n for n, _ in Holder().named_parameters()] == FULL_ORDER


def test_state_by_name_of_single_model():
    model, opt = _trained_full()
    named = optimizer_state_by_name(opt, model)
    assert list(named["state"]) == FULL_ORDER
    params = dict(model.named_parameters())
    for name, state in named["state"].items():
        _assert_state_equal(state, opt.state[params[name]])
        assert int(state["step"]) == 3
    assert named["param_groups"][0]["param_names"] == FULL_ORDER
    assert "params" not in named["param_groups"][0]
    assert named["param_groups"][0]["lr"] == LR


def test_merge_of_single_part_is_the_standard_state_dict():
    model, opt = _trained_full()
    merged = merge_optimizer_states([optimizer_state_by_name(opt, model)], FULL_ORDER)
    _assert_merged_equals(merged, opt.state_dict())
    # and it loads into a plain optimizer of the full model
    fresh = copy.deepcopy(model)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.5)
    fresh_opt.load_state_dict(merged)
    for (_, p), (_, q) in zip(model.named_parameters(), fresh.named_parameters()):
        _assert_state_equal(fresh_opt.state[q], opt.state[p])
    assert fresh_opt.param_groups[0]["lr"] == LR


@pytest.mark.parametrize("n_stages, local_names", [
    (2, [FULL_ORDER[:4], FULL_ORDER[4:]]),
    (3, [FULL_ORDER[:2], FULL_ORDER[2:4], FULL_ORDER[4:]]),
])  # fmt: skip
def test_split_and_merge_over_stages(n_stages, local_names):
    model, opt = _trained_full()
    saved = _saved(optimizer_state_by_name(opt, model))
    full_params = dict(model.named_parameters())
    stages = _stages(model, n_stages)

    for (module, stage_opt), names in zip(stages, local_names):
        assert [n for n, _ in module.named_parameters()] == names
        load_optimizer_state_by_name(stage_opt, module, saved)
        # each local parameter got exactly the state of the same parameter of the single optimizer
        for name, p in module.named_parameters():
            _assert_state_equal(stage_opt.state[p], opt.state[full_params[name]])
            assert torch.equal(p, full_params[name])
        assert len(stage_opt.state) == len(names)
        assert stage_opt.param_groups[0]["lr"] == LR and stage_opt.param_groups[0]["weight_decay"] == WD

    merged = merge_optimizer_states([optimizer_state_by_name(o, m) for m, o in stages], FULL_ORDER)
    _assert_merged_equals(merged, opt.state_dict())

    # train on: the stages (fed the full model's gradients) and the full model stay in lockstep
    gen = torch.Generator().manual_seed(7)
    for _ in range(2):
        x, y = torch.randn(8, 3, generator=gen), torch.randn(8, 2, generator=gen)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        for module, stage_opt in stages:
            for name, p in module.named_parameters():
                p.grad = full_params[name].grad.clone()
            stage_opt.step()
    for module, _ in stages:
        for name, p in module.named_parameters():
            assert torch.equal(p, full_params[name]), name
    merged = merge_optimizer_states([optimizer_state_by_name(o, m) for m, o in stages], FULL_ORDER)
    _assert_merged_equals(merged, opt.state_dict())
    assert all(int(s["step"]) == 5 for s in merged["state"].values())


def test_merge_with_parts_in_any_order():
    model, opt = _trained_full()
    saved = _saved(optimizer_state_by_name(opt, model))
    stages = _stages(model, 3)
    for module, stage_opt in stages:
        load_optimizer_state_by_name(stage_opt, module, saved)
    parts = [optimizer_state_by_name(o, m) for m, o in reversed(stages)]
    _assert_merged_equals(merge_optimizer_states(parts, FULL_ORDER), opt.state_dict())


def test_load_before_any_step_has_no_state():
    torch.manual_seed(0)
    model = Holder()
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    saved = _saved(optimizer_state_by_name(opt, model))
    assert saved["state"] == {}
    module, stage_opt = _stages(model, 2)[1]
    load_optimizer_state_by_name(stage_opt, module, saved)
    assert len(stage_opt.state) == 0 and stage_opt.param_groups[0]["lr"] == LR


def test_two_param_groups():
    torch.manual_seed(0)
    model = Holder()
    params = dict(model.named_parameters())
    decay = [n for n in FULL_ORDER if n.endswith("weight")]
    no_decay = [n for n in FULL_ORDER if n.endswith("bias")]
    opt = torch.optim.AdamW([{"params": [params[n] for n in decay], "weight_decay": WD},
                             {"params": [params[n] for n in no_decay], "weight_decay": 0.0}], lr=LR)  # fmt: skip
    _train(model, opt, 2, seed=3)
    saved = _saved(optimizer_state_by_name(opt, model))
    assert [g["param_names"] for g in saved["param_groups"]] == [decay, no_decay]
    assert [g["weight_decay"] for g in saved["param_groups"]] == [WD, 0.0]

    stages = []
    for s in range(3):
        module = copy.deepcopy(model)
        partition_module(module, 3, s)
        local = dict(module.named_parameters())
        stage_opt = torch.optim.AdamW([{"params": [p for n, p in local.items() if n.endswith("weight")]},
                                       {"params": [p for n, p in local.items() if n.endswith("bias")]}], lr=0.5)  # fmt: skip
        load_optimizer_state_by_name(stage_opt, module, saved)
        assert [g["weight_decay"] for g in stage_opt.param_groups] == [WD, 0.0]
        for name, p in local.items():
            _assert_state_equal(stage_opt.state[p], opt.state[params[name]])
        stages.append((module, stage_opt))

    merged = merge_optimizer_states([optimizer_state_by_name(o, m) for m, o in stages], FULL_ORDER)
    assert [g["param_names"] for g in merged["param_groups"]] == [decay, no_decay]
    # the merged dict loads into a single optimizer of the full model with the right state per parameter
    fresh = copy.deepcopy(model)
    fresh_params = dict(fresh.named_parameters())
    fresh_opt = torch.optim.AdamW([{"params": [fresh_params[n] for n in decay]},
                                   {"params": [fresh_params[n] for n in no_decay]}], lr=0.5)  # fmt: skip
    fresh_opt.load_state_dict(merged)
    for name in FULL_ORDER:
        _assert_state_equal(fresh_opt.state[fresh_params[name]], opt.state[params[name]])
    assert [g["weight_decay"] for g in fresh_opt.param_groups] == [WD, 0.0]


def test_load_without_param_names():
    model, opt = _trained_full()
    module, stage_opt = _stages(model, 2)[0]
    with pytest.raises(PipelineConfigError, match=r"has no parameter names, so it cannot be split over pipeline stages"):
        load_optimizer_state_by_name(stage_opt, module, opt.state_dict())


def test_load_with_missing_parameters():
    model, opt = _trained_full()
    stages = _stages(model, 3)
    saved = _saved(optimizer_state_by_name(opt, model))
    load_optimizer_state_by_name(stages[0][1], stages[0][0], saved)
    only_stage0 = merge_optimizer_states([optimizer_state_by_name(stages[0][1], stages[0][0])], FULL_ORDER)
    module, stage_opt = stages[1]
    with pytest.raises(
        PipelineConfigError, match=r"no entry for parameters \['net\.2\.bias', 'net\.2\.weight'\] of param group 0"
    ):
        load_optimizer_state_by_name(stage_opt, module, only_stage0)


def test_load_with_more_groups_than_saved():
    model, opt = _trained_full()
    saved = _saved(optimizer_state_by_name(opt, model))
    module = copy.deepcopy(model)
    partition_module(module, 2, 1)
    local = dict(module.named_parameters())
    stage_opt = torch.optim.AdamW([{"params": [local["net.4.weight"], local["net.4.bias"]]},
                                   {"params": [local["net.5.weight"], local["net.5.bias"]]}])  # fmt: skip
    with pytest.raises(
        PipelineConfigError, match=r"no entry for parameters \['net\.5\.bias', 'net\.5\.weight'\] of param group 1"
    ):
        load_optimizer_state_by_name(stage_opt, module, saved)
