"""The executable specification: every policy run sequentially in one process, with no pipeline.

This module does not import the schedule, the executor or the policies. It trains copies of the
stages one micro-batch at a time, in data order, and decides from each policy's *definition*
(the table in docs/concepts.md) which weight version every forward and backward uses and with
which learning rate every update is applied. The multi-process engine must end with the same
weights; that equality is the proof that the engine implements the policies.

Definitions (``p`` stages, ``m`` micro-batches per batch, ``w_s = p-1-s``; micro-batch ``j`` of
batch ``k``; ``f`` the step at which the pipeline was last filled, ``r = j - f*m``; versions count
updates, and every batch is one update, so ``f`` updates were done at the fill):

=====================  =========================================  ==============================
policy                 forward version                            backward
=====================  =========================================  ==============================
gpipe, pipedream_flush ``k``                                      same weights
zero_bubble (ZB-H1)    ``k``                                      same weights
pipedream              ``f + floor(max(0, r - w_s) / m)``         same weights
pipedream vertical     ``f + floor(max(0, r - (p-1)) / m)``       same weights
pipedream_2bw          ``max(0, k - 1)``                          same weights
pipemare               as pipedream (latest)                      ``W(k) - gap * delta`` (T2)
pipelined_backprop     as pipedream; ``W - lr*gap*v`` with LWP    ``W(k)``
pipeoptim              as pipedream; ``W - lr*gap*d`` (below)     ``W(k)``
nesterov_async         ``max(0, k - 1)``                          same weights
=====================  =========================================  ==============================

PipeOptim's ``d`` is the optimizer's update direction in the state it had after the forward's
version: the momentum buffer for SGD, ``m_hat / (sqrt(v_hat) + eps)`` (+ ``weight_decay * W`` when
decoupled) for Adam/AdamW. nesterov_async updates with the optimizer (NAdam or Nesterov SGD) whose
momentum coefficient is set to its ``momentum`` option (default 0.99).

``gap = k - forward version`` for the non-stashing policies. The update of batch ``k`` at stage
``s`` applies the batch's mean gradient to the newest weights with the learning rate the
scheduler gave for step ``k`` (whenever the stage gets to apply it). Asynchronous policies clip
gradients per stage; synchronous ones by the norm over all stages.

Gradient accumulation (``accumulate_grad_batches=K``): synchronous policies accumulate as one
device does; for an asynchronous policy a window of ``K`` consecutive batches of ``m``
micro-batches *is* one batch of ``K*m`` micro-batches (one update, one version), so its
specification is this one with the window's batches concatenated and ``microbatches=K*m``
(each micro-batch's loss weighted by its share of its own batch times ``1/K``, which is its
share of the window when batches are equal).
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.optim import Optimizer

from lightning_asyncpipe.microbatch import microbatch_weights, split

__all__ = ["reference_train", "reference_train_stages", "split_stages", "ReferenceResult", "SYNCHRONOUS", "STASHING", "RECOMPUTING"]

SYNCHRONOUS = ("gpipe", "pipedream_flush", "zero_bubble")  # the order of passes differs, not the result
STASHING = ("pipedream", "pipedream_2bw", "nesterov_async")
RECOMPUTING = ("pipemare", "pipelined_backprop", "pipeoptim")


@dataclass
class ReferenceResult:
    """Final weights (keyed as the full module) and, per stage, the delay of each update."""

    state_dict: dict[str, Tensor]
    delays: list[list[int]] = field(default_factory=list)


def _snapshot(module: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _lr_table(optimizer_factory: Callable[[Iterable[nn.Parameter]], Optimizer],
              scheduler_factory: Optional[Callable[[Optimizer], Any]], n_steps: int) -> list[float]:  # fmt: skip
    """The learning rate during each step, as the scheduler (stepped once per step) sets it."""
    probe = optimizer_factory([nn.Parameter(torch.zeros(1))])
    scheduler = scheduler_factory(probe) if scheduler_factory is not None else None
    table = []
    for _ in range(n_steps + 1):
        table.append(float(probe.param_groups[0]["lr"]))
        if scheduler is not None:
            probe.step()
            scheduler.step()
    return table


def _sgd_spike_compensated(optimizer: Optimizer, delay: int) -> None:
    # Deliberately written again from Kosson et al.'s rule rather than imported from the policy:
    # the specification must not share code with what it checks.
    with torch.no_grad():
        for group in optimizer.param_groups:
            mu, lr, wd, damp = group["momentum"], group["lr"], group["weight_decay"], group["dampening"]
            a = mu**delay
            b = (1.0 - a) / (1.0 - mu)
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad if wd == 0 else p.grad.add(p, alpha=wd)
                state = optimizer.state[p]
                if state.get("momentum_buffer") is None:
                    state["momentum_buffer"] = torch.clone(g).detach()
                else:
                    state["momentum_buffer"].mul_(mu).add_(g, alpha=1.0 - damp)
                p.add_(state["momentum_buffer"], alpha=-lr * a)
                if b != 0.0:
                    p.add_(g, alpha=-lr * b)


def _adam_like_direction(state: dict[str, Any], group: dict[str, Any], w: Tensor) -> Tensor:
    # Written again from the Adam/AdamW update rule (bias-corrected moments), not imported from the
    # policy: the specification must not share code with what it checks.
    beta1, beta2 = group["betas"]
    t = float(state["step"])
    m_hat = state["exp_avg"] / (1.0 - beta1**t)
    v_hat = state["exp_avg_sq"] / (1.0 - beta2**t)
    d = m_hat / (v_hat.sqrt() + group["eps"])
    if group.get("decoupled_weight_decay", False):
        d = d + group["weight_decay"] * w
    return d


def _predicted(weights: dict[str, Tensor], states: dict[str, dict[str, Any]], groups: dict[str, dict[str, Any]],
               lr: float, updates: int) -> dict[str, Tensor]:  # fmt: skip
    """PipeOptim: every weight moved ``updates`` optimizer updates ahead along its update direction."""
    out = {}
    for n, w in weights.items():
        st = states.get(n, {})
        if "momentum_buffer" in st:
            d = st["momentum_buffer"]
        elif "exp_avg" in st:
            d = _adam_like_direction(st, groups[n], w)
        else:
            d = None
        out[n] = w if d is None else w - lr * updates * d
    return out


def reference_train(sequential: nn.Sequential, counts: Sequence[int], policy: str, *args: Any,
                    **kwargs: Any) -> ReferenceResult:  # fmt: skip
    """Train ``sequential`` (a copy) as ``policy`` defines it, split into stages of ``counts``
    layers; the other arguments (``batches, microbatches, loss_fn, optimizer, ...``) are
    :func:`reference_train_stages`'s."""
    names = list(sequential._modules)
    edges = [sum(counts[:i]) for i in range(len(counts) + 1)]
    stages = [nn.Sequential(OrderedDict((names[i], copy.deepcopy(sequential[i])) for i in range(edges[s], edges[s + 1])))
              for s in range(len(counts))]  # fmt: skip
    return reference_train_stages(stages, policy, *args, **kwargs)


