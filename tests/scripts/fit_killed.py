"""A 3-stage asynchronous run that trains until one of its processes is killed from outside.

Usage: python fit_killed.py OUT_DIR TOKEN
  After 5 steps every rank writes OUT_DIR/rank<R>.pid (its pid and stage); the test then kills
  one of them with SIGKILL. TOKEN: a marker, so the test can look for processes left behind.
"""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import lightning as L  # noqa: E402
import torch  # noqa: E402

from lightning_asyncpipe import AsyncPipeStrategy  # noqa: E402
from tests.helpers.models import SeqRegressor, loader, regression_data  # noqa: E402


class ReportPid(L.Callback):
    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == 5:
            stage = trainer.strategy.stage  # type: ignore[attr-defined]
            with open(os.path.join(self.out, f"rank{trainer.global_rank}.pid"), "w") as f:
                json.dump({"pid": os.getpid(), "stage": stage}, f)


def main() -> None:
    torch.set_num_threads(1)
    L.seed_everything(0)
    trainer = L.Trainer(
        accelerator="cpu", devices=3, max_steps=1_000_000, logger=False, callbacks=[ReportPid(sys.argv[1])],
        strategy=AsyncPipeStrategy(policy="pipedream_2bw", microbatches=3), enable_progress_bar=False,
        enable_checkpointing=False,
    )  # fmt: skip
    trainer.fit(SeqRegressor(), loader(regression_data(), 8))


if __name__ == "__main__":
    main()
