"""Single-process unit tests of the weight-version policies, driven by hand.

No processes, no transport, no Trainer: each test binds a policy to one stage's layers (built with
``partition_module``) and calls the policy hooks the way the executor would, following the
asynchronous 1F1B stream of ``lightning_asyncpipe.schedule``.
"""

from __future__ import annotations

import copy
from typing import Callable, Optional

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call

from lightning_asyncpipe.errors import PipelineConfigError
from lightning_asyncpipe.partition import StageModule, computing, partition_module
from lightning_asyncpipe.policies import (
    NesterovAsyncPolicy,
    PipeDream2BWPolicy,
    PipeDreamPolicy,
    PipelinedBackpropPolicy,
    PipeMarePolicy,
    PipeOptimPolicy,
    available_policies,
    get_policy,
)
from lightning_asyncpipe.policies.base import WeightPolicy
from lightning_asyncpipe.policies.pipelined_backprop import spike_compensated_sgd_step
from lightning_asyncpipe.policies.pipemare import pipemare_lr_factor
from lightning_asyncpipe.schedule import ActionKind, async_1f1b_step


class Holder(nn.Module):
    """A plain module whose layers all live in one ``nn.Sequential`` named ``net``."""

    def __init__(self, *layers: nn.Module) -> None:
        super().__init__()
        self.net = nn.Sequential(*layers)


def _stage(layers: list[nn.Module], n_stages: int, stage: int) -> StageModule:
    part = partition_module(Holder(*layers), n_stages, stage)
    assert isinstance(part.local, StageModule)
    return part.local


def _make_apply(opt: torch.optim.Optimizer) -> Callable[[int, Optional[Callable]], None]:
    """``apply(batch, step_fn)``: one optimizer update of the live weights, then clear the grads."""

    def apply(batch: int, step_fn: Optional[Callable[[torch.optim.Optimizer], None]]) -> None:
        if step_fn is not None:
            step_fn(opt)
        else:
            opt.step()
        for group in opt.param_groups:
            for p in group["params"]:
                p.grad = None

    return apply


def _live_ids(module: nn.Module) -> set[int]:
    return {id(p) for p in module.parameters()}


# ---------------------------------------------------------------------------------------------- 1


def _recompute_policy(kind: str, module: nn.Module) -> WeightPolicy:
    if kind == "pipemare":
        policy: WeightPolicy = PipeMarePolicy()
        policy.bind(0, 3, 1, module, torch.optim.SGD(module.parameters(), lr=0.1))
    else:
        policy = PipelinedBackpropPolicy(weight_prediction=False)
        policy.bind(0, 3, 1, module, torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9))
    return policy


@pytest.mark.parametrize("kind", ["pipemare", "pipelined_backprop"])
def test_recompute_replays_forward_exactly_with_dropout(kind: str) -> None:
    torch.manual_seed(0)
    # 4 layers over 3 stages: stage 0 holds Linear and Dropout
    module = _stage([nn.Linear(8, 32), nn.Dropout(0.5), nn.Tanh(), nn.Linear(32, 4)], 3, 0)
    assert [type(m) for m in module] == [nn.Linear, nn.Dropout]
    assert module.training
    policy = _recompute_policy(kind, module)
    x0, x1 = torch.randn(4, 8), torch.randn(4, 8)

    policy.step_actions(3, 1, 0, step=0, fill_step=0)  # records the fill
    with computing(module):
        out0 = policy.forward(module, (x0,), 0, training=True)
    # micro-batch 0 has no update between its forward and backward at stage 0: a normal graph
    assert not policy.recomputes(0) and out0.requires_grad

    policy.step_actions(3, 1, 0, step=1, fill_step=0)
    assert policy.gap(1) > 0
    with computing(module):
        out = policy.forward(module, (x1,), 1, training=True)
    assert policy.recomputes(1) is True
    assert out.requires_grad is False
    assert (out == 0).any(), "dropout zeroed nothing"

    # another plain forward draws another mask (and moves the RNG on before the replay)
    with computing(module):
        other = module(x1)
    assert not torch.equal(other.detach(), out)

    before = torch.get_rng_state()
    with computing(module):
        again = policy.recompute(module, (x1,), 1)
    after = torch.get_rng_state()
    assert torch.equal(out, again.detach())
    assert again.requires_grad
    assert torch.equal(after, before), "the replay disturbed the global RNG stream"
    assert not policy.recomputes(1)


