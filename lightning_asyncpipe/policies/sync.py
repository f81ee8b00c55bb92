"""Synchronous policies: GPipe, 1F1B with a flush (PipeDream-Flush) and zero-bubble ZB-H1. All
equal ordinary training with gradient accumulation over the micro-batches: one weight version,
delay 0."""

from __future__ import annotations

from typing import ClassVar

from lightning_asyncpipe.errors import PipelineConfigError
from lightning_asyncpipe.policies.base import WeightPolicy
from lightning_asyncpipe.policies.registry import register_policy
from lightning_asyncpipe.schedule import Action, gpipe, one_f_one_b, zero_bubble_h1

__all__ = ["GPipePolicy", "PipeDreamFlushPolicy", "ZeroBubblePolicy"]


class _Synchronous(WeightPolicy):
    synchronous: ClassVar[bool] = True

    def forward_version_at(self, stage: int, microbatch: int) -> int:
        return self.updates  # every stage runs batch k on W(k)

    def drain_actions(self, n_stages: int, n_microbatches: int, stage: int, step: int, fill_step: int) -> list[Action]:
        return []  # every step ends with an empty pipeline


@register_policy
class GPipePolicy(_Synchronous):
    """GPipe (Huang et al., 2019): all forwards, then all backwards, then one update per batch.

    Every stage holds up to ``m`` micro-batches of activations; bubble ``(p-1)/(m+p-1)``.
    """

    name: ClassVar[str] = "gpipe"

    def step_actions(self, n_stages: int, n_microbatches: int, stage: int, step: int, fill_step: int) -> list[Action]:
        return gpipe(n_stages, n_microbatches, step)[stage]


@register_policy
class PipeDreamFlushPolicy(_Synchronous):
    """PipeDream-Flush (Narayanan et al., ICML 2021, section 3): 1F1B within a batch, then a flush.

    Same result and bubble as GPipe, but stage ``s`` holds at most ``p-s`` micro-batches in flight.
    """

    name: ClassVar[str] = "pipedream_flush"

    def step_actions(self, n_stages: int, n_microbatches: int, stage: int, step: int, fill_step: int) -> list[Action]:
        return one_f_one_b(n_stages, n_microbatches, step)[stage]


@register_policy
class ZeroBubblePolicy(_Synchronous):
    """ZB-H1 (Qi et al., ICLR 2024, "Zero Bubble Pipeline Parallelism", section 2.1): 1F1B within a
    batch with each backward split into ``B`` (input gradient) and ``W`` (weight gradient), the
    ``W`` actions moved into 1F1B's cool-down bubble; then a flush.

    Same result as GPipe: ``W(j)`` computes the ``nn.Linear`` weight gradients of micro-batch ``j``
    from the input and output gradient its ``B`` kept (:mod:`lightning_asyncpipe.wgrad`), and all
    of a batch's ``W`` run before its update (which computes the rest, with ``merge_weight_grads``). Other layers' weight gradients (and every layer's
    with ``defer_weight_grad=False``) are computed in ``B``, as with 1F1B. With equal forward,
    input-gradient and weight-gradient times the bubble is a third of 1F1B's; every stage holds at
    most ``p`` micro-batches' activations or kept ``(x, g)`` (stage 0's 1F1B peak; ``m`` with
    ``merge_weight_grads``).
    See :func:`lightning_asyncpipe.schedule.zero_bubble_h1` for the table.

    Args:
        merge_weight_grads: keep ``W`` actions only in the cool-down, where they fill the bubble,
            and compute the other weight gradients at the update in one GEMM per layer over their
            micro-batches. Faster where the weight gradient of one small micro-batch costs more than
            its share of the batch's (on CPUs, small micro-batches), the same otherwise; every stage
            then keeps the ``(x, g)`` of all ``m`` micro-batches until the update, as
            ``pipedream_flush`` does. The result is the same (exact like GPipe).
    """

    name: ClassVar[str] = "zero_bubble"

    def __init__(self, merge_weight_grads: bool = False) -> None:
        super().__init__()
        if not isinstance(merge_weight_grads, bool):
            raise PipelineConfigError(
                f"zero_bubble: merge_weight_grads must be true or false, got {merge_weight_grads!r}."
            )
        self.merge_weight_grads = merge_weight_grads

    def step_actions(self, n_stages: int, n_microbatches: int, stage: int, step: int, fill_step: int) -> list[Action]:
        return zero_bubble_h1(n_stages, n_microbatches, step, self.merge_weight_grads)[stage]
