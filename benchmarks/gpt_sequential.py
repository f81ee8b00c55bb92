"""The main job's GPT (examples/chargpt.py, written nanoGPT's way) as an ``nn.Sequential`` of the
same layer objects: embedding, blocks, head. For the peers that split only Sequentials
(torch.distributed.pipelining's manual stages) and for timing the Sequential form against the
original. The head gets its own copy of the tied weight (same values: the same arithmetic; the
peers cannot keep a tie across stages)."""

from __future__ import annotations

import copy
import os
import sys

import torch
from torch import Tensor, nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))

from chargpt import GPT  # noqa: E402


class Embed(nn.Module):
    def __init__(self, gpt: GPT) -> None:
        super().__init__()
        self.wte, self.wpe, self.drop = gpt.transformer.wte, gpt.transformer.wpe, gpt.transformer.drop

    def forward(self, idx: Tensor) -> Tensor:
        return self.drop(self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device)))


class Head(nn.Module):
    def __init__(self, gpt: GPT) -> None:
        super().__init__()
        self.ln_f, self.lm_head = gpt.transformer.ln_f, copy.deepcopy(gpt.lm_head)

    def forward(self, x: Tensor) -> Tensor:
        return self.lm_head(self.ln_f(x))


def sequential_gpt(gpt: GPT) -> nn.Sequential:
    """``gpt``'s layers as a Sequential (the blocks are the same objects)."""
    return nn.Sequential(Embed(gpt), *gpt.transformer.h, Head(gpt))
