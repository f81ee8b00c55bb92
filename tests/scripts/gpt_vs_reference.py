"""Run every GPT-with-tied-head case (tests/helpers/tied_cases.py) on N real processes (gloo) with
the raw engine; each rank saves its stage's weights per case.

Usage: python gpt_vs_reference.py OUT_DIR N_STAGES
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from lightning_asyncpipe.comm import PipelineGroups  # noqa: E402
from lightning_asyncpipe.engine import PipelineEngine  # noqa: E402
from lightning_asyncpipe.topology import Topology  # noqa: E402
from tests.helpers import tied_cases as C  # noqa: E402


def worker(rank: int, world: int, rendezvous: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world)
    groups = PipelineGroups(Topology(world, world), rank)
    data = C.batches()
    for i, case in enumerate(C.cases(world)):
        engine = PipelineEngine(
            C.model(), n_stages=world, policy=case.policy, policy_options=case.options,
            microbatches=case.microbatches, optimizer=C.optimizer(case.policy), loss_fn=C.loss_fn,
            lr_scheduler=C.scheduler, clip_grad_norm=C.CLIP, groups=groups,
        )  # fmt: skip
        for k, (x, y) in enumerate(data):
            engine.train_step(x, y, drain=k in C.DRAIN_AFTER or k == len(data) - 1)
        torch.save(engine.stage_state_dict(), os.path.join(out, f"{i}-{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    out, world = sys.argv[1], int(sys.argv[2])
    rendezvous = f"file://{os.path.abspath(out)}/rendezvous-{os.getpid()}"
    mp.start_processes(worker, args=(world, rendezvous, out), nprocs=world, start_method="spawn")
