"""PipeOptim: forwards on weights predicted with the optimizer's own update rule (Guan et al., 2023).

"PipeOptim: Ensuring Effective 1F1B Schedule with Optimizer-Dependent Weight Prediction", Guan,
Li, Chen, Liang, Wang, Lu, arXiv 2312.00839 (public code: guanleics/PipeOptim, ``optimizer.py``).
No weight stashing: the forward of micro-batch ``j`` runs on the weights its backward is expected
to meet, extrapolated from the live weights along the optimizer's next update direction ``d``::

    W_hat = W - s * lr * d        s = gap(j): updates between the forward and the backward of j

- SGD with momentum: ``d = v``, the momentum buffer (weight decay is already in it);
- Adam / AdamW: ``d = m_hat / (sqrt(v_hat) + eps)`` with the bias corrections of the last step
  (``m_hat = exp_avg / (1 - beta1**t)``, ``v_hat = exp_avg_sq / (1 - beta2**t)``), plus
  ``weight_decay * W`` for decoupled weight decay (AdamW): that term is part of AdamW's update
  ``lr * (m_hat / (sqrt(v_hat) + eps) + weight_decay * W)``, so it is predicted like the rest
  (first order, as the prediction is). Adam's coupled weight decay is already in ``m``.

A parameter with no optimizer state yet (before its first update) is used as it is.

[Note: choices against the paper and its code]
- ``s``: this project's delay, the number of updates between the forward and the backward of the
  micro-batch in the 1F1B stream (``gap(j)``, at most ``tau_s = ceil((p-1-s)/m)``). With one
  micro-batch per update it is ``p-1-s``, the paper's README's ``s = D - rank - 1``; the public
  code's ``forward_s = world_size - rank`` predicts one update further (the last stage, which has
  no delay, predicts too). We predict over the delay there is, so the last stage runs on its
  live weights and the prediction is exact for a constant update direction.
- SGD: the code predicts with ``mu*v + (1-dampening)*grad`` (the buffer of a step that includes
  the gradient left in ``.grad``); at a forward here ``.grad`` holds a partly accumulated batch,
  so we use the buffer of the last update, ``v`` (as Kosson et al.'s linear weight prediction).
- Adam: the code ignores weight decay and hard-codes ``eps = 1e-8``; we take ``eps`` and the
  decoupled weight decay from the optimizer's parameter group.
- Backward: the paper runs it on the fresh (current) weights, which is what this policy does,
  by recomputing the stage from its stored input on ``W_s(k)`` (as PipeMare and Pipelined
  Backpropagation): so no weight version is stashed; the gradient is taken at the current
  weights with the activations of the predicted forward replayed exactly (same input, same
  random state).

Memory: the live weights plus one weight-sized scratch for the predicted weights on a stage with
delay (``tau_s >= 1``); the optimizer state is the optimizer's own (no copy).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Optional

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_asyncpipe.errors import PipelineConfigError
from lightning_asyncpipe.policies.recompute import RecomputingPolicy, shifted_weights
from lightning_asyncpipe.policies.registry import register_policy

__all__ = ["PipeOptimPolicy", "update_direction"]


def _rule(optimizer: Optimizer) -> str:
    """``"sgd"`` or ``"adam"``: the update rule the prediction follows, or a clear error."""
    groups = optimizer.param_groups
    if isinstance(optimizer, torch.optim.SGD) and all(g.get("momentum") and not g.get("nesterov") for g in groups):
        return "sgd"
    if isinstance(optimizer, torch.optim.Adam) and not any(g.get("amsgrad") or g.get("maximize") for g in groups):
        return "adam"
    group = groups[0] if groups else {}
    raise PipelineConfigError(
        f"Policy 'pipeoptim' predicts weights with the optimizer's own update rule, defined for torch.optim.SGD "
        f"with momentum > 0 (nesterov=False) and torch.optim.Adam / AdamW (amsgrad=False, maximize=False). "
        f"configure_optimizers returned {type(optimizer).__name__} with "
        f"{ {k: v for k, v in group.items() if k in ('momentum', 'nesterov', 'amsgrad', 'maximize')} }. "
        "Use e.g. torch.optim.AdamW(self.parameters(), lr=1e-3) or torch.optim.SGD(..., momentum=0.9)."
    )


def update_direction(rule: str, group: dict[str, Any], state: dict[str, Any], param: Tensor,
                     out: Tensor) -> Optional[Tensor]:  # fmt: skip
    """The optimizer's next update direction ``d`` for ``param`` (its update being ``lr * d``),
    written into ``out``; ``None`` when the parameter has no optimizer state yet."""
    if rule == "sgd":
        return state.get("momentum_buffer")
    if "exp_avg" not in state:
        return None
    beta1, beta2 = group["betas"]
    step = float(state["step"])
    bias1, bias2_sqrt = 1.0 - beta1**step, math.sqrt(1.0 - beta2**step)
    # m_hat / (sqrt(v_hat) + eps), in the order torch.optim.Adam computes its update
    torch.sqrt(state["exp_avg_sq"], out=out)
    out.div_(bias2_sqrt).add_(group["eps"])
    torch.div(state["exp_avg"], out, out=out)
    out.div_(bias1)
    if group.get("decoupled_weight_decay", False) and group["weight_decay"] != 0:
        out.add_(param.detach(), alpha=group["weight_decay"])
    return out


@register_policy
class PipeOptimPolicy(RecomputingPolicy):
    """PipeOptim: optimizer-dependent weight prediction for the forward, current weights for the backward."""

    name: ClassVar[str] = "pipeoptim"

    def __init__(self) -> None:
        super().__init__()
        self._scratch: Optional[list[Tensor]] = None  # the predicted weights, reused

    def validate_optimizer(self, optimizer: Optimizer) -> None:
        _rule(optimizer)

    def forward_weights(self, microbatch: int, gap: int) -> Optional[dict[str, Tensor]]:
        if gap == 0 or self.optimizer is None:
            return None
        rule = _rule(self.optimizer)
        group_of = {id(p): g for g in self.optimizer.param_groups for p in g["params"]}
        named = self._named_live()
        self._scratch = self._scratch_buffers(self._scratch, [p for _, p in named])
        weights: dict[str, Tensor] = dict(named)  # no optimizer state yet: the live weight
        moving: list[tuple[str, nn.Parameter]] = []
        directions, alphas, buffers = [], [], []
        for (name, p), scratch in zip(named, self._scratch):
            group = group_of.get(id(p))
            if group is None:
                continue
            d = update_direction(rule, group, self.optimizer.state.get(p, {}), p, scratch)
            if d is not None:
                moving.append((name, p))
                directions.append(d)
                alphas.append(group["lr"] * gap)
                buffers.append(scratch)
        weights.update(shifted_weights(moving, directions, alphas, buffers))
        return weights

    def extra_buffers(self) -> int:
        return 1 if self.tau >= 1 else 0  # the predicted weights
