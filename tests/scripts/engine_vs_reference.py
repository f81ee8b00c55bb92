"""Run every engine-versus-reference case on N real processes (gloo) with the raw engine; each
rank saves its stage's weights and policy report per case.

Usage: python engine_vs_reference.py OUT_DIR N_STAGES [CASES]
  CASES: a module of tests/helpers with cases(), model(), batches(), engine_kwargs(case) and
  DRAIN_AFTER: engine_cases (an MLP Sequential, the default) or tied_cases (a nanoGPT with a tied head)
"""

import dataclasses
import importlib
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from lightning_asyncpipe.comm import PipelineGroups  # noqa: E402
from lightning_asyncpipe.engine import PipelineEngine  # noqa: E402
from lightning_asyncpipe.topology import Topology  # noqa: E402


def worker(rank: int, world: int, rendezvous: str, out: str, cases: str) -> None:
    C = importlib.import_module(f"tests.helpers.{cases}")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world)
    groups = PipelineGroups(Topology(world, world), rank)
    data = C.batches()
    for i, case in enumerate(C.cases(world)):
        engine = PipelineEngine(
            C.model(), n_stages=world, policy=case.policy, policy_options=case.options,
            microbatches=case.microbatches, groups=groups, **C.engine_kwargs(case),
        )  # fmt: skip
        for k, (x, y) in enumerate(data):
            engine.train_step(x, y, drain=k in C.DRAIN_AFTER or k == len(data) - 1)
        torch.save({"state": engine.stage_state_dict(), "report": dataclasses.asdict(engine.policy.report())},
                   os.path.join(out, f"{i}-{rank}.pt"))  # fmt: skip
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    out, world = sys.argv[1], int(sys.argv[2])
    cases = sys.argv[3] if len(sys.argv) > 3 else "engine_cases"
    # a file rendezvous, not a TCP port: a free port picked here can be taken (e.g. as another
    # job's ephemeral port) before rank 0 binds it, as seen once with two pytest workers
    rendezvous = f"file://{os.path.abspath(out)}/rendezvous-{os.getpid()}"
    mp.start_processes(worker, args=(world, rendezvous, out, cases), nprocs=world, start_method="spawn")