class _ProgramStage(nn.Module):
    """One stage of a split module: its program run on the stage's attributes."""

    def __init__(self, program: Any) -> None:
        super().__init__()
        self.__dict__["program"] = program

    def forward(self, *tensors: Tensor) -> Any:
        return self.program(self, *tensors)


def split_stages(module: nn.Module, args: Sequence[Any], n_stages: int, balance: Any = "parameters",
                 split_points: Optional[Sequence[str]] = None) -> tuple[list[nn.Module], list[dict[int, str]]]:  # fmt: skip
    """``module`` (not modified) captured for the call ``module(*args)`` and split as the pipeline
    splits it (by parameters, or at ``split_points``): one module per stage, each holding its own
    copy of the weights it uses under the user's names, and each shared parameter's name on every
    stage that uses it (``{stage: name}``, the first stage owning it)."""
    from lightning_asyncpipe.partition import plan_partition  # capture and split only
    from lightning_asyncpipe.split import install

    holder = nn.Module()
    holder.net = copy.deepcopy(module)
    plan = plan_partition(holder, n_stages, balance, "net", split_points, (), (tuple(args), {}))
    stages: list[nn.Module] = []
    copies = []
    for program in plan.split.programs:
        whole = copy.deepcopy(module)  # ties inside the copy stay ties
        stage = install(_ProgramStage(program), whole, program.attributes)
        stages.append(stage)
        copies.append(whole)
    shared = []
    for name, users in plan.split.shared.items():
        local = {}
        for s in users:
            target = copies[s].get_parameter(name)
            local[s] = next(n for n, q in stages[s].named_parameters(remove_duplicate=False) if q is target)
        shared.append(local)
    return stages, shared