# ---------------------------------------------------------------------------------------------- 2


@pytest.mark.parametrize(
    "make_policy, n_mb", [(PipeDream2BWPolicy, 2), (lambda: PipeDreamPolicy(vertical_sync=True), 1)],
    ids=["pipedream_2bw", "pipedream_vertical_sync"],
)  # fmt: skip
def test_batchnorm_buffers_are_live_not_versioned(make_policy: Callable[[], WeightPolicy], n_mb: int) -> None:
    torch.manual_seed(0)
    n_stages = 2
    # the last stage holds BatchNorm1d and a Linear
    module = _stage([nn.Linear(4, 8), nn.Tanh(), nn.BatchNorm1d(8), nn.Linear(8, 3)], n_stages, 1)
    bn = module[0]
    assert isinstance(bn, nn.BatchNorm1d)
    opt = torch.optim.SGD(module.parameters(), lr=0.5)
    policy = make_policy()
    policy.bind(1, n_stages, n_mb, module, opt)
    apply = _make_apply(opt)
    version0 = {n: p.detach().clone() for n, p in module.named_parameters()}
    inputs = {j: torch.randn(6, 8) for j in range(4 * n_mb)}

    checked = False
    outputs: dict[int, Tensor] = {}
    for step in range(3):
        for a in policy.step_actions(n_stages, n_mb, 1, step, 0):
            j = a.index
            if a.kind is ActionKind.FORWARD:
                stale = policy.forward_version(j) < policy.updates  # type: ignore[attr-defined]
                if stale and not checked:
                    assert policy.forward_version(j) == 0  # type: ignore[attr-defined]
                    stashed = policy._stash[0]  # type: ignore[attr-defined]
                    # the stash holds parameters only, with version 0's values
                    assert len(stashed) == len(version0)
                    for (name, live), old in zip(module.named_parameters(), stashed):
                        assert old is not live
                        assert torch.equal(old.detach(), version0[name])
                    assert any(not torch.equal(p, version0[n]) for n, p in module.named_parameters())
                    ref_module = copy.deepcopy(module)  # BN buffers as they are now
                    ref_module.load_state_dict(version0, strict=False)
                    live_module = copy.deepcopy(module)
                    mean_before = bn.running_mean.clone()
                    tracked_before = int(bn.num_batches_tracked)
                with computing(module):
                    outputs[j] = policy.forward(module, (inputs[j],), j, training=True)
                if stale and not checked:
                    with computing(ref_module), torch.no_grad():
                        expected = ref_module(inputs[j])
                    with computing(live_module), torch.no_grad():
                        on_live = live_module(inputs[j])
                    assert torch.equal(outputs[j].detach(), expected), "forward did not use the stashed weights"
                    assert not torch.equal(outputs[j].detach(), on_live)
                    # the forward on the old version updated the module's own running statistics
                    assert not torch.equal(bn.running_mean, mean_before)
                    assert int(bn.num_batches_tracked) == tracked_before + 1
                    # ... exactly as the same forward of a module holding version 0 and these buffers
                    assert torch.equal(bn.running_mean, ref_module[0].running_mean)
                    assert torch.equal(bn.running_var, ref_module[0].running_var)
                    checked = True
            elif a.kind is ActionKind.BACKWARD:
                torch.autograd.backward(outputs.pop(j).sum())
                policy.after_backward(j)
            else:
                policy.update(j, apply)
    assert checked, "no forward ran on a stashed version"


# ---------------------------------------------------------------------------------------------- 3


