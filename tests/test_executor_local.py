"""Transparency of the executor in one process: a 3-stage pipeline over LocalTransport computes the
same gradients and weights as the plain model trained with gradient accumulation.

Every stage gets its own PipelineExecutor; the stages' actions are interleaved in a topological order
taken from the simulator's timeline (sorted by start time, then stage). Each action runs as a
one-action ``run([action])`` call: LocalTransport's receives are lazy (the message is taken from the
mailbox at ``wait()``), so pre-posting the receive of a forward inside ``run`` is harmless.
"""

from __future__ import annotations

import copy
from collections.abc import Hashable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_asyncpipe.comm import LocalHub, LocalTransport
from lightning_asyncpipe.errors import PipelineConfigError
from lightning_asyncpipe.executor import PipelineExecutor, as_tensors
from lightning_asyncpipe.microbatch import microbatch_weights, signature, split
from lightning_asyncpipe.partition import partition_module
from lightning_asyncpipe.policies import get_policy
from lightning_asyncpipe.schedule import Action, ActionKind, forward_only, simulate, validate

N_STAGES, N_MICRO, BATCH, N_BATCHES, LR = 3, 4, 8, 3, 0.1
# float64 throughout: the pipeline and the reference compute the same sums in another order
# (deferred weight gradients: one GEMM per batch), so they differ by a few eps64 of magnitudes
# <= ~10, i.e. ~1e-14; ATOL allows 1e-11, far below any real error (a lost or repeated
# micro-batch moves a weight by ~LR * |g| ~ 1e-2).
ATOL = 1e-11


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        # 5 layers, uniform over 3 stages: [2, 2, 1]
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x):
        return self.net(x)


class Hooks:
    """StepHooks over globally numbered micro-batches (batch k holds k*m .. k*m+m-1)."""

    def __init__(self, batches, m: int) -> None:
        self.mb: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}
        for k, (x, y) in enumerate(batches):
            xs, ys = split(x, m), split(y, m)
            for i, (xi, yi, w) in enumerate(zip(xs, ys, microbatch_weights(xs))):
                self.mb[k * m + i] = (xi, yi, w)
        self.outputs: dict[int, torch.Tensor] = {}
        self.calls: list[tuple[str, int]] = []

    def key(self, microbatch: int) -> Hashable:
        return signature(self.mb[microbatch][0])

    def stage_inputs(self, microbatch: int) -> tuple[torch.Tensor, ...]:
        self.calls.append(("inputs", microbatch))
        return (self.mb[microbatch][0],)

    def stage_outputs(self, microbatch: int, outputs):
        self.calls.append(("outputs", microbatch))
        self.outputs[microbatch] = outputs.detach()
        _, y, w = self.mb[microbatch]
        return F.mse_loss(outputs, y) * w


def _data():
    gen = torch.Generator().manual_seed(123)
    return [(torch.randn(BATCH, 4, generator=gen, dtype=torch.float64),
             torch.randn(BATCH, 3, generator=gen, dtype=torch.float64)) for _ in range(N_BATCHES)]  # fmt: skip


def _full_model() -> MLP:
    torch.manual_seed(0)
    return MLP().double()


def _reference(model: MLP, batches):
    """Plain gradient accumulation over equal micro-batches (loss = mean over the batch)."""
    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    first_grads = None
    for x, y in batches:
        opt.zero_grad()
        for xi, yi in zip(x.chunk(N_MICRO), y.chunk(N_MICRO)):
            (F.mse_loss(model(xi), yi) / N_MICRO).backward()
        if first_grads is None:
            first_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
    return model, first_grads


