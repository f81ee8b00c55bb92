"""Pipelined Backpropagation (Kosson et al., MLSys 2021, "Pipelined Backpropagation at Scale").

No weight stashing: the forward uses the latest weights and the backward the current ones (by
recomputing the stage, as PipeMare), so a stage with delay ``D = tau_s`` applies stale
gradients. Two mitigations, each switchable, both defined on SGD with momentum ``mu``
(``v <- mu*v + g``):

- **Spike compensation** (section 4.1): the update becomes ``w <- w - lr*(a*v + b*g)`` with
  ``a = mu**D`` and ``b = (1 - mu**D)/(1 - mu)``: the ``D`` momentum contributions a delayed
  gradient missed are applied at once, and the velocity term shrinks so each gradient's total
  contribution stays ``1/(1 - mu)``. With ``D = 0`` it is plain momentum SGD.
- **Linear weight prediction** (section 4.2): the forward of a micro-batch whose backward comes
  ``D`` updates later uses ``w - lr*D*v``, an extrapolation of the weights its gradient will be
  applied to.

Both need ``torch.optim.SGD`` with ``momentum > 0``; another optimizer is rejected at setup.
"""

from __future__ import annotations

from typing import ClassVar, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_asyncpipe.policies.base import ApplyUpdate, require_sgd_momentum
from lightning_asyncpipe.policies.recompute import RecomputingPolicy, shifted_weights
from lightning_asyncpipe.policies.registry import register_policy

__all__ = ["PipelinedBackpropPolicy", "spike_compensated_sgd_step"]


def spike_compensated_sgd_step(optimizer: Optimizer, delay: int) -> None:
    """One SGD-with-momentum update with spike compensation for gradients ``delay`` updates old.

    Follows ``torch.optim.SGD``'s conventions (weight decay added to the gradient, dampening, the
    buffer initialised to the first gradient); with ``delay = 0`` it is exactly ``optimizer.step()``.
    """
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
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = torch.clone(g).detach()
                else:
                    buf.mul_(mu).add_(g, alpha=1.0 - damp)
                p.add_(buf, alpha=-lr * a)
                if b != 0.0:
                    p.add_(g, alpha=-lr * b)


@register_policy
class PipelinedBackpropPolicy(RecomputingPolicy):
    """Pipelined Backpropagation with spike compensation and linear weight prediction.

    Args:
        spike_compensation: use the spike-compensated update.
        weight_prediction: forward on linearly predicted weights.
    """

    name: ClassVar[str] = "pipelined_backprop"

    def __init__(self, spike_compensation: bool = True, weight_prediction: bool = True) -> None:
        super().__init__()
        self.spike_compensation, self.weight_prediction = spike_compensation, weight_prediction
        self._scratch: Optional[list[Tensor]] = None  # the predicted weights, reused

    def validate_optimizer(self, optimizer: Optimizer) -> None:
        require_sgd_momentum(self.name, optimizer)

    def forward_weights(self, microbatch: int, gap: int) -> Optional[dict[str, Tensor]]:
        if not self.weight_prediction or gap == 0 or self.optimizer is None:
            return None
        lr_of = {id(p): g["lr"] for g in self.optimizer.param_groups for p in g["params"]}
        named = self._named_live()
        self._scratch = self._scratch_buffers(self._scratch, [p for _, p in named])
        weights: dict[str, Tensor] = dict(named)  # no momentum yet: the live weight
        moving, velocities, alphas, buffers = [], [], [], []
        for (name, p), scratch in zip(named, self._scratch):
            buf = self.optimizer.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                moving.append((name, p))
                velocities.append(buf)
                alphas.append(lr_of.get(id(p), 0.0) * gap)
                buffers.append(scratch)
        weights.update(shifted_weights(moving, velocities, alphas, buffers))
        return weights

    def extra_buffers(self) -> int:
        return 1 if self.weight_prediction and self.tau >= 1 else 0  # the predicted weights

    def update(self, batch: int, apply: ApplyUpdate) -> None:
        delay = self.tau if self.spike_compensation else 0
        apply(batch, (lambda opt: spike_compensated_sgd_step(opt, delay)) if delay else None)
        self._finish_update(batch)
