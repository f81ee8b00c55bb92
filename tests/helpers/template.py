"""A module and DataModule written the way lightning-hydra-template writes them
(``src/models/mnist_module.py``, ``src/models/components/simple_dense_net.py``,
``src/data/mnist_datamodule.py``), unchanged except that the data is generated (no download): a
net passed to ``__init__``, torchmetrics ``Accuracy`` / ``MeanMetric`` / ``MaxMetric`` objects logged
with ``self.log``, ``sync_dist=True`` in ``on_validation_epoch_end``, the optimizer and scheduler as
Hydra-style partials, ``ReduceLROnPlateau`` monitoring ``val/loss``, and a DataModule that divides
the batch size by ``trainer.world_size``."""

from __future__ import annotations

from typing import Any, Optional

import torch
from lightning import LightningDataModule, LightningModule
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification.accuracy import Accuracy


class SimpleDenseNet(nn.Module):
    """A simple fully-connected neural net for computing predictions."""

    def __init__(self, input_size: int = 784, lin1_size: int = 256, lin2_size: int = 256, lin3_size: int = 256,
                 output_size: int = 10) -> None:  # fmt: skip
        super().__init__()
        self.model = nn.Sequential(
            nn.Linear(input_size, lin1_size),
            nn.BatchNorm1d(lin1_size),
            nn.ReLU(),
            nn.Linear(lin1_size, lin2_size),
            nn.BatchNorm1d(lin2_size),
            nn.ReLU(),
            nn.Linear(lin2_size, lin3_size),
            nn.BatchNorm1d(lin3_size),
            nn.ReLU(),
            nn.Linear(lin3_size, output_size),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch_size, channels, width, height = x.size()
        # (batch, 1, width, height) -> (batch, 1*width*height)
        x = x.view(batch_size, -1)
        return self.model(x)


class MNISTLitModule(LightningModule):
    """Example of a `LightningModule` for MNIST classification."""

    def __init__(self, net: torch.nn.Module, optimizer: Any, scheduler: Any, compile: bool = False) -> None:
        super().__init__()
        # this line allows to access init params with 'self.hparams' attribute
        # also ensures init params will be stored in ckpt
        self.save_hyperparameters(logger=False)
        self.net = net
        # loss function
        self.criterion = torch.nn.CrossEntropyLoss()
        # metric objects for calculating and averaging accuracy across batches
        self.train_acc = Accuracy(task="multiclass", num_classes=10)
        self.val_acc = Accuracy(task="multiclass", num_classes=10)
        self.test_acc = Accuracy(task="multiclass", num_classes=10)
        # for averaging loss across batches
        self.train_loss = MeanMetric()
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()
        # for tracking best so far validation accuracy
        self.val_acc_best = MaxMetric()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def on_train_start(self) -> None:
        # by default lightning executes validation step sanity checks before training starts,
        # so it's worth to make sure validation metrics don't store results from these checks
        self.val_loss.reset()
        self.val_acc.reset()
        self.val_acc_best.reset()

    def model_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, y = batch
        logits = self.forward(x)
        loss = self.criterion(logits, y)
        preds = torch.argmax(logits, dim=1)
        return loss, preds, y

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, preds, targets = self.model_step(batch)
        # update and log metrics
        self.train_loss(loss)
        self.train_acc(preds, targets)
        self.log("train/loss", self.train_loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        # return loss or backpropagation will fail
        return loss

    def on_train_epoch_end(self) -> None:
        pass

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        loss, preds, targets = self.model_step(batch)
        # update and log metrics
        self.val_loss(loss)
        self.val_acc(preds, targets)
        self.log("val/loss", self.val_loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log("val/acc", self.val_acc, on_step=False, on_epoch=True, prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        acc = self.val_acc.compute()  # get current val acc
        self.val_acc_best(acc)  # update best so far val acc
        # log `val_acc_best` as a value through `.compute()` method, instead of as a metric object
        # otherwise metric would be reset by lightning after each epoch
        self.log("val/acc_best", self.val_acc_best.compute(), sync_dist=True, prog_bar=True)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        loss, preds, targets = self.model_step(batch)
        self.test_loss(loss)
        self.test_acc(preds, targets)
        self.log("test/loss", self.test_loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log("test/acc", self.test_acc, on_step=False, on_epoch=True, prog_bar=True)

    def setup(self, stage: str) -> None:
        if self.hparams.compile and stage == "fit":
            self.net = torch.compile(self.net)

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.hparams.optimizer(params=self.trainer.model.parameters())
        if self.hparams.scheduler is not None:
            scheduler = self.hparams.scheduler(optimizer=optimizer)
            return {
                "optimizer": optimizer,
                "lr_scheduler": {
                    "scheduler": scheduler,
                    "monitor": "val/loss",
                    "interval": "epoch",
                    "frequency": 1,
                },
            }
        return {"optimizer": optimizer}


def fake_mnist(n: int, seed: int) -> TensorDataset:
    """MNIST-shaped data (1 x 28 x 28 images, 10 classes) with a learnable rule, generated."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 28, 28, generator=g)
    y = (x[:, 0, :10, :10].sum(dim=(1, 2)) > 0).long() * 5 + x[:, 0, 0, :5].argmax(dim=1)
    return TensorDataset(x, y)


class MNISTDataModule(LightningDataModule):
    """`LightningDataModule` for the MNIST dataset (generated here)."""

    def __init__(self, data_dir: str = "data/", train_val_test_split: tuple[int, int, int] = (96, 32, 32),
                 batch_size: int = 16, num_workers: int = 0, pin_memory: bool = False) -> None:  # fmt: skip
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.data_train: Optional[Dataset] = None
        self.data_val: Optional[Dataset] = None
        self.data_test: Optional[Dataset] = None
        self.batch_size_per_device = batch_size

    def setup(self, stage: Optional[str] = None) -> None:
        # Divide batch size by the number of devices.
        if self.trainer is not None:
            if self.hparams.batch_size % self.trainer.world_size != 0:
                raise RuntimeError(
                    f"Batch size ({self.hparams.batch_size}) is not divisible by the number of devices "
                    f"({self.trainer.world_size})."
                )
            self.batch_size_per_device = self.hparams.batch_size // self.trainer.world_size
        # load and split datasets only if not loaded already
        if not self.data_train and not self.data_val and not self.data_test:
            n_train, n_val, n_test = self.hparams.train_val_test_split
            self.data_train = fake_mnist(n_train, 0)
            self.data_val = fake_mnist(n_val, 1)
            self.data_test = fake_mnist(n_test, 2)

    def train_dataloader(self) -> DataLoader[Any]:
        return DataLoader(dataset=self.data_train, batch_size=self.batch_size_per_device,
                          num_workers=self.hparams.num_workers, pin_memory=self.hparams.pin_memory, shuffle=True)  # fmt: skip

    def val_dataloader(self) -> DataLoader[Any]:
        return DataLoader(dataset=self.data_val, batch_size=self.batch_size_per_device,
                          num_workers=self.hparams.num_workers, pin_memory=self.hparams.pin_memory, shuffle=False)  # fmt: skip

    def test_dataloader(self) -> DataLoader[Any]:
        return DataLoader(dataset=self.data_test, batch_size=self.batch_size_per_device,
                          num_workers=self.hparams.num_workers, pin_memory=self.hparams.pin_memory, shuffle=False)  # fmt: skip
