"""The GPT-with-tied-head cases, shared by tests/scripts/engine_vs_reference.py (which runs them on
real processes with the raw engine) and tests/test_tied_reference.py (which checks them against
:mod:`lightning_asyncpipe.reference`). float64: the comparison holds to ~1e-12 on any CPU."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tests.helpers import engine_cases as E
from tests.helpers.engine_cases import Case
from tests.helpers.zoo import GPT, GPTConfig

# every policy with its default options, and PipeDream's vertical sync (the owner's version then
# is every stage's)
POLICIES: list[tuple[str, dict[str, Any]]] = [(p, o) for p, o in E.POLICIES if not o or p == "pipedream"]
N_STEPS = 6
DRAIN_AFTER = (2,)  # a drain mid-run (as validation would cause), then a refill
T = 8  # tokens per sequence


def cases(n_stages: int) -> list[Case]:
    """Each policy with one micro-batch per batch (the owner's version then lags the most; not for
    2BW, which needs ``m >= p``) and with ``2p`` (several batches' micro-batches in flight)."""
    return [Case(policy, options, m, {"pipelined_backprop": "sgd", "nesterov_async": "nadam"}.get(policy, "adamw"))
            for policy, options in POLICIES for m in (1, 2 * n_stages) if m >= n_stages or policy not in E.NEEDS_M_GE_P]


def model() -> nn.Module:
    """A nanoGPT (token and position embeddings, a ModuleList of blocks, the head tied to the token
    embedding), in float64, held as ``net`` (the pipelined module)."""
    torch.manual_seed(0)
    holder = nn.Module()
    holder.net = GPT(GPTConfig(n_layer=4, bias=False)).double()
    return holder


def batches() -> list[tuple[Any, Any]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(N_STEPS):
        data = torch.randint(0, 32, (8, T + 1), generator=g)
        x, y = data[:, :-1].contiguous(), data[:, 1:].contiguous()
        out.append(((x, y), y))
    return out


def loss_fn(output: Any, target: Any) -> torch.Tensor:
    _, loss = output  # nanoGPT's forward computes the loss when given targets
    return loss


def optimizer(name: str) -> Any:
    """AdamW with nanoGPT's decay groups, NAdam with the same groups (for nesterov_async), or SGD with
    momentum (for pipelined_backprop, which needs it)."""

    def make(params: Any) -> torch.optim.Optimizer:
        params = list(params)
        if name == "sgd":
            return torch.optim.SGD(params, lr=0.05, momentum=0.9)
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]  # fmt: skip
        if name == "nadam":
            return torch.optim.NAdam(groups, lr=1e-2, betas=(0.9, 0.95), decoupled_weight_decay=True)
        return torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95))

    return make


def scheduler(opt: torch.optim.Optimizer) -> Any:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1.0 + 0.1 * step))


CLIP = 0.5


def engine_kwargs(case: Case) -> dict[str, Any]:
    """What the engine is built with for ``case`` (besides the model and the layout)."""
    return {"optimizer": optimizer(case.optimizer), "loss_fn": loss_fn, "lr_scheduler": scheduler, "clip_grad_norm": CLIP}
