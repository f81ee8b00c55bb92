"""Single-device runs of the helper models: what the pipelines must equal."""

from __future__ import annotations

import functools
from typing import Any

import lightning as L
import torch

from torch.utils.data import DataLoader

from tests.helpers.models import MemoryLogger, SeqRegressor, loader, regression_data


@functools.lru_cache(maxsize=None)
def single_device_fit(
    optimizer: str, batch_size: int, max_steps: int = 6, permutation_seed: int | None = None, clip: float | None = 0.3
) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Weights and per-step logged train_loss of a plain one-device Trainer (same seed and data as
    tests/scripts/fit_pipeline.py).

    ``permutation_seed``: read the data in the order of ``torch.randperm(n)`` seeded so, which is
    the order in which the replicas' ``DistributedSampler(shuffle=True)`` shards, taken together,
    visit it: batch ``b`` of the union of replicas is ``perm[b*B:(b+1)*B]``.
    """
    L.seed_everything(7)
    model = SeqRegressor(optimizer=optimizer, depth=4)
    logger = MemoryLogger()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=logger, log_every_n_steps=1,
        gradient_clip_val=clip, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
    )  # fmt: skip
    data = regression_data()
    if permutation_seed is None:
        train = loader(data, batch_size=batch_size)
    else:
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(permutation_seed)).tolist()
        train = DataLoader(data, batch_size=batch_size, sampler=order)
    trainer.fit(model, train)
    return {k: v.clone() for k, v in model.state_dict().items()}, train_losses(logger.rows)


def train_losses(rows: list[dict[str, Any]]) -> list[float]:
    return [r["train_loss"] for r in rows if "train_loss" in r]