def test_pipedream_optimizer_state_is_one_copy() -> None:
    torch.manual_seed(0)
    n_stages, n_mb, stage = 3, 1, 0
    module = _stage([nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Linear(8, 2)], n_stages, stage)
    opt = torch.optim.AdamW(module.parameters(), lr=0.01, weight_decay=0.01)
    policy = PipeDreamPolicy()
    policy.bind(stage, n_stages, n_mb, module, opt)
    apply = _make_apply(opt)
    outputs: dict[int, Tensor] = {}
    n_updates = 0
    for step in range(7):
        for a in policy.step_actions(n_stages, n_mb, stage, step, 0):
            assert a.stage == stage
            if a.kind is ActionKind.FORWARD:
                with computing(module):
                    outputs[a.index] = policy.forward(module, (torch.randn(5, 4),), a.index, training=True)
                assert outputs[a.index].requires_grad
            elif a.kind is ActionKind.BACKWARD:
                torch.autograd.backward(outputs.pop(a.index).sum())
                policy.after_backward(a.index)
            else:
                policy.update(a.index, apply)
                n_updates += 1
                live = list(module.parameters())
                live_ids = _live_ids(module)
                # optimizer state: one entry per live parameter, none for a stashed version
                assert len(opt.state) == len(live)
                assert {id(p) for p in opt.state} == live_ids
                assert all(any(p is q for q in live) for p in opt.state)
                group_params = [p for g in opt.param_groups for p in g["params"]]
                assert len(group_params) == len(live) and {id(p) for p in group_params} == live_ids
                for versions in policy._stash.values():
                    assert not ({id(p) for p in versions} & live_ids)
                # one copy per distinct version in flight, the live one included
                report = policy.report()
                assert report.weight_copies == 1 + len(policy._stash)
                assert report.weight_copies == len(policy.in_flight_versions() | {policy.updates})
    assert n_updates == 5 and policy.updates == 5
    assert policy.report().peak_weight_copies == n_stages - stage  # p - s for m = 1
    assert policy.report().delays[-3:] == [2, 2, 2]


# ---------------------------------------------------------------------------------------------- 4


def _small_module() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 3))


def test_config_errors() -> None:
    module = _small_module()
    with pytest.raises(PipelineConfigError) as info:
        get_policy("pipedream_2bw").bind(0, 4, 2, module, torch.optim.SGD(module.parameters(), lr=0.1))
    assert "microbatches >= stages" in str(info.value)
    assert "microbatches >= 4" in str(info.value)
    get_policy("pipedream_2bw").bind(0, 4, 4, module, torch.optim.SGD(module.parameters(), lr=0.1))

    with pytest.raises(PipelineConfigError, match="SGD with momentum"):
        PipelinedBackpropPolicy().bind(0, 2, 1, module, torch.optim.AdamW(module.parameters(), lr=0.1))
    with pytest.raises(PipelineConfigError, match="SGD with momentum"):
        PipelinedBackpropPolicy().bind(0, 2, 1, module, torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.0))
    policy = PipelinedBackpropPolicy()
    opt = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    policy.bind(0, 2, 1, module, opt)
    assert policy.module is module and policy.optimizer is opt

    with pytest.raises(PipelineConfigError) as info:
        get_policy("nope")
    message = str(info.value)
    assert "'nope'" in message
    names = available_policies()
    assert {"gpipe", "pipedream_flush", "zero_bubble", "pipedream", "pipedream_2bw", "pipemare", "pipelined_backprop",
            "pipeoptim", "nesterov_async"} <= set(names)
    assert all(name in message for name in names)

    with pytest.raises(PipelineConfigError):
        PipeMarePolicy(velocity_decay=1.5)
    PipeMarePolicy(velocity_decay=0.9)


# ---------------------------------------------------------------------------------------------- 5


def test_pipemare_lr_factor() -> None:
    assert pipemare_lr_factor(0, 0, 100) == 1.0
    assert pipemare_lr_factor(2, 0, 100) == 0.5
    assert pipemare_lr_factor(3, 0, 100) == pytest.approx(1 / 3)
    assert pipemare_lr_factor(2, 100, 100) == 1.0
    assert pipemare_lr_factor(2, 250, 100) == 1.0
    assert pipemare_lr_factor(2, 50, 100) == pytest.approx(2**-0.5)
    assert pipemare_lr_factor(4, 25, 100) == pytest.approx(4**-0.75)


def _sgd_pair() -> tuple[torch.optim.SGD, torch.optim.SGD, list[nn.Parameter], list[nn.Parameter]]:
    torch.manual_seed(0)
    a = [nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(3))]
    b = [nn.Parameter(p.detach().clone()) for p in a]
    hp = dict(lr=0.1, momentum=0.9, weight_decay=0.01, dampening=0.0)
    return torch.optim.SGD(a, **hp), torch.optim.SGD(b, **hp), a, b


