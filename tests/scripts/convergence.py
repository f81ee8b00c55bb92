"""Train a small teacher-student regression with every policy on 4 processes (raw engine, gloo)
and save each run's per-step training loss: the data behind tests/test_convergence.py and the
convergence table in docs/concepts.md.

Usage: python convergence.py OUT_JSON [STEPS]
"""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from lightning_asyncpipe.comm import PipelineGroups  # noqa: E402
from lightning_asyncpipe.engine import PipelineEngine  # noqa: E402
from lightning_asyncpipe.topology import Topology  # noqa: E402

STAGES = 4
MODERATE, HIGH = 0.03, 0.12  # SGD learning rates (momentum 0.9)
RUNS = [  # (label, policy, options, lr, microbatches)
    ("sync", "pipedream_flush", {}, MODERATE, 4),
    ("gpipe", "gpipe", {}, MODERATE, 4),
    ("pipedream", "pipedream", {}, MODERATE, 4),
    ("pipedream_vsync", "pipedream", {"vertical_sync": True}, MODERATE, 4),
    ("pipedream_2bw", "pipedream_2bw", {}, MODERATE, 4),
    ("pipemare", "pipemare", {}, MODERATE, 4),
    ("pipelined_backprop", "pipelined_backprop", {}, MODERATE, 4),
    # one micro-batch per batch: delays of 3, 2, 1, 0 updates, at a learning rate sync handles
    ("high/sync", "pipedream_flush", {}, HIGH, 1),
    ("high/pipedream", "pipedream", {}, HIGH, 1),
    ("high/pipemare_plain", "pipemare", {"lr_rescheduling": False, "discrepancy_correction": False}, HIGH, 1),
    ("high/pipemare_t1", "pipemare", {"discrepancy_correction": False, "anneal_updates": 2000}, HIGH, 1),
    ("high/pipemare_t2", "pipemare", {"lr_rescheduling": False}, HIGH, 1),
    ("high/pipemare", "pipemare", {"anneal_updates": 2000}, HIGH, 1),
]


def data(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    teacher = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
    for p in teacher.parameters():
        p.data = torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5
    batches = []
    for _ in range(steps):
        x = torch.randn(32, 16, generator=g)
        with torch.no_grad():
            batches.append((x, teacher(x)))
    return batches


def student() -> nn.Sequential:
    torch.manual_seed(1)
    layers: list[nn.Module] = []
    for d_in, d_out in [(16, 64), (64, 64), (64, 64), (64, 64)]:
        layers += [nn.Linear(d_in, d_out), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(64, 4))


def worker(rank: int, rendezvous: str, out: str, steps: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=STAGES)
    groups = PipelineGroups(Topology(STAGES, STAGES), rank)
    batches = data(steps)
    curves = {}
    for label, policy, options, lr, m in RUNS:
        engine = PipelineEngine(student(), STAGES, policy, m, lambda ps, lr=lr: torch.optim.SGD(ps, lr=lr, momentum=0.9),
                                F.mse_loss, policy_options=options, groups=groups)  # fmt: skip
        losses = [engine.train_step(x, y, drain=k == steps - 1) for k, (x, y) in enumerate(batches)]
        curves[label] = losses
    if rank == 0:  # the last stage holds the losses
        with open(out, "w") as f:
            json.dump({"lr": {"moderate": MODERATE, "high": HIGH}, "curves": curves}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    # a file rendezvous next to the output, not a picked free TCP port (another job can take the
    # port before rank 0 binds it: EADDRINUSE seen once with two pytest workers)
    rendezvous = f"file://{os.path.abspath(sys.argv[1])}.rendezvous-{os.getpid()}"
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 300
    mp.start_processes(worker, args=(rendezvous, sys.argv[1], steps), nprocs=STAGES, start_method="spawn")
