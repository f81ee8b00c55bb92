"""A 3-stage asynchronous run with the CSV logger, pipeline metrics and the timeline callback.

Usage: python fit_metrics.py OUT_DIR POLICY MICROBATCHES
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402

from lightning_asyncpipe import AsyncPipeStrategy, PipelineTimeline  # noqa: E402
from tests.helpers.models import SeqRegressor, loader, regression_data  # noqa: E402

torch.set_num_threads(1)


def main() -> None:
    out, policy, microbatches = sys.argv[1], sys.argv[2], int(sys.argv[3])
    L.seed_everything(0)
    trainer = L.Trainer(
        accelerator="cpu", devices=3, max_steps=12, log_every_n_steps=4,
        strategy=AsyncPipeStrategy(policy=policy, microbatches=microbatches),
        logger=CSVLogger(out, name="csv", version=0),
        callbacks=[PipelineTimeline(os.path.join(out, "timeline"), first_step=3, steps=3)],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(SeqRegressor(depth=4), loader(regression_data(96), 8))


if __name__ == "__main__":
    main()