def _set_grads(params_a: list[nn.Parameter], params_b: list[nn.Parameter]) -> None:
    for p, q in zip(params_a, params_b):
        g = torch.randn_like(p)
        p.grad, q.grad = g.clone(), g.clone()


def test_spike_compensation_without_delay_is_sgd() -> None:
    ours, ref, a, b = _sgd_pair()
    for _ in range(3):
        _set_grads(a, b)
        spike_compensated_sgd_step(ours, 0)
        ref.step()
        for p, q in zip(a, b):
            assert torch.equal(p, q)
            assert torch.equal(ours.state[p]["momentum_buffer"], ref.state[q]["momentum_buffer"])


def test_spike_compensation_with_delay() -> None:
    ours, ref, a, b = _sgd_pair()
    for _ in range(2):
        _set_grads(a, b)
        spike_compensated_sgd_step(ours, 2)
        ref.step()
    assert any(not torch.equal(p, q) for p, q in zip(a, b))

    # one step by hand from an existing buffer
    lr, mu, wd, delay = 0.1, 0.9, 0.01, 2
    torch.manual_seed(1)
    for p in a:
        p.grad = torch.randn_like(p)
    w = [p.detach().clone() for p in a]
    v = [ours.state[p]["momentum_buffer"].clone() for p in a]
    grads = [p.grad.clone() for p in a]
    spike_compensated_sgd_step(ours, delay)
    for p, w0, v0, g0 in zip(a, w, v, grads):
        g = g0 + wd * w0
        v1 = mu * v0 + g
        expected = w0 - lr * (mu**delay * v1 + (1 - mu**delay) / (1 - mu) * g)
        torch.testing.assert_close(ours.state[p]["momentum_buffer"], v1)
        torch.testing.assert_close(p.detach(), expected)
        assert not torch.allclose(expected, w0 - lr * v1)  # differs from the plain momentum step


# ---------------------------------------------------------------------------------------------- 6


@pytest.mark.parametrize("kind", ["adamw", "adam_l2", "sgd"])
def test_pipeoptim_predicts_along_the_optimizers_update(kind: str) -> None:
    """``W - gap*lr*d`` with the optimizer's own direction, by hand: SGD's momentum buffer;
    Adam's ``m_hat / (sqrt(v_hat) + eps)``, plus ``weight_decay * W`` when decoupled (AdamW)."""
    torch.manual_seed(0)
    module = _stage([nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)], 2, 0)
    lr, wd = 0.05, 0.1
    opt = {"adamw": lambda ps: torch.optim.AdamW(ps, lr=lr, weight_decay=wd, betas=(0.8, 0.9), eps=1e-3),
           "adam_l2": lambda ps: torch.optim.Adam(ps, lr=lr, weight_decay=wd, eps=1e-3),
           "sgd": lambda ps: torch.optim.SGD(ps, lr=lr, momentum=0.9, weight_decay=wd)}[kind](module.parameters())
    policy = PipeOptimPolicy()
    policy.bind(0, 2, 1, module, opt)
    assert policy.forward_weights(0, gap=2) is None or all(  # no optimizer state yet: the live weights
        torch.equal(w, p) for w, p in zip(policy.forward_weights(0, gap=2).values(), module.parameters()))
    for _ in range(3):
        for p in module.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
    predicted = policy.forward_weights(5, gap=2)
    assert predicted is not None
    for name, p in module.named_parameters():
        st, w = opt.state[p], p.detach()
        if kind == "sgd":
            d = st["momentum_buffer"]
        else:
            t = float(st["step"])
            b1, b2 = opt.param_groups[0]["betas"]
            d = (st["exp_avg"] / (1 - b1**t)) / ((st["exp_avg_sq"] / (1 - b2**t)).sqrt() + 1e-3)
            if kind == "adamw":
                d = d + wd * w
        torch.testing.assert_close(predicted[name].detach(), w - 2 * lr * d, rtol=1e-6, atol=1e-7)
        assert not torch.allclose(predicted[name], w)
    assert policy.forward_weights(5, gap=0) is None  # no delay: the live weights
    # the prediction is differentiable in the live weights with an identity Jacobian
    name, p = next(iter(module.named_parameters()))
    p.grad = None
    policy.forward_weights(5, gap=1)[name].sum().backward()
    torch.testing.assert_close(p.grad, torch.ones_like(p))


