"""Small LightningModules and data shared by the tests and the scripts they launch."""

from __future__ import annotations

import json
from typing import Any, Optional

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers.logger import Logger
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class SeqRegressor(L.LightningModule):
    """A plain LightningModule written with no knowledge of pipelines: an MLP in one nn.Sequential."""

    def __init__(self, optimizer: str = "sgd", lr: float = 0.05, width: int = 16, n_in: int = 8, n_out: int = 4,
                 depth: int = 4, scheduler: bool = True) -> None:  # fmt: skip
        super().__init__()
        self.save_hyperparameters()
        layers: list[nn.Module] = []
        d = n_in
        for _ in range(depth - 1):
            layers += [nn.Linear(d, width), nn.Tanh()]
            d = width
        layers.append(nn.Linear(d, n_out))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.log("train_loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.mse_loss(self(x), y), prog_bar=True)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("test_loss", F.mse_loss(self(x), y))

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, _ = batch
        return self(x)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        if hp.optimizer == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=0.9)
        elif hp.optimizer == "nadam":  # nesterov_async's
            opt = torch.optim.NAdam(self.parameters(), lr=hp.lr, weight_decay=0.01, decoupled_weight_decay=True)
        else:
            opt = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=0.01)
        if not hp.scheduler:
            return opt
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.7)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def regression_data(n: int = 96, n_in: int = 8, n_out: int = 4, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, n_in, generator=g)
    w = torch.randn(n_in, n_out, generator=g)
    return TensorDataset(x, torch.tanh(x @ w) + 0.1 * torch.randn(n, n_out, generator=g))


def loader(dataset: TensorDataset, batch_size: int = 8, shuffle: bool = False) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle)


class MemoryLogger(Logger):
    """Keeps what Lightning logs, on rank 0, and can dump it as JSON."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, float]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        self.rows.append({"step": step, **{k: float(v) for k, v in metrics.items()}})

    def dump(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.rows, f)
