"""A small GPT-style character model and the text it learns: the standard library's own sources.

The model is written nanoGPT's way (a ``ModuleList`` of blocks, the head tied to the token
embedding); ``AsyncPipeStrategy`` captures its forward and splits it between blocks.
"""

from __future__ import annotations

import math
import os
import sysconfig
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

__all__ = ["CharGPT", "GPT", "StdlibText", "read_stdlib"]


class Block(nn.Module):
    """Pre-norm transformer block with causal self-attention."""

    def __init__(self, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.ln1, self.ln2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.qkv, self.proj = nn.Linear(n_embd, 3 * n_embd), nn.Linear(n_embd, n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd), nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        drop = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=drop)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """nanoGPT's layout: token and position embeddings, a ``ModuleList`` of blocks, a final
    LayerNorm and an LM head tied to the token embedding."""

    def __init__(self, vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int,
                 dropout: float) -> None:  # fmt: skip
        super().__init__()
        self.block_size = block_size
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab_size, n_embd),
            wpe=nn.Embedding(block_size, n_embd),
            drop=nn.Dropout(dropout),
            h=nn.ModuleList([Block(n_embd, n_head, dropout) for _ in range(n_layer)]),
            ln_f=nn.LayerNorm(n_embd),
        ))  # fmt: skip
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying

    def forward(self, idx: Tensor) -> Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


class CharGPT(L.LightningModule):
    """A character-level GPT (byte vocabulary), written as a Lightning project writes one: the model
    in ``self.model``, nothing shaped for the pipeline.

    Args:
        vocab_size: 256: the model reads raw bytes.
        block_size: context length.
        n_layer, n_head, n_embd: transformer size.
        dropout: dropout in the blocks.
        lr: peak AdamW learning rate; warm-up then cosine decay over ``max_steps``.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up length.
    """

    def __init__(self, vocab_size: int = 256, block_size: int = 64, n_layer: int = 4, n_head: int = 4,
                 n_embd: int = 128, dropout: float = 0.0, lr: float = 3e-3, weight_decay: float = 0.01,
                 warmup_steps: int = 20) -> None:  # fmt: skip
        super().__init__()
        self.save_hyperparameters()
        self.model = GPT(vocab_size, block_size, n_layer, n_head, n_embd, dropout)

    def forward(self, idx: Tensor) -> Tensor:
        return self.model(idx)

    def _loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        logits = self(x)
        return F.cross_entropy(logits.flatten(0, 1), y.flatten())

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch), prog_bar=True)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        opt = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay, betas=(0.9, 0.95))
        total = max(self.trainer.max_steps, hp.warmup_steps + 1) if self.trainer.max_steps > 0 else 1000

        def schedule(step: int) -> float:
            if step < hp.warmup_steps:
                return (step + 1) / hp.warmup_steps
            progress = min(1.0, (step - hp.warmup_steps) / max(1, total - hp.warmup_steps))
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def read_stdlib(max_bytes: int) -> Tensor:
    """The bytes of the standard library's ``.py`` files (sorted by path, tests and installed
    packages left out), up to ``max_bytes``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "__pycache__"}
    paths = []
    for folder, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in skip]
        paths += [Path(folder) / f for f in files if f.endswith(".py")]
    chunks, total = [], 0
    for path in sorted(paths):
        try:
            data = path.read_bytes()
        except OSError:
            continue
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)[:max_bytes]), dtype=torch.uint8).long()


class _Windows(Dataset):
    def __init__(self, data: Tensor, block_size: int, n: int, seed: int) -> None:
        self.data, self.block_size = data, block_size
        g = torch.Generator().manual_seed(seed)
        self.offsets = torch.randint(0, len(data) - block_size - 1, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        o = int(self.offsets[i])
        chunk = self.data[o : o + self.block_size + 1]
        return chunk[:-1], chunk[1:]


class StdlibText(L.LightningDataModule):
    """Random windows of the standard library's source text (no download: it is on every machine).

    Args:
        max_bytes: how much text to read (the last 10% is held out for validation).
        block_size: window length (the model's context).
        batch_size: windows per batch (per pipeline replica).
        train_windows, val_windows: samples per epoch.
        seed: where the windows start.
    """

    def __init__(self, max_bytes: int = 2_000_000, block_size: int = 64, batch_size: int = 32,
                 train_windows: int = 32_000, val_windows: int = 512, seed: int = 0) -> None:  # fmt: skip
        super().__init__()
        self.max_bytes, self.block_size, self.batch_size = max_bytes, block_size, batch_size
        self.train_windows, self.val_windows, self.seed = train_windows, val_windows, seed
        self._data: Optional[Tensor] = None

    def setup(self, stage: str) -> None:
        if self._data is None:
            self._data = read_stdlib(self.max_bytes)

    def _split(self) -> tuple[Tensor, Tensor]:
        assert self._data is not None
        cut = int(len(self._data) * 0.9)
        return self._data[:cut], self._data[cut:]

    def train_dataloader(self) -> DataLoader:
        train, _ = self._split()
        return DataLoader(_Windows(train, self.block_size, self.train_windows, self.seed), self.batch_size,
                          shuffle=False, drop_last=True)  # fmt: skip

    def val_dataloader(self) -> DataLoader:
        _, val = self._split()
        return DataLoader(_Windows(val, self.block_size, self.val_windows, self.seed + 1), self.batch_size,
                          drop_last=True)  # fmt: skip