def test_pipeoptim_and_nesterov_async_check_their_optimizer() -> None:
    module = _small_module()
    ps = list(module.parameters())
    for bad in (torch.optim.SGD(ps, lr=0.1), torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
                torch.optim.AdamW(ps, lr=0.1, amsgrad=True), torch.optim.Adagrad(ps, lr=0.1)):  # fmt: skip
        with pytest.raises(PipelineConfigError, match="Policy 'pipeoptim' predicts weights"):
            PipeOptimPolicy().bind(0, 2, 1, module, bad)
    for good in (torch.optim.SGD(ps, lr=0.1, momentum=0.9), torch.optim.Adam(ps), torch.optim.AdamW(ps)):
        PipeOptimPolicy().bind(0, 2, 1, module, good)

    for bad in (torch.optim.AdamW(ps), torch.optim.SGD(ps, lr=0.1, momentum=0.9)):
        with pytest.raises(PipelineConfigError, match="Policy 'nesterov_async' updates with Nesterov"):
            NesterovAsyncPolicy().bind(0, 2, 2, module, bad)
    with pytest.raises(PipelineConfigError, match="Policy 'nesterov_async' needs microbatches >= stages"):
        NesterovAsyncPolicy().bind(0, 4, 2, module, torch.optim.NAdam(ps))
    with pytest.raises(PipelineConfigError, match="0 < momentum < 1"):
        NesterovAsyncPolicy(momentum=1.0)

    # the paper's momentum, set on the optimizer at bind time (None: the optimizer's own)
    nadam, sgd = torch.optim.NAdam(ps, betas=(0.9, 0.95)), torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True)
    NesterovAsyncPolicy().bind(0, 2, 2, module, nadam)
    NesterovAsyncPolicy(momentum=0.95).bind(0, 2, 2, module, sgd)
    assert nadam.param_groups[0]["betas"] == (0.99, 0.95) and sgd.param_groups[0]["momentum"] == 0.95
    kept = torch.optim.NAdam(ps, betas=(0.9, 0.95))
    NesterovAsyncPolicy(momentum=None).bind(0, 2, 2, module, kept)
    assert kept.param_groups[0]["betas"] == (0.9, 0.95)
    assert NesterovAsyncPolicy().forward_version(5) == PipeDream2BWPolicy().forward_version(5)


def test_zero_bubble_is_synchronous_and_plans_zb_h1() -> None:
    """zero_bubble differs from pipedream_flush only in its plan: the same F and B order, W actions
    added; synchronous (one version, nothing left to drain, a flush every step)."""
    from lightning_asyncpipe.schedule import one_f_one_b, validate, zero_bubble_h1

    zb, flush = get_policy("zero_bubble"), get_policy("pipedream_flush")
    assert zb.synchronous and flush.synchronous
    p, m = 3, 4
    for step in (0, 1):
        plan = {s: zb.step_actions(p, m, s, step, 0) for s in range(p)}
        validate(plan, m)
        assert plan == zero_bubble_h1(p, m, step)
        assert {s: [a for a in acts if a.kind is not ActionKind.WEIGHT] for s, acts in plan.items()} == \
            {s: flush.step_actions(p, m, s, step, 0) for s in range(p)} == one_f_one_b(p, m, step)  # fmt: skip
        assert all(zb.drain_actions(p, m, s, step, 0) == [] for s in range(p))
    zb.updates = 5
    assert zb.forward_version_at(0, 7) == 5  # every stage runs batch k on W(k)
    merged = get_policy("zero_bubble", merge_weight_grads=True)
    plan = {s: merged.step_actions(p, m, s, 1, 0) for s in range(p)}
    validate(plan, m)
    assert plan == zero_bubble_h1(p, m, 1, merge_weight_grads=True) != zero_bubble_h1(p, m, 1)
    with pytest.raises(PipelineConfigError, match="merge_weight_grads must be true or false"):
        get_policy("zero_bubble", merge_weight_grads="yes")


