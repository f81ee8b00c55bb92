"""A LightningCLI entry point, as projects write one; the strategy comes from the command line.

Usage: python cli_fit.py fit --trainer.strategy pipemare ...
       python cli_fit.py fit --trainer.strategy lightning_asyncpipe.AsyncPipeStrategy \\
           --trainer.strategy.policy pipedream_2bw --trainer.strategy.microbatches 2 ...
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.cli import LightningCLI  # noqa: E402

import lightning_asyncpipe  # noqa: E402, F401  (registers the strategy names)
from tests.helpers.models import SeqRegressor, loader, regression_data  # noqa: E402

torch.set_num_threads(1)


class RegressionData(L.LightningDataModule):
    def __init__(self, samples: int = 48, batch_size: int = 8) -> None:
        super().__init__()
        self.samples, self.batch_size = samples, batch_size

    def train_dataloader(self):  # type: ignore[no-untyped-def]
        return loader(regression_data(self.samples), self.batch_size)


class Reporting(SeqRegressor):
    def on_fit_end(self) -> None:
        strategy = self.trainer.strategy
        print(f"rank {self.global_rank}: {type(strategy).__name__} policy={getattr(strategy, 'policy_name', None)} "
              f"microbatches={getattr(strategy, 'microbatches', None)} steps={self.trainer.global_step}", flush=True)


if __name__ == "__main__":
    LightningCLI(Reporting, RegressionData, seed_everything_default=0)
