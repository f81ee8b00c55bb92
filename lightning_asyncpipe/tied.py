"""Parameters that several stages hold: one logical parameter in several copies.

A GPT's head tied to its token embedding is used by the first stage (the embedding) and by the
last (the head); each of them holds a copy (:attr:`~lightning_asyncpipe.partition.Partition.shared`).
For synchronous policies the copies stay one parameter: before each update the holders'
gradients are summed (an all-reduce over the holders, per replica), so every holder applies the
same update to the same weights and the copies stay bitwise equal; gradient clipping counts the
parameter once (on its first holder). Which version each holder's passes would see under an
asynchronous policy is not defined yet, so those refuse shared parameters at setup.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from lightning_asyncpipe.topology import Topology

__all__ = ["SharedParameters"]


class SharedParameters:
    """The copies of shared parameters this stage holds, and how to keep them equal.

    Every rank must construct it, in the same order (it creates one process group per shared
    parameter and replica).

    Args:
        shared: parameter name -> the stages that hold it.
        local: this stage's copies by the same names.
        stage: this stage.
        topology: stages and replicas.
        rank: this process's global rank.
    """

    def __init__(self, shared: Mapping[str, Sequence[int]], local: Mapping[str, nn.Parameter], stage: int,
                 topology: Topology, rank: int) -> None:  # fmt: skip
        self.groups: dict[str, object] = {}
        for name in sorted(shared):
            for replica in range(topology.n_replicas):
                ranks = [topology.rank_of(s, replica) for s in shared[name]]
                group = dist.new_group(ranks) if dist.is_initialized() else None
                if rank in ranks:
                    self.groups[name] = group
        self.params = {name: local[name] for name in self.groups}
        self._counted_elsewhere = {id(p) for name, p in self.params.items() if shared[name][0] != stage}

    def __bool__(self) -> bool:
        return bool(self.params)

    def sum_gradients(self) -> None:
        """Sum each shared parameter's gradient over its holders (collective over the holders)."""
        for name, p in self.params.items():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, group=self.groups[name])

    def counts_in_norm(self, p: nn.Parameter) -> bool:
        """Whether this stage counts ``p`` in a norm over all stages (each parameter once)."""
        return id(p) not in self._counted_elsewhere
