"""Two gloo processes exchange step payloads through StepHandoff (deferred), small and larger than
one inline message, and rank 0 checks it received every one, in order, equal to what was sent.

Usage: python handoff_exchange.py PORT
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from lightning_asyncpipe.handoff import StepHandoff  # noqa: E402

STEPS = 6


def payload(step: int) -> tuple:
    big = torch.arange(3000, dtype=torch.float32) * step if step % 2 else None  # 12 kB: a second message
    return {"loss": torch.tensor(0.5 * step)}, [("train_loss", torch.tensor(float(step)), {"prog_bar": True})], big


def same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


def worker(rank: int, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    handoff = StepHandoff([0, 1], rank, dist.group.WORLD, deferred=True, device=torch.device("cpu"))
    got = []
    for step in range(STEPS):
        got += handoff.exchange(step, payload(step) if handoff.is_source else None)
        if rank == 0:  # the newest pending receive is left for later: step k's payload arrives at k + 2
            assert len(got) == max(0, step - 1), (step, len(got))
    got += handoff.flush()
    if rank == 0:
        assert len(got) == STEPS, len(got)
        for step, received in enumerate(got):
            assert same(received, payload(step)), (step, received)
        print("OK", len(got))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(worker, args=(int(sys.argv[1]),), nprocs=2)
