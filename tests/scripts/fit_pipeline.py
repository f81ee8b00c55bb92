"""Train SeqRegressor with AsyncPipeStrategy for each requested (policy, optimizer) and save, on
rank 0, the final weights and the logged metrics: the multi-process side of the equivalence tests.

Usage: python fit_pipeline.py OUT_DIR DEVICES STAGES POLICY:OPTIM [POLICY:OPTIM ...]
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import lightning as L  # noqa: E402
import torch  # noqa: E402

from lightning_asyncpipe import AsyncPipeStrategy  # noqa: E402
from tests.helpers.models import MemoryLogger, SeqRegressor, loader, regression_data  # noqa: E402

torch.set_num_threads(1)


def main() -> None:
    out, devices, stages = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    microbatches = int(os.environ.get("AP_MICROBATCHES", "4"))
    for spec in sys.argv[4:]:
        policy, optim = spec.split(":")
        L.seed_everything(7)
        model = SeqRegressor(optimizer=optim, depth=4)
        logger = MemoryLogger()
        trainer = L.Trainer(
            accelerator="cpu", devices=devices, max_steps=6, logger=logger, log_every_n_steps=1,
            strategy=AsyncPipeStrategy(policy=policy, microbatches=microbatches, stages=stages),
            gradient_clip_val=0.3, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        )  # fmt: skip
        trainer.fit(model, loader(regression_data(), batch_size=8))  # per replica, as with DDP
        if trainer.global_rank == 0:
            torch.save(model.state_dict(), os.path.join(out, f"{policy}-{optim}.pt"))
            logger.dump(os.path.join(out, f"{policy}-{optim}.json"))


if __name__ == "__main__":
    main()
