"""Reuse in an existing project: a LightningModule written with no knowledge of pipelines,
trained on 2 pipeline stages by changing only the Trainer's strategy.

    python examples/minimal.py
"""

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_asyncpipe import AsyncPipeStrategy


class Regressor(L.LightningModule):
    """An ordinary LightningModule: one nn.Sequential, a loss, an optimizer."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(16, width), nn.GELU(), nn.Linear(width, width), nn.GELU(),
            nn.Linear(width, width), nn.GELU(), nn.Linear(width, 1),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.mse_loss(self(x), y), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


def data(n: int, seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    y = torch.sin(x.sum(dim=1, keepdim=True))
    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=seed == 0)


if __name__ == "__main__":
    L.seed_everything(0)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,  # one process per stage
        strategy=AsyncPipeStrategy(policy="pipedream_flush", microbatches=4),  # the only change
        max_epochs=3,
        logger=False,
        enable_checkpointing=False,
    )
    model = Regressor()
    trainer.fit(model, data(2048, 0), data(256, 1))
    if trainer.is_global_zero:
        print(f"final val_loss: {trainer.callback_metrics['val_loss']:.4f}")
