"""The engine-versus-reference cases, shared by tests/scripts/engine_vs_reference.py (which runs
them in real processes) and tests/test_policies_reference.py (which checks them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

POLICIES: list[tuple[str, dict[str, Any]]] = [
    ("gpipe", {}),
    ("pipedream_flush", {}),
    ("zero_bubble", {}),
    ("zero_bubble", {"merge_weight_grads": True}),
    ("pipedream", {}),
    ("pipedream", {"vertical_sync": True}),
    ("pipedream_2bw", {}),
    ("pipemare", {}),
    ("pipemare", {"lr_rescheduling": False, "discrepancy_correction": False}),
    ("pipelined_backprop", {}),
    ("pipelined_backprop", {"spike_compensation": False, "weight_prediction": False}),
    ("pipeoptim", {}),
    ("nesterov_async", {}),
]
# the optimizers a policy is run with (default: SGD with momentum and AdamW)
OPTIMIZERS: dict[str, tuple[str, ...]] = {"pipelined_backprop": ("sgd",), "nesterov_async": ("nadam", "sgd_nesterov")}
NEEDS_M_GE_P = ("pipedream_2bw", "nesterov_async")  # two weight buffers
N_STEPS = 12  # long enough after the refill for 4 stages to reach the steady state
DRAIN_AFTER = (2,)  # a drain mid-run (as validation would cause), then a refill


@dataclass(frozen=True)
class Case:
    policy: str
    options: dict[str, Any] = field(hash=False)
    microbatches: int
    optimizer: str

    @property
    def name(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        return f"{self.policy}[{opts}]-m{self.microbatches}-{self.optimizer}"


def cases(n_stages: int) -> list[Case]:
    out = []
    for policy, options in POLICIES:
        for m in sorted({1, n_stages, 2 * n_stages}):
            if policy in NEEDS_M_GE_P and m < n_stages:
                continue
            for optimizer in OPTIMIZERS.get(policy, ("sgd", "adamw")):
                if optimizer == "sgd_nesterov" and m != n_stages:
                    continue  # one m suffices (2BW's delay does not depend on m): test time
                out.append(Case(policy, options, m, optimizer))
    return out


def model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)
    )  # fmt: skip


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)) for _ in range(N_STEPS)]


def optimizer(name: str):  # type: ignore[no-untyped-def]
    if name == "sgd":
        return lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9)
    if name == "sgd_nesterov":  # nesterov_async sets the momentum to 0.99
        return lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9, nesterov=True)
    if name == "nadam":  # the Nesterov paper's optimizer (decoupled weight decay)
        return lambda ps: torch.optim.NAdam(ps, lr=0.01, weight_decay=0.01, decoupled_weight_decay=True)
    return lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.01)


def scheduler(opt: torch.optim.Optimizer) -> Any:
    return torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.7)


loss_fn = F.mse_loss


def engine_kwargs(case: Case) -> dict[str, Any]:
    """What the engine is built with for ``case`` (besides the model and the layout)."""
    return {"optimizer": optimizer(case.optimizer), "loss_fn": loss_fn, "lr_scheduler": scheduler}
