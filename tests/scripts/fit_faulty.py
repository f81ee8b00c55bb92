"""A 2-stage run in which user code fails on one stage, or a setup that must be rejected.

Usage: python fit_faulty.py MODE TOKEN
  MODE: raise-first | raise-last (a layer raises at the 5th training forward, on stage 0 or on the
        last stage), two-optimizers (configure_optimizers returns two), nan-first (stage 0's output
        turns NaN at the 5th training forward, with anomaly detection on)
  TOKEN: an arbitrary marker, so the test can look for processes left behind
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from lightning_asyncpipe import AsyncPipeStrategy  # noqa: E402
from tests.helpers.models import SeqRegressor, loader, regression_data  # noqa: E402


class Bomb(nn.Module):
    def __init__(self, where: str) -> None:
        super().__init__()
        self.where, self.calls = where, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
            if self.calls == 5:
                raise RuntimeError(f"boom from the {self.where} stage")
        return x


class Poison(nn.Module):
    """Turns its input into NaN at the 5th training forward."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
            if self.calls == 5:
                return x * float("nan")
        return x


class TwoOptimizers(SeqRegressor):
    def configure_optimizers(self):  # type: ignore[override]
        return [torch.optim.SGD(self.parameters(), lr=0.1), torch.optim.SGD(self.parameters(), lr=0.1)]


def main() -> None:
    mode = sys.argv[1]
    torch.set_num_threads(1)
    L.seed_everything(0)
    model = TwoOptimizers() if mode == "two-optimizers" else SeqRegressor()
    if mode == "raise-first":
        model.net.insert(0, Bomb("first"))
    if mode == "raise-last":
        model.net.append(Bomb("last"))
    if mode == "nan-first":
        model.net.insert(1, Poison())
    trainer = L.Trainer(
        accelerator="cpu", devices=2, max_steps=20, logger=False,
        strategy=AsyncPipeStrategy(policy="pipedream", microbatches=2, detect_anomaly=mode == "nan-first"),
        enable_progress_bar=False, enable_checkpointing=False,
    )  # fmt: skip
    trainer.fit(model, loader(regression_data(), 8))


if __name__ == "__main__":
    main()