class Stage:
    def __init__(self, full: MLP, stage: int, hub: LocalHub, policy_name: str, defer: bool = True) -> None:
        self.module = copy.deepcopy(full)
        self.part = partition_module(self.module, N_STAGES, stage)
        self.opt = torch.optim.SGD(self.module.parameters(), lr=LR)
        self.grads: list[dict[str, torch.Tensor]] = []
        self.policy = get_policy(policy_name)
        self.policy.bind(stage, N_STAGES, N_MICRO, self.part.local, self.opt)
        self.executor = PipelineExecutor(
            self.part.local, stage, N_STAGES, LocalTransport(hub, stage), self.policy, self.apply_update,
            defer_weight_grad=defer,
        )

    def apply_update(self, batch, step_fn=None) -> None:
        self.grads.append({n: p.grad.clone() for n, p in self.module.named_parameters()})
        (step_fn or (lambda opt: opt.step()))(self.opt)
        self.opt.zero_grad()


def _topological_order(schedule) -> list[Action]:
    events = [(start, s, pos, a) for s, evs in simulate(schedule).timeline.items() for pos, (start, _, a) in enumerate(evs)]
    return [a for *_, a in sorted(events, key=lambda e: e[:3])]


def _run_pipeline(policy_name: str, full: MLP, batches, defer: bool = True):
    hub = LocalHub()
    stages = [Stage(full, s, hub, policy_name, defer) for s in range(N_STAGES)]
    hooks = Hooks(batches, N_MICRO)
    for k in range(N_BATCHES):
        schedule = {s: st.policy.step_actions(N_STAGES, N_MICRO, s, k, 0) for s, st in enumerate(stages)}
        validate(schedule, N_MICRO)
        for action in _topological_order(schedule):
            stages[action.stage].executor.run([action], hooks)
        for st in stages:
            assert st.executor.in_flight == []
    assert all(not box for box in hub.boxes.values())
    return stages, hooks


@pytest.mark.parametrize("policy_name, defer", [("gpipe", True), ("pipedream_flush", True), ("zero_bubble", True),
                                                ("zero_bubble", False)])  # fmt: skip
def test_pipeline_equals_gradient_accumulation(policy_name, defer):
    """(zero_bubble without deferred weight gradients: B computes them and W has nothing to do.)"""
    full = _full_model()
    batches = _data()
    reference, ref_grads = _reference(full, batches)
    stages, hooks = _run_pipeline(policy_name, full, batches, defer)

    # the stages hold disjoint parts of the model that together are all of it
    names = [n for st in stages for n, _ in st.module.named_parameters()]
    assert names == [n for n, _ in reference.named_parameters()]
    assert [st.part.counts for st in stages] == [[2, 2, 1]] * 3

    ref_params = dict(reference.named_parameters())
    for st in stages:
        assert len(st.grads) == N_BATCHES
        assert st.policy.report().delays == [0] * N_BATCHES
        for name, g in st.grads[0].items():
            torch.testing.assert_close(g, ref_grads[name], rtol=0, atol=ATOL, msg=f"gradient of {name}")
        for name, p in st.module.named_parameters():
            torch.testing.assert_close(p.detach(), ref_params[name].detach(), rtol=0, atol=ATOL, msg=name)
            # and training did move the weights
            assert not torch.allclose(p, dict(full.named_parameters())[name])

    # every micro-batch entered the pipeline once and left it once, in order
    total = N_BATCHES * N_MICRO
    assert sorted(j for kind, j in hooks.calls if kind == "inputs") == list(range(total))
    assert [j for kind, j in hooks.calls if kind == "outputs"] == list(range(total))


def test_zero_bubble_computes_weight_gradients_in_its_w_actions():
    """Under zero_bubble the linear weight gradient of micro-batch j is computed by W(j), not by B(j)
    and not left to the update: after B(j) the stage still keeps j's (x, g), after W(j) it does not,
    and nothing is left for the update's flush."""
    full = _full_model()
    hub = LocalHub()
    stages = [Stage(full, s, hub, "zero_bubble") for s in range(N_STAGES)]
    hooks = Hooks(_data()[:1], N_MICRO)
    schedule = {s: st.policy.step_actions(N_STAGES, N_MICRO, s, 0, 0) for s, st in enumerate(stages)}
    assert all(any(a.kind is ActionKind.WEIGHT for a in acts) for acts in schedule.values())

    def kept(s: int) -> set:
        return {mb for items in stages[s].executor.wgrad._kept.values() for mb, _, _ in items}

    for action in _topological_order(schedule):
        s = action.stage
        if action.kind is ActionKind.UPDATE:
            assert not stages[s].executor.wgrad.pending, f"stage {s}: W actions left work for the update"
        stages[s].executor.run([action], hooks)
        if action.kind is ActionKind.BACKWARD:
            assert action.index in kept(s)
        elif action.kind is ActionKind.WEIGHT:
            assert action.index not in kept(s)
    assert all(len(st.grads) == 1 for st in stages)


