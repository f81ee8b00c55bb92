"""A 2-stage run in which user code fails on one stage, or a setup that must be rejected.

Usage: python fit_faulty.py MODE TOKEN
  MODE: raise-first | raise-last (a layer raises at the 5th training forward, on stage 0 or on the
        last stage), two-optimizers (configure_optimizers returns two), nan-first (stage 0's output
        turns NaN at the 5th training forward, with anomaly detection on)
        Bad input: unsplittable (batches are plain objects), small-batch (a batch of 8 with 16
        micro-batches), ragged (stage 0's output length depends on the data), dict-between-stages,
        detached (stage 0's output does not require grad), 2bw-few-microbatches, pb-adamw,
        other-model-checkpoint (ckpt_path written for a model of another width);
        stall (stage 0 hangs for 120 s at its 5th training forward; timeout=15 s);
        ckpt (fit from the checkpoint file given as TOKEN)
  TOKEN: an arbitrary marker, so the test can look for processes left behind
"""

import os
import sys
import time
from datetime import timedelta
from typing import Callable

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from lightning_asyncpipe import AsyncPipeStrategy  # noqa: E402
from tests.helpers.models import SeqRegressor, loader, regression_data  # noqa: E402


class AtFifthForward(nn.Module):
    """Passes its input through, except at the 5th training forward, where ``act`` decides."""

    def __init__(self, act: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.act, self.calls = act, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
            if self.calls == 5:
                return self.act(x)
        return x


def bomb(where: str) -> AtFifthForward:
    def act(x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(f"boom from the {where} stage")

    return AtFifthForward(act)


def stall() -> AtFifthForward:
    """Hangs far longer than the strategy's timeout."""

    def act(x: torch.Tensor) -> torch.Tensor:
        time.sleep(120)
        return x

    return AtFifthForward(act)


def poison() -> AtFifthForward:
    """Turns its input into NaN."""
    return AtFifthForward(lambda x: x * float("nan"))


class Boundary(nn.Module):
    """The last layer of stage 0, breaking the stage boundary's contract in one way."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how

    def forward(self, x: torch.Tensor) -> object:
        if self.how == "ragged":
            return x[: 1 + int(x.abs().sum() * 1000) % x.shape[0]]  # data-dependent length
        if self.how == "dict-between-stages":
            return {"hidden": x}
        return x.detach()


class Box:
    """A batch type the pipeline cannot split."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y


class BoxRegressor(SeqRegressor):
    def training_step(self, batch: Box, batch_idx: int) -> torch.Tensor:  # type: ignore[override]
        return torch.nn.functional.mse_loss(self(batch.x), batch.y)


class TwoOptimizers(SeqRegressor):
    def configure_optimizers(self):  # type: ignore[override]
        return [torch.optim.SGD(self.parameters(), lr=0.1), torch.optim.SGD(self.parameters(), lr=0.1)]


def main() -> None:
    mode = sys.argv[1]
    torch.set_num_threads(1)
    L.seed_everything(0)
    model = {"two-optimizers": TwoOptimizers, "unsplittable": BoxRegressor}.get(mode, SeqRegressor)()
    if mode == "pb-adamw":
        model = SeqRegressor(optimizer="adamw")
    if mode == "raise-first":
        model.net.insert(0, bomb("first"))
    if mode == "raise-last":
        model.net.append(bomb("last"))
    if mode == "nan-first":
        model.net.insert(1, poison())
    if mode == "stall":
        model.net.insert(0, stall())
    if mode in ("ragged", "dict-between-stages", "detached"):
        model.net.insert(3, Boundary(mode))  # 8 layers: the last of stage 0's four
    # the fault injectors count calls and branch on data: Python that a recorded graph would run
    # once, at capture; declared leaf modules run whole, every call
    leaf = [n for n, m in model.net.named_children() if isinstance(m, (AtFifthForward, Boundary))]
    policy = {"2bw-few-microbatches": "pipedream_2bw", "pb-adamw": "pipelined_backprop"}.get(mode, "pipedream")
    microbatches = {"small-batch": 16, "2bw-few-microbatches": 1}.get(mode, 2)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, max_steps=20, logger=False,
        strategy=AsyncPipeStrategy(policy=policy, microbatches=microbatches, detect_anomaly=mode == "nan-first",
                                   leaf_modules=leaf,
                                   timeout=timedelta(seconds=15) if mode == "stall" else timedelta(minutes=30)),
        enable_progress_bar=False, enable_checkpointing=False,
    )  # fmt: skip
    data = loader(regression_data(), 8)
    if mode == "unsplittable":
        data = torch.utils.data.DataLoader(regression_data(), batch_size=8, collate_fn=lambda b: Box(
            torch.stack([x for x, _ in b]), torch.stack([y for _, y in b])))  # fmt: skip
    ckpt_path = None
    if mode == "other-model-checkpoint":
        ckpt_path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"other-model-{sys.argv[2]}.ckpt")
        if not os.path.exists(ckpt_path):  # written by the main process before launch
            torch.save({"state_dict": SeqRegressor(width=32).state_dict(), "pytorch-lightning_version": L.__version__},
                       ckpt_path)  # fmt: skip
    if mode == "ckpt":  # argv[2]: a damaged checkpoint file
        ckpt_path = sys.argv[2]
    trainer.fit(model, data, ckpt_path=ckpt_path)


if __name__ == "__main__":
    main()