def test_parameter_slots_run_a_stage_on_other_weights_as_functional_call_does() -> None:
    """ParameterSlots (how policies run old or corrected weights) against torch.func.functional_call:
    the same outputs and gradients, a tie inside the stage fed one tensor, the live parameters back
    afterwards, also when the forward raises."""
    from lightning_asyncpipe.policies.slots import ParameterSlots

    torch.manual_seed(0)
    enc, dec = nn.Linear(4, 3), nn.Linear(3, 4)
    model = nn.Sequential(enc, nn.Tanh(), dec, nn.Tanh(), nn.Linear(4, 4))
    tied = nn.Sequential(model, nn.Linear(4, 3))
    tied[1].weight = enc.weight  # one parameter in two places
    slots = ParameterSlots(tied)
    live = list(tied.parameters())
    assert len(slots.places) == len(live) and sorted(len(p) for p in slots.places)[-1] == 2
    other = [nn.Parameter(p.detach() + 0.1 * torch.randn_like(p)) for p in live]
    x = torch.randn(5, 4, dtype=torch.float32)

    got = slots.run(tied, other, (x,))
    want = functional_call(tied, dict(zip(slots.names, [o.detach().clone().requires_grad_() for o in other])), (x,))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    got.square().sum().backward()
    ref = [o.detach().clone().requires_grad_() for o in other]
    functional_call(tied, dict(zip(slots.names, ref)), (x,)).square().sum().backward()
    for o, r in zip(other, ref):
        torch.testing.assert_close(o.grad, r.grad, rtol=0, atol=0)
    assert all(p.grad is None for p in live)  # the live parameters took no part
    assert all(a is b for a, b in zip(slots.live(), live)) and tied[1].weight is enc.weight is live[0]

    by_name = slots.run(tied, {slots.names[0]: other[0]}, (x,))  # missing names keep the live tensor
    mixed = functional_call(tied, {slots.names[0]: other[0].detach()}, (x,))
    torch.testing.assert_close(by_name, mixed, rtol=0, atol=0)

    class Boom(nn.Module):
        def forward(self, h: Tensor) -> Tensor:
            raise ValueError("boom")

    # a stage whose parameters move during training (pruning, a tie broken) gets a clear error, not
    # another layer's weights
    from lightning_asyncpipe.errors import AsyncPipeError

    tied[1].weight = nn.Parameter(torch.zeros(3, 4))
    with pytest.raises(AsyncPipeError, match="changed place during training"):
        slots.run(tied, other, (x,))
    pruned = nn.Sequential(nn.Linear(4, 4))
    pruned_slots = ParameterSlots(pruned)
    torch.nn.utils.prune.l1_unstructured(pruned[0], "weight", 0.5)
    with pytest.raises(AsyncPipeError, match="changed place during training"):
        pruned_slots.live()

    failing = nn.Sequential(nn.Linear(4, 4), Boom())
    failing_slots = ParameterSlots(failing)
    before = list(failing.parameters())
    with pytest.raises(ValueError, match="boom"):
        failing_slots.run(failing, [torch.zeros(4, 4), torch.zeros(4)], (x,))
    assert all(a is b for a, b in zip(failing.parameters(), before))


def test_parameter_slots_run_a_recurrent_layer_on_other_weights() -> None:
    """nn.LSTM runs on its own flat list of its weights (torch re-reads ``_parameters`` into it when
    it notices other objects there, and until then keeps the last version it ran alive):
    ``put_parameter`` keeps the list current. The same LSTM with the other weights loaded is the
    reference."""
    from lightning_asyncpipe.policies.slots import ParameterSlots

    torch.manual_seed(0)
    stage = nn.Sequential(nn.LSTM(3, 5, num_layers=2, batch_first=True))
    slots = ParameterSlots(stage)
    live = list(stage.parameters())
    other = [p.detach() + 0.1 * torch.randn_like(p) for p in live]
    reference = nn.LSTM(3, 5, num_layers=2, batch_first=True)
    reference.load_state_dict({n.removeprefix("0."): o for n, o in zip(slots.names, other)})
    x = torch.randn(2, 4, 3)

    out, (h, c) = slots.run(stage, other, (x,))
    want, (h_want, c_want) = reference(x)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    torch.testing.assert_close(h, h_want, rtol=0, atol=0)
    # and back on the live weights afterwards, in both places
    assert all(a is b for a, b in zip(stage[0]._flat_weights, live))
    assert all(a is b for a, b in zip(stage.parameters(), live))
    assert not torch.equal(stage(x)[0], want)
