"""Nesterov look-ahead updates over a one-update delay (Ajanthan et al., ICML 2025).

"Nesterov Method for Asynchronous Pipeline Parallel Optimization", Ajanthan, Ramasinghe, Zuo,
Avraham, Long, ICML 2025 (PMLR 267:909-924, arXiv 2505.01099); official code
PluralisResearch/AsyncPP. The paper keeps the pipeline asynchronous and treats the stale gradient
with Nesterov's look-ahead: the update does not wait for a gradient at the look-ahead point, it
extrapolates along the momentum, with a large momentum coefficient. Its code runs PipeDream's
weight stashing with ``torch.optim.NAdam`` (Dozat's Nesterov momentum inside Adam, decoupled weight
decay) and ``beta1 = 0.99`` (``run.bash``: ``--momentum 0.99 --optimizer nadamw``).

Here the delay is PipeDream-2BW's (:mod:`~lightning_asyncpipe.policies.pipedream_2bw`), uniform and
independent of the number of stages:

- the forward and the backward of every micro-batch of batch ``k`` see ``W_s(max(0, k-1))`` at
  every stage (two weight versions per stage; needs ``m >= p``);
- the update of batch ``k`` applies the Nesterov step with the batch's mean gradient (taken at
  ``W(k-1)``) to the newest weights ``W(k)``:

  * ``torch.optim.NAdam`` (the paper's optimizer): ``W <- W - lr * (mu_{t+1} * m_t / (1 - prod mu_{..t+1})
    + (1 - mu_t) * g / (1 - prod mu_{..t})) / (sqrt(v_hat) + eps)`` (and ``W <- W*(1 - lr*wd)``
    with ``decoupled_weight_decay=True``), ``mu_t = beta1 * (1 - 0.5 * 0.96**(t * momentum_decay))``;
  * ``torch.optim.SGD(nesterov=True)``, the same look-ahead without the adaptive scaling:
    ``v <- mu*v + g``, ``W <- W - lr*(g + mu*v)`` (Sutskever et al.'s form of NAG).

``momentum`` (default 0.99, the paper's): the policy sets NAdam's ``beta1`` (or SGD's momentum) to
it when it is bound to the optimizer; ``None`` keeps the optimizer's own value. Step x stage
table: as PipeDream-2BW's.
"""

from __future__ import annotations

from typing import ClassVar, Optional

import torch
from torch import nn
from torch.optim import Optimizer

from lightning_asyncpipe.errors import PipelineConfigError
from lightning_asyncpipe.policies.pipedream_2bw import PipeDream2BWPolicy
from lightning_asyncpipe.policies.registry import register_policy

__all__ = ["NesterovAsyncPolicy"]


@register_policy
class NesterovAsyncPolicy(PipeDream2BWPolicy):
    """PipeDream-2BW's one-update delay with Nesterov look-ahead updates (NAdam or Nesterov SGD).

    Args:
        momentum: the momentum coefficient the updates use (NAdam's ``beta1``, SGD's ``momentum``);
            the paper recommends 0.99. ``None``: the optimizer's own.
    """

    name: ClassVar[str] = "nesterov_async"

    def __init__(self, momentum: Optional[float] = 0.99) -> None:
        super().__init__()
        if momentum is not None and not 0.0 < momentum < 1.0:
            raise PipelineConfigError(f"NesterovAsyncPolicy needs 0 < momentum < 1 (or None), got {momentum}.")
        self.momentum = momentum

    def validate_optimizer(self, optimizer: Optimizer) -> None:
        groups = optimizer.param_groups
        if isinstance(optimizer, torch.optim.NAdam):
            return
        if isinstance(optimizer, torch.optim.SGD) and all(g.get("nesterov") and g.get("momentum") for g in groups):
            return
        raise PipelineConfigError(
            f"Policy 'nesterov_async' updates with Nesterov's look-ahead: it needs torch.optim.NAdam (the paper's "
            f"optimizer, e.g. NAdam(params, lr=3e-4, weight_decay=0.1, decoupled_weight_decay=True)) or "
            f"torch.optim.SGD(params, lr=..., momentum=0.9, nesterov=True). configure_optimizers returned "
            f"{type(optimizer).__name__}; the policy then sets the momentum to {self.momentum} (option 'momentum')."
        )

    def bind(self, stage: int, n_stages: int, n_microbatches: int, module: nn.Module,
             optimizer: Optional[Optimizer]) -> None:  # fmt: skip
        super().bind(stage, n_stages, n_microbatches, module, optimizer)
        if optimizer is None or self.momentum is None:
            return
        for group in optimizer.param_groups:
            if "betas" in group:
                group["betas"] = (self.momentum, group["betas"][1])
            else:
                group["momentum"] = self.momentum
