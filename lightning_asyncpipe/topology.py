"""Which stage and which pipeline replica each global rank holds.

``devices = stages x replicas``. The mapping puts the *last* stage of replica 0 on global rank 0,
because the last stage is where the loss, ``self.log`` values and predictions exist, and rank 0 is
where Lightning's loggers, progress bar and checkpoint writer live::

    rank    = replica * stages + (stages - 1 - stage)
    stage   = stages - 1 - rank % stages
    replica = rank // stages

    4 devices, 2 stages x 2 replicas:   rank 0 -> (stage 1, replica 0)   rank 1 -> (stage 0, replica 0)
                                        rank 2 -> (stage 1, replica 1)   rank 3 -> (stage 0, replica 1)
"""

from __future__ import annotations

from dataclasses import dataclass

from lightning_asyncpipe.errors import PipelineConfigError

__all__ = ["Topology"]


@dataclass(frozen=True)
class Topology:
    """The pipeline layout of a world of ``world_size`` processes.

    Args:
        world_size: total number of processes (``devices x num_nodes``).
        n_stages: pipeline stages per replica.

    Raises:
        PipelineConfigError: if ``world_size`` is not a multiple of ``n_stages``.
    """

    world_size: int
    n_stages: int

    def __post_init__(self) -> None:
        if self.n_stages < 1:
            raise PipelineConfigError(f"Topology requires stages >= 1, got stages={self.n_stages}.")
        if self.world_size % self.n_stages != 0:
            raise PipelineConfigError(
                f"Topology requires the number of processes ({self.world_size}) to be divisible by the number of "
                f"pipeline stages ({self.n_stages}): devices = stages x replicas. Use devices="
                f"{self.n_stages * max(1, self.world_size // self.n_stages)} or stages dividing {self.world_size}."
            )

    @property
    def n_replicas(self) -> int:
        return self.world_size // self.n_stages

    def stage_of(self, rank: int) -> int:
        return self.n_stages - 1 - rank % self.n_stages

    def replica_of(self, rank: int) -> int:
        return rank // self.n_stages

    def rank_of(self, stage: int, replica: int) -> int:
        return replica * self.n_stages + (self.n_stages - 1 - stage)

    def pipeline_ranks(self, replica: int) -> list[int]:
        """Global ranks of one pipeline replica, ordered by stage (stage 0 first)."""
        return [self.rank_of(s, replica) for s in range(self.n_stages)]

    def stage_ranks(self, stage: int) -> list[int]:
        """Global ranks holding ``stage`` in every replica (the data-parallel group of that stage)."""
        return [self.rank_of(stage, r) for r in range(self.n_replicas)]
