"""balance="time" through Lightning: 2 stages, a model whose first layer costs ~all the compute.

Usage: python fit_balance_time.py OUT_DIR    (rank 0 writes OUT_DIR/balance.json)
"""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import lightning as L  # noqa: E402
import torch  # noqa: E402

from lightning_asyncpipe import AsyncPipeStrategy  # noqa: E402
from tests.helpers.models import SeqRegressor, loader, regression_data  # noqa: E402


class Heavy(torch.nn.Module):
    """Parameter-free, and far more expensive than the rest of the model together."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(200):
            x = torch.tanh(x @ torch.eye(x.shape[-1]) * 1.0001)
        return x


def main() -> None:
    torch.set_num_threads(1)
    L.seed_everything(0)
    model = SeqRegressor(depth=3)  # Linear, Tanh, Linear, Tanh, Linear
    model.net.insert(0, Heavy())  # 6 layers: uniform would split 3/3
    model.example_input_array = torch.zeros(8, 8)
    strategy = AsyncPipeStrategy(policy="pipedream_flush", microbatches=2, balance="time")
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=2, logger=False,
                        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(model, loader(regression_data(32), 8))
    if trainer.global_rank == 0:
        with open(os.path.join(sys.argv[1], "balance.json"), "w") as f:
            json.dump({"counts": strategy.resolved_balance, "costs": strategy.measured_costs}, f)


if __name__ == "__main__":
    main()