def _tuple(x: Any) -> tuple[Any, ...]:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def reference_train_stages(
    stages: Sequence[nn.Module],
    policy: str,
    batches: Sequence[tuple[Any, Any]],
    microbatches: int,
    loss_fn: Callable[[Any, Any], Tensor],
    optimizer: Callable[[Iterable[nn.Parameter]], Optimizer],
    lr_scheduler: Optional[Callable[[Optimizer], Any]] = None,
    clip_grad_norm: Optional[float] = None,
    drain_after: Iterable[int] = (),
    policy_options: Optional[dict[str, Any]] = None,
    shared: Sequence[dict[int, str]] = (),
    prefix: str = "net.",
    delay_offset: int = 0,
) -> ReferenceResult:
    """Train ``stages`` (modified in place) on ``batches`` as ``policy`` defines it.

    Args:
        stages: one module per stage; stage ``s+1`` is called with stage ``s``'s outputs (a tensor
            or a tuple), stage 0 with the micro-batch's inputs (a tensor or a tuple).
        policy: a policy name.
        batches: ``(inputs, targets)`` per step.
        microbatches: ``m``.
        loss_fn: ``loss_fn(output of the last stage, target)``, a mean over a micro-batch.
        optimizer, lr_scheduler: factories, as the engine gets them (one scheduler step per step).
        clip_grad_norm: the engine's clipping norm.
        drain_after: steps after which the pipeline is drained (the last step always is).
        policy_options: the policy's keyword arguments.
        shared: parameters several stages use, each as ``{stage: its name there}``. The first stage
            owns it: it applies the update with the sum of every holder's gradient; every other
            holder uses, for micro-batch ``j``, the owner's version of the owner's forward of ``j``
            (raw weights: no prediction, no correction), in its forward and its backward.
        prefix: prepended to the stages' keys in the result.
        delay_offset: a deliberately wrong delay, for tests that the comparison would see one:
            pipedream_2bw and nesterov_async forward (and backward) on ``W(max(0, k-1-offset))``,
            pipeoptim predicts over ``gap + offset`` updates (where ``gap > 0``). Other policies
            reject it.
    """
    opts = dict(policy_options or {})
    p, m, n_steps = len(stages), microbatches, len(batches)
    if delay_offset and policy not in ("pipedream_2bw", "nesterov_async", "pipeoptim"):
        raise ValueError(f"delay_offset is defined for pipedream_2bw, nesterov_async and pipeoptim, not {policy!r}")
    owner_of: list[dict[str, tuple[int, str]]] = [{} for _ in stages]  # stage -> its name -> (owner, name there)
    for names in shared:
        owner = min(names)
        for s, n in names.items():
            if s != owner:
                owner_of[s][n] = (owner, names[owner])
    optims = [optimizer([q for n, q in st.named_parameters() if n not in owner_of[s]]) for s, st in enumerate(stages)]
    if policy == "nesterov_async" and opts.get("momentum", 0.99) is not None:
        for opt in optims:  # the momentum coefficient the policy runs with
            for g in opt.param_groups:
                if "betas" in g:
                    g["betas"] = (opts.get("momentum", 0.99), g["betas"][1])
                else:
                    g["momentum"] = opts.get("momentum", 0.99)
    group_of = [{n: g for g in opt.param_groups for q in g["params"] for n, q2 in st.named_parameters() if q is q2}
                for opt, st in zip(optims, stages)]  # fmt: skip
    opt_states: list[dict[int, dict[str, dict[str, Any]]]] = [{0: {}} for _ in stages]  # PipeOptim: state per version
    lrs = _lr_table(optimizer, lr_scheduler, n_steps)
    drains = set(drain_after) | {n_steps - 1}
    history: list[dict[int, dict[str, Tensor]]] = [{0: _snapshot(st)} for st in stages]
    momentum: list[dict[int, dict[str, Optional[Tensor]]]] = [{0: {}} for _ in stages]
    velocity: list[Optional[dict[str, Tensor]]] = [None] * p
    delays: list[list[int]] = [[] for _ in stages]
    warm = [p - 1 - s for s in range(p)]
    tau = [math.ceil(w / m) for w in warm]
    fill = 0
    vsync = policy == "pipedream" and opts.get("vertical_sync", False)

    def forward_version(s: int, j: int, k: int) -> int:
        r = j - fill * m
        if policy in SYNCHRONOUS:
            return k
        if policy in ("pipedream_2bw", "nesterov_async"):
            return max(0, k - 1 - delay_offset)
        return fill + max(0, r - ((p - 1) if vsync else warm[s])) // m

    def with_owners(s: int, weights: dict[str, Tensor], fv: list[int]) -> dict[str, Tensor]:
        if not owner_of[s]:
            return weights
        mirrored = {n: history[o][fv[o]][on] for n, (o, on) in owner_of[s].items()}
        return {**weights, **mirrored}

    for k, (x, y) in enumerate(batches):
        xs, ys = split(x, m), split(y, m)
        shares = microbatch_weights(xs)
        grads: list[dict[str, Tensor]] = [{} for _ in stages]
        oldest = [k] * p
        for i in range(m):
            j = k * m + i
            fv = [forward_version(s, j, k) for s in range(p)]
            recompute = [policy in RECOMPUTING and fv[s] != k for s in range(p)]
            inputs: list[tuple[Tensor, ...]] = []
            leaves: list[dict[str, Tensor]] = []
            outputs: list[Any] = []
            h = _tuple(xs[i])
            for s, st in enumerate(stages):
                oldest[s] = min(oldest[s], fv[s])
                h_in = tuple(t.detach().requires_grad_(s > 0 and t.is_floating_point()) for t in h)
                weights = history[s][fv[s]]
                if policy == "pipelined_backprop" and opts.get("weight_prediction", True) and fv[s] != k:
                    gap = k - fv[s]
                    lr_now = lrs[k]
                    weights = {n: w if momentum[s][fv[s]].get(n) is None else w - lr_now * gap * momentum[s][fv[s]][n]
                               for n, w in weights.items()}  # fmt: skip
                if policy == "pipeoptim" and fv[s] != k:
                    weights = _predicted(weights, opt_states[s][fv[s]], group_of[s], lrs[k], k - fv[s] + delay_offset)
                weights = with_owners(s, weights, fv)
                if recompute[s]:
                    with torch.no_grad():
                        out = functional_call(st, weights, h_in)
                    leaves.append({})
                else:
                    leaf = {n: w.clone().requires_grad_(True) for n, w in weights.items()}
                    out = functional_call(st, leaf, h_in)
                    leaves.append(leaf)
                inputs.append(h_in)
                outputs.append(out)
                h = tuple(t.detach().contiguous() for t in _tuple(out))  # as a transfer delivers it
            loss = loss_fn(outputs[-1], ys[i]) * shares[i]
            grad_out: Sequence[Optional[Tensor]] = ()
            for s in reversed(range(p)):
                st = stages[s]
                if recompute[s]:
                    gap = k - fv[s]
                    current = history[s][k]
                    if policy == "pipemare" and opts.get("discrepancy_correction", True) and velocity[s] is not None:
                        current = {n: w - gap * velocity[s][n] for n, w in current.items()}  # type: ignore[index]
                    current = with_owners(s, current, fv)
                    leaves[s] = {n: w.clone().requires_grad_(True) for n, w in current.items()}
                    outputs[s] = functional_call(st, leaves[s], inputs[s])
                if s == p - 1:
                    torch.autograd.backward(loss)
                else:
                    pairs = [(o, g) for o, g in zip(_tuple(outputs[s]), grad_out) if o.requires_grad and g is not None]
                    torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
                for n, leaf in leaves[s].items():
                    if leaf.grad is not None:
                        grads[s][n] = grads[s][n] + leaf.grad if n in grads[s] else leaf.grad.clone()
                grad_out = [t.grad for t in inputs[s]]
        for s in range(p):  # a holder's gradient goes to the owner
            for n, (o, on) in owner_of[s].items():
                g = grads[s].pop(n, None)
                if g is not None:
                    grads[o][on] = grads[o][on] + g if on in grads[o] else g
        # one update per stage, on the newest weights
        if clip_grad_norm is not None:
            if policy in SYNCHRONOUS:
                total = sum(g.pow(2).sum() for gs in grads for g in gs.values())
                coefs = [torch.clamp(clip_grad_norm / (torch.sqrt(total) + 1e-6), max=1.0)] * p
            else:
                coefs = [torch.clamp(clip_grad_norm / (torch.sqrt(sum(g.pow(2).sum() for g in gs.values())) + 1e-6),
                                     max=1.0) for gs in grads]  # fmt: skip
            grads = [{n: g * c for n, g in gs.items()} for gs, c in zip(grads, coefs)]
        for s, st in enumerate(stages):
            opt = optims[s]
            before = _snapshot(st)
            for n, param in st.named_parameters():
                param.grad = grads[s].get(n)
            lr = lrs[k]
            if policy == "pipemare" and opts.get("lr_rescheduling", True) and tau[s] >= 1:
                anneal = opts.get("anneal_updates", 500)
                lr *= float(tau[s]) ** -(1.0 - (1.0 if anneal <= 0 else min(k / anneal, 1.0)))
            for g in opt.param_groups:
                g["lr"] = lr
            if policy == "pipelined_backprop" and opts.get("spike_compensation", True) and tau[s] > 0:
                _sgd_spike_compensated(opt, tau[s])
            else:
                opt.step()
            delays[s].append(k - oldest[s])
            history[s][k + 1] = _snapshot(st)
            momentum[s][k + 1] = {n: (opt.state[q].get("momentum_buffer") if q in opt.state else None)
                                  for n, q in st.named_parameters()}  # fmt: skip
            momentum[s][k + 1] = {n: None if b is None else b.detach().clone() for n, b in momentum[s][k + 1].items()}
            if policy == "pipeoptim":
                opt_states[s][k + 1] = {n: {key: v.detach().clone() if isinstance(v, Tensor) else v
                                            for key, v in opt.state[q].items()}
                                        for n, q in st.named_parameters() if q in opt.state}  # fmt: skip
            if policy == "pipemare" and opts.get("discrepancy_correction", True):
                decay = opts.get("velocity_decay", 0.5)
                if velocity[s] is None:
                    velocity[s] = {n: torch.zeros_like(w) for n, w in before.items()}
                for n, w in history[s][k + 1].items():
                    velocity[s][n].mul_(decay).add_(w - before[n], alpha=1.0 - decay)  # type: ignore[index]
        if k in drains:
            fill = k + 1
    state: dict[str, Tensor] = {}
    for s, st in enumerate(stages):
        own = {n: t.detach().clone() for n, t in st.state_dict().items()}
        own.update({n: history[o][n_steps][on].clone() for n, (o, on) in owner_of[s].items()})
        state.update({prefix + n: t for n, t in own.items()})
    return ReferenceResult(state, delays)
