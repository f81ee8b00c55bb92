"""One 4-stage asynchronous run, launched in one of three ways (issue 6, point 5).

Usage: python fit_multinode.py OUT_DIR MODE
  MODE single: one launch, devices=4 (Lightning's launcher starts 3 children)
  MODE node:   one of two launches with devices=2, num_nodes=2; NODE_RANK, MASTER_ADDR and
               MASTER_PORT come from the environment, as on a cluster
  MODE torchrun: started by torchrun --nproc_per_node=4 (TorchElasticEnvironment)
Rank 0 writes the final weights to OUT_DIR/<MODE>.pt.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import lightning as L  # noqa: E402
import torch  # noqa: E402

from lightning_asyncpipe import AsyncPipeStrategy  # noqa: E402
from tests.helpers.models import SeqRegressor, loader, regression_data  # noqa: E402


def main() -> None:
    out, mode = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    L.seed_everything(11)
    model = SeqRegressor(optimizer="adamw", lr=0.02, depth=5)  # 9 layers over 4 stages
    trainer = L.Trainer(
        accelerator="cpu", devices=2 if mode == "node" else 4, num_nodes=2 if mode == "node" else 1,
        strategy=AsyncPipeStrategy(policy="pipedream_2bw", microbatches=4, stages=4), max_steps=10,
        logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )  # fmt: skip
    trainer.fit(model, loader(regression_data(48), 8, shuffle=True))
    if trainer.global_rank == 0:
        torch.save(model.state_dict(), os.path.join(out, f"{mode}.pt"))
    print(f"rank {trainer.global_rank} of {trainer.world_size}: stage {trainer.strategy.stage} on node "
          f"{trainer.node_rank}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
