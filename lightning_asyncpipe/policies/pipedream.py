"""PipeDream: 1F1B with weight stashing (Narayanan et al., SOSP 2019, section 3.3).

Step x stage table, p = 3, m = 1 (``F5v3``: forward of micro-batch 5 on weights ``W_s(3)``)::

    stage 0:  F0v0 F1v0 F2v0 B0 U F3v1 B1 U F4v2 B2 U F5v3 ...   delay p-1-s = 2
    stage 1:       F0v0 F1v0 B0 U F2v1 B1 U F3v2 B2 U ...         delay 1
    stage 2:            F0v0 B0 U F1v1 B1 U F2v2 B2 U ...         delay 0

- forward of micro-batch ``j`` at stage ``s`` uses the latest weights,
  ``W_s(floor(max(0, j - (p-1-s)) / m))``; its backward uses that same stashed version;
- the update applies the gradient to the latest weights: ``W(t+1) = W(t) - lr * g(W(t - delay))``;
- stage ``s`` holds one version per distinct version in flight: ``p - s`` when ``m = 1``.

``vertical_sync=True`` (section 3.3, "vertical sync"): every stage uses, for micro-batch ``j``,
the version stage 0 used for it, ``W_s(floor(max(0, j - (p-1)) / m))``: a uniform delay across
stages, at the cost of keeping more versions on later stages.
"""

from __future__ import annotations

from typing import ClassVar

from lightning_asyncpipe.policies.registry import register_policy
from lightning_asyncpipe.policies.stash import StashingPolicy

__all__ = ["PipeDreamPolicy"]


@register_policy
class PipeDreamPolicy(StashingPolicy):
    """PipeDream weight stashing, optionally with vertical sync.

    Args:
        vertical_sync: use stage 0's version of each micro-batch at every stage.
    """

    name: ClassVar[str] = "pipedream"

    def __init__(self, vertical_sync: bool = False) -> None:
        super().__init__()
        self.vertical_sync = vertical_sync

    def forward_version_at(self, stage: int, microbatch: int) -> int:
        return super().forward_version_at(0 if self.vertical_sync else stage, microbatch)

    def forward_version(self, microbatch: int) -> int:
        if not self.vertical_sync:
            return self.updates  # the latest weights at forward time
        m, rel = self.n_microbatches, microbatch - self.fill_step * self.n_microbatches
        return self.fill_update + max(0, rel - (self.n_stages - 1)) // m