def test_policies_produce_different_orders():
    # the test above really exercises two different interleavings
    gpipe = [str(a) for a in _topological_order({s: get_policy("gpipe").step_actions(3, 4, s, 0, 0) for s in range(3)})]
    flush = [str(a) for a in _topological_order(
        {s: get_policy("pipedream_flush").step_actions(3, 4, s, 0, 0) for s in range(3)})]  # fmt: skip
    assert gpipe != flush
    assert flush[:8] == ["0F0", "0F1", "1F0", "0F2", "1F1", "2F0", "2B0", "1B0"]


def test_forward_only_matches_model():
    full = _full_model()
    batches = _data()[:1]
    hub = LocalHub()
    stages = [Stage(full, s, hub, "gpipe") for s in range(N_STAGES)]
    hooks = Hooks(batches, N_MICRO)
    schedule = forward_only(N_STAGES, N_MICRO)
    for action in _topological_order(schedule):
        stages[action.stage].executor.run([action], hooks, train=False)
    out = torch.cat([hooks.outputs[j] for j in range(N_MICRO)])
    torch.testing.assert_close(out, full(batches[0][0]).detach(), rtol=0, atol=ATOL)  # micro-batches vs batch
    assert all(st.executor.in_flight == [] for st in stages)
    assert all(not box for box in hub.boxes.values())


def test_timings_recorded():
    full = _full_model()
    stages, _ = _run_pipeline("gpipe", full, _data())
    timings = stages[0].executor.pop_timings()
    assert [str(t.action) for t in timings[:5]] == ["0F0", "0F1", "0F2", "0F3", "0B0"]
    assert len(timings) == N_BATCHES * (2 * N_MICRO + 1)
    assert all(t.end >= t.start and t.wait == 0.0 for t in timings)
    assert stages[0].executor.pop_timings() == []


def test_receive_before_send_is_an_error():
    full = _full_model()
    hub = LocalHub()
    stage1 = Stage(full, 1, hub, "gpipe")
    with pytest.raises(RuntimeError, match="stage 1 waits for a act message that was never sent"):
        stage1.executor.run([Action(1, ActionKind.FORWARD, 0)], Hooks(_data()[:1], N_MICRO))


def test_last_stage_must_return_a_loss():
    full = _full_model()
    hub = LocalHub()
    stages = [Stage(full, s, hub, "gpipe") for s in range(N_STAGES)]

    class NoLoss(Hooks):
        def stage_outputs(self, microbatch, outputs):
            return None

    hooks = NoLoss(_data()[:1], N_MICRO)
    for s in range(N_STAGES - 1):
        stages[s].executor.run([Action(s, ActionKind.FORWARD, 0)], hooks)
    with pytest.raises(PipelineConfigError, match="returned NoneType for micro-batch 0"):
        stages[-1].executor.run([Action(N_STAGES - 1, ActionKind.FORWARD, 0)], hooks)


def test_as_tensors():
    t = torch.zeros(1)
    assert as_tensors(t, 0) == (t,)
    assert as_tensors([t, t], 0) == (t, t)
    with pytest.raises(PipelineConfigError, match=r"Stage 2 produced dict"):
        as_tensors({"a": t}, 2)
    with pytest.raises(PipelineConfigError, match=r"Stage 1 produced tuple \['Tensor', 'str'\]"):
        as_tensors((t, "x"), 1)
